"""Activations of named layers (``model.named_modules()`` names) through forward hooks.

Used by every analysis that works "on any named layer": unit sensitivity, RSA, CKA.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch
from torch import nn


def layer_names(model: nn.Module) -> list[str]:
    """All addressable layer names of ``model`` (its ``named_modules`` except the root)."""
    return [n for n, _ in model.named_modules() if n]


def get_layer(model: nn.Module, name: str) -> nn.Module:
    """The submodule called ``name``; a KeyError listing the valid names otherwise."""
    modules = dict(model.named_modules())
    if name not in modules or name == "":
        names = layer_names(model)
        shown = ", ".join(names[:60]) + (f", ... ({len(names)} in all)" if len(names) > 60 else "")
        raise KeyError(
            f"layer {name!r} does not exist in {type(model).__name__}. Valid layer names: {shown}"
        )
    return modules[name]


@contextlib.contextmanager
def capture(model: nn.Module, names: Sequence[str], flatten: bool = True) -> Iterator[dict]:
    """Context manager: inside it, each forward pass stores ``out[name]`` for every name.

    Outputs are kept with their graph (so gradients can flow through them) and flattened to
    (B, -1) when ``flatten`` is true.
    """
    out: dict[str, torch.Tensor] = {}
    handles = []
    for name in names:
        layer = get_layer(model, name)

        def hook(_m, _i, o, name=name):
            o = o[0] if isinstance(o, (tuple, list)) else o
            out[name] = o.flatten(1) if flatten else o

        handles.append(layer.register_forward_hook(hook))
    try:
        yield out
    finally:
        for h in handles:
            h.remove()


class LayerOutput(nn.Module):
    """Wrap ``model`` so that forward returns the (B, K) flattened output of layer ``name``.

    ``name=None`` (or "output") returns the model's own output. The forward pass stops being
    useful beyond that layer, but keeps the model's modes and flags untouched.
    """

    def __init__(self, model: nn.Module, name: str | None = None):
        super().__init__()
        self.model = model
        self.name = None if name in (None, "", "output") else name
        if self.name is not None:
            get_layer(model, self.name)  # validate early

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.name is None:
            y = self.model(x)
            return y.flatten(1)
        with capture(self.model, [self.name]) as out:
            self.model(x)
        return out[self.name]


@torch.no_grad()
def extract(model: nn.Module, images: torch.Tensor, names: Sequence[str], batch_size: int = 128) -> dict:
    """Activations (N, K) of each named layer on ``images`` (N, 3, H, W) in [0, 1], on CPU."""
    device = next(model.parameters()).device
    chunks: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    for i in range(0, len(images), batch_size):
        xb = images[i : i + batch_size].to(device)
        with capture(model, names) as out:
            model(xb)
        for n in names:
            chunks[n].append(out[n].float().cpu())
    return {n: torch.cat(v) for n, v in chunks.items()}
