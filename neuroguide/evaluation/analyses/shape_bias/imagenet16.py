"""The 16 entry-level categories of Geirhos et al. and their ImageNet-1k class indices.

Copied from the public model-vs-human toolbox (bethgelab/model-vs-human,
``modelvshuman/helper/human_categories.py``: ``get_human_object_recognition_categories()`` and the
``<category>_indices`` attributes of ``HumanCategories``), checked entry by entry against that file.
An ImageNet-1k model's decision for a category is the mean softmax probability over these indices
(``ImageNetProbabilitiesTo16ClassesMapping`` with ``np.mean`` in ``modelvshuman/datasets/decision_mappings.py``).

A model trained on a subset of ImageNet (e.g. the ImageNet-50 of Shao et al.) names its classes by
ImageNet-1k index or by wnid; :func:`category_columns` keeps, for each category, the model's output
columns whose ImageNet class belongs to it. wnid -> index uses timm's ImageNet-1k synset list
(``timm.data.ImageNetInfo``), the standard ILSVRC-2012 order (index = position of the sorted wnid).
"""
from __future__ import annotations

from typing import Sequence

# get_human_object_recognition_categories(): sorted alphabetically.
CATEGORIES: tuple[str, ...] = ("airplane", "bear", "bicycle", "bird", "boat", "bottle", "car", "cat", "chair",
                               "clock", "dog", "elephant", "keyboard", "knife", "oven", "truck")

# HumanCategories.<category>_indices (ImageNet-1k class indices, 0-based).
IMAGENET_INDICES: dict[str, tuple[int, ...]] = {
    "airplane": (404,),
    "bear": (294, 295, 296, 297),
    "bicycle": (444, 671),
    "bird": (8, 10, 11, 12, 13, 14, 15, 16, 18, 19, 20, 22, 23, 24, 80, 81, 82, 83, 87, 88, 89, 90, 91, 92, 93,
             94, 95, 96, 98, 99, 100, 127, 128, 129, 130, 131, 132, 133, 135, 136, 137, 138, 139, 140, 141, 142,
             143, 144, 145),
    "boat": (472, 554, 625, 814, 914),
    "bottle": (440, 720, 737, 898, 899, 901, 907),
    "car": (436, 511, 817),
    "cat": (281, 282, 283, 284, 285, 286),
    "chair": (423, 559, 765, 857),
    "clock": (409, 530, 892),
    "dog": (152, 153, 154, 155, 156, 157, 158, 159, 160, 161, 162, 163, 164, 165, 166, 167, 168, 169, 170, 171,
            172, 173, 174, 175, 176, 177, 178, 179, 180, 181, 182, 183, 184, 185, 186, 187, 188, 189, 190, 191,
            193, 194, 195, 196, 197, 198, 199, 200, 201, 202, 203, 205, 206, 207, 208, 209, 210, 211, 212, 213,
            214, 215, 216, 217, 218, 219, 220, 221, 222, 223, 224, 225, 226, 228, 229, 230, 231, 232, 233, 234,
            235, 236, 237, 238, 239, 240, 241, 243, 244, 245, 246, 247, 248, 249, 250, 252, 253, 254, 255, 256,
            257, 259, 261, 262, 263, 265, 266, 267, 268),
    "elephant": (385, 386),
    "keyboard": (508, 878),
    "knife": (499,),
    "oven": (766,),
    "truck": (555, 569, 656, 675, 717, 734, 864, 867),
}

N_IMAGENET = 1000


def imagenet_wnids() -> list[str]:
    """The 1000 ILSVRC-2012 wnids in class-index order (from timm's bundled synset list)."""
    from timm.data import ImageNetInfo

    return list(ImageNetInfo("imagenet-1k").label_names())


def to_imagenet_indices(classes: Sequence[int | str], what: str = "classes") -> list[int]:
    """The ImageNet-1k index of each of a model's classes, given as indices (0..999) or wnids.

    Raises ValueError naming the entries that are neither.
    """
    classes = list(classes)
    if not classes:
        raise ValueError(f"{what} is empty: expected the model's ImageNet class indices or wnids, one per output")
    if all(isinstance(c, str) and not c.isdigit() for c in classes):
        lookup = {w: i for i, w in enumerate(imagenet_wnids())}
        bad = [c for c in classes if c not in lookup]
        if bad:
            raise ValueError(f"{what}: {bad[:5]}{' ...' if len(bad) > 5 else ''} are not ImageNet-1k wnids "
                             "(expected e.g. 'n01440764'). Fix: give the model's class list as ImageNet-1k wnids "
                             "or 0-based class indices")
        return [lookup[c] for c in classes]
    out = []
    for c in classes:
        try:
            i = int(c)
        except (TypeError, ValueError):
            raise ValueError(f"{what}: {c!r} is neither an ImageNet-1k index nor a wnid; do not mix indices and "
                             "wnids") from None
        if not 0 <= i < N_IMAGENET:
            raise ValueError(f"{what}: ImageNet index {i} is outside 0..{N_IMAGENET - 1}")
        out.append(i)
    return out


def category_columns(classes: Sequence[int | str] | None = None, n_outputs: int | None = None
                     ) -> tuple[dict[str, list[int]], list[str]]:
    """Which output columns of a model belong to each of the 16 categories.

    Args:
        classes: ImageNet-1k index or wnid of each model output, in output order; None for a full
            ImageNet-1k model (output ``k`` is class ``k``).
        n_outputs: the model's number of outputs, checked against ``classes`` (or against 1000).
    Returns:
        (``{category: [column, ...]}`` for the categories with at least one column,
        the sorted list of unmapped categories, which have none).
    Raises:
        ValueError when no class of the model falls into any of the 16 categories.
    """
    classes = None if classes is None else list(classes)
    if classes is None:
        if n_outputs is not None and n_outputs != N_IMAGENET:
            raise ValueError(f"the model has {n_outputs} outputs but no class list was given: expected {N_IMAGENET} "
                             "outputs (an ImageNet-1k model), or pass classes=[ImageNet index or wnid per output] "
                             "(e.g. the wnids of the model's class-list file)")
        index = list(range(N_IMAGENET))
    else:
        index = to_imagenet_indices(classes)
        if n_outputs is not None and len(index) != n_outputs:
            raise ValueError(f"classes lists {len(index)} ImageNet classes but the model has {n_outputs} outputs: "
                             "give one ImageNet index or wnid per output, in output order")
    where: dict[int, list[int]] = {}
    for col, i in enumerate(index):
        where.setdefault(i, []).append(col)
    mapped = {c: sorted(col for i in IMAGENET_INDICES[c] for col in where.get(i, [])) for c in CATEGORIES}
    mapped = {c: cols for c, cols in mapped.items() if cols}
    unmapped = [c for c in CATEGORIES if c not in mapped]
    if not mapped:
        shown = [classes[i] for i in range(min(5, len(index)))] if classes is not None else []
        raise ValueError(f"none of the model's {len(index)} classes (e.g. {shown}) belongs to any of the 16 "
                         f"cue-conflict categories {list(CATEGORIES)}: shape bias on the Geirhos stimuli is undefined "
                         "for this model. Fix: use the style-transfer cue-conflict images made from the model's "
                         "own classes (neuroguide.evaluation.analyses.shape_bias.style_transfer), or check the class list")
    return mapped, unmapped
