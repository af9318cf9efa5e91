"""Population and behavioural measures (Lonngqvist et al.) against closed forms on a linear population r = W x."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from neuroguide.attacks import objectives
from neuroguide.evaluation.metrics.decoder import fit_decoder
from neuroguide.evaluation.analyses.population.core import evaluate, population_measures

EPS = [0.02, 0.05, 0.1]
BUDGET = dict(steps=128, schedule="guo", restarts=1, batch_size=256, progress=False)


def _linear_population(n_images=90, k=6, seed=0):
    """r = W x + b on 3x8x8 images near mid-grey (pixels in [0.25, 0.75], so every perturbation of norm <= 2 * 0.1
    stays inside [0, 1]); labels planted from a noisy projection of r (2 classes)."""
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, k))
    with torch.no_grad():
        model[1].weight.copy_(torch.randn(k, 3 * 8 * 8, generator=g))
        model[1].bias.copy_(torch.randn(k, generator=g))
    images = (0.5 + 0.08 * torch.randn(n_images, 3, 8, 8, generator=g)).clamp(0.25, 0.75)
    with torch.no_grad():
        r = model(images)
    score = (r - r.mean(0)) / r.std(0) @ torch.randn(k, generator=g) + 0.5 * torch.randn(n_images, generator=g)
    labels = (score > score.median()).long()
    return model, images, labels


def test_response_change_scale_is_the_normalized_population_change():
    ref, out, sigma = torch.randn(4, 5), torch.randn(4, 5), torch.rand(5) + 0.5
    value = objectives.ResponseChange(ref, scale=sigma)(out, torch.arange(4))
    torch.testing.assert_close((5 * value).sqrt(), ((out - ref) / sigma).norm(dim=1))
    with pytest.raises(ValueError, match="scales > 0"):
        objectives.ResponseChange(ref, scale=torch.tensor([1.0, 0.0, 1, 1, 1]))


def test_linear_population_matches_the_closed_forms(one_thread):
    model, images, labels = _linear_population()
    res = population_measures(model, images, EPS, labels=labels, n_images=12, n_units=None, **BUDGET)

    w = model[1].weight.detach().double().numpy()
    sigma = model(images).detach().double().numpy().std(0, ddof=1)
    wn = w / sigma[:, None]  # diag(1 / sigma) W
    top = np.linalg.svd(wn, compute_uv=False)[0]
    rows = np.linalg.norm(wn, axis=1)
    print(f"sigma_max(diag(1/sigma) W) = {top:.4f}; row norms {np.round(rows, 3)}")
    for e, eps in enumerate(EPS):
        print(f"eps {eps}: population {res.population_change[e].mean():.5f} (closed form {eps * top:.5f}), "
              f"units {np.round(res.unit.s_norm[e].numpy(), 4)} (closed form {np.round(eps * rows, 4)})")
        np.testing.assert_allclose(res.population_change[e].numpy(), eps * top, rtol=2e-3)
        np.testing.assert_allclose(res.unit.s_norm[e].numpy(), eps * rows, rtol=2e-3)
    # the unit-targeted perturbation is made for the most sensitive unit (the largest row norm, for every image)
    assert (res.unit_attack_unit == int(rows.argmax())).all()
    # ... and moves the population by ||diag(1/sigma) W w_u|| / ||w_u|| per unit eps (d = +-eps w_u / ||w_u||)
    u = int(rows.argmax())
    along = np.linalg.norm(wn @ w[u]) / np.linalg.norm(w[u])
    np.testing.assert_allclose(res.unit_attack_change.numpy(), np.broadcast_to(np.array(EPS)[:, None] * along, (3, 12)),
                               rtol=2e-3)

    # behaviour: the decoder-targeted attack flips exactly the images whose margin is below eps times the norm of the
    # margin's gradient in pixels, g = ||W^T diag(1/sigma) a|| (a: the decoder's weight difference in z-space)
    dec = res.decoder
    a = (dec.weight[1] - dec.weight[0]).double().numpy()
    g = np.linalg.norm(wn.T @ a)
    x = images[res.attacked]
    logits = dec(model(x)).detach().double().numpy()
    y = labels[res.attacked].numpy()
    margin = np.where(y == 1, 1, -1) * (logits[:, 1] - logits[:, 0])
    np.testing.assert_array_equal(res.decoder_correct_clean.numpy(), margin > 0)
    for e, eps in enumerate(EPS):
        expected = margin > eps * g
        clear = np.abs(margin - eps * g) > 0.01 * eps * g  # leave out images on the boundary itself
        got = res.decoder_correct_decoder_attack[e].numpy()
        np.testing.assert_array_equal(got[clear], expected[clear])
    summary = res.summary()
    for r in summary:
        print(f"eps {r['eps']}: decoder acc clean {r['decoder_acc_clean']:.3f}, unit-targeted "
              f"{r['decoder_acc_unit_attack']:.3f}, decoder-targeted {r['decoder_acc_decoder_attack']:.3f}")
        assert r["decoder_acc_decoder_attack"] <= r["decoder_acc_unit_attack"] <= r["decoder_acc_clean"] + 1e-9
    assert summary[-1]["decoder_acc_decoder_attack"] < summary[-1]["decoder_acc_clean"]  # the attack does something


def test_decoder_agrees_with_scikit_learn_on_three_classes():
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(0)
    r = torch.tensor(rng.normal(size=(90, 5)), dtype=torch.float32)
    y = torch.tensor(rng.integers(0, 3, 90))
    r[:, 0] += 2 * y
    mean, sigma = r.mean(0), r.std(0)
    dec = fit_decoder(r, y, mean, sigma)
    ref = LogisticRegression(max_iter=2000).fit(((r - mean) / sigma).double().numpy(), y.numpy())
    np.testing.assert_array_equal(dec(r).argmax(1).numpy(), ref.predict(((r - mean) / sigma).double().numpy()))
    with pytest.raises(ValueError, match=r"labels \[7\] were not among"):
        dec.targets(torch.tensor([0, 7]))


def test_evaluate_writes_keys_and_figure_and_skips_the_decoder_without_labels(tmp_path, caplog, one_thread):
    model, images, labels = _linear_population(n_images=40)
    small = dict(steps=8, n_images=4, n_units=3, progress=False)
    m = evaluate(model, images, tmp_path / "lab", labels=labels, eps_list=[0.05], **small)
    for k in ("population_sensitivity", "mean_unit_sensitivity", "decoder_acc_clean", "decoder_acc_unit_attack",
              "decoder_acc_decoder_attack"):
        assert f"eval/population/l2_0.05/{k}" in m
    assert m["eval/population/n_units"] == 6 and m["eval/population/n_decoder_images"] == 36
    assert (tmp_path / "lab" / "population.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with caplog.at_level("INFO", logger="neuroguide"):
        m = evaluate(model, images, tmp_path / "nolab", eps_list=[0.05], **small)
    assert "no class labels" in caplog.text and not any("decoder" in k for k in m)
    assert m["eval/population/l2_0.05/population_sensitivity"] > 0


def test_bad_input_is_named(one_thread):
    model, images, labels = _linear_population(n_images=20)
    with pytest.raises(ValueError, match="eval.population.eps_list is empty"):
        population_measures(model, images, [], labels=labels)
    with pytest.raises(ValueError, match=r"labels must be \(20,\)"):
        population_measures(model, images, [0.1], labels=labels[:5])
    with pytest.raises(ValueError, match="eval.population.n_images=20"):
        population_measures(model, images, [0.1], n_images=20)
    with pytest.raises(ValueError, match="no image can be attacked.*only one of its class"):
        population_measures(model, images, [0.1], labels=torch.arange(20), n_images=2, steps=2, n_units=2,
                            progress=False)
    with pytest.raises(ValueError, match="needs at least 2"):
        population_measures(model, images, [0.1], labels=torch.zeros(20, dtype=torch.long), n_images=2, steps=2,
                            n_units=2, progress=False)


@pytest.mark.slow
def test_evaluate_py_population_on_a_guided_classifier(tmp_path, one_thread):
    """`evaluate.py ckpt=<guided model> eval=[population]` through the real configs: the neural head's units,
    sigma over the held-out split, the decoder trained on its labelled images."""
    from conftest import small_overrides

    from neuroguide.config import compose_config
    from neuroguide.evaluation.runner import run as run_eval
    from neuroguide.train import run as train

    train(compose_config("train", small_overrides(tmp_path) + ["region=TO", "+trainer.fast_dev_run=true"],
                         output_dir=tmp_path / "guided"))
    cfg = compose_config("evaluate", [f"paths.log_dir={tmp_path}/outputs", f"ckpt={tmp_path}/guided/model.ckpt",
                                      "eval=[population]", "eval.population.eps_list=[0.5,1.0]",
                                      "eval.population.steps=4", "eval.population.n_images=4",
                                      "eval.population.n_units=3", "n_images=6"], output_dir=tmp_path / "ev")
    m = run_eval(cfg)
    print({k: v for k, v in m.items() if "l2_1.0" in k})
    assert m["eval/population/n_images"] == 4 and m["eval/population/n_decoder_images"] >= 2
    for tag in ("l2_0.5", "l2_1.0"):
        # the whole normalized vector moves at least as far as its most sensitive unit alone
        assert m[f"eval/population/{tag}/population_sensitivity"] >= m[f"eval/population/{tag}/max_unit_sensitivity"]
        assert 0 <= m[f"eval/population/{tag}/decoder_acc_decoder_attack"] <= 1
    assert (tmp_path / "ev" / "population" / "population.png").exists()


def test_units_with_nan_responses_are_named_not_called_constant(one_thread):
    torch.manual_seed(0)
    lin = nn.Linear(3 * 4 * 4, 5)
    model = nn.Sequential(nn.Flatten(), lin)
    with torch.no_grad():
        lin.bias[2] = float("nan")
    with pytest.raises(ValueError, match=r"units \[2\] of output give NaN or inf responses"):
        population_measures(model, torch.rand(12, 3, 4, 4), [0.1], n_images=4, steps=2, progress=False)
