"""Forward-mode products of the perturbation subspaces (neuroguide.evaluation.analyses.subspace.forward_mode): the
folded batch norm equals the batch norm, the fold touches only what it may and always puts the model back, and the
JVP with dual buffers equals an independent float64 autograd Jacobian times the tangent."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from neuroguide.evaluation.analyses.subspace.core import perturbation_subspaces
from neuroguide.evaluation.analyses.subspace.forward_mode import ChannelAffine, DualBuffers, folded_batchnorm
from neuroguide.models.normalize import Normalize


def trained_bn(bn: nn.Module, seed: int = 0) -> nn.Module:
    """``bn`` with non-trivial running statistics and affine parameters, in eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        bn.running_mean.copy_(torch.rand(bn.num_features, generator=g) - 0.5)
        bn.running_var.copy_(torch.rand(bn.num_features, generator=g) * 2 + 0.1)
        if bn.affine:
            bn.weight.copy_(torch.randn(bn.num_features, generator=g))
            bn.bias.copy_(torch.randn(bn.num_features, generator=g))
    return bn.eval()


@pytest.mark.parametrize("bn, shape", [(nn.BatchNorm1d(5), (4, 5)), (nn.BatchNorm1d(5), (4, 5, 7)),
                                       (nn.BatchNorm2d(5), (4, 5, 6, 6)), (nn.BatchNorm3d(5), (2, 5, 3, 4, 4)),
                                       (nn.BatchNorm2d(5, affine=False, eps=0.1), (4, 5, 6, 6))])
def test_channel_affine_equals_the_batch_norm_in_eval_mode(bn, shape):
    bn = trained_bn(bn)
    x = torch.randn(shape)
    ref = bn(x)
    assert torch.allclose(ChannelAffine(bn)(x), ref, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(ChannelAffine(bn)(x), x, atol=1e-2)  # the statistics matter (not an identity)


def net_with_every_case() -> nn.Module:
    """Foldable BNs (one shared at two places), and four that must stay: training, no running statistics, hooked,
    a subclass with its own forward."""

    class OwnBN(nn.BatchNorm2d):
        def forward(self, x):
            return super().forward(x) * 2

    torch.manual_seed(0)
    shared = trained_bn(nn.BatchNorm2d(4), 1)
    net = nn.Sequential(Normalize(), nn.Conv2d(3, 4, 3, padding=1), trained_bn(nn.BatchNorm2d(4), 2), nn.ReLU(),
                        shared, nn.Conv2d(4, 4, 1), shared, nn.Softplus(),
                        nn.BatchNorm2d(4, track_running_stats=False), trained_bn(OwnBN(4), 3),
                        trained_bn(nn.BatchNorm2d(4), 4), nn.Flatten(), nn.Linear(4 * 5 * 5, 6)).eval()
    net[10].register_forward_hook(lambda m, i, o: None)
    return net


def test_the_fold_replaces_only_plain_eval_batch_norms_and_always_puts_the_model_back():
    net = net_with_every_case()
    before = [(name, m) for name, m in net.named_modules(remove_duplicate=False)]
    state = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.rand(3, 3, 5, 5)
    ref = net(x)
    with folded_batchnorm(net) as n:
        assert n == 2  # net[2], and the shared one (once)
        assert isinstance(net[2], ChannelAffine) and isinstance(net[4], ChannelAffine) and net[4] is net[6]
        assert all(type(net[i]) is not ChannelAffine for i in (8, 9, 10))  # no stats, subclass, hooked
        assert torch.allclose(net(x), ref, rtol=1e-4, atol=1e-4)  # float32 rounding through 4 batch norms
    assert [(name, m) for name, m in net.named_modules(remove_duplicate=False)] == before
    assert all(torch.equal(state[k], v) for k, v in net.state_dict().items())
    net[2].train()
    with pytest.raises(RuntimeError, match="inside"):
        with folded_batchnorm(net) as n:
            assert n == 1 and type(net[2]) is nn.BatchNorm2d  # in training mode: not folded
            raise RuntimeError("inside")
    assert [(name, m) for name, m in net.named_modules(remove_duplicate=False)] == before


def jacobian64(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(K, D) float64 Jacobian of a float64 copy of the model at one image x (1, 3, S, S), by torch.autograd."""
    m = copy.deepcopy(model).double().eval()
    return torch.autograd.functional.jacobian(lambda z: m(z.reshape(x.shape))[0], x.double().reshape(-1))


def test_the_jvp_with_dual_buffers_is_the_jacobian_times_the_tangent_and_restores_the_buffers():
    torch.manual_seed(0)
    net = nn.Sequential(Normalize(), nn.Conv2d(3, 4, 3, padding=1), trained_bn(nn.BatchNorm2d(4)), nn.Tanh(),
                        nn.Flatten(), nn.Linear(4 * 6 * 6, 7)).eval()
    x, T = torch.rand(1, 3, 6, 6), torch.randn(5, 1, 3, 6, 6)
    J = jacobian64(net, x)
    with folded_batchnorm(net):
        dual = DualBuffers(net)
        assert len(dual.slots) == 4  # Normalize's mean and std, the ChannelAffine's scale and shift
        buffers = [m._buffers[name] for m, name in dual.slots]
        one = dual.jvp(net, x, T[0])
        many = torch.func.vmap(lambda t: dual.jvp(net, x, t))(T)
        assert all(m._buffers[name] is b for (m, name), b in zip(dual.slots, buffers))  # the same tensors back
        with pytest.raises(ValueError, match="from the forward"):
            dual.jvp(lambda z: (_ for _ in ()).throw(ValueError("from the forward")), x, T[0])
        assert all(m._buffers[name] is b for (m, name), b in zip(dual.slots, buffers))
    expected = (J @ T.reshape(5, -1).double().T).T.float()  # (5, K)
    assert torch.allclose(one[0], expected[0], rtol=1e-4, atol=1e-5)
    assert torch.allclose(many[:, 0], expected, rtol=1e-4, atol=1e-5)


def test_a_plain_function_has_no_dual_buffers_and_gets_the_plain_jvp():
    f = lambda z: (z ** 2).flatten(1)  # noqa: E731
    x, t = torch.rand(1, 3, 2, 2), torch.randn(1, 3, 2, 2)
    dual = DualBuffers(f)
    assert dual.slots == []
    assert torch.allclose(dual.jvp(f, x, t), (2 * x * t).flatten(1))


def test_subspaces_leave_the_users_model_exactly_as_it_was():
    net = net_with_every_case()
    calls = []
    net[2].register_forward_hook(lambda m, i, o: calls.append(1))  # now hooked: must not be folded, must fire
    before = [(name, m) for name, m in net.named_modules(remove_duplicate=False)]
    perturbation_subspaces(net, torch.rand(1, 3, 5, 5), k=2, layer=None, method="block", progress=False)
    assert calls  # the hooked batch norm ran as itself
    assert [(name, m) for name, m in net.named_modules(remove_duplicate=False)] == before
