"""Transfer matrices on planted linear models: a copy of the source receives the full white-box effect,
a model whose weights are orthogonal to the source's receives none; the random control is weaker."""
from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from torch import nn

from neuroguide.evaluation.analyses.transfer import fixed_eps as transfer
from neuroguide.attacks import objectives, pgd_attack
from neuroguide.evaluation.analyses.transfer.fixed_eps import perturbation_norms, random_control, random_like, transfer_matrix

SHAPE = (3, 4, 4)
D = 48


pytestmark = pytest.mark.usefixtures("one_thread")


def linear(weight: torch.Tensor, bias: torch.Tensor | None = None) -> nn.Module:
    m = nn.Sequential(nn.Flatten(), nn.Linear(D, weight.shape[0]))
    with torch.no_grad():
        m[1].weight.copy_(weight)
        m[1].bias.copy_(bias if bias is not None else -0.5 * weight.sum(1))  # boundary through the grey image
    return m


def orthogonal_pair(k: int, seed=0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two (k, D) weight matrices whose row spaces are orthogonal."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(D, 2 * k, generator=g))
    return q[:, :k].T * 3, q[:, k:].T * 3


def images(n=80, seed=1):
    g = torch.Generator().manual_seed(seed)
    return 0.3 + 0.4 * torch.rand((n, *SHAPE), generator=g)


def classifiers():
    wa, wb = orthogonal_pair(2)
    return {"A": linear(wa), "A_copy": linear(wa.clone()), "B": linear(wb)}


def test_classification_transfer_planted():
    models = classifiers()
    x = images()
    y = models["A"](x).argmax(1).detach()  # A is right on every image; B is not
    res = transfer_matrix(models, x, y, eps=0.5, norm="l2", steps=10, progress=False)
    i = {n: k for k, n in enumerate(res.names)}
    assert res.metric == "acc_drop"
    white_box = res.adversarial[i["A"], i["A"]]
    assert white_box > 0.3
    assert res.adversarial[i["A"], i["A_copy"]] == pytest.approx(white_box)  # same model: same effect
    # orthogonal weights: only what is left of the random start reaches B (a few images near its boundary)
    assert abs(res.adversarial[i["A"], i["B"]]) <= 0.05
    assert res.random[i["A"], i["A"]] < white_box / 2  # the control of the same norm is far weaker
    np.testing.assert_allclose(res.random_norm, res.delta_norm, rtol=0.05)


def test_neural_transfer_planted_and_objectives():
    wa, wb = orthogonal_pair(5)
    models = {"A": linear(wa), "A_copy": linear(wa.clone()), "B": linear(wb)}
    x = images(20)
    res = transfer_matrix(models, x, None, eps=0.3, norm="l2", steps=8, progress=False)
    assert res.metric == "change"
    assert res.adversarial[0, 0] > 0.1
    assert res.adversarial[0, 1] == pytest.approx(res.adversarial[0, 0], rel=1e-4)
    assert res.adversarial[0, 2] < res.adversarial[0, 0] / 5
    assert res.random[0, 0] < res.adversarial[0, 0] / 2
    up = transfer_matrix(models, x, None, eps=0.3, norm="linf", steps=8, objective="up", progress=False)
    assert up.adversarial[0, 0] > 0 and up.adversarial[0, 1] == pytest.approx(up.adversarial[0, 0], rel=1e-4)
    down = transfer_matrix(models, x, None, eps=0.3, norm="linf", steps=8, objective="down", progress=False)
    assert down.adversarial[0, 0] > 0  # "down" is scored in its own direction


@pytest.mark.parametrize("objective", ["up", "down", "change"])
def test_region_change_is_in_the_held_out_sd_of_the_target_region_mean(objective):
    """Linear models, region mean m_t = w_t . x + b (w_t the mean row of W_t). Source A is rank one (W_A = u v^T),
    so every objective's optimum within L2 eps is d = +-eps v_hat (plain PGD with a long step reaches it exactly,
    away from the pixel bounds), and "up"/"down" for source B is d = +-eps w_B / ||w_B||. In closed form:

        region_change_sd[s, t] = eps (w_t . w_s) / (||w_s|| sd_t)   (up / down; the attack's sign cancels)
        region_change_sd[s, t] = eps |w_t . v_hat| / sd_t           (change, source A)

    sd_t = std of m_t over the natural images, with sd_t over the held-out split given to the
    runner (narrower than the attacked images), while the old key ``change`` ("up"/"down") divides by the std over
    the attacked images."""
    from neuroguide.evaluation.stimuli import Stimuli

    g = torch.Generator().manual_seed(3)
    u, v = torch.tensor([1.0, 2.0, 0.5, 1.5, 1.0]), torch.randn(D, generator=g)
    wa, wb = torch.outer(u, v), torch.randn(5, D, generator=g)
    models = {"A": linear(wa), "B": linear(wb)}
    x, nat = images(12), images(300, seed=7) * 0.5 + 0.25
    eps = 0.3
    sigma = transfer.natural_images(Stimuli(x, split=lambda n: Stimuli(nat[:n] if n else nat)), None)
    assert sigma is nat
    res = transfer_matrix(models, x, None, eps=eps, norm="l2", steps=10, step_size=100 * eps, objective=objective,
                          sigma_images=sigma, progress=False)
    w = {"A": wa.double().mean(0), "B": wb.double().mean(0)}
    sd = {n: float((nat.flatten(1).double() @ w[n]).std()) for n in w}
    sd_attacked = {n: float((x.flatten(1).double() @ w[n]).std()) for n in w}
    assert abs(sd["A"] / sd_attacked["A"] - 1) > 0.2  # the two units are distinguishable
    direction = {"A": v.double() / v.double().norm(), "B": w["B"] / w["B"].norm()}
    sources = ["A"] if objective == "change" else ["A", "B"]  # B's "change" optimum is no closed form
    for i, s_ in enumerate(res.names):
        if s_ not in sources:
            continue
        for j, t in enumerate(res.names):
            cos = float(w[t] @ direction[s_])  # d = sign * eps w_s / ||w_s|| (up / down), +-eps v_hat (change)
            expected = eps * (abs(cos) if objective == "change" else cos) / sd[t]
            assert res.region_change[i, j] == pytest.approx(expected, rel=1e-3), (s_, t)
    np.testing.assert_allclose(res.region_sd, [sd["A"], sd["B"]], rtol=1e-5)
    assert res.n_sigma == len(nat)
    if objective != "change":  # the old key: the same change over the std across the 12 attacked images
        assert res.adversarial[0, 0] == pytest.approx(eps * float(w["A"].norm()) / sd_attacked["A"], rel=1e-3)


def test_region_change_keys_through_the_runner(tmp_path):
    """evaluate.py's transfer wrapper takes the sd over the held-out split (eval.transfer.n_sigma_images) and
    writes the new keys beside the old ones."""
    from neuroguide.evaluation import runner
    from neuroguide.evaluation.stimuli import Stimuli

    wa, wb = orthogonal_pair(5)
    models = {"A": linear(wa), "B": linear(wb)}
    x, nat = images(8), images(100, seed=7) * 0.5 + 0.25
    m = runner.MULTI_MODEL["transfer"](models, Stimuli(x, split=lambda n: Stimuli(nat[:n] if n else nat)), tmp_path,
                                       {"eps": [0.3], "steps": 10, "step_size": 30.0, "objective": "up",
                                        "n_sigma_images": None, "effect": {"enabled": False}})
    w_a = wa.double().mean(0)
    expected = 0.3 * float(w_a.norm()) / float((nat.flatten(1).double() @ w_a).std())
    assert m["eval/transfer/l2_0.3/A/A/region_change_sd"] == pytest.approx(expected, rel=1e-3)
    assert {"eval/transfer/l2_0.3/A/B/change", "eval/transfer/l2_0.3/A/B/random_region_change_sd",
            "eval/transfer/l2_0.3/offdiag_mean_region_change_sd", "eval/transfer/l2_0.3/random_mean_region_change_sd",
            "eval/transfer/l2_0.3/diag_mean_region_change_sd"} <= set(m)
    assert m["eval/transfer/n_sigma_images"] == 100
    rows = list(csv.DictReader(open(tmp_path / "transfer_l2_0.3.csv")))
    assert {"region_change_sd", "random_region_change_sd", "target_region_sd"} <= set(rows[0])


def test_random_control_has_the_same_norm():
    g = torch.Generator().manual_seed(0)
    delta = torch.randn(5, *SHAPE, generator=g) * torch.rand(5, 1, 1, 1, generator=g)
    r2 = random_like(delta, "l2", g)
    torch.testing.assert_close(r2.flatten(1).norm(dim=1), delta.flatten(1).norm(dim=1))
    assert (torch.nn.functional.cosine_similarity(r2.flatten(1), delta.flatten(1)).abs() < 0.6).all()
    rinf = random_like(delta, "linf", g)
    torch.testing.assert_close(rinf.flatten(1).abs().amax(1), delta.flatten(1).abs().amax(1))


def edge_images(n=40, frac=0.6, seed=2):
    """Images with a fraction ``frac`` of the pixels at 0 or 1 (half each), the others uniform in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand((n, *SHAPE), generator=g)
    at_edge = torch.rand((n, *SHAPE), generator=g) < frac
    return torch.where(at_edge, (torch.rand((n, *SHAPE), generator=g) < 0.5).float(), x)


@pytest.mark.parametrize("norm,eps", [("l2", 0.5), ("l2", 1.5), ("linf", 8 / 255), ("linf", 0.3)])
def test_random_control_keeps_the_attack_norm_after_clipping(norm, eps):
    """60% of the pixels at 0 or 1: the control, clipped to [0, 1], has the attack's per-image norm within 1%
    (a random direction scaled before clipping loses about a sixth of its L2 norm here)."""
    x = edge_images()
    wa, _ = orthogonal_pair(2)
    model = linear(wa)
    y = model(x).argmax(1).detach()
    x_adv = pgd_attack(model, x, objectives.CrossEntropy(y), eps=eps, norm=norm, steps=5,
                       generator=torch.Generator().manual_seed(0)).x_adv
    d_norm = perturbation_norms(x_adv, x, norm)
    assert (d_norm > 0.5 * eps).all()
    x_rnd = random_control(x, x_adv - x, norm, torch.Generator().manual_seed(1))
    assert x_rnd.min() >= 0 and x_rnd.max() <= 1
    r_norm = perturbation_norms(x_rnd, x, norm)
    torch.testing.assert_close(r_norm, d_norm, rtol=0.01, atol=0)
    if norm == "l2":  # the scale-then-clip control falls short here; the new one is not the attack direction
        naive = perturbation_norms((x + random_like(x_adv - x, norm, torch.Generator().manual_seed(1))).clamp(0, 1),
                                   x, norm)
        assert (naive / d_norm).mean() < 0.9
        cos = torch.nn.functional.cosine_similarity((x_rnd - x).flatten(1), (x_adv - x).flatten(1))
        assert (cos.abs() < 0.6).all()
    # through the transfer matrix: the reported mean norms agree, every image matched
    res = transfer_matrix({"A": model}, x, y, eps=eps, norm=norm, steps=5, progress=False,
                          generator=torch.Generator().manual_seed(0))
    np.testing.assert_allclose(res.random_norm, res.delta_norm, rtol=0.01)
    assert res.random_norm_matched.tolist() == [1.0]


def test_random_control_reports_an_unreachable_norm():
    """Every pixel at 0 or 1 and an attack that flips them all (norm sqrt(48)): a random direction can only
    move the pixels it points into the box (about half), so no scale reaches the attack's norm. The control
    then takes the largest norm it can reach (every movable pixel moved all the way), short of the target."""
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(4, *SHAPE, generator=g) < 0.5).float()
    delta = 1 - 2 * x
    x_rnd = random_control(x, delta, "l2", torch.Generator().manual_seed(0))
    moved = (x_rnd - x).flatten(1)
    assert ((moved == 0) | (moved.abs() == 1)).all()  # saturated: at the largest reachable norm
    r = perturbation_norms(x_rnd, x, "l2")
    torch.testing.assert_close(r ** 2, (moved != 0).sum(1).float())
    assert (r < 0.9 * delta.flatten(1).norm(dim=1)).all()  # short of the attack's norm, and it says so


def test_evaluate_outputs(tmp_path):
    models = classifiers()
    x = images(20)
    y = models["A"](x).argmax(1).detach()
    metrics = transfer.evaluate(models, x, y, tmp_path, eps=[0.25], norm="l2", steps=4, progress=False)
    assert "eval/transfer/l2_0.25/A/B/acc_drop" in metrics
    assert "eval/transfer/l2_0.25/A/B/random_acc_drop" in metrics
    assert {"eval/transfer/l2_0.25/diag_mean", "eval/transfer/l2_0.25/offdiag_mean",
            "eval/transfer/l2_0.25/random_mean", "eval/transfer/l2_0.25/random_norm_matched"} <= set(metrics)
    assert metrics["eval/transfer/l2_0.25/random_norm_matched"] == 1.0
    rows = list(csv.DictReader(open(tmp_path / "transfer_l2_0.25.csv")))
    assert len(rows) == 9 and {"source", "target", "adversarial", "random", "delta_norm", "random_norm",
                               "random_norm_matched"} <= set(rows[0])
    assert (tmp_path / "transfer_l2_0.25.png").stat().st_size > 1000


def test_different_input_sizes_are_refused(tmp_path):
    models = classifiers()
    models["A"].image_size = 4
    models["B"].neuroguide_info = {"facts": {"image_size": 8}}
    x = images(4)
    with pytest.raises(ValueError, match=r"one input size.*'A': 4 px, 'B': 8 px"):
        transfer.evaluate(models, x, None, tmp_path, eps=0.1, progress=False)
    with pytest.raises(ValueError, match="model 'A' takes 8 px images but the images are 4 px"):
        transfer_matrix({"A": models["A"]}, x, None, eps=0.1, input_sizes={"A": 8}, progress=False)


def test_bad_input(tmp_path):
    models = classifiers()
    x = images(4)
    with pytest.raises(ValueError, match="eps holds"):
        transfer.evaluate(models, x, None, tmp_path, eps=-0.1, progress=False)
    with pytest.raises(ValueError, match="eps is empty"):
        transfer.evaluate(models, x, None, tmp_path, eps=[], progress=False)
    with pytest.raises(ValueError, match="objective 'sideways' is not known"):
        transfer_matrix(models, x, None, eps=0.1, objective="sideways", progress=False)
    with pytest.raises(ValueError, match="models is empty"):
        transfer_matrix({}, x, None, eps=0.1, progress=False)
