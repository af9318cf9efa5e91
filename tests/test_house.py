"""The house: every config option composes, analyses and their configs match one to one, an analysis is one
package plus one config, a kind is declared once, and evaluate.py's seed is read."""
from __future__ import annotations

import json
import textwrap

import pytest
from omegaconf import OmegaConf

from neuroguide.config import CONF_DIR, compose_config

# groups chosen on the command line of train.py as <group>=<option> (the others are placed by their users:
# datamodule/ by the tasks, backbone/ by the tasks that have a backbone, eval/ by evaluate.py)
TRAIN_GROUPS = ("data", "region", "task", "trainer", "logger", "callbacks", "paths")


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


@pytest.mark.parametrize("group", TRAIN_GROUPS)
def test_every_option_of_every_train_group_composes(group, tmp_path):
    for option in _options(group):
        cfg = compose_config("train", [f"{group}={option}"], output_dir=tmp_path)
        assert OmegaConf.select(cfg, group) is not None, (group, option)


def test_every_backbone_datamodule_and_launcher_option_composes(tmp_path):
    for option in _options("backbone"):
        cfg = compose_config("train", ["task=encoding", f"backbone={option}"], output_dir=tmp_path)
        assert cfg.backbone.name, option
    seen = set()
    for task in _options("task"):
        cfg = compose_config("train", [f"task={task}"], output_dir=tmp_path)
        seen.add(cfg.task.datamodule._target_)
    assert len(seen) == len(_options("datamodule")) == 3  # each datamodule option is some task's
    for option in _options("hydra/launcher"):
        cfg = compose_config("train", [f"hydra/launcher={option}"], output_dir=tmp_path)
        assert cfg.task.name == "guidance", option


def test_every_experiment_composes_with_its_entry_point(tmp_path):
    for option in _options("experiment"):
        text = (CONF_DIR / "experiment" / f"{option}.yaml").read_text()
        entry = "evaluate" if "python evaluate.py" in text and "python train.py" not in text else "train"
        cfg = compose_config(entry, [f"experiment={option}"], output_dir=tmp_path)
        assert cfg is not None, option


def test_every_registered_analysis_has_its_config_and_the_reverse():
    from neuroguide.evaluation.registry import registered

    files = set(_options("eval"))
    names = registered()
    assert names == files, {"registered without conf/eval/<name>.yaml": sorted(names - files),
                            "conf/eval/<name>.yaml without an analysis": sorted(files - names)}
    for name in files:  # a config file configures its own analysis: its one top-level key is its name
        assert list(OmegaConf.load(CONF_DIR / "eval" / f"{name}.yaml")) == [name], name


def test_evaluate_reads_every_key_of_its_config():
    """Keys of evaluate.yaml that nothing reads are not offered (batch_size was one)."""
    src = "".join(p.read_text() for p in (CONF_DIR.parent / "neuroguide" / "evaluation").glob("*.py"))
    src += (CONF_DIR.parent / "neuroguide" / "run_names.py").read_text()
    top = [k for k in OmegaConf.load(CONF_DIR / "evaluate.yaml") if k != "defaults"]
    unread = [k for k in top if f'"{k}"' not in src and f"cfg.{k}" not in src]
    assert not unread, unread


# ----------------------------------------------------------------------------- adding an analysis
TOY = '''
"""A toy analysis: the mean of the model's output on the stimuli, times a factor."""
import torch

from neuroguide.evaluation.registry import per_model


@per_model("toy_mean")
def _toy(model, stim, out, p):
    with torch.no_grad():
        value = float(model(stim.images).mean()) * float(p["factor"])
    out.mkdir(parents=True, exist_ok=True)
    (out / "toy.txt").write_text(repr(value))
    return {"eval/toy_mean/value": value}
'''


def test_an_analysis_is_one_package_and_one_config(tmp_path, monkeypatch, guided_ckpts):
    """A new folder beside the analyses' packages and a conf/eval/<name>.yaml on Hydra's search path: evaluate.py's
    runner finds, configures and runs it, with no list edited anywhere."""
    import torch

    import neuroguide.evaluation.analyses as analyses
    from neuroguide.evaluation import registry
    from neuroguide.evaluation.runner import run
    from neuroguide.models.checkpoints import load_model

    pkgs = tmp_path / "pkgs"
    (pkgs / "toy_mean").mkdir(parents=True)
    (pkgs / "toy_mean" / "__init__.py").write_text(textwrap.dedent(TOY))
    conf = tmp_path / "conf" / "eval"
    conf.mkdir(parents=True)
    (conf / "toy_mean.yaml").write_text("toy_mean:\n  factor: 3.0\n")
    monkeypatch.setattr(analyses, "__path__", [*analyses.__path__, str(pkgs)])
    monkeypatch.setattr(registry, "PER_MODEL", dict(registry.PER_MODEL))
    import neuroguide.evaluation.runner as runner_mod

    monkeypatch.setattr(runner_mod, "PER_MODEL", registry.PER_MODEL)
    monkeypatch.delitem(__import__("sys").modules, "neuroguide.evaluation.analyses.toy_mean", raising=False)
    assert "toy_mean" in registry.registered()

    tmp, paths = guided_ckpts
    cfg = compose_config("evaluate", [f"hydra.searchpath=[file://{tmp_path / 'conf'}]", "eval=[toy_mean]",
                                      f"ckpt={paths[0]}", "n_images=4", "device=cpu", f"paths.log_dir={tmp_path}/o"],
                         output_dir=tmp_path / "out")
    metrics = run(cfg)
    model = load_model(paths[0])
    from neuroguide.evaluation.stimuli import model_stimuli

    with torch.no_grad():
        expected = float(model(model_stimuli(model, 4).images).mean()) * 3.0
    assert metrics["eval/toy_mean/value"] == pytest.approx(expected, rel=1e-5)
    assert json.loads((tmp_path / "out" / "metrics.json").read_text()) == metrics
    assert (tmp_path / "out" / "toy_mean" / "toy.txt").is_file()


# ----------------------------------------------------------------------------- adding a kind
def test_a_kind_is_declared_once_and_read_by_stimuli_run_names_and_report(monkeypatch):
    """A new task registered with its ModelKind: the region layer, the held-out stimuli, the run folder's factors
    and the report's factors all come from that one declaration."""
    import neuroguide.tasks as tasks
    from neuroguide import report, run_names
    from neuroguide.evaluation import responses, stimuli
    from neuroguide.tasks.kinds import ModelKind
    from torch import nn

    tasks.task_names()  # the real tasks first
    monkeypatch.setattr(tasks, "_TASKS", dict(tasks._TASKS))

    @tasks.register_task("toy_kind", kind=ModelKind(region_layer="head", penultimate_layer="body", stimuli="it",
                                                    name_factors=("region", "seed"), report_factors=("alpha",)))
    class ToyTask:
        pass

    class Toy(nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.head = nn.Linear(4, 3), nn.Linear(3, 2)

        def forward(self, x):
            return self.head(self.body(x.flatten(1)))

    m = Toy()
    m.neuroguide_info = {"model_kind": "toy_kind", "task_name": "toy_kind"}
    assert responses.resolve_layer(m, "region") == "head" and responses.resolve_layer(m, "penultimate") == "body"
    assert stimuli.stimuli_loader(m) is stimuli.it_stimuli
    assert run_names.core_factors("toy_kind") == ("region", "seed")
    f = report.factors_of({"task": {"name": "toy_kind"}, "region": {"name": "V1"}, "alpha": 0.3, "seed": 2})
    assert f["alpha"] == 0.3 and f["region"] is None and f["seed"] == 2
    with pytest.raises(TypeError, match="expected a ModelKind"):
        tasks.register_task("bad_kind", kind={"stimuli": "it"})(type("Bad", (), {}))


def test_every_task_declares_its_kind_and_kind_equals_the_task_name():
    from neuroguide.models.registry import model_kinds
    from neuroguide.tasks import get_task, model_kind, task_names
    from neuroguide.tasks.kinds import ModelKind

    for name in task_names():
        assert isinstance(model_kind(name), ModelKind) and get_task(name).task_name == name
    assert set(task_names()) <= set(model_kinds())


# ----------------------------------------------------------------------------- evaluate.py's seed
def test_evaluate_seed_fixes_the_random_draws_of_an_analysis(tmp_path, guided_ckpts):
    """Unit sensitivity's random starts come from eval.sensitivity.seed, which is evaluate.py's seed: the same seed
    gives the same numbers, another seed other numbers."""
    from conftest import evaluate_in

    tmp, paths = guided_ckpts
    small = ["eval=[sensitivity]", f"ckpt={paths[0]}", "n_images=4", "eval.sensitivity.n_images=2",
             "eval.sensitivity.units=3", "eval.sensitivity.steps=2", "eval.sensitivity.restarts=2",
             "eval.sensitivity.eps_list=[0.5]", "eval.sensitivity.layer=region"]
    a, _ = evaluate_in(tmp_path, "a", *small, "seed=0")
    b, _ = evaluate_in(tmp_path, "b", *small, "seed=0")
    c, _ = evaluate_in(tmp_path, "c", *small, "seed=1")
    key = "eval/sensitivity/l2_0.5/mean_norm"
    assert a[key] == b[key] and a[key] != c[key]
