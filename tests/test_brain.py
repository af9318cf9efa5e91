"""The simulated brain: rebuilt from its config, planted noise, differentiable truth, and the IT data's teacher."""
from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
import torch

from neuroguide.closed_loop.brain import SimulatedBrain, brain_from_config, load_brain, save_brain

SMALL = dict(seed=3, n_sites=3, image_size=16, n_calibration=32)


@pytest.fixture(scope="module")
def brain():
    return SimulatedBrain(**SMALL)


def test_the_config_file_rebuilds_the_same_brain_and_another_seed_does_not(brain, tmp_path):
    x = torch.rand(5, 3, 16, 16)
    again = load_brain(save_brain(brain, tmp_path / "brain.json"))
    torch.testing.assert_close(again(x), brain(x), rtol=0, atol=0)
    other = SimulatedBrain(**{**SMALL, "seed": 4})
    assert (other(x) - brain(x)).abs().max() > 1.0  # spikes/s: a different brain
    with pytest.raises(KeyError, match=r"unknown key\(s\) \['sites'\]"):
        brain_from_config({**SMALL, "sites": 3})
    (tmp_path / "bad.json").write_text('{"format": "other"}')
    with pytest.raises(ValueError, match="is not a simulated brain file"):
        load_brain(tmp_path / "bad.json")


def test_record_adds_the_planted_trial_noise(brain):
    """Mean over many repeats -> the noise-free rate; sd over repeats -> noise_sd; NaN only where asked."""
    x = torch.rand(4, 3, 16, 16)
    r = brain.record(x, 4000, generator=torch.Generator().manual_seed(0))
    assert r.shape == (4, 3, 4000) and r.dtype == torch.float32
    rate = brain.rates(x)
    se = brain.noise_sd / 4000 ** 0.5
    assert ((r.mean(2) - rate).abs() < 5 * se).all()
    torch.testing.assert_close(r.std(2), brain.noise_sd.expand(4, 3), rtol=0.05, atol=0)
    lost = brain.record(x, 3, generator=torch.Generator().manual_seed(1), missing_fraction=0.5)
    assert torch.isnan(lost).any() and not torch.isnan(lost).all(2).any()  # never all repeats of one image and site
    same = brain.record(x, 3, generator=torch.Generator().manual_seed(1), missing_fraction=0.5)
    assert torch.equal(torch.nan_to_num(lost), torch.nan_to_num(same))  # seeded


def test_calibration_standardizes_the_drive_on_clean_images():
    """On new rendered clean images each site's rate has mean ~ baseline and std ~ gain (its response scale),
    the drive having been standardized on the brain's own 256 calibration images."""
    from neuroguide.data.synthetic.nsd import render_images

    brain = SimulatedBrain(**{**SMALL, "n_calibration": 256})

    x = torch.from_numpy(render_images(400, 16, np.random.default_rng(7))).permute(0, 3, 1, 2).float() / 255
    rate = brain.rates(x)
    torch.testing.assert_close(rate.std(0), brain.gain, rtol=0.25, atol=0)
    assert ((rate.mean(0) - brain.baseline).abs() < 0.4 * brain.gain).all()


def test_white_box_sensitivity_from_the_engine_matches_the_gradient_at_small_eps(brain, one_thread):
    """For a small eps away from the pixel bounds, max_{||d|| <= eps} |r(x + d) - r(x)| = eps ||grad r(x)||
    (first order); the engine's unit_sensitivity on the brain finds it (gradient by torch.autograd)."""
    from neuroguide.evaluation.analyses.sensitivity.core import unit_sensitivity

    x = 0.3 + 0.4 * torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    eps = 1e-3
    res = unit_sensitivity(brain, x, None, [eps], sigma=torch.ones(3), steps=20, progress=False,
                           generator=torch.Generator().manual_seed(0))
    xg = x.clone().requires_grad_(True)
    grads = torch.stack([torch.autograd.grad(brain(xg)[:, i].sum(), xg)[0].flatten(1).norm(dim=1) for i in range(3)])
    torch.testing.assert_close(res.per_image[0], eps * grads, rtol=0.05, atol=0)


def test_the_synthetic_it_data_is_recorded_from_the_brain(tmp_path):
    """One teacher: the IT file's noise-free responses are the rates of the brain its brain_config describes."""
    from neuroguide.data.synthetic.it import write_synthetic_it

    path = write_synthetic_it(tmp_path, seed=2, n_images=12, n_sites=3, n_repeats=2, image_size=16)
    with h5py.File(path) as f:
        brain = brain_from_config(json.loads(f["ground_truth"].attrs["brain_config"]))
        images = torch.from_numpy(f["images"][()]).permute(0, 3, 1, 2).float() / 255
        torch.testing.assert_close(brain.rates(images), torch.from_numpy(f["ground_truth/drive"][()]))
        noise = f["responses"][()] - f["ground_truth/drive"][()][..., None]
    assert brain.config["seed"] == 2 and brain.config["n_sites"] == 3
    assert np.nanstd(noise) > 0.3 * float(brain.noise_sd.min())  # responses are the rates plus trial noise
