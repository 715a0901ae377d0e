"""The training layer's imports point one way (stage, optim, checkpoint, distribute -> tuning -> stepwise),
inside functions too: the search never reaches the trainer, the trainer never reaches the search."""

import ast
from pathlib import Path

import pytest

import retina_scale

TRAINING = Path(retina_scale.__file__).parent / "training"


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports, at the top or inside a function (``from a import b`` counts as
    ``a`` and ``a.b``)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def test_the_walk_sees_imports_inside_functions(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from retina_scale.training import stepwise\n    import retina_scale.cli\n")
    assert {"retina_scale.training.stepwise", "retina_scale.cli"} <= _imports(module)


@pytest.mark.parametrize("name", sorted(p.stem for p in TRAINING.glob("*.py") if p.stem != "stepwise"))
def test_only_the_trainer_itself_imports_the_trainer(name):
    assert "retina_scale.training.stepwise" not in _imports(TRAINING / f"{name}.py")


def test_the_trainer_does_not_import_the_search():
    assert "retina_scale.training.tuning" not in _imports(TRAINING / "stepwise.py")


@pytest.mark.parametrize("name", sorted(p.stem for p in TRAINING.glob("*.py")))
def test_training_imports_no_later_layer(name):
    later = ("retina_scale.evidence", "retina_scale.commands", "retina_scale.cli")
    assert not [m for m in _imports(TRAINING / f"{name}.py") if m.startswith(later)]
