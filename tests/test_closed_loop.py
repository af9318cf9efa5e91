"""Guo et al.'s closed loop on the simulated brain: stimuli, the lab's three steps, simulate, resume, bad input."""
from __future__ import annotations

import copy
import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from torch import nn

from neuroguide.closed_loop import stimuli as stim
from neuroguide.closed_loop.brain import SimulatedBrain
from neuroguide.closed_loop.recordings import write_recordings

ROOT = Path(__file__).resolve().parents[1]
# 16 px, 3 sites, 32 clean images a day (16 per site), 20 attack steps: the loop in ~15 s on one core
FAST = ["loop.image_size=16", "loop.images_per_day=32", "loop.images_per_site=16", "loop.brain.n_sites=3",
        "loop.attack.steps=20", "loop.refit.steps=150", "loop.truth.steps=20", "loop.truth.n_images=4",
        "loop.truth.n_sigma=64", "loop.brain.n_calibration=64", "progress=false", "threads=1"]
TINY = ["loop.image_size=16", "loop.images_per_day=4", "loop.images_per_site=2", "loop.brain.n_sites=2",
        "loop.eps=[0.5]", "loop.attack.steps=2", "loop.refit.steps=3", "loop.truth.steps=2", "loop.truth.n_images=2",
        "loop.truth.n_sigma=8", "loop.brain.n_calibration=16", "progress=false"]


def compose(out: Path, *overrides: str):
    from neuroguide.config import compose_config

    return compose_config("closed_loop", [f"out_dir={out}", *overrides])


def summary(out: Path) -> list[dict]:
    with open(out / "report" / "summary.csv") as f:
        return [{k: float(v) if v not in ("", "nan") else float("nan") for k, v in r.items()}
                for r in csv.DictReader(f)]


def at(rows: list[dict], day: int, eps: float) -> dict:
    return next(r for r in rows if r["day"] == day and r["eps"] == eps)


# ---------------------------------------------------------------------- stimuli
def test_shown_images_are_8_bit_and_within_eps():
    g = torch.Generator().manual_seed(0)
    x = (torch.randint(0, 256, (6, 3, 16, 16), generator=g) / 255).float()
    eps = torch.tensor([0.1, 0.25, 0.5, 1.0, 2.0, 4.0])
    d = torch.randn(x.shape, generator=g)
    target = (x + eps.view(-1, 1, 1, 1) * d / stim.l2(d).view(-1, 1, 1, 1)).clamp(0, 1)
    q = stim.quantize_within_ball(x, target, eps)
    assert ((q * 255 - (q * 255).round()).abs() < 1e-3).all()  # whole grey levels
    assert (stim.l2(stim.from_uint8(stim.to_uint8(q)) - x) <= eps + 1e-6).all()  # also as stored
    norm = stim.l2(q - x)
    assert (norm <= eps + 1e-6).all() and (norm > 0.85 * stim.l2(target - x)).all()  # close to the wanted step
    gauss = stim.gaussian_control(x, eps, g)
    assert (stim.l2(gauss - x) <= eps + 1e-6).all() and (stim.l2(gauss - x) > 0.85 * eps).all()
    other = torch.rand(x.shape, generator=g)
    interp = stim.interpolation_control(x, other, eps)
    step, towards = (interp - x).flatten(1), (other - x).flatten(1)
    # along the line to the other image, up to the 8-bit rounding (which matters most at the smallest eps)
    assert (torch.nn.functional.cosine_similarity(step, towards) > 0.93).all()
    assert (stim.l2(interp - x) <= eps + 1e-6).all() and (stim.l2(interp - x) > 0.85 * eps).all()


class Linear(nn.Module):
    """f(x) = W vec(x): the best L2 attack of site i moves f_i by eps ||W_i|| (away from the pixel bounds)."""

    def __init__(self, w: torch.Tensor):
        super().__init__()
        self.w = nn.Parameter(w)

    def forward(self, x):
        return x.flatten(1) @ self.w.T


def test_attacks_reach_the_closed_form_and_keep_the_larger_direction(one_thread):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(2, 3 * 16 * 16, generator=g)
    w[1] *= 3
    model = Linear(w)
    x = (torch.randint(100, 156, (4, 3, 16, 16), generator=g) / 255).float()  # far from 0 and 1
    sites, eps = torch.tensor([0, 1, 0, 1]), torch.tensor([0.1, 0.1, 0.2, 0.2])
    res = stim.attack_sites(model, x, sites, eps, steps=10, generator=g)
    best = eps * w[sites].norm(dim=1)
    change = res["predicted_change"]
    assert (change.abs() <= best * (1 + 1e-4)).all() and (change.abs() > 0.9 * best).all()
    assert torch.equal(torch.sign(change).long(), res["direction"].long())  # +1000 raises f_i, -1000 lowers it
    # a kinked model, 4 times steeper downwards from the clean image: the kept direction is "down"
    x0 = x[:1].expand(4, -1, -1, -1)
    kinked = Kinked(w, (x0[:1].flatten(1) @ w.T)[0])
    res = stim.attack_sites(kinked, x0, sites, eps, steps=10, generator=g)
    assert (res["direction"] == -1).all()
    assert (res["predicted_change"] < -0.9 * 4 * best).all()


class Kinked(Linear):
    """f_i(x) = (u_i - c_i) - 3 relu(c_i - u_i), u = W vec(x): slope 1 upwards of c, 4 downwards."""

    def __init__(self, w, c):
        super().__init__(w)
        self.register_buffer("c", c)

    def forward(self, x):
        u = super().forward(x) - self.c
        return u - 3 * torch.relu(-u)


# ---------------------------------------------------------------------- simulate
@pytest.mark.slow  # a CLI run in a subprocess, or a training of ~15 s: the full suite runs it
def test_simulate_four_days_lower_bound_grows_below_the_truth_and_beats_the_controls(tmp_path):
    from neuroguide.closed_loop.run import run

    start = time.time()
    metrics = run(compose(tmp_path / "sim", *FAST, "step=simulate", "days=4"))
    rows = summary(tmp_path / "sim")
    print(f"simulate, 4 days, {time.time() - start:.0f} s")
    for r in rows:
        print(f"day {r['day']:.0f} eps {r['eps']}: lower bound {r['lower_bound_norm']:.3f}, Gaussian "
              f"{r['gaussian_rms_norm']:.3f}, interpolation {r['interpolation_rms_norm']:.3f}, noise-free change "
              f"{r['true_change_norm']:.3f}, truth {r['truth_norm']:.3f}")
    mid = 0.5
    assert at(rows, 3, mid)["lower_bound_norm"] > at(rows, 1, mid)["lower_bound_norm"] + 0.1
    for r in rows:
        if r["day"] >= 1:
            assert r["lower_bound_norm"] <= r["truth_norm"]
            assert r["true_change_norm"] <= r["truth_norm"]  # the brain's worst case bounds what any attack does
            assert r["lower_bound_norm"] > max(r["gaussian_rms_norm"], r["interpolation_rms_norm"])
    assert metrics["closed_loop/day_3/l2_0.5/lower_bound_norm"] == pytest.approx(at(rows, 3, mid)["lower_bound_norm"])
    assert (tmp_path / "sim" / "report" / "fig5.png").stat().st_size > 10_000
    with h5py.File(tmp_path / "sim" / "day_002" / "stimuli.h5") as f:  # what was shown is within eps
        assert (f["norm"][()] <= f["eps"][()] + 1e-5).all()
        assert set(np.unique(f["kind"][()].astype(str))) == {"clean", "attack", "gaussian", "interpolation"}


# ---------------------------------------------------------------------- the lab's steps
def _lab(tmp_path, n_pool=20, **more):
    """A lab's loop: a pool of images, site ids, no brain; its 'monkey' is a SimulatedBrain it records with."""
    rng = np.random.default_rng(0)
    pool = tmp_path / "pool.h5"
    with h5py.File(pool, "w") as f:
        f["images"] = rng.integers(0, 256, (n_pool, 16, 16, 3), dtype=np.uint8)
        f["image_ids"] = np.array([f"imagenet_{i}" for i in range(n_pool)], dtype="S")
        f["labels"] = np.arange(n_pool) % 4
    monkey = SimulatedBrain(seed=5, n_sites=2, image_size=16, n_calibration=16)
    over = [*TINY, "loop.brain=null", "loop.sites=[site000,site001]", f"loop.pool_file={pool}",
            "loop.model.weights=null", *more.get("overrides", [])]
    return monkey, over


def _record(monkey, stimuli_file, out, order=None, drop=0, nan_site=None):
    with h5py.File(stimuli_file) as f:
        images, ids = f["images"][()], [s.decode() for s in f["image_ids"][()]]
    x = stim.from_uint8(images)
    resp = monkey.record(x, 2, torch.Generator().manual_seed(0)).numpy()
    if nan_site is not None:
        resp[:, nan_site] = np.nan
    order = np.arange(len(ids)) if order is None else order
    keep = order[drop:]
    return write_recordings(out, images[keep], [ids[i] for i in keep], monkey.site_ids, resp[keep])


def test_lab_workflow_propose_record_refit_report(tmp_path):
    """Three steps around a recording session; the report's lower bound is the sign-corrected mean, computed
    here again by hand from the stimuli and the (shuffled) recordings."""
    from neuroguide.closed_loop.run import run

    monkey, over = _lab(tmp_path)
    out = tmp_path / "lab"
    run(compose(out, *over, "step=propose", "day=0"))
    stimuli_file = out / "day_000" / "stimuli.h5"
    with h5py.File(stimuli_file) as f:
        n = len(f["image_ids"])
        assert set(f["source"][()].astype(str)) <= {s.decode() for s in f["image_ids"][()]}
    perm = np.random.default_rng(1).permutation(n)  # the lab stores its trials in its own order
    rec = _record(monkey, stimuli_file, tmp_path / "day0_lab.h5", order=perm)
    run(compose(out, *over, "step=refit", "day=0", f"recordings={rec}"))
    assert (out / "day_001" / "model.pt").is_file() and (out / "day_000" / "recordings.h5").is_file()
    run(compose(out, *over, "step=propose"))  # day=null: the first day without stimuli, day 1
    assert (out / "day_001" / "stimuli.h5").is_file()
    metrics = run(compose(out, *over, "step=report"))
    with h5py.File(stimuli_file) as f, h5py.File(rec) as r:
        ids = [s.decode() for s in f["image_ids"][()]]
        row = {s.decode(): i for i, s in enumerate(r["image_ids"][()])}
        mean = np.nanmean(r["responses"][()], 2)[[row[i] for i in ids]]
        kind, site, pred = f["kind"][()].astype(str), f["site"][()], f["predicted"][()]
        src = np.array([ids.index(s) for s in f["source"][()].astype(str)])
    a = np.flatnonzero((kind == "attack") & (site == 1))
    lb = np.mean(np.sign(pred[src[a], 1] - pred[a, 1]) * (mean[src[a], 1] - mean[a, 1]))
    sigma = np.std(mean[kind == "clean", 1], ddof=1)
    with open(out / "report" / "report.csv") as fh:
        got = next(r for r in csv.DictReader(fh) if r["site"] == "site001" and r["day"] == "0")
    assert float(got["lower_bound_norm"]) == pytest.approx(lb / sigma, rel=1e-4)
    assert "closed_loop/day_0/l2_0.5/lower_bound_norm" in metrics


def test_a_missing_recordings_file_names_the_recordings_key(tmp_path):
    """closed_loop.py step=refit recordings=<missing file>: the message names recordings=, the key the user gave
    (it said paths.it_file, a key of train.py)."""
    from neuroguide.closed_loop.run import run

    absent = tmp_path / "day0_it.h5"
    with pytest.raises(FileNotFoundError, match=rf"recordings={absent}: no such file.*step=refit day=0 recordings=") as e:
        run(compose(tmp_path / "loop", *TINY, "step=refit", "day=0", f"recordings={absent}"))
    assert "paths.it_file" not in str(e.value)


def test_recordings_that_do_not_match_the_proposals_are_refused(tmp_path):
    from neuroguide.closed_loop.run import run

    monkey, over = _lab(tmp_path)
    out = tmp_path / "lab"
    run(compose(out, *over, "step=propose", "day=0"))
    stimuli_file = out / "day_000" / "stimuli.h5"
    with h5py.File(stimuli_file) as f:
        first = f["image_ids"][0].decode()
    short = _record(monkey, stimuli_file, tmp_path / "short.h5", drop=1)  # the first proposed image not recorded
    with pytest.raises(ValueError, match=rf"lack 1 of the day's \d+ proposed images: missing image ids {first}\."):
        run(compose(out, *over, "step=refit", "day=0", f"recordings={short}"))
    empty = _record(monkey, stimuli_file, tmp_path / "empty.h5", nan_site=1)
    with pytest.raises(ValueError, match=r"site\(s\) site001 have only NaN repeats.*allow_empty_sites=true"):
        run(compose(out, *over, "step=refit", "day=0", f"recordings={empty}"))
    assert not (out / "day_000" / "recordings.h5").exists() and not (out / "day_001").exists()  # nothing half-done
    run(compose(out, *over, "step=refit", "day=0", f"recordings={empty}", "allow_empty_sites=true"))
    run(compose(out, *over, "step=report", "allow_empty_sites=true"))
    with open(out / "report" / "report.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert {r["lower_bound_norm"] for r in rows if r["site"] == "site001"} == {"nan"}
    assert all(r["lower_bound_norm"] != "nan" for r in rows if r["site"] == "site000")
    # day 1's proposals against day 0's recordings: the ids are not the day's
    run(compose(out, *over, "step=propose", "day=1"))
    with pytest.raises(ValueError, match=r"lack \d+ of the day's \d+ proposed images: missing image ids "):
        run(compose(out, *over, "step=refit", "day=1", f"recordings={empty}", "allow_empty_sites=true"))


def test_a_day_folder_made_with_another_configuration_is_refused(tmp_path):
    from neuroguide.closed_loop.run import run

    out = tmp_path / "sim"
    run(compose(out, *TINY, "step=propose", "day=0"))
    with pytest.raises(ValueError, match=r"day_000 was made with a different configuration \(loop.eps: \[0.5\] there, "
                                         r"\[0.25\] now\).*another out_dir"):
        run(compose(out, *TINY, "loop.eps=[0.25]", "step=propose", "day=0"))
    with pytest.raises(FileNotFoundError, match=r"day_001/model.pt does not exist.*step=refit day=0 first"):
        run(compose(out, *TINY, "step=propose", "day=1"))


# ---------------------------------------------------------------------- resume
@pytest.mark.slow
def test_simulate_killed_mid_day_continues_and_ends_like_an_uninterrupted_run(tmp_path):
    """SIGKILL during day 1 (its model written, its stimuli not yet), the same command again: the final report
    equals that of a run never interrupted, and no temporary file is left."""
    over = [*FAST, "loop.images_per_day=16", "loop.images_per_site=8", "step=simulate", "days=3"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def command(out):
        return [sys.executable, str(ROOT / "closed_loop.py"), f"out_dir={out}", *over]

    subprocess.run(command(tmp_path / "whole"), check=True, env=env, cwd=ROOT, capture_output=True)
    out = tmp_path / "killed"
    proc = subprocess.Popen(command(out), env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (out / "day_001" / "model.pt").is_file() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "day_001" / "stimuli.h5").exists() and not (out / "report").exists()  # killed mid-day
    done = {p: p.stat().st_mtime_ns for p in (out / "day_000" / "stimuli.h5", out / "day_001" / "model.pt")}
    subprocess.run(command(out), check=True, env=env, cwd=ROOT, capture_output=True)
    assert {p: p.stat().st_mtime_ns for p in done} == done  # continued: finished steps were not run again
    a, b = summary(tmp_path / "whole"), summary(out)
    assert [(r["day"], r["eps"]) for r in a] == [(r["day"], r["eps"]) for r in b]
    for ra, rb in zip(a, b):
        for k in ra:
            np.testing.assert_allclose(rb[k], ra[k], rtol=1e-4, atol=1e-6, err_msg=k)
    assert not [p for p in out.rglob(".*") if ".tmp" in p.name]


def test_steps_name_what_is_missing(tmp_path):
    from neuroguide.closed_loop.run import run

    with pytest.raises(ValueError, match=r"step='fit': expected one of \('propose', 'record', 'refit'"):
        run(compose(tmp_path / "a", *TINY, "step=fit"))
    with pytest.raises(ValueError, match=r"loop.sites is empty and loop.brain is null"):
        run(compose(tmp_path / "a", *TINY, "loop.brain=null", "step=propose"))
    with pytest.raises(ValueError, match=r"step=record needs a simulated brain"):
        run(compose(tmp_path / "a", *TINY, "loop.brain=null", "loop.sites=[s1]", "loop.model.weights=null",
                    "step=record", "day=0"))
    with pytest.raises(FileNotFoundError, match=r"day_000/stimuli.h5 does not exist: run step=propose day=0 first"):
        run(compose(tmp_path / "b", *TINY, "step=record", "day=0"))
    run(compose(tmp_path / "c", *TINY, "step=propose", "day=0"))
    with pytest.raises(FileNotFoundError, match=r"day_000/recordings.h5 does not exist: pass the day's recordings"):
        run(compose(tmp_path / "c", *TINY, "step=refit", "day=0"))
    # a propose that fails before writing anything leaves no configuration behind: the corrected command runs
    with pytest.raises(FileNotFoundError, match=r"loop.model.weights=/no/such.pt does not exist"):
        run(compose(tmp_path / "d", *TINY, "loop.model.weights=/no/such.pt", "step=propose", "day=0"))
    assert not (tmp_path / "d" / "day_000" / "config.json").exists()
    run(compose(tmp_path / "d", *TINY, "step=propose", "day=0"))
    assert (tmp_path / "d" / "day_000" / "stimuli.h5").is_file()


def test_eps_that_are_not_binary_fractions_keep_their_names(tmp_path):
    from neuroguide.closed_loop.run import run

    metrics = run(compose(tmp_path / "e", *TINY, "loop.eps=[0.1,0.3]", "step=simulate", "days=1"))
    for e in ("0.1", "0.3"):
        assert np.isfinite(metrics[f"closed_loop/day_0/l2_{e}/truth_norm"])
        assert f"closed_loop/day_0/l2_{e}/lower_bound_norm" in metrics


def test_weight_noise_makes_a_related_network_not_the_brain():
    """loop.model.weight_noise: each conv/linear weight gets seeded noise of that fraction of its own std; 0 keeps the
    brain's trunk exactly; BatchNorm parameters and statistics are untouched; a negative value is refused."""
    from neuroguide.closed_loop.refit import perturb_weights

    brain = SimulatedBrain(seed=0, n_sites=2, image_size=16, n_calibration=16)
    trunk = brain.trunk
    same = copy.deepcopy(trunk)
    perturb_weights(same, 0.0, seed=1)
    assert all(torch.equal(a, b) for a, b in zip(trunk.state_dict().values(), same.state_dict().values()))
    noisy = copy.deepcopy(trunk)
    perturb_weights(noisy, 0.1, seed=1)
    for (name, a), b in zip(trunk.named_parameters(), noisy.parameters()):
        if a.ndim >= 2:
            ratio = float((b - a).std() / a.std())
            assert 0.08 < ratio < 0.12, (name, ratio)  # 0.1 of the tensor's std, up to sampling
        else:
            assert torch.equal(a, b), name  # BatchNorm weights and biases kept
    again = copy.deepcopy(trunk)
    perturb_weights(again, 0.1, seed=1)
    assert all(torch.equal(a, b) for a, b in zip(noisy.state_dict().values(), again.state_dict().values()))  # seeded
    with pytest.raises(ValueError, match="weight_noise must be >= 0"):
        perturb_weights(copy.deepcopy(trunk), -0.1, seed=1)
