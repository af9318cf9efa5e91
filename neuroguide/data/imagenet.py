"""Classification data: an ImageNet subset in ImageFolder layout, or CIFAR-100, as a LightningDataModule.

ImageNet subset (``dataset="imagenet_subset"``)
    ``<root>/train/<wnid>/*.JPEG`` and ``<root>/val/<wnid>/*.JPEG`` (the validation set sorted into
    class folders, as torchvision's ImageFolder expects), plus a class-list file selecting the
    subset: one wnid per line, ``#`` starts a comment, anything after the first word of a line is
    ignored (so ``LOC_synset_mapping.txt`` works as a list of all 1000 classes). The class index is
    the position in the class list (the ImageNet-50 list of Shao et al. is such a file). Without a
    class list every folder of ``<root>/train`` is a class, in sorted order.

CIFAR-100 (``dataset="cifar100"``)
    ``<root>/cifar-100-python/{train,test,meta}`` as unpacked from ``cifar-100-python.tar.gz``
    (read by ``torchvision.datasets.CIFAR100``, never downloaded). A class list here names CIFAR-100
    fine labels (e.g. ``apple``) and selects a subset the same way.

Splits (train / val / test)
    ImageNet's test labels are not public, so, as is usual, its ``val/`` folder (CIFAR-100: its test
    set) is the **test** split: held out from training and from checkpoint selection. The
    **validation** split (early stopping, the best checkpoint) is held out from the training
    images: ``val_fraction`` of every class (stratified: ``round(val_fraction * n_c)`` images of a
    class of ``n_c``, at least 1 and never all), chosen by a permutation seeded by ``split_seed``
    and the class name, so a class holds out the same images whatever the class list, the run's
    ``seed`` or the order of classes. The rest is the training split (shuffled by ``seed``, see
    :mod:`neuroguide.data.loaders`). ``val_fraction=0`` validates on the test split, as versions
    before the held-out split did (checkpoint selection then sees the test images).

Transforms (no normalization: every model normalizes inside, images stay in [0, 1])
    ImageNet train: RandomResizedCrop(image_size), RandomHorizontalFlip, ToTensor.
    ImageNet val: Resize(int(image_size / 0.875)), CenterCrop(image_size), ToTensor.
    CIFAR train: Resize(image_size) when image_size != 32, RandomCrop(image_size, padding=image_size // 8),
    RandomHorizontalFlip, ToTensor. CIFAR val: Resize(image_size) when != 32, ToTensor.
    Batches are ``(images (B, 3, S, S) float32 in [0, 1], labels (B,) int64)``.

Unreadable image files (policy ``unreadable``)
    Files are listed up front but read lazily, so a corrupt or truncated file is found when it is
    first read. With ``unreadable="skip"`` (default) the sample is replaced by the next readable
    sample of the split (index + 1, + 2, ... wrapping around), a warning names the file, the file is
    remembered (in shared memory, so data-loader workers skip it from then on) and counted in
    ``datamodule.n_unreadable`` (distinct files met so far, per process in multi-GPU runs;
    ``datamodule.unreadable_files`` lists them). With ``unreadable="error"`` the first unreadable
    file raises :class:`UnreadableImageError` naming it.

``val_limit`` keeps at most that many validation images, balanced over classes (the first images
of every class in turn), for quick validation on large subsets; the test split is always complete.
"""
from __future__ import annotations

import copy
import logging
import os
import warnings
from pathlib import Path
from typing import Callable, Sequence

import lightning as L
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T
from torchvision.datasets import CIFAR100
from torchvision.datasets.folder import IMG_EXTENSIONS, DatasetFolder, pil_loader
from torchvision.datasets.vision import StandardTransform

from neuroguide.data.loaders import train_loader
from neuroguide.data.splits import balanced_head, stratified_split

log = logging.getLogger("neuroguide")

DATASETS = ("imagenet_subset", "cifar100")
UNREADABLE_POLICIES = ("skip", "error")
CIFAR_FOLDER = "cifar-100-python"
# What PIL raises on a corrupt, truncated, empty or unknown image file.
READ_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


class UnreadableImageError(OSError):
    """An image file of the dataset could not be decoded (with ``unreadable="error"``)."""


# ----------------------------------------------------------------------------- class list
def read_class_list(path: str | os.PathLike) -> list[str]:
    """The wnids (or class names) of a class-list file, in order: one per line, ``#`` comments.

    Only the first whitespace-separated word of a line counts. Raises FileNotFoundError when the
    file is missing and ValueError when it names no class or names a class twice.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"class list {path} does not exist: expected a text file with one wnid per line "
                                "(e.g. n01440764), '#' for comments. Fix: data.imagenet_class_list / "
                                "paths.imagenet_class_list, or class_list=null to use every folder of <root>/train.")
    names, seen = [], {}
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        name = words[0]
        if name in seen:
            raise ValueError(f"class list {path} names {name!r} twice (lines {seen[name]} and {lineno}); "
                             "each class must appear once, since its index is its position. Remove the duplicate.")
        seen[name] = lineno
        names.append(name)
    if not names:
        raise ValueError(f"class list {path} is empty: it holds no wnid (only blank or '#' comment lines). "
                         "Expected one wnid per line, e.g. n01440764. Fix the file or set class_list=null.")
    return names


def imagenet_classes(root: str | os.PathLike, class_list: str | os.PathLike | None) -> list[str]:
    """The wnids of the subset: the class list, or every folder of ``<root>/train`` (sorted)."""
    if class_list is not None:
        return read_class_list(class_list)
    train = Path(root).expanduser() / "train"
    if not train.is_dir():
        raise FileNotFoundError(f"{train} does not exist: expected the ImageFolder layout <root>/train/<wnid>/*.JPEG "
                                f"and <root>/val/<wnid>/*.JPEG under root={root}. Fix paths.imagenet_root.")
    wnids = sorted(d.name for d in os.scandir(train) if d.is_dir() and not d.name.startswith("."))
    if not wnids:
        raise FileNotFoundError(f"{train} holds no class folders: expected {train}/<wnid>/*.JPEG")
    return wnids


# ----------------------------------------------------------------------------- datasets
class SkipUnreadable:
    """Mixin: ``__getitem__`` with the unreadable-file policy over ``self.samples`` [(path, label)]."""

    samples: list[tuple[str, int]]
    loader: Callable
    transform: Callable | None
    unreadable: str

    def _init_unreadable(self, unreadable: str) -> None:
        self.unreadable = unreadable
        self.bad = torch.zeros(len(self.samples), dtype=torch.bool).share_memory_()  # shared with workers

    @property
    def unreadable_files(self) -> list[str]:
        return [self.samples[i][0] for i in torch.nonzero(self.bad).flatten().tolist()]

    def __getitem__(self, index: int):
        n = len(self.samples)
        for k in range(n):
            j = (index + k) % n
            if self.bad[j]:
                continue
            path, target = self.samples[j]
            try:
                img = self.loader(path)
            except READ_ERRORS as e:
                if self.unreadable == "error":
                    raise UnreadableImageError(
                        f"cannot read image file {path}: {type(e).__name__}: {e}. Replace or delete the file, "
                        "or set unreadable='skip' to replace such samples by the next readable one.") from e
                self.bad[j] = True
                warnings.warn(f"unreadable image file {path} ({type(e).__name__}: {e}): skipped, sample {j} "
                              "replaced by the next readable one (unreadable='skip')", RuntimeWarning, stacklevel=2)
                continue
            return (self.transform(img) if self.transform is not None else img), target
        raise UnreadableImageError(f"none of the {n} image files under {getattr(self, 'root', '?')} can be read")


class ImageSubsetFolder(SkipUnreadable, DatasetFolder):
    """One split (``<root>/<split>/<wnid>/*``) of an ImageNet subset; label = position in ``wnids``.

    Item: (image (3, S, S) float in [0, 1] after ``transform``, label int).
    """

    def __init__(self, split_dir: str | os.PathLike, wnids: Sequence[str], transform: Callable | None = None,
                 unreadable: str = "skip", class_list_file: str | os.PathLike | None = None,
                 limit: int | None = None):
        self.wnids = list(wnids)
        self.class_list_file = class_list_file
        super().__init__(str(Path(split_dir).expanduser()), loader=pil_loader, extensions=IMG_EXTENSIONS,
                         transform=transform)
        if limit is not None:
            self.samples = balanced_head(self.samples, int(limit))
            self.targets = [t for _, t in self.samples]
        self.imgs = self.samples
        self._init_unreadable(unreadable)

    def subset(self, rows: Sequence[int], transform: Callable | None, limit: int | None = None) -> "ImageSubsetFolder":
        """The samples ``rows`` (then at most ``limit``, balanced over classes) with ``transform``,
        without listing the folder again; its own record of unreadable files."""
        new = copy.copy(self)
        new.samples = [self.samples[int(i)] for i in rows]
        if limit is not None:
            new.samples = balanced_head(new.samples, int(limit))
        new.targets = [t for _, t in new.samples]
        new.imgs = new.samples
        new.transform, new.transforms = transform, StandardTransform(transform, None)
        new._init_unreadable(self.unreadable)
        return new

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        split = Path(directory)
        missing = [w for w in self.wnids if not (split / w).is_dir()]
        if missing:
            src = f"named in class list {self.class_list_file}" if self.class_list_file else "found in <root>/train"
            shown = ", ".join(missing[:10]) + (f" (and {len(missing) - 10} more)" if len(missing) > 10 else "")
            hint = ""
            if split.is_dir() and any(f.suffix.lower() in IMG_EXTENSIONS for f in _first_files(split)):
                hint = (f" {split} holds image files directly: sort them into class folders "
                        "<wnid>/ (e.g. with the usual valprep.sh script) to get the ImageFolder layout.")
            elif not split.is_dir():
                hint = f" The folder {split} itself does not exist."
            raise FileNotFoundError(
                f"wnid {shown} {src} has no folder in {split}: expected {split}/<wnid>/*.JPEG for every class.{hint} "
                "Fix: point paths.imagenet_root at the ImageFolder root or remove the wnid from the class list.")
        return self.wnids, {w: i for i, w in enumerate(self.wnids)}

    def make_dataset(self, directory, class_to_idx, extensions=None, is_valid_file=None, allow_empty=False):
        try:
            return super().make_dataset(directory, class_to_idx, extensions, is_valid_file, allow_empty)
        except FileNotFoundError as e:  # a class folder without images
            raise FileNotFoundError(f"{e} (in {directory}, for the class list {self.class_list_file}). "
                                    "Expected image files in every class folder.") from e


def _first_files(folder: Path, n: int = 20) -> list[Path]:
    out = []
    for entry in os.scandir(folder):
        if entry.is_file():
            out.append(Path(entry.path))
            if len(out) >= n:
                break
    return out


class _LocalCIFAR100(CIFAR100):
    """CIFAR-100 from a local folder: the files must exist; their md5 sums are not checked."""

    train_list = [["train", None]]
    test_list = [["test", None]]
    meta = {**CIFAR100.meta, "md5": None}


class CIFARSubset(Dataset):
    """CIFAR-100 (one split), optionally restricted to ``names`` (labels = position in ``names``).

    Item: (image (3, S, S) float in [0, 1] after ``transform``, label int). The images are arrays in
    memory, so no file is unreadable (``bad`` is empty; kept for the datamodule's counter).
    """

    def __init__(self, root: str | os.PathLike, train: bool, transform: Callable | None = None,
                 names: Sequence[str] | None = None, class_list_file=None, limit: int | None = None):
        root = Path(root).expanduser()
        folder = root / CIFAR_FOLDER
        if not all((folder / f).is_file() for f in ("train", "test", "meta")):
            found = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else "no such folder"
            raise FileNotFoundError(
                f"CIFAR-100 not found under root={root}: expected {folder}/ holding the files train, test and meta "
                f"(the layout of cifar-100-python.tar.gz unpacked in {root}); found: {found}. Fix: unpack the "
                "archive there or point paths.cifar_root at the folder that holds cifar-100-python/.")
        base = _LocalCIFAR100(str(root), train=train, download=False)
        self.all_classes = list(base.classes)
        data, targets = base.data, np.asarray(base.targets)
        if names is not None:
            unknown = [c for c in names if c not in base.class_to_idx]
            if unknown:
                raise ValueError(f"class list {class_list_file} names {unknown[:10]} which are not CIFAR-100 fine "
                                 f"labels (e.g. {self.all_classes[:5]}). Fix the class list or set class_list=null.")
            old = np.array([base.class_to_idx[c] for c in names])
            remap = np.full(len(self.all_classes), -1)
            remap[old] = np.arange(len(names))
            keep = np.isin(targets, old)
            data, targets = data[keep], remap[targets[keep]]
        if limit is not None:
            rows = [i for i, _ in balanced_head(list(enumerate(targets.tolist())), int(limit))]
            data, targets = data[rows], targets[rows]
        self.classes = list(names) if names is not None else self.all_classes
        self.data, self.targets = data, targets.astype(np.int64)  # (N, 32, 32, 3) uint8, (N,)
        self.transform = transform
        self.bad = torch.zeros(0, dtype=torch.bool)
        self.unreadable_files: list[str] = []

    def subset(self, rows: Sequence[int], transform: Callable | None, limit: int | None = None) -> "CIFARSubset":
        """The images ``rows`` (then at most ``limit``, balanced over classes) with ``transform``."""
        rows = np.asarray(rows, dtype=np.int64)
        if limit is not None:
            rows = rows[[i for i, _ in balanced_head(list(enumerate(self.targets[rows].tolist())), int(limit))]]
        new = copy.copy(self)
        new.data, new.targets, new.transform = self.data[rows], self.targets[rows], transform
        return new

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        img = Image.fromarray(self.data[i])
        return (self.transform(img) if self.transform is not None else img), int(self.targets[i])


# ----------------------------------------------------------------------------- transforms
def imagenet_transforms(image_size: int) -> tuple[Callable, Callable]:
    """(train, val) transforms for ImageNet-style images; output (3, S, S) in [0, 1]."""
    train = T.Compose([T.RandomResizedCrop(image_size), T.RandomHorizontalFlip(), T.ToTensor()])
    val = T.Compose([T.Resize(int(image_size / 0.875)), T.CenterCrop(image_size), T.ToTensor()])
    return train, val


def cifar_transforms(image_size: int) -> tuple[Callable, Callable]:
    """(train, val) transforms for 32-px CIFAR images; output (3, S, S) in [0, 1]."""
    resize = [T.Resize(image_size)] if image_size != 32 else []
    train = T.Compose(resize + [T.RandomCrop(image_size, padding=image_size // 8), T.RandomHorizontalFlip(),
                                T.ToTensor()])
    return train, T.Compose(resize + [T.ToTensor()])


# ----------------------------------------------------------------------------- datamodule
class ClassificationDataModule(L.LightningDataModule):
    """Train / val / test loaders of an ImageNet subset or CIFAR-100 (splits: see the module docstring).

    Args:
        root: the ImageFolder root (``train/``, ``val/``) or, for CIFAR-100, the folder holding
            ``cifar-100-python/``.
        class_list: class-list file (wnids; CIFAR-100 label names) selecting the subset and its
            order, or None for all classes.
        dataset: ``imagenet_subset`` or ``cifar100``.
        image_size: side S of the (3, S, S) images the loaders yield.
        unreadable: ``skip`` or ``error`` (see the module docstring).
        val_limit: keep at most this many validation images, balanced over classes.
        seed: seed of the training loader's shuffling (depends on (seed, epoch) only).
        val_fraction: fraction of each class's training images held out as the validation split;
            0 validates on the test split.
        split_seed: seed of the held-out choice (fixed by default, so runs with different ``seed``
            hold out the same images and their validation numbers compare).

    Attributes: ``num_classes``, ``class_names`` (wnids, or CIFAR label names), ``image_size``,
    ``n_unreadable``, ``unreadable_files``; ``train_set`` / ``val_set`` / ``test_set`` after :meth:`setup`.
    """

    def __init__(self, root: str | os.PathLike, class_list: str | os.PathLike | None = None,
                 dataset: str = "imagenet_subset", image_size: int = 224, batch_size: int = 64,
                 num_workers: int = 0, unreadable: str = "skip", val_limit: int | None = None,
                 pin_memory: bool | None = None, seed: int = 0, val_fraction: float = 0.1, split_seed: int = 0):
        super().__init__()
        self.seed = int(seed)
        if dataset not in DATASETS:
            raise ValueError(f"dataset must be one of {DATASETS} (data.classification); got {dataset!r}")
        if unreadable not in UNREADABLE_POLICIES:
            raise ValueError(f"unreadable must be one of {UNREADABLE_POLICIES}; got {unreadable!r}")
        if root is None:
            key = "paths.cifar_root" if dataset == "cifar100" else "paths.imagenet_root"
            raise ValueError(f"root is not set: set {key} to the dataset folder (or use data=synthetic)")
        if val_limit is not None and int(val_limit) < 1:
            raise ValueError(f"val_limit must be a positive number of images or null; got {val_limit}")
        if not 0 <= float(val_fraction) < 1:
            raise ValueError(f"task.datamodule.val_fraction must lie in [0, 1) (the fraction of each class's training "
                             f"images held out for validation; 0 = validate on the test split); got {val_fraction}")
        self.root = Path(root).expanduser()
        self.class_list = Path(class_list).expanduser() if class_list not in (None, "") else None
        self.dataset = dataset
        self.image_size, self.batch_size, self.num_workers = int(image_size), int(batch_size), int(num_workers)
        self.unreadable = unreadable
        self.val_limit = None if val_limit is None else int(val_limit)
        self.val_fraction, self.split_seed = float(val_fraction), int(split_seed)
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else bool(pin_memory)
        self._class_names: list[str] | None = None
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None

    # --- classes
    @property
    def class_names(self) -> list[str]:
        if self._class_names is None:
            if self.dataset == "imagenet_subset":
                self._class_names = imagenet_classes(self.root, self.class_list)
            elif self.class_list is not None:
                self._class_names = read_class_list(self.class_list)
            else:
                self.setup()
        return self._class_names

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    # --- data
    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        if self.dataset == "imagenet_subset":
            wnids = self.class_names
            train_tf, val_tf = imagenet_transforms(self.image_size)
            kw = dict(unreadable=self.unreadable, class_list_file=self.class_list)
            full = ImageSubsetFolder(self.root / "train", wnids, None, **kw)
            test = ImageSubsetFolder(self.root / "val", wnids, val_tf, **kw)
        else:
            names = read_class_list(self.class_list) if self.class_list is not None else None
            train_tf, val_tf = cifar_transforms(self.image_size)
            full = CIFARSubset(self.root, True, None, names, self.class_list)
            test = CIFARSubset(self.root, False, val_tf, names, self.class_list)
            self._class_names = full.classes
        if self.val_fraction > 0:
            train_rows, val_rows = stratified_split(full.targets, self.val_fraction, self.split_seed, self.class_names)
            if len(val_rows) == 0:
                raise ValueError(f"task.datamodule.val_fraction={self.val_fraction} holds out no image: every class of "
                                 f"{self.root} has fewer than 2 training images. Add images or set val_fraction=0.")
            self.val_set = full.subset(val_rows, val_tf, limit=self.val_limit)
        else:
            train_rows = np.arange(len(full.targets))
            self.val_set = test.subset(np.arange(len(test.targets)), val_tf, limit=self.val_limit)
            log.warning("val_fraction=0: validation (and the best checkpoint) uses the test split %s", self.root)
        self.train_set = full.subset(train_rows, train_tf)
        self.test_set = test
        log.info("%s: %d classes, %d train / %d val (held out of train: %s) / %d test images at %d px from %s",
                 self.dataset, self.num_classes, len(self.train_set), len(self.val_set), self.val_fraction > 0,
                 len(self.test_set), self.image_size, self.root)

    def _sets(self) -> list[Dataset]:
        return [s for s in (self.train_set, self.val_set, self.test_set) if s is not None]

    @property
    def n_unreadable(self) -> int:
        """Distinct unreadable image files met so far (train + val + test)."""
        return len(self.unreadable_files)

    @property
    def unreadable_files(self) -> list[str]:
        return list(dict.fromkeys(f for s in self._sets() for f in s.unreadable_files))

    def _loader(self, ds: Dataset, shuffle: bool) -> DataLoader:
        return DataLoader(ds, batch_size=self.batch_size, shuffle=shuffle, num_workers=self.num_workers,
                          pin_memory=self.pin_memory, persistent_workers=self.num_workers > 0, drop_last=False)

    def train_dataloader(self) -> DataLoader:
        self.setup()
        ws = self.trainer.world_size if self.trainer is not None else 1
        return train_loader(self.train_set, self.batch_size, self.num_workers, self.seed, ws,
                            pin_memory=self.pin_memory)

    def val_dataloader(self) -> DataLoader:
        """The validation split: held out of the training images (``val_fraction``)."""
        self.setup()
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        """The test split: ImageNet's ``val/`` folder (CIFAR-100's test set)."""
        self.setup()
        return self._loader(self.test_set, shuffle=False)
