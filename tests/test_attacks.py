"""The attack engine: steps, objectives, closed-form optima of linear units, restarts, modes and flags."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from neuroguide.attacks import L2Step, LinfStep, objectives, pgd_attack


pytestmark = pytest.mark.usefixtures("one_thread")


def linear_units(k=3, shape=(3, 6, 6), seed=0):
    torch.manual_seed(seed)
    d = int(torch.tensor(shape).prod())
    return nn.Sequential(nn.Flatten(), nn.Linear(d, k)), shape


def mid_images(n, shape, seed=1):
    """Images in [0.3, 0.7]: small attacks on them never meet the [0, 1] bounds."""
    g = torch.Generator().manual_seed(seed)
    return 0.3 + 0.4 * torch.rand((n, *shape), generator=g)


def edge_images(n, shape, seed=1, frac=0.5):
    """Images with a fraction ``frac`` of the pixels at 0 or 1 (half each), the others in [0.3, 0.7]: the
    [0, 1] box binds."""
    g = torch.Generator().manual_seed(seed)
    x = 0.3 + 0.4 * torch.rand((n, *shape), generator=g)
    at_edge = torch.rand((n, *shape), generator=g) < frac
    edge = (torch.rand((n, *shape), generator=g) < 0.5).to(x.dtype)
    return torch.where(at_edge, edge, x)


def box_projection_l2(v, x0, eps, iters=200):
    """argmin ||d - v|| s.t. ||d||_2 <= eps, 0 <= x0 + d <= 1, per row, in float64, by bisection on the
    multiplier: d = clip(v / (1 + mu), -x0, 1 - x0), mu >= 0 (independent of the engine)."""
    out = []
    for vb, xb in zip(v.double().flatten(1), x0.double().flatten(1)):
        lo, hi = -xb, 1 - xb
        d = lambda t: torch.clamp(t * vb, lo, hi)  # noqa: E731, B023  (t = 1 / (1 + mu))
        if d(1.0).norm() <= eps:
            out.append(d(1.0))
            continue
        a, b = 0.0, 1.0
        for _ in range(iters):
            m = (a + b) / 2
            a, b = (m, b) if d(m).norm() <= eps else (a, m)
        out.append(d(a))
    return torch.stack(out).reshape(v.shape)


def box_optimum(w, x, eps, norm):
    """max_d w.d s.t. ||d|| <= eps and 0 <= x + d <= 1, per row of x, in float64 (independent of the engine).

    L2: d_j = clip(lambda w_j, -x_j, 1 - x_j), lambda by bisection so that ||d||_2 = eps (or every coordinate
    saturates). Linf: per coordinate, d_j = clip(eps sign(w_j), -x_j, 1 - x_j)."""
    w, x = w.double().flatten(), x.double().flatten(1)
    if norm == "linf":
        d = torch.clamp(eps * torch.sign(w).expand_as(x), -x, 1 - x)
    else:
        d = box_projection_l2(w.expand_as(x) * 1e6, x, eps)  # lambda w with lambda -> inf, projected
    return d @ w


# ----------------------------------------------------------------------------- steps
def test_l2_step_projects_onto_ball_and_box():
    x0 = mid_images(4, (3, 5, 5))
    eps = torch.tensor([0.1, 0.2, 0.5, 1.0])
    s = L2Step(x0, eps, step_size=0.1)
    far = x0 + torch.randn_like(x0) * 3
    p = s.project(far)
    assert (p >= 0).all() and (p <= 1).all()
    assert ((p - x0).flatten(1).norm(dim=1) <= eps + 1e-5).all()
    # inside the box, projection onto the L2 ball is the radial rescaling (closed form)
    d = torch.randn_like(x0)
    d = d / d.flatten(1).norm(dim=1).view(-1, 1, 1, 1) * 0.05  # norm 0.05, well inside [0, 1]
    s2 = L2Step(x0, 0.02, step_size=0.1)
    torch.testing.assert_close(s2.project(x0 + d), x0 + d * (0.02 / 0.05))
    # a point inside the ball is left alone
    torch.testing.assert_close(L2Step(x0, 0.1, 0.1).project(x0 + d), x0 + d)
    r = s.random_perturb(x0, torch.Generator().manual_seed(0))
    assert ((r - x0).flatten(1).norm(dim=1) <= eps + 1e-5).all()
    assert not torch.equal(r, x0)


def test_l2_projection_is_exact_onto_ball_and_box():
    """Where the box binds, radial rescaling then clipping is not the projection onto ball ∩ box; the
    step's projection matches the KKT solution found by bisection, for per-row radii."""
    x0 = edge_images(6, (3, 5, 5))
    eps = torch.tensor([0.05, 0.3, 1.0, 2.0, 4.0, 0.0])
    v = torch.randn(x0.shape, generator=torch.Generator().manual_seed(3)) * 0.6
    p = L2Step(x0, eps, step_size=0.1).project(x0 + v)
    expected = torch.stack([box_projection_l2(v[i:i + 1], x0[i:i + 1], float(e))[0] for i, e in enumerate(eps)])
    torch.testing.assert_close((p - x0).double(), expected, atol=2e-6, rtol=0)
    assert (p >= 0).all() and (p <= 1).all()
    assert ((p - x0).flatten(1).norm(dim=1) <= eps * (1 + 1e-6)).all()
    # the naive projection lands strictly inside the ball here, farther from v
    d = x0 + v * torch.clamp(eps.view(-1, 1, 1, 1) / v.flatten(1).norm(dim=1).view(-1, 1, 1, 1), max=1)
    naive = d.clamp(0, 1) - x0
    far = ((naive - v).flatten(1).norm(dim=1) - (p - x0 - v).flatten(1).norm(dim=1))[:5]
    assert (far > 1e-3).all()


def test_l2_step_moves_along_normalized_gradient():
    x0 = mid_images(2, (3, 4, 4))
    g = torch.randn_like(x0)
    s = L2Step(x0, 1.0, step_size=torch.tensor([0.1, 0.3]))
    moved = s.step(x0, g) - x0
    torch.testing.assert_close(moved.flatten(1).norm(dim=1), torch.tensor([0.1, 0.3]))
    cos = F.cosine_similarity(moved.flatten(1), g.flatten(1))
    torch.testing.assert_close(cos, torch.ones(2))


def test_linf_step_sign_projection_and_start():
    x0 = mid_images(3, (3, 4, 4))
    s = LinfStep(x0, 0.03, step_size=0.01)
    g = torch.randn_like(x0)
    torch.testing.assert_close(s.step(x0, g), x0 + 0.01 * g.sign())
    p = s.project(x0 + torch.randn_like(x0))
    assert ((p - x0).abs() <= 0.03 + 1e-6).all()
    assert (p >= 0).all() and (p <= 1).all()
    r = s.random_perturb(x0)
    assert ((r - x0).abs() <= 0.03 + 1e-6).all() and (r != x0).any()
    # at the box edge the clip wins: pixels at 1 cannot go up
    ones = torch.ones(1, 3, 2, 2)
    assert (LinfStep(ones, 0.1, 0.1).project(ones + 0.05) == 1).all()


# ----------------------------------------------------------------------------- objectives
def test_objectives_match_their_formulas_with_row_lookup():
    torch.manual_seed(0)
    out = torch.randn(6, 5)
    rows = torch.tensor([0, 1, 2, 0, 1, 2])  # two restarts of three inputs
    y = torch.tensor([4, 0, 2])
    torch.testing.assert_close(objectives.CrossEntropy(y)(out, rows), F.cross_entropy(out, y[rows], reduction="none"))
    t = torch.tensor([1, 3, 3])
    torch.testing.assert_close(objectives.TargetClass(t)(out, rows), F.log_softmax(out, 1)[torch.arange(6), t[rows]])
    torch.testing.assert_close(objectives.Unit(2, "down")(out, rows), -out[:, 2])
    idx, sign = torch.tensor([4, 1, 0]), torch.tensor([1.0, -1.0, 1.0])
    torch.testing.assert_close(objectives.Unit(idx, sign)(out, rows), sign[rows] * out[torch.arange(6), idx[rows]])
    torch.testing.assert_close(objectives.MeanResponse("up")(out, rows), out.mean(1))
    torch.testing.assert_close(objectives.MeanResponse("down")(out, rows), -out.mean(1))
    target = torch.randn(3, 5)
    torch.testing.assert_close(objectives.MSEToTarget(target)(out, rows), -((out - target[rows]) ** 2).mean(1))
    torch.testing.assert_close(objectives.MSEToTarget(target[0])(out, rows), -((out - target[0]) ** 2).mean(1))
    torch.testing.assert_close(objectives.ResponseChange(target)(out, rows), ((out - target[rows]) ** 2).mean(1))
    with pytest.raises(ValueError, match="'up' or 'down'"):
        objectives.Unit(0, "sideways")


# ----------------------------------------------------------------------------- closed forms
@pytest.mark.parametrize("schedule,steps,step_size", [("pgd", 30, 0.05), ("guo", 24, None)])
def test_linear_unit_l2_sensitivity_is_eps_times_l2_norm(schedule, steps, step_size):
    """h(x) = w.x + b away from the bounds: max_{||d||_2 <= eps} h(x + d) - h(x) = eps ||w||_2.

    (Plain PGD at Madry's 2.5 eps / steps spends its whole path turning from a random start that is
    orthogonal to w; a step of eps / 2 converges.)"""
    model, shape = linear_units()
    x = mid_images(4, shape)
    w = model[1].weight.detach()
    eps = 0.1
    for unit in range(w.shape[0]):
        for direction in ("up", "down"):
            obj = objectives.Unit(unit, direction)
            res = pgd_attack(model, x, obj, eps=eps, norm="l2", steps=steps, schedule=schedule, step_size=step_size)
            gain = res.value - obj(model(x), torch.arange(4)).detach()
            torch.testing.assert_close(gain, torch.full((4,), eps * float(w[unit].norm())), rtol=0.01, atol=0)
            assert ((res.x_adv - x).flatten(1).norm(dim=1) <= eps * (1 + 1e-5)).all()


@pytest.mark.parametrize("schedule", ["pgd", "guo"])
def test_linear_unit_linf_sensitivity_is_eps_times_l1_norm(schedule):
    """max_{||d||_inf <= eps} w.d = eps ||w||_1, reached at d = eps sign(w)."""
    model, shape = linear_units()
    x = mid_images(4, shape)
    w = model[1].weight.detach()
    eps = 4 / 255
    res = pgd_attack(model, x, objectives.Unit(1, "up"), eps=eps, norm="linf", steps=12, schedule=schedule)
    gain = res.value - model(x)[:, 1].detach()
    torch.testing.assert_close(gain, torch.full((4,), eps * float(w[1].abs().sum())), rtol=0.01, atol=0)
    assert ((res.x_adv - x).abs() <= eps + 1e-6).all()


@pytest.mark.parametrize("norm,eps", [("l2", 0.5), ("l2", 2.0), ("linf", 8 / 255), ("linf", 0.5)])
@pytest.mark.parametrize("schedule,steps,step_size", [("pgd", 30, 0.5), ("guo", 16, None), ("guo", 24, None)])
def test_linear_unit_closed_form_when_the_box_binds(norm, eps, schedule, steps, step_size):
    """Half the pixels at 0 or 1: max w.d over {||d|| <= eps} ∩ {0 <= x + d <= 1} is below the unbounded
    eps ||w||_* and is computed independently (:func:`box_optimum`). The engine reaches >= 99% of it
    (PGD with a step of eps / 2, the Guo schedule at the sensitivity default of 16 steps and at 24), for
    L2 and Linf, both directions, and never exceeds it (feasibility)."""
    model, shape = linear_units()
    x = edge_images(4, shape)
    w = model[1].weight.detach()
    rows = torch.arange(4)
    for unit in range(w.shape[0]):
        for direction, sign in (("up", 1.0), ("down", -1.0)):
            best = box_optimum(sign * w[unit], x, eps, norm)
            unbounded = eps * float(w[unit].norm() if norm == "l2" else w[unit].abs().sum())
            assert (best < 0.95 * unbounded).all()  # the box binds
            obj = objectives.Unit(unit, direction)
            res = pgd_attack(model, x, obj, eps=eps, norm=norm, steps=steps, schedule=schedule,
                             step_size=None if step_size is None else step_size * eps)
            gain = (res.value - obj(model(x), rows).detach()).double()
            assert (gain >= 0.99 * best).all(), (gain / best).tolist()
            assert (gain <= best + 1e-5 * best.abs() + 1e-5).all(), (gain / best).tolist()
            d = (res.x_adv - x).flatten(1)
            assert ((d.norm(dim=1) if norm == "l2" else d.abs().amax(1)) <= eps * (1 + 1e-5)).all()
            assert res.x_adv.min() >= 0 and res.x_adv.max() <= 1


def test_value_is_objective_at_x_adv_and_best_over_restarts():
    model, shape = linear_units()
    x = mid_images(5, shape)
    obj = objectives.MSEToTarget(torch.zeros(3))
    res = pgd_attack(model, x, obj, eps=0.5, norm="l2", steps=3, restarts=3)
    assert res.restart_values.shape == (3, 5)
    torch.testing.assert_close(res.value, res.restart_values.max(0).values)
    torch.testing.assert_close(res.value, obj(model(res.x_adv), torch.arange(5)).detach())
    assert res.grad_evals == 3 * 5 * 3


class _Recorder(nn.Module):
    """Wraps a model; for every gradient evaluation (input with requires_grad) records the smallest per-row L2
    distance of the iterate from the clean images ``x0``."""

    def __init__(self, inner, x0):
        super().__init__()
        self.inner, self.x0, self.grad_calls = inner, x0, []

    def forward(self, x):
        if x.requires_grad:
            self.grad_calls.append(float((x - self.x0).detach().flatten(1).norm(dim=1).min()))
        return self.inner(x)


@pytest.mark.parametrize("per_phase", [False, True])
def test_guo_steps_per_phase_runs_steps_in_each_phase(per_phase):
    """Guo et al.: "250 steps ... first with a ball of radius 2 eps and finally with one of radius eps". Counted
    independently of the engine: the gradient evaluations of the 2-eps phase are those whose iterate lies outside
    the eps ball (a linear unit pushes every iterate to the sphere of its phase, the random start is at ~2 eps in
    108 dimensions), the others are the eps phase's. Split (default): steps // 2 + the rest; per phase: steps each."""
    model, shape = linear_units()
    x = mid_images(3, shape)
    eps, steps = 0.2, 10
    rec = _Recorder(model, x)
    res = pgd_attack(rec, x, objectives.Unit(0), eps=eps, norm="l2", steps=steps, schedule="guo",
                     steps_per_phase=per_phase, victim=model)
    outside = sum(d > eps * (1 + 1e-4) for d in rec.grad_calls)
    inside = len(rec.grad_calls) - outside
    assert (outside, inside) == ((steps, steps) if per_phase else (steps // 2, steps - steps // 2))
    assert res.grad_evals == len(rec.grad_calls) * x.shape[0]
    # the eps phase still ends at the closed-form optimum eps * ||w||_2
    w = model[1].weight[0].detach()
    torch.testing.assert_close(res.value - model(x)[:, 0].detach(), eps * w.norm().expand(3), rtol=1e-3, atol=1e-5)


def test_steps_per_phase_needs_the_guo_schedule():
    model, shape = linear_units()
    with pytest.raises(ValueError, match="steps_per_phase=True needs schedule='guo'"):
        pgd_attack(model, mid_images(2, shape), objectives.Unit(0), eps=0.1, schedule="pgd", steps_per_phase=True)


def test_chunked_batches_give_the_same_result():
    model, shape = linear_units()
    x = mid_images(5, shape)
    kw = dict(eps=0.3, norm="l2", steps=4, random_start=False, restarts=2)
    a = pgd_attack(model, x, objectives.Unit(0), **kw)
    b = pgd_attack(model, x, objectives.Unit(0), batch_size=3, **kw)
    torch.testing.assert_close(a.x_adv, b.x_adv)
    torch.testing.assert_close(a.value, b.value)


def test_eps_zero_returns_the_clean_image():
    model, shape = linear_units()
    x = mid_images(2, shape)
    res = pgd_attack(model, x, objectives.Unit(0), eps=0.0, steps=3)
    torch.testing.assert_close(res.x_adv, x)


def test_x_adv_in_ball_and_box_near_bounds():
    model, shape = linear_units()
    x = torch.rand(6, *shape)  # touches 0 and 1
    for norm, eps in (("l2", 2.0), ("linf", 8 / 255)):
        for schedule in ("pgd", "guo"):
            res = pgd_attack(model, x, objectives.Unit(2), eps=eps, norm=norm, steps=6, schedule=schedule)
            d = (res.x_adv - x).flatten(1)
            n = d.norm(dim=1) if norm == "l2" else d.abs().amax(1)
            assert (n <= eps * (1 + 1e-5)).all()
            assert res.x_adv.min() >= 0 and res.x_adv.max() <= 1


# ----------------------------------------------------------------------------- victim modes and flags
class Victim(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.drop = nn.Dropout(0.5)
        self.frozen = nn.Linear(4, 4)
        self.fc = nn.Linear(4, 3)
        self.seen_training = []
        for m in self.modules():
            m.register_forward_pre_hook(lambda mod, _i: self.seen_training.append(mod.training))

    def forward(self, x):
        h = self.drop(self.bn(self.conv(x)).relu().mean((2, 3)))
        return self.fc(self.frozen(h))


def test_attack_restores_modes_and_flags_and_leaves_no_grads():
    torch.manual_seed(0)
    v = Victim()
    v.train()
    v.frozen.eval()  # a frozen part inside a training model (like the guidance predictor)
    v.frozen.weight.requires_grad_(False)
    v.fc.bias.grad = torch.ones(3)  # an accumulated grad must stay untouched
    modes = {n: m.training for n, m in v.named_modules()}
    flags = {n: p.requires_grad for n, p in v.named_parameters()}
    bn_stats = v.bn.running_mean.clone()
    x = torch.rand(4, 3, 8, 8)
    y = torch.tensor([0, 1, 2, 0])
    for schedule in ("pgd", "guo"):
        v.seen_training.clear()
        res = pgd_attack(v, x, objectives.CrossEntropy(y), eps=0.5, steps=3, schedule=schedule)
        assert v.seen_training and not any(v.seen_training), "the victim must run in eval mode during the attack"
        assert {n: m.training for n, m in v.named_modules()} == modes
        assert {n: p.requires_grad for n, p in v.named_parameters()} == flags
        assert all(p.grad is None for n, p in v.named_parameters() if n != "fc.bias")
        torch.testing.assert_close(v.fc.bias.grad, torch.ones(3))
        torch.testing.assert_close(v.bn.running_mean, bn_stats)  # eval mode: no BN statistics updated
        assert res.x_adv.grad_fn is None and not res.x_adv.requires_grad


def test_explicit_victim_for_a_wrapped_forward():
    v = Victim().train()
    v.seen_training.clear()
    pgd_attack(lambda x: v(x), torch.rand(2, 3, 8, 8), objectives.Unit(0), eps=0.3, steps=2, victim=v)
    assert not any(v.seen_training) and v.training


def test_adversarial_training_call_raises_the_loss_and_keeps_train_mode():
    torch.manual_seed(0)
    v = Victim().train()
    x, y = torch.rand(6, 3, 8, 8), torch.tensor([0, 1, 2, 0, 1, 2])
    x_adv = pgd_attack(v, x, objectives.CrossEntropy(y), eps=0.5, norm="l2", steps=5, step_size=None,
                       random_start=True).x_adv
    assert v.training
    v.eval()
    with torch.no_grad():
        assert F.cross_entropy(v(x_adv), y) > F.cross_entropy(v(x), y)


def test_attack_works_under_no_grad_and_inference_mode():
    model, shape = linear_units()
    x = mid_images(2, shape)
    with torch.no_grad():
        a = pgd_attack(model, x, objectives.Unit(0), eps=0.1, steps=5)
    with torch.inference_mode():
        xi = x.clone()
        b = pgd_attack(model, xi, objectives.Unit(0), eps=0.1, steps=5)
    h0 = model(x)[:, 0].detach()
    assert (a.value > h0).all() and (b.value > h0).all()


# ----------------------------------------------------------------------------- bad input
def test_bad_input_messages():
    model, shape = linear_units()
    x = mid_images(2, shape)
    with pytest.raises(ValueError, match="norm 'l3' is not known"):
        pgd_attack(model, x, objectives.Unit(0), eps=0.1, norm="l3")
    with pytest.raises(ValueError, match="schedule 'adam' is not known"):
        pgd_attack(model, x, objectives.Unit(0), eps=0.1, schedule="adam")
    with pytest.raises(ValueError, match="eps must be a finite number >= 0"):
        pgd_attack(model, x, objectives.Unit(0), eps=-1.0)
    with pytest.raises(ValueError, match=r"must be in \[0, 1\] pixel space"):
        pgd_attack(model, x * 4 - 2, objectives.Unit(0), eps=0.1)
    with pytest.raises(ValueError, match="one value per row"):
        pgd_attack(model, x, lambda out, rows: out.sum(), eps=0.1, steps=1)
    with pytest.raises(ValueError, match="restarts must be an integer >= 1"):
        pgd_attack(model, x, objectives.Unit(0), eps=0.1, restarts=0)
