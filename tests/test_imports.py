"""The CPU side of the package must not load vllm, torch or transformers (checked in a fresh process)."""

import subprocess
import sys

CPU_MODULES = [
    "flip_ray",
    "flip_ray.config",
    "flip_ray.io",
    "flip_ray.metrics",
    "flip_ray.parsing",
    "flip_ray.prompts",
    "flip_ray.records",
    "flip_ray.schema",
    "flip_ray.scoring",
    "flip_ray.similarity",
    "flip_ray.judge",
    "flip_ray.evalstats",
    "flip_ray.evaluate",
    "flip_ray.pairjudge",
    "flip_ray.likelihood",
    "flip_ray.flags",
    "flip_ray.selection",
    "flip_ray.store",
    "flip_ray.tracker",
    "flip_ray.downstream",
    "flip_ray.report",
    "flip_ray.stages",
    "flip_ray.pipeline",
    "flip_ray.model",
    "flip_ray.engine",
    "flip_ray.scorer",
    "flip_ray.cli",
]


def test_cpu_modules_import_no_heavy_frameworks():
    code = (
        "import sys\n"
        f"for m in {CPU_MODULES!r}: __import__(m)\n"
        "heavy = sorted(m for m in ('vllm', 'torch', 'transformers') if m in sys.modules)\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"imported at module level: {out.stdout.strip()}"
