"""The CPU side of the package must not load vllm, torch or transformers (checked in a fresh process)."""

import subprocess
import sys
from pathlib import Path

# Every module of the package: vLLM, torch and transformers are imported inside functions only.
CPU_MODULES = ["flip_ray"] + sorted(
    f"flip_ray.{p.stem}"
    for p in (Path(__file__).resolve().parents[1] / "flip_ray").glob("*.py")
    if p.stem != "__init__"
)


def test_cpu_modules_import_no_heavy_frameworks():
    code = (
        "import sys\n"
        f"for m in {CPU_MODULES!r}: __import__(m)\n"
        "heavy = sorted(m for m in ('vllm', 'torch', 'transformers') if m in sys.modules)\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"imported at module level: {out.stdout.strip()}"


def test_no_import_cycle_and_no_builder_from_the_scoring_run():
    """Imports between flip_ray modules (lazy ones inside functions included) form no cycle, and no
    module takes a builder from the scoring run (`score`): builders live in `runtime` and `specs`."""
    import ast

    root = Path(__file__).resolve().parents[1] / "flip_ray"
    modules = {p.stem for p in root.glob("*.py")}
    graph, from_score = {}, set()
    for path in root.glob("*.py"):
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("flip_ray."):
                deps.add(node.module.split(".")[1])
                if node.module == "flip_ray.score":
                    from_score |= {a.name for a in node.names}
            elif isinstance(node, ast.Import):
                deps |= {a.name.split(".")[1] for a in node.names if a.name.startswith("flip_ray.")}
        graph[path.stem] = deps & modules
    state: dict[str, int] = {}

    def visit(node, trail):
        if state.get(node) == 1:
            raise AssertionError(f"import cycle: {' -> '.join([*trail, node])}")
        if state.get(node) != 2:
            state[node] = 1
            for dep in sorted(graph.get(node, ())):
                visit(dep, [*trail, node])
            state[node] = 2

    for module in sorted(graph):
        visit(module, [])
    assert from_score <= {"run_score", "RunStopped", "Terminated"}, from_score
