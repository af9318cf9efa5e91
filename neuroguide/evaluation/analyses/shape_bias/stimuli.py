"""Reading cue-conflict stimulus folders (the layout of Geirhos et al.'s stimuli), and finding them.

``<dir>/<shape category>/<name>.png`` with the texture category in the file name after the last
``-`` (``airplane/airplane1-bicycle2.png``; model-vs-human prefixes such as
``0001_..._dog10-bird2.png`` are fine). The categories are the 16 of :mod:`.imagenet16`, unless the
folder holds a ``categories.txt`` (one name per line, ``#`` comments): then they are the names it
lists, the model's own classes (the synthetic set of :mod:`neuroguide.data.synthetic.cue_conflict`).
Images are returned as (B, 3, S, S) float tensors in [0, 1].

:func:`resolve_stimuli_dir` turns ``eval.shape_bias.stimuli_dir`` (``auto``, ``synthetic`` or a
folder) into a folder, writing the synthetic set on first use.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import torch

from neuroguide.evaluation.analyses.shape_bias.imagenet16 import CATEGORIES

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
CATEGORY_FILE = "categories.txt"  # a folder of the model's own classes names them here


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


def folder_categories(folder: str | os.PathLike) -> list[str] | None:
    """The categories a stimulus folder names in its ``categories.txt`` (in the model's output order),
    or None when it has none (the 16 ImageNet categories of Geirhos et al.)."""
    f = Path(folder).expanduser() / CATEGORY_FILE
    if not f.is_file():
        return None
    from neuroguide.data.imagenet import read_class_list

    return read_class_list(f)


def read_cue_conflict(folder: str | os.PathLike, categories: Sequence[str] | None = None
                      ) -> list[CueConflictStimulus]:
    """The cue-conflict images of ``folder`` (``<shape>/<shape><i>-<texture><j>.png``), sorted by path.

    ``categories``: the names the folders and file names may use; default the folder's own
    ``categories.txt`` if it has one, else the 16 categories of Geirhos et al.
    """
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"cue-conflict folder {folder} does not exist. Expected the Geirhos et al. stimuli "
                                "(texture-vs-shape 'style-transfer-preprocessed-512', or model-vs-human's "
                                "'cue-conflict'): one sub-folder per shape category holding e.g. "
                                "airplane/airplane1-bicycle2.png. Fix: eval.shape_bias.stimuli_dir=<that folder> (or "
                                "eval.shape_bias.geirhos_dir, the folder stimuli_dir=auto uses for models trained on "
                                "real data), or stimuli_dir=synthetic for the synthetic cue-conflict set")
    if categories is None:
        categories = folder_categories(folder) or CATEGORIES
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



# ----------------------------------------------------------------------------- where the stimuli are
def _get(d, path: str, default=None):
    for k in path.split("."):
        if not isinstance(d, Mapping) or k not in d:
            return default
        d = d[k]
    return d


def resolve_stimuli_dir(model, stimuli_dir: str | os.PathLike | None, *,
                        geirhos_dir: str | os.PathLike | None = None, synthetic: Mapping | None = None,
                        classes: Sequence | None = None) -> Path | None:
    """The cue-conflict folder to evaluate ``model`` on.

    Args:
        stimuli_dir: ``"auto"``: the synthetic set when the model's run was on synthetic data
            (``data.synthetic`` true in ``model.neuroguide_info["run_config"]``), else ``geirhos_dir``;
            ``"synthetic"``: the synthetic set; a folder: that folder; None: none.
        geirhos_dir: the real Geirhos et al. stimuli (used by ``auto`` on real data).
        synthetic: ``{root, n_per_pair, image_size, seed}`` of the synthetic set, written under
            ``root`` on first use (:func:`neuroguide.data.synthetic.cue_conflict.write_cue_conflict`) with
            the model's classes; ``image_size`` null: the run's ``data.image_size``.
        classes: the model's class names (default: :func:`.core.model_classes`, else the synthetic
            ImageNet's first ``data.synthetic_imagenet.n_classes`` wnids).
    """
    if stimuli_dir is None:
        return None
    run_config = (getattr(model, "neuroguide_info", None) or {}).get("run_config") or {}
    choice = str(stimuli_dir)
    if choice == "auto":
        if not _get(run_config, "data.synthetic", False):
            if geirhos_dir is None:
                raise ValueError("eval.shape_bias.stimuli_dir=auto on a model trained on real data needs "
                                 "eval.shape_bias.geirhos_dir=<Geirhos et al. cue-conflict folder>; got null")
            return Path(str(geirhos_dir)).expanduser()
        choice = "synthetic"
    if choice != "synthetic":
        return Path(choice).expanduser()
    from neuroguide.data.synthetic.cue_conflict import write_cue_conflict
    from neuroguide.data.synthetic.imagenet import WNIDS
    from neuroguide.evaluation.analyses.shape_bias.core import model_classes

    p = dict(synthetic or {})
    root = p.pop("root", None)
    if not root:
        raise ValueError("eval.shape_bias.synthetic.root is not set: expected the folder for the synthetic "
                         "cue-conflict set (conf/eval/shape_bias.yaml: ${paths.synthetic_root}/cue_conflict)")
    if classes is None:
        classes = model_classes(model)
    if classes is None:
        n = _get(run_config, "data.synthetic_imagenet.n_classes")
        if not n:
            raise ValueError("the synthetic cue-conflict set is made from the model's classes, but the model has no "
                             "class list (neither model.imagenet_classes nor run_config data.imagenet_class_list "
                             "as a file, nor data.synthetic_imagenet.n_classes). Fix: pass classes=[name per output]")
        classes = list(WNIDS[: int(n)])
    p["image_size"] = int(p.get("image_size") or _get(run_config, "data.image_size", 64))
    return write_cue_conflict(root, [str(c) for c in classes], **p)
