"""The package's shape: no import cycle, dependencies pointing one way down the pipeline, short functions.

Every import of a ``retina_scale`` module is read from the source with ``ast``, including the imports
inside functions (which would otherwise hide a cycle), so these checks do not import TensorFlow.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "retina_scale"

# The pipeline's layers, in order: a module may import from its own layer or an earlier one.
LAYERS = [
    ("utils",),
    ("config", "run_layout"),
    ("grading",),
    ("data", "models"),
    ("serving",),
    ("training.checkpoint", "training.distribute", "training.optim", "training.stage"),
    ("training.tuning", "training.fusion"),
    ("training.stepwise",),
    ("evidence",),
    ("commands", "cli", "__main__"),
]

MAX_FUNCTION_LINES = 80


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def package_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imported_modules(path: Path, name: str, known: set[str]) -> set[str]:
    """The ``retina_scale`` modules ``path`` imports anywhere in its body (resolved to known modules)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        targets = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            # "from a.b import c" imports a.b, or the module a.b.c when c is one
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = package_modules()
    known = set(modules)
    return {name: imported_modules(path, name, known) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a list of nodes (first == last), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def layer_of(module: str) -> int:
    rel = module.removeprefix("retina_scale").lstrip(".")
    best, best_len = None, -1
    for rank, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (rel == prefix or rel.startswith(prefix + ".")) and len(prefix) > best_len:
                best, best_len = rank, len(prefix)
    if rel == "":
        return 0  # the package itself: its __init__ imports nothing
    if rel == "training":
        return LAYERS.index(("training.checkpoint", "training.distribute", "training.optim", "training.stage"))
    if best is None:
        raise AssertionError(f"module {module} has no layer in tests/test_architecture.py's LAYERS; add it")
    return best


def test_the_cycle_finder_finds_a_hidden_cycle_and_accepts_a_chain():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"x": {"y"}, "y": {"y2"}, "y2": {"y"}}) == ["y", "y2", "y"]


def test_imports_inside_functions_are_seen(tmp_path):
    source = tmp_path / "mod.py"
    source.write_text("import os\n\ndef f():\n    from retina_scale.training import stepwise\n"
                      "    from retina_scale.grading.kappa import confusion_matrix\n")
    known = {"retina_scale.training", "retina_scale.training.stepwise", "retina_scale.grading.kappa"}
    assert imported_modules(source, "retina_scale.x", known) == {"retina_scale.training.stepwise",
                                                                 "retina_scale.grading.kappa"}


def test_no_import_cycle_in_the_package():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_dependencies_point_one_way_down_the_pipeline():
    upward = []
    for module, imports in import_graph().items():
        for target in imports:
            if layer_of(target) > layer_of(module):
                upward.append(f"{module} imports {target}")
    assert not upward, "imports against the pipeline's order:\n" + "\n".join(sorted(upward))


def function_lengths():
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                start = min([node.lineno] + [d.lineno for d in node.decorator_list])
                yield f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name}", node.end_lineno - start + 1


def test_no_function_is_longer_than_a_screen():
    long = [f"{where} ({n} lines)" for where, n in function_lengths() if n > MAX_FUNCTION_LINES]
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines:\n" + "\n".join(long)


@pytest.mark.parametrize("module", ["retina_scale", "retina_scale.config", "retina_scale.run_layout",
                                    "retina_scale.cli", "retina_scale.grading.evaluation"])
def test_light_modules_do_not_import_tensorflow(module):
    """`retina-scale --help`, the config and the grading stay fast: TensorFlow is imported only when used."""
    import subprocess
    import sys

    code = f"import sys, {module}; print('tensorflow' in sys.modules, 'keras' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=PACKAGE.parent).stdout.split()
    assert out == ["False", "False"], f"importing {module} imported tensorflow/keras: {out}"
