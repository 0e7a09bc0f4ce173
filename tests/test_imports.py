"""The CPU side of the package must not load vllm, torch or transformers (checked in a fresh process)."""

import subprocess
import sys
from pathlib import Path

# Modules that vLLM itself loads by name inside the engine (a logits processor must subclass vLLM's
# class); flip_ray imports them only inside functions (`engine.generation.FlipGenerator.copy_blocked`).
VLLM_PLUGINS = {"flip_ray.engine.copy_block"}
# Every other module of the package: vLLM, torch and transformers are imported inside functions only.
CPU_MODULES = sorted(
    m
    for p in (Path(__file__).resolve().parents[1] / "flip_ray").rglob("*.py")
    if (
        m := ".".join(p.relative_to(Path(__file__).resolve().parents[1]).with_suffix("").parts).removesuffix(
            ".__init__"
        )
    )
    not in VLLM_PLUGINS
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


ROOT = Path(__file__).resolve().parents[1] / "flip_ray"


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def import_graph() -> tuple[dict[str, set[str]], set[str]]:
    """Module -> the flip_ray modules it imports, every form counted (`import flip_ray.x`, `from
    flip_ray.x import y`, `from flip_ray import x`, `from flip_ray.pkg import sub`, relative imports),
    at module level or inside functions; and the names taken from the scoring run (`score`)."""
    import ast

    modules = {module_name(p) for p in ROOT.rglob("*.py")}
    graph, from_score = {}, set()
    for path in ROOT.rglob("*.py"):
        me = module_name(path)
        package = me if path.name == "__init__.py" else me.rpartition(".")[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the package, up level - 1
                    anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join([*anchor, *([base] if base else [])])
                if not base.startswith("flip_ray"):
                    continue
                for alias in node.names:  # `from pkg import sub` imports the submodule
                    deps.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
                if base == "flip_ray.recipe":
                    from_score |= {a.name for a in node.names}
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name.startswith("flip_ray")}
        graph[me] = {d for d in deps if d in modules and d != me}
    return graph, from_score


def test_the_import_graph_sees_every_form():
    graph, _ = import_graph()
    assert "flip_ray.rewards" in graph["flip_ray.schema"]  # `from flip_ray import rewards`
    assert "flip_ray.rewards.flip" in graph["flip_ray.rewards.registry"]  # `from flip_ray.rewards.flip import X`
    assert "flip_ray.engine.generation" in graph["flip_ray.rewards.flip"]  # inside a function


def test_no_import_cycle_and_no_builder_from_the_scoring_run():
    """Imports between flip_ray modules (lazy ones inside functions included) form no cycle, and no
    module takes a builder from the scoring run (`score`): builders live in `runtime` and `specs`.
    A submodule's import of its own package's other submodules is an edge to those only (Python
    runs the package's `__init__` first, which is not a dependency of the submodule)."""
    graph, from_score = import_graph()
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


# The packages from the bottom up: a module may import its own package and those below it, never one
# above (every import form counted, lazy ones inside functions too).
LAYERS = [
    ("flip_ray", "flip_ray.text"),  # the package's version; pure text functions and row rules
    ("flip_ray.engine",),  # the vLLM side
    ("flip_ray.rewards",),  # the registry and each reward
    ("flip_ray.schema",),  # the output schema, built from the registry
    ("flip_ray.input",),  # reading the input into rows
    ("flip_ray.config",),  # the typed configs, checked (each reward checks its own keys)
    ("flip_ray.job",),  # the scoring job's steps
    ("flip_ray.downstream",),  # filter, best-of-N, pairs, report
    ("flip_ray.recipe",),  # the scoring run: the steps in order
    ("flip_ray.evaluation",),  # evaluating rewards on preference data (runs scoring runs)
    ("flip_ray.scorer", "flip_ray.cli"),  # the public entry points
]


def layer_of(module: str) -> int:
    for level, names in enumerate(LAYERS):
        if module in names or any(module.startswith(n + ".") for n in names if n != "flip_ray"):
            return level
    raise AssertionError(f"{module} is in no layer: add its package to LAYERS")


def test_packages_import_only_downwards():
    graph, _ = import_graph()
    upward = [
        f"{m} ({LAYERS[layer_of(m)][0]}) imports {d} ({LAYERS[layer_of(d)][0]})"
        for m, deps in sorted(graph.items())
        for d in sorted(deps)
        if layer_of(d) > layer_of(m)
    ]
    assert not upward, "\n".join(upward)
