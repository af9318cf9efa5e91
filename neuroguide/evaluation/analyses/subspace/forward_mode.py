"""Forward-mode products ``J t`` (JVPs) without functorch's per-operation overhead on a CPU.

Under ``torch.func.jvp`` an operation between a dual tensor and a plain one (a BatchNorm's running statistics, a
normalization's mean and std) gives the plain operand an efficient zero tangent, whose shape is then found by a
Python meta kernel: on a CPU that costs more than the operation itself on small feature maps (an eval-mode
BatchNorm in a vmapped JVP costs several ReLUs). Two exact rewrites remove them (``benchmarks/subspace.py``
measures the products with them against the explicit Jacobian with and without the fold):

- :func:`folded_batchnorm`: inside, every eval-mode ``BatchNorm1d/2d/3d`` with running statistics (and no hooks of
  its own) is replaced by a :class:`ChannelAffine` ``x * scale + shift`` with ``scale = weight / sqrt(running_var +
  eps)`` and ``shift = bias - running_mean * scale``: the same function (to float32 rounding), one multiply and
  one add instead of the batch norm's tangent formula. The original modules are put back on exit.
- :class:`DualBuffers`: the floating buffers of the :class:`ChannelAffine` and
  :class:`~neuroguide.models.normalize.Normalize` modules enter the JVP as primals with zero tangents, so that every
  elementwise operation of theirs has two dual operands (and no efficient zeros).

Only modules whose operations are known (elementwise) get dual buffers: a zero tangent through an arbitrary
buffer (a sampling grid, say) could cost more than it saves.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from neuroguide.models.normalize import Normalize

BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


class ChannelAffine(nn.Module):
    """An eval-mode batch norm as ``x * scale + shift`` per channel: (B, C, ...) -> (B, C, ...).

    Args:
        bn: a ``BatchNorm1d/2d/3d`` with running statistics; its weight and bias (when affine) are read once.
    """

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm):
        super().__init__()
        with torch.no_grad():
            scale = torch.rsqrt(bn.running_var + bn.eps)
            if bn.weight is not None:
                scale = scale * bn.weight
            shift = -bn.running_mean * scale
            if bn.bias is not None:
                shift = shift + bn.bias
        self.register_buffer("scale", scale.detach().clone(), persistent=False)
        self.register_buffer("shift", shift.detach().clone(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (1, -1) + (1,) * (x.ndim - 2)
        return x * self.scale.view(shape) + self.shift.view(shape)


def foldable(module: nn.Module) -> bool:
    """True for a plain ``BatchNorm1d/2d/3d`` in eval mode that uses running statistics and has no hooks."""
    return (type(module) in BATCHNORMS and not module.training and module.track_running_stats
            and module.running_mean is not None and module.running_var is not None
            and not (module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                     or getattr(module, "_backward_pre_hooks", None)))


@contextmanager
def folded_batchnorm(model: nn.Module) -> Iterator[int]:
    """Inside: each :func:`foldable` batch norm of ``model`` replaced by its :class:`ChannelAffine` (a module shared by
    several parents becomes one shared ChannelAffine); yields how many were folded. On exit every original module is
    back in its place, whatever happened inside."""
    swapped: list[tuple[nn.Module, str, nn.Module]] = []
    folded: dict[int, ChannelAffine] = {}
    try:
        for parent in list(model.modules()):
            for name, child in list(parent._modules.items()):
                if child is not None and foldable(child):
                    if id(child) not in folded:
                        folded[id(child)] = ChannelAffine(child)
                    swapped.append((parent, name, child))
                    parent._modules[name] = folded[id(child)]
        yield len(folded)
    finally:
        for parent, name, child in reversed(swapped):
            parent._modules[name] = child


class DualBuffers:
    """The floating buffers of the :class:`ChannelAffine` and ``Normalize`` modules of ``module`` (a response
    function), to enter :meth:`jvp` as primals with zero tangents.

    Attributes:
        slots: (module, buffer name) pairs; ``primals``: their tensors; ``tangents``: zeros of the same shapes.
    """

    def __init__(self, module):
        modules = module.modules() if isinstance(module, nn.Module) else ()
        self.slots = [(m, name) for m in modules if isinstance(m, (ChannelAffine, Normalize))
                      for name, b in m._buffers.items() if b is not None and b.is_floating_point()]
        self.primals = tuple(m._buffers[name] for m, name in self.slots)
        self.tangents = tuple(torch.zeros_like(b) for b in self.primals)

    def jvp(self, forward, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``J t``: ``torch.func.jvp(forward, (x,), (t,))[1]``, with the slots' buffers dual (zero tangents) inside
        (vmappable over ``t``)."""
        if not self.slots:
            return torch.func.jvp(forward, (x,), (t,))[1]

        def with_dual_buffers(x, *buffers):
            for (m, name), b in zip(self.slots, buffers):
                m._buffers[name] = b
            try:
                return forward(x)
            finally:
                for (m, name), b in zip(self.slots, self.primals):
                    m._buffers[name] = b

        return torch.func.jvp(with_dual_buffers, (x, *self.primals), (t, *self.tangents))[1]
