"""Reading cue-conflict stimulus folders (the layout of Geirhos et al.'s stimuli).

``<dir>/<shape category>/<name>.png`` with the texture category in the file name after the last
``-`` (``airplane/airplane1-bicycle2.png``; model-vs-human prefixes such as
``0001_..._dog10-bird2.png`` are fine). Images are returned as (B, 3, S, S) float tensors in [0, 1].
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from neuroguide.evaluation.shape_bias.imagenet16 import CATEGORIES

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")


@dataclass
class CueConflictStimulus:
    path: Path
    shape: str
    texture: str


def _match(token: str, vocabulary: Sequence[str]) -> str | None:
    """The vocabulary entry that ``token`` names, alone or followed by a running number (longest wins)."""
    hits = [c for c in vocabulary if token == c or (token.startswith(c) and token[len(c):].isdigit())]
    return max(hits, key=len) if hits else None


def parse_name(file_name: str, vocabulary: Sequence[str] = CATEGORIES) -> tuple[str | None, str | None]:
    """(shape, texture) categories named in a cue-conflict file name (None where not recognised).

    ``airplane1-bicycle2.png`` -> ("airplane", "bicycle"); ``0003_cl_dog10-bird2.png`` -> ("dog", "bird").
    """
    stem = Path(file_name).stem
    if "-" not in stem:
        return None, None
    head, tail = stem.rsplit("-", 1)
    return _match(head.rsplit("_", 1)[-1], vocabulary), _match(tail, vocabulary)


def read_cue_conflict(folder: str | os.PathLike, categories: Sequence[str] = CATEGORIES) -> list[CueConflictStimulus]:
    """The cue-conflict images of ``folder`` (``<shape>/<shape><i>-<texture><j>.png``), sorted by path."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"cue-conflict folder {folder} does not exist. Expected the Geirhos et al. stimuli "
                                "(texture-vs-shape 'style-transfer-preprocessed-512', or model-vs-human's "
                                "'cue-conflict'): one sub-folder per shape category holding e.g. "
                                "airplane/airplane1-bicycle2.png. Fix: eval.shape_bias.stimuli_dir")
    subdirs = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not subdirs:
        raise ValueError(f"cue-conflict folder {folder} has no category sub-folders; expected one per shape category "
                         f"among {list(categories)}")
    unknown = [p.name for p in subdirs if p.name not in categories]
    if unknown:
        raise ValueError(f"cue-conflict folder {folder}: sub-folders {unknown} are not cue-conflict categories. "
                         f"Expected folder names among {list(categories)} (lower case, as in the Geirhos et al. "
                         "stimuli). Fix: rename or remove them")
    out = []
    for sub in subdirs:
        for p in sorted(sub.iterdir()):
            if p.suffix.lower() not in IMAGE_EXTENSIONS or p.name.startswith("."):
                continue
            shape_tok, texture = parse_name(p.name, categories)
            if texture is None:
                raise ValueError(f"cue-conflict image {p}: cannot read the texture category from the file name. "
                                 f"Expected '<shape><i>-<texture><j>{p.suffix}' with <texture> among "
                                 f"{list(categories)} (e.g. airplane1-bicycle2.png)")
            if shape_tok is not None and shape_tok != sub.name:
                raise ValueError(f"cue-conflict image {p}: the file name says shape '{shape_tok}' but it lies in the "
                                 f"folder '{sub.name}'; the folder is the shape category. Move the file")
            out.append(CueConflictStimulus(p, sub.name, texture))
    if not out:
        raise ValueError(f"cue-conflict folder {folder} holds no images ({', '.join(IMAGE_EXTENSIONS)}) in its "
                         "category sub-folders")
    return out


def load_images(paths: Sequence[Path], image_size: int | None = None) -> torch.Tensor:
    """(B, 3, S, S) float images in [0, 1] (resized to ``image_size`` when given)."""
    from PIL import Image
    from torchvision.transforms.functional import pil_to_tensor, resize

    out = []
    for p in paths:
        with Image.open(p) as im:
            x = pil_to_tensor(im.convert("RGB")).float() / 255.0
        if image_size and tuple(x.shape[-2:]) != (image_size, image_size):
            x = resize(x, [image_size, image_size], antialias=True).clamp(0, 1)
        out.append(x)
    return torch.stack(out)

