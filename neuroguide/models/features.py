"""Activations of named layers (``model.named_modules()`` names) through forward hooks, and the
evaluation mode every analysis and attack runs a model in.

Used by every analysis that works "on any named layer": unit sensitivity, RSA, CKA, layer selection.
"""
from __future__ import annotations

import contextlib
import math
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

OUTPUT = "output"  # the layer name of the model's own output


def device_of(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a model without parameters)."""
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


@contextlib.contextmanager
def evaluation_mode(module: nn.Module | None) -> Iterator[None]:
    """Inside: ``module`` and all its submodules in eval mode, its parameters ``requires_grad=False``.

    On exit every submodule's ``training`` flag and every parameter's ``requires_grad`` are put back
    exactly as they were (module by module: a frozen part stays in eval, a training part trains).
    """
    if module is None:
        yield
        return
    modes = [(m, m.training) for m in module.modules()]
    flags = [(p, p.requires_grad) for p in module.parameters()]
    try:
        module.eval()
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for m, was in modes:
            m.training = was
        for p, was in flags:
            p.requires_grad_(was)


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
        self.name = None if layer_key(name) == OUTPUT else name
        if self.name is not None:
            get_layer(model, self.name)  # validate early

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.name is None:
            y = self.model(x)
            return y.flatten(1)
        with capture(self.model, [self.name]) as out:
            self.model(x)
        return out[self.name]


def layer_key(layer: str | None) -> str:
    """The name of ``layer`` in results: None, "" and "output" all mean the model output ("output")."""
    return OUTPUT if layer in (None, "", OUTPUT) else str(layer)


def pool_map(a: torch.Tensor, pool: int | None) -> torch.Tensor:
    """What ``pool`` does to one layer's output before it is flattened (here and in encoding models, so that
    cached features and the exported model agree): (B, C, H, W) maps wider than ``pool`` are average-pooled to
    ``pool`` x ``pool`` (1: global average); (B, N, D) token sequences (vision transformers) are averaged over
    tokens; other outputs, and any output with ``pool=None``, are kept whole."""
    if pool is None:
        return a
    if a.ndim == 4 and a.shape[-1] > pool:
        return F.adaptive_avg_pool2d(a, pool)
    if a.ndim == 3:
        return a.mean(1)
    return a


def activations(model: nn.Module, images, layers: Sequence[str | None], *, batch_size: int = 128,
                pool: int | None = None, root: nn.Module | None = None,
                progress: bool = False) -> dict[str, torch.Tensor]:
    """Flattened float32 CPU activations ``{layer: (N, D)}`` of each layer on ``images``.

    The one activation extractor of the project: batched, under ``torch.no_grad``, the model in
    :func:`evaluation_mode` (its modes and flags restored afterwards).

    Args:
        model: takes (B, 3, H, W) images in [0, 1].
        images: (N, 3, H, W) tensor, or a dataset of (3, H, W) images (or of tuples whose first item is
            the image, e.g. (image, label)) read batch by batch, so a large image set never sits in memory.
        layers: names in ``root`` (``named_modules`` names); None / "" / "output" is the model output,
            keyed "output".
        batch_size: images per forward pass.
        pool: average-pool (B, C, H, W) maps larger than ``pool`` x ``pool`` to that size before
            flattening, and average (B, N, D) token sequences over tokens (bounds D for large layers;
            :func:`pool_map`); None keeps them whole.
        root: the module the layer names refer to (default: ``model``), e.g. the backbone inside a wrapper.
        progress: show a progress bar.
    Returns:
        ``{layer_key(layer): (N, D) tensor}`` in the order of ``layers``.
    """
    root = model if root is None else root
    prefix = {m: n for n, m in model.named_modules()}.get(root)
    if prefix is None:
        raise ValueError(f"activations: root ({type(root).__name__}) is not a submodule of the model "
                         f"({type(model).__name__}); give the module the layer names refer to")
    keys = [layer_key(layer) for layer in layers]
    hooked = {k: (f"{prefix}.{k}" if prefix else k) for k in keys if k != OUTPUT}
    for k in hooked:
        get_layer(root, k)  # KeyError listing the valid names
    device = device_of(model)
    chunks: dict[str, list[torch.Tensor]] = {k: [] for k in keys}
    if isinstance(images, torch.Tensor):
        batches = (images[i:i + batch_size] for i in range(0, len(images), batch_size))
    else:
        batches = torch.utils.data.DataLoader(images, batch_size=batch_size)
    with evaluation_mode(model), torch.no_grad():
        for xb in tqdm(batches, total=math.ceil(len(images) / batch_size), desc="activations",
                       disable=not progress, leave=False):
            with capture(model, list(hooked.values()), flatten=False) as out:
                y = model((xb[0] if isinstance(xb, (list, tuple)) else xb).to(device))
            for k in keys:
                a = y if k == OUTPUT else out[hooked[k]]
                a = pool_map(a, pool)
                chunks[k].append(a.reshape(a.shape[0], -1).float().cpu())
    return {k: torch.cat(v) for k, v in chunks.items()}
