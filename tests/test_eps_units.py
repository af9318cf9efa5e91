"""Units of eps (issue 21): a Linf eps >= 1 is refused and a k/255 value as an L2 eps warned about, by one function
(neuroguide.attacks.eps.check_eps_units) called wherever an eps comes in: at.* (train.py), every eps key of
conf/eval/*.yaml (evaluate.py, before any model is loaded) and loop.eps (closed_loop.py)."""
from __future__ import annotations

import logging
import re
import pytest
from omegaconf import OmegaConf

from neuroguide.attacks import eps as eps_mod
from neuroguide.attacks.eps import check_eps_units
from neuroguide.config import CONF_DIR, compose_config
from neuroguide.evaluation.checks import EPS_KEYS, NOT_RADII


@pytest.fixture(autouse=True)
def fresh_warnings(monkeypatch, caplog):
    """Each test sees its own warnings (they are said once per key and value in a process)."""
    monkeypatch.setattr(eps_mod, "_WARNED", set())
    caplog.set_level(logging.WARNING, logger="neuroguide")


def _unit_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "as an L2 eps" in r.getMessage()]


# ------------------------------------------------------------------------------------------- the one check
def test_linf_eps_of_one_or_more_is_refused_with_the_k_255_hint():
    with pytest.raises(ValueError, match=r"at\.eps=8: images are in \[0, 1\].*did you mean at\.eps=8/255\?"):
        check_eps_units(8.0, "linf", "at.eps", 8)
    with pytest.raises(ValueError, match=r"x holds 1: .*did you mean x=\[1/255\]\?"):
        check_eps_units(1.0, "fgsm", "x", 1, in_list=True)
    assert check_eps_units(8 / 255, "linf", "at.eps") == 8 / 255
    assert check_eps_units(0.99, "linf", "at.eps") == 0.99  # large, but inside the pixel range


def test_k_255_as_l2_eps_is_warned_about_once_and_usual_l2_budgets_are_not(caplog):
    for e in (0.1, 0.2, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 0.05, 0.125):  # none is a k/255 with k <= 32
        assert check_eps_units(e, "l2", "eval.sensitivity.eps_list") == e
    assert _unit_warnings(caplog) == []
    for k in (1, 4, 8, 16, 32):
        check_eps_units(k / 255, "l2", "at.eps", f"{k}/255")
        check_eps_units(k / 255, "l2", "at.eps", f"{k}/255")  # the config check and the run: said once
    msgs = _unit_warnings(caplog)
    assert len(msgs) == 5
    assert msgs[2].startswith("at.eps=8/255: that is 8/255 = 0.0314 as an L2 eps")
    assert "L2 budgets are usually 0.25-3" in msgs[2] and "at 32-224 px" in msgs[2] and "at.norm=linf" in msgs[2]


# ------------------------------------------------------------------------------------------- train.py
def test_train_refuses_at_eps_8_with_linf_before_anything_is_written(compose_train, tmp_path):
    from neuroguide.train import run

    cfg = compose_train("at.eps=8", "at.norm=linf")
    with pytest.raises(ValueError, match=r"at\.eps=8: .*whole pixel range.*did you mean at\.eps=8/255\?"):
        run(cfg)
    assert not (tmp_path / "run").exists() and not (tmp_path / "data").exists()  # stopped at once


def test_train_warns_about_8_255_under_the_default_l2_norm(compose_train, caplog):
    from neuroguide.tasks import get_task

    cfg = compose_train("at.eps=8/255")
    get_task(cfg.task.name).check_config(cfg)
    msgs = _unit_warnings(caplog)
    assert len(msgs) == 1 and msgs[0].startswith("at.eps=8/255: that is 8/255") and "at.norm=linf" in msgs[0]
    caplog.clear()
    get_task(cfg.task.name).check_config(compose_train("at.eps=8/255", "at.norm=linf"))
    get_task(cfg.task.name).check_config(compose_train("at.eps=1.0"))
    assert _unit_warnings(caplog) == []


# ------------------------------------------------------------------------------------------- evaluate.py
def _eps_keys(node, prefix="") -> set[str]:
    out = set()
    for k, v in node.items():
        path = f"{prefix}{k}"
        if re.search(r"(^|_)eps($|_)", str(k)) and not isinstance(v, dict):  # eps, eps_l2, brain_eps (not steps)
            out.add(path)
        if isinstance(v, dict):
            out |= _eps_keys(v, f"{path}.")
    return out


def test_every_eps_key_of_conf_eval_is_checked():
    found = set()
    for f in sorted((CONF_DIR / "eval").glob("*.yaml")):
        found |= _eps_keys(OmegaConf.to_container(OmegaConf.load(f)))
    listed = {f"{a}.{k}" for a, keys in EPS_KEYS.items() for k, _ in keys} | set(NOT_RADII)
    assert found, "no eps keys found in conf/eval"
    assert found <= listed, f"eps keys of conf/eval/*.yaml not in neuroguide.evaluation.checks.EPS_KEYS: {found - listed}"
    assert listed <= found, f"EPS_KEYS names keys that conf/eval/*.yaml lacks: {listed - found}"


def _cases():
    for analysis, keys in EPS_KEYS.items():
        for key, norm in keys:
            yield pytest.param(analysis, key, norm, id=f"{analysis}.{key}")


@pytest.mark.parametrize("analysis,key,norm", list(_cases()))
def test_evaluate_checks_every_eps_key_before_loading_a_model(analysis, key, norm, tmp_path, caplog):
    from neuroguide.evaluation.runner import EvaluationFailed, run

    default = OmegaConf.select(OmegaConf.load(CONF_DIR / "eval" / f"{analysis}.yaml"), f"{analysis}.{key}")
    listed = not isinstance(default, (str, int, float, type(None)))
    full = f"eval.{analysis}.{key}"
    base = [f"eval=[{analysis}]", f"ckpt={tmp_path}/absent/model.ckpt", f"paths.log_dir={tmp_path}/outputs"]
    if norm != "l2":  # a Linf eps of 8: refused, naming the key and 8/255, before the (absent) model is looked at
        over = [f"{full}={'[8]' if listed else 8}"]
        if norm.startswith("@"):
            over.append(f"eval.{analysis}.{norm[1:]}=linf")
        cfg = compose_config("evaluate", base + over, output_dir=tmp_path / "eval")
        with pytest.raises(ValueError, match=rf"{full} (holds 8|=8): .*whole pixel range.*{full}=\[?8/255\]?\?"):
            run(cfg)
        assert not (tmp_path / "eval" / "metrics.json").exists()
    if norm != "linf":  # 8/255 as an L2 eps: warned about, naming the key
        over = [f"{full}={'[8/255]' if listed else '8/255'}"]
        if norm.startswith("@"):
            over.append(f"eval.{analysis}.{norm[1:]}=l2")
        cfg = compose_config("evaluate", base + over, output_dir=tmp_path / "eval_l2")
        with pytest.raises(EvaluationFailed, match="eval/model/failed: FileNotFoundError"):  # then the absent model
            run(cfg)
        msgs = _unit_warnings(caplog)
        assert len(msgs) == 1 and msgs[0].startswith(f"{full} ") and "L2 budgets are usually 0.25-3" in msgs[0]


def test_evaluate_robustness_eps_linf_8_no_longer_reports_linf_2040_255(tmp_path):
    """The reported case: eval.robustness.eps_linf=[8] ran and reported accuracy 0 under linf_2040_255."""
    from neuroguide.evaluation.runner import run

    cfg = compose_config("evaluate", ["eval=[robustness]", "eval.robustness.eps_linf=[8]",
                                      f"ckpt={tmp_path}/absent/model.ckpt"], output_dir=tmp_path / "eval")
    with pytest.raises(ValueError, match=r"eval\.robustness\.eps_linf holds 8: .*eval\.robustness\.eps_linf=\[8/255\]"):
        run(cfg)


# ------------------------------------------------------------------------------------------- closed_loop.py
def test_closed_loop_warns_about_k_255_in_loop_eps(tmp_path, caplog):
    from neuroguide.closed_loop.run import run

    cfg = compose_config("closed_loop", [f"out_dir={tmp_path / 'loop'}", "loop.eps=[8/255,0.5]", "step=report"])
    with pytest.raises(FileNotFoundError, match="no day .* has recordings yet"):  # nothing to report on
        run(cfg)
    msgs = _unit_warnings(caplog)
    assert len(msgs) == 1 and msgs[0].startswith("loop.eps holds 8/255: that is 8/255")
    assert "the closed loop attacks in L2 balls only" in msgs[0]
    caplog.clear()
    with pytest.raises(FileNotFoundError, match="no day .* has recordings yet"):
        run(compose_config("closed_loop", [f"out_dir={tmp_path / 'loop2'}", "step=report"]))  # 0.25, 0.5, 1.0
    assert _unit_warnings(caplog) == []


def test_the_attack_engine_refuses_a_linf_eps_above_the_pixel_range():
    import torch

    from neuroguide.attacks import objectives
    from neuroguide.attacks.pgd import pgd_attack

    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
    x = torch.rand(2, 3, 2, 2)
    with pytest.raises(ValueError, match=r"eps=8.*8/255"):
        pgd_attack(model, x, objectives.CrossEntropy(torch.tensor([0, 1])), eps=8.0, norm="linf", steps=1)
    with pytest.raises(ValueError, match=r"eps=1.0: .*whole pixel range"):
        pgd_attack(model, x, objectives.CrossEntropy(torch.tensor([0, 1])), eps=torch.tensor([0.1, 1.0]),
                   norm="linf", steps=1)
    res = pgd_attack(model, x, objectives.CrossEntropy(torch.tensor([0, 1])), eps=8 / 255, norm="linf", steps=1)
    assert (res.x_adv - x).abs().max() <= 8 / 255 + 1e-6
