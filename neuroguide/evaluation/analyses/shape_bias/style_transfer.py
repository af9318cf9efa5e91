"""Cue-conflict images from a model's own classes by style transfer (AdaIN, Huang & Belongie 2017).

Shao et al. measured the shape bias of their ImageNet-50 models on cue-conflict images made from the
models' own classes: the shape (content) of an image of class ``a`` rendered in the texture (style)
of an image of class ``b != a``. This module makes such images with AdaIN:

    t = AdaIN(f(c), f(s)) = sigma(f(s)) * (f(c) - mu(f(c))) / sigma(f(c)) + mu(f(s))
    image = g(alpha * t + (1 - alpha) * f(c))

``f`` the VGG-19 encoder up to relu4_1, ``g`` the mirrored decoder, ``mu``/``sigma`` per-channel
spatial mean and standard deviation (variance + 1e-5, unbiased, as the reference code).

The two networks have exactly the layer layout of the public PyTorch AdaIN release
(naoto0804/pytorch-AdaIN, ``net.py``: ``vgg`` and ``decoder`` as ``nn.Sequential``), so its weight
files ``vgg_normalised.pth`` (the whole VGG; the layers after relu4_1 are ignored) and
``decoder.pth`` load as they are, always through ``safe_torch_load`` (weights only). The encoder's
first layer is a 1x1 convolution that maps [0, 1] RGB to the caffe VGG input, so images stay in
[0, 1] throughout; the output is clamped to [0, 1].
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from neuroguide.models.checkpoints import safe_torch_load

ENCODER_LAYERS = 31  # vgg[:31] ends at relu4_1


def _conv(cin: int, cout: int) -> list[nn.Module]:
    return [nn.ReflectionPad2d((1, 1, 1, 1)), nn.Conv2d(cin, cout, (3, 3)), nn.ReLU()]


def vgg_encoder() -> nn.Sequential:
    """VGG-19 (normalised, caffe order) up to relu4_1: (B, 3, H, W) in [0, 1] -> (B, 512, H/8, W/8)."""
    pool = lambda: nn.MaxPool2d((2, 2), (2, 2), (0, 0), ceil_mode=True)  # noqa: E731
    layers = [nn.Conv2d(3, 3, (1, 1))]
    layers += _conv(3, 64) + _conv(64, 64) + [pool()]
    layers += _conv(64, 128) + _conv(128, 128) + [pool()]
    layers += _conv(128, 256) + _conv(256, 256) + _conv(256, 256) + _conv(256, 256) + [pool()]
    layers += _conv(256, 512)
    assert len(layers) == ENCODER_LAYERS
    return nn.Sequential(*layers)


def decoder() -> nn.Sequential:
    """The AdaIN decoder: (B, 512, h, w) -> (B, 3, 8h, 8w)."""
    up = lambda: nn.Upsample(scale_factor=2, mode="nearest")  # noqa: E731
    layers = _conv(512, 256) + [up()]
    layers += _conv(256, 256) + _conv(256, 256) + _conv(256, 256) + _conv(256, 128) + [up()]
    layers += _conv(128, 128) + _conv(128, 64) + [up()]
    layers += _conv(64, 64) + [nn.ReflectionPad2d((1, 1, 1, 1)), nn.Conv2d(64, 3, (3, 3))]
    return nn.Sequential(*layers)


def mean_std(feat: torch.Tensor, eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel spatial mean and std of (B, C, H, W) features: two (B, C, 1, 1) tensors."""
    b, c = feat.shape[:2]
    flat = feat.reshape(b, c, -1)
    return flat.mean(dim=2).view(b, c, 1, 1), (flat.var(dim=2) + eps).sqrt().view(b, c, 1, 1)


def adain(content: torch.Tensor, style: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Adaptive instance normalization: content features with the style's channel means and stds."""
    if content.shape[:2] != style.shape[:2]:
        raise ValueError(f"adain: content features {tuple(content.shape)} and style features {tuple(style.shape)} "
                         "must agree in batch and channels")
    cm, cs = mean_std(content, eps)
    sm, ss = mean_std(style, eps)
    return (content - cm) / cs * ss + sm


class AdaIN(nn.Module):
    """Style transfer: ``forward(content, style, alpha)`` -> stylized (B, 3, H, W) in [0, 1].

    ``content`` and ``style`` are (B, 3, H, W) in [0, 1] (style may have another size). The output
    has the content's size (resized back when H, W are not multiples of 8).
    """

    def __init__(self):
        super().__init__()
        self.encoder = vgg_encoder()
        self.decoder = decoder()

    @classmethod
    def from_files(cls, vgg_path: str | os.PathLike, decoder_path: str | os.PathLike) -> "AdaIN":
        """Load the AdaIN release's ``vgg_normalised.pth`` and ``decoder.pth`` (state dicts, weights only)."""
        net = cls()
        _load_into(net.encoder, safe_torch_load(vgg_path), vgg_path, "vgg", keep_below=ENCODER_LAYERS)
        _load_into(net.decoder, safe_torch_load(decoder_path), decoder_path, "decoder")
        return net.eval()

    def forward(self, content: torch.Tensor, style: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha (degree of stylization) must be in [0, 1], got {alpha}")
        for name, x in (("content", content), ("style", style)):
            if min(x.shape[-2:]) < 16:
                raise ValueError(f"AdaIN: {name} images are {tuple(x.shape[-2:])} px; they must be at least 16 x 16 "
                                 "(relu4_1 is 1/8 of the size and needs >= 2 x 2 positions for a channel std)")
        fc = self.encoder(content)
        fs = self.encoder(style)
        if fs.shape[0] != fc.shape[0]:
            raise ValueError(f"content batch {fc.shape[0]} and style batch {fs.shape[0]} differ")
        t = alpha * adain(fc, fs) + (1 - alpha) * fc
        out = self.decoder(t)
        if out.shape[-2:] != content.shape[-2:]:
            out = F.interpolate(out, size=content.shape[-2:], mode="bilinear", align_corners=False)
        return out.clamp(0, 1)


def _load_into(module: nn.Sequential, state, path, what: str, keep_below: int | None = None) -> None:
    """Load a Sequential's state dict (keys ``"<index>.weight"``), with errors naming the file."""
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state dict of the AdaIN {what} network, found {type(state).__name__}")
    if "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if keep_below is not None:
        state = {k: v for k, v in state.items() if k.split(".")[0].isdigit() and int(k.split(".")[0]) < keep_below}
    want = module.state_dict()
    missing = sorted(set(want) - set(state))
    if missing:
        raise ValueError(f"{path} is not an AdaIN {what} state dict: missing {missing[:6]}"
                         f"{' ...' if len(missing) > 6 else ''} (found keys {sorted(state)[:6]}). Expected the "
                         f"pytorch-AdaIN release files: vgg_normalised.pth for the encoder, decoder.pth for the decoder")
    bad = [k for k in want if tuple(state[k].shape) != tuple(want[k].shape)]
    if bad:
        k = bad[0]
        raise ValueError(f"{path}: tensor {k} has shape {tuple(state[k].shape)}, the AdaIN {what} needs "
                         f"{tuple(want[k].shape)}; is this the right file for the {what}?")
    module.load_state_dict({k: state[k] for k in want})


# ----------------------------------------------------------------------------- cue-conflict sets
@dataclass
class CueConflictSet:
    """Cue-conflict images with their two labels.

    Attributes:
        images: (M, 3, H, W) in [0, 1].
        shape: (M,) class of the content image (the shape cue).
        texture: (M,) class of the style image (the texture cue); never equal to ``shape``.
        content_index, style_index: (M,) rows of the source images used.
    """

    images: torch.Tensor
    shape: torch.Tensor
    texture: torch.Tensor
    content_index: torch.Tensor
    style_index: torch.Tensor

    def __len__(self) -> int:
        return len(self.images)

    def save(self, folder: str | os.PathLike, class_names: Sequence[str] | None = None) -> list[Path]:
        """PNG files in the Geirhos layout ``<shape>/<shape><k>-<texture><k>.png``, k = position in the set
        (``content_index`` / ``style_index`` say which source images made image k)."""
        from PIL import Image

        from neuroguide.utils.io import atomic_path

        folder = Path(folder)
        names = class_names or [f"class{k}" for k in range(int(max(self.shape.max(), self.texture.max())) + 1)]
        paths = []
        for k, (img, s, t) in enumerate(zip(self.images, self.shape, self.texture)):
            p = folder / names[int(s)] / f"{names[int(s)]}{k}-{names[int(t)]}{k}.png"
            arr = (img.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
            with atomic_path(p, suffix=".png") as tmp:
                Image.fromarray(arr).save(tmp, format="PNG")
            paths.append(p)
        return paths


def cue_conflict_from_classes(images: torch.Tensor, labels: torch.Tensor,
                              stylize: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], *, n_images: int = 256,
                              batch_size: int = 16, seed: int = 0, progress: bool = False) -> CueConflictSet:
    """Cue-conflict images from labelled images: each content image styled by an image of another class.

    Args:
        images: (N, 3, H, W) in [0, 1] (e.g. the model's validation images).
        labels: (N,) class indices (the model's own classes), at least two distinct classes.
        stylize: ``(content (B, 3, H, W), style (B, 3, H, W)) -> (B, 3, H, W)``, e.g. an :class:`AdaIN`.
        n_images: how many images to make (content images are taken in a seeded random order,
            cycling when ``n_images > N``; each gets a random style image of a different class).
    """
    labels = torch.as_tensor(labels).long().cpu()
    if images.ndim != 4 or labels.shape != (images.shape[0],):
        raise ValueError(f"expected images (N, 3, H, W) and labels (N,), got {tuple(images.shape)} and "
                         f"{tuple(labels.shape)}")
    classes = labels.unique()
    if len(classes) < 2:
        raise ValueError(f"cue-conflict images need images of at least 2 classes, got classes {classes.tolist()}")
    g = torch.Generator().manual_seed(seed)
    n = images.shape[0]
    content = torch.cat([torch.randperm(n, generator=g) for _ in range(-(-n_images // n))])[:n_images]
    style = torch.empty_like(content)
    for i, c in enumerate(content.tolist()):
        others = torch.nonzero(labels != labels[c]).squeeze(1)
        style[i] = others[torch.randint(len(others), (1,), generator=g)]
    device = next(iter(stylize.parameters())).device if isinstance(stylize, nn.Module) else images.device
    out = []
    with torch.no_grad():
        for s in tqdm(range(0, n_images, batch_size), desc="style transfer", disable=not progress, leave=False):
            ci, si = content[s:s + batch_size], style[s:s + batch_size]
            out.append(stylize(images[ci].to(device), images[si].to(device)).float().cpu())
    return CueConflictSet(torch.cat(out), labels[content], labels[style], content, style)
