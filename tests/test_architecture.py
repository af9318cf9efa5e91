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


# ----------------------------------------------------------------------------- the evaluation package
EVAL = PKG / "evaluation"
ANALYSES = EVAL / "analyses"


def _analysis_of(path: Path) -> str | None:
    rel = path.relative_to(EVAL).parts
    return rel[1] if rel[0] == "analyses" and len(rel) > 2 else None


def test_the_evaluation_package_has_at_most_ten_top_level_modules_and_no_flat_analyses():
    top = sorted(p.name for p in EVAL.glob("*.py"))
    assert len(top) <= 10, top
    assert not (EVAL / "analyses.py").exists()  # registrations live beside their analyses


def test_analyses_import_metrics_attacks_and_infrastructure_never_the_runner_nor_each_others_modules():
    """An analysis may use another one only through that package's public names (its __init__), never its modules;
    none imports the runner; the shared math imports no analysis, runner or model."""
    bad = []
    for p in sorted(ANALYSES.rglob("*.py")):
        mine = _analysis_of(p)
        for name in imports_of(p):
            if name.startswith("neuroguide.evaluation.runner"):
                bad.append(f"{p.relative_to(PKG)} imports {name}")
            parts = name.split(".")
            if name.startswith("neuroguide.evaluation.analyses.") and len(parts) > 4 and parts[3] != mine \
                    and (ANALYSES / parts[3] / f"{parts[4]}.py").exists():
                bad.append(f"{p.relative_to(PKG)} imports {name}, a module of another analysis")
    for p in sorted((EVAL / "metrics").rglob("*.py")):
        bad += [f"{p.relative_to(PKG)} imports {n}" for n in imports_of(p)
                if n.startswith(("neuroguide.evaluation.analyses", "neuroguide.evaluation.runner",
                                 "neuroguide.evaluation.stimuli", "neuroguide.models", "neuroguide.tasks"))]
    assert not bad, bad


def test_the_architecture_rule_sees_an_import_of_another_analysis_module(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("from neuroguide.evaluation.analyses.transfer.fixed_eps import random_like\n")
    name = imports_of(f)[0]
    parts = name.split(".")
    assert parts[3] == "transfer" and (ANALYSES / parts[3] / f"{parts[4]}.py").exists()


def test_every_analysis_package_registers_itself_in_its_init():
    decorators = ("per_model", "multi_model", "standalone")
    for pkg in sorted(p for p in ANALYSES.iterdir() if (p / "__init__.py").exists()):
        calls = {node.func.id for node in ast.walk(ast.parse((pkg / "__init__.py").read_text()))
                 if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in decorators}
        assert calls, f"{pkg.name}/__init__.py registers nothing"
        elsewhere = [str(p.relative_to(PKG)) for p in pkg.rglob("*.py") if p.name != "__init__.py"
                     and any(f"@{d}(" in p.read_text() for d in decorators)]
        assert not elsewhere, elsewhere


def test_each_kind_is_named_in_one_table_only():
    """No string-keyed table of model kinds outside the tasks' declarations (neuroguide/tasks/kinds.py)."""
    kinds = ("predictor", "guidance", "it_encoding", "encoding")
    bad = []
    for p in modules():
        if p.parts[-2] == "tasks" or "models" in p.relative_to(PKG).parts:
            continue
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.Dict) and sum(isinstance(k, ast.Constant) and k.value in kinds
                                                  for k in node.keys) >= 2:
                bad.append(f"{p.relative_to(PKG)}:{node.lineno}")
            if isinstance(node, ast.Compare) and any(isinstance(c, ast.Constant) and c.value in kinds
                                                     for c in node.comparators) and "task" in ast.unparse(node.left):
                bad.append(f"{p.relative_to(PKG)}:{node.lineno} {ast.unparse(node)}")
    assert not bad, bad
