"""The house rules, checked on the source: import layers, module size, registries by decorator."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "neuroguide"
# a module of the key's layer may not import any of these (at module level or inside functions)
FORBIDDEN = {
    "models": ("neuroguide.tasks", "neuroguide.evaluation", "neuroguide.train", "neuroguide.requirements",
               "neuroguide.data"),
    "data": ("neuroguide.tasks", "neuroguide.evaluation", "neuroguide.train", "neuroguide.requirements"),
    "attacks": ("neuroguide.tasks", "neuroguide.evaluation", "neuroguide.train", "neuroguide.requirements"),
    "utils": ("neuroguide.models", "neuroguide.data", "neuroguide.tasks", "neuroguide.evaluation", "neuroguide.train"),
    "tasks": ("neuroguide.evaluation", "neuroguide.train", "neuroguide.requirements"),
}


def imports_of(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names += [node.module] + [f"{node.module}.{a.name}" for a in node.names]
    return names


def modules(sub: str = "") -> list[Path]:
    return sorted((PKG / sub).rglob("*.py"))


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_no_import_from_a_lower_layer_to_a_higher_one(layer):
    bad = [f"{p.relative_to(PKG)} imports {name}" for p in modules(layer) for name in imports_of(p)
           if name.startswith(FORBIDDEN[layer])]
    assert not bad, bad


def test_the_rule_checker_sees_function_level_imports(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from neuroguide.tasks import get_task\n    return get_task\n")
    assert "neuroguide.tasks" in imports_of(f)


def test_no_module_over_450_lines():
    long = {str(p.relative_to(PKG)): n for p in modules() if (n := len(p.read_text().splitlines())) > 450}
    assert not long, long


def test_no_task_runs_the_training_entry_point():
    bad = [str(p) for p in modules("tasks") if "neuroguide.train" in " ".join(imports_of(p))
           or ".run(" in p.read_text() and "train" in p.read_text().split(".run(")[0][-40:]]
    assert not bad, bad


def test_registries_need_no_hand_kept_lists():
    """Every task module registers itself; get_task finds all of them by importing the package."""
    from neuroguide.models.registry import model_kinds
    from neuroguide.tasks import task_names

    decorated = sorted({node.args[0].value for p in modules("tasks") for node in ast.walk(ast.parse(p.read_text()))
                        if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "register_task"
                        and node.args and isinstance(node.args[0], ast.Constant)})
    assert task_names() == decorated and {"predictor", "guidance", "it_encoding"} <= set(decorated)
    assert set(decorated) <= set(model_kinds())  # every task's model kind has a builder in models/
    assert "_MODULES" not in (PKG / "tasks" / "__init__.py").read_text()
