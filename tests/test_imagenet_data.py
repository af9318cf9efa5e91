"""Classification data: the synthetic ImageNet writer, the ImageFolder subset reader, CIFAR-100, errors."""
from __future__ import annotations

import pickle
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import neuroguide.data.synthetic.imagenet as synth
from neuroguide.data.imagenet import ClassificationDataModule, UnreadableImageError, read_class_list
from neuroguide.data.splits import stratified_split
from neuroguide.data.synthetic.imagenet import MARKER, WNIDS, write_synthetic_imagenet

SMALL = dict(n_classes=4, n_train=6, n_val=3, image_size=24, seed=0)


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    return write_synthetic_imagenet(tmp_path_factory.mktemp("in") / "imagenet", **SMALL)


def copy_tree(tree: Path, dst: Path) -> Path:
    shutil.copytree(tree, dst)
    return dst


# ----------------------------------------------------------------------------- writer
def test_writer_layout(tree):
    wnids = read_class_list(tree / "classes.txt")
    assert wnids == list(WNIDS[:4]) and all(re.fullmatch(r"n\d{8}", w) for w in wnids)
    assert (tree / "classes.txt").read_text().startswith("#")  # the comment header is skipped
    for split, n in (("train", 6), ("val", 3)):
        assert sorted(p.name for p in (tree / split).iterdir()) == sorted(wnids)
        for w in wnids:
            files = sorted((tree / split / w).iterdir())
            assert len(files) == n and all(f.suffix == ".JPEG" for f in files)
            pattern = rf"{w}_\d+\.JPEG" if split == "train" else r"ILSVRC2012_val_\d{8}\.JPEG"
            assert all(re.fullmatch(pattern, f.name) for f in files)
            with Image.open(files[0]) as im:
                assert im.format == "JPEG" and im.size == (24, 24) and im.mode == "RGB"
    val_names = [f.name for f in (tree / "val").rglob("*.JPEG")]
    assert len(set(val_names)) == 4 * 3  # unique validation file names, as in the real set
    assert not [p for p in tree.parent.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_writer_is_idempotent_and_refuses_other_params(tree):
    marker_mtime = (tree / MARKER).stat().st_mtime_ns
    first = next((tree / "train").rglob("*.JPEG"))
    mtime = first.stat().st_mtime_ns
    assert write_synthetic_imagenet(tree, **SMALL) == tree
    assert (tree / MARKER).stat().st_mtime_ns == marker_mtime and first.stat().st_mtime_ns == mtime
    with pytest.raises(FileExistsError, match=r"imagenet is not empty.*n_train.*7.*Delete the folder"):
        write_synthetic_imagenet(tree, **{**SMALL, "n_train": 7})


def test_writer_is_seeded(tmp_path):
    a = write_synthetic_imagenet(tmp_path / "a", **SMALL)
    b = write_synthetic_imagenet(tmp_path / "b", **SMALL)
    c = write_synthetic_imagenet(tmp_path / "c", **{**SMALL, "seed": 1})
    f = Path("train") / WNIDS[0] / f"{WNIDS[0]}_0.JPEG"
    assert (a / f).read_bytes() == (b / f).read_bytes()
    assert (a / f).read_bytes() != (c / f).read_bytes()


def test_concurrent_writer_that_finishes_first_wins(tmp_path, monkeypatch):
    """While this writer renders its copy another writer completes the tree: ours is discarded."""
    root = tmp_path / "imagenet"
    original = synth._write_tree
    calls = []

    def racing_write_tree(tmp, params, recipes):
        calls.append(tmp)
        original(tmp, params, recipes)
        if len(calls) == 1:  # the other writer runs to completion before our rename
            write_synthetic_imagenet(root, **SMALL)

    monkeypatch.setattr(synth, "_write_tree", racing_write_tree)
    assert write_synthetic_imagenet(root, **SMALL) == root
    assert len(calls) == 2
    assert not calls[0].exists()  # our copy was removed
    assert [p.name for p in tmp_path.iterdir()] == ["imagenet"]
    assert len(list((root / "train").rglob("*.JPEG"))) == 4 * 6


def test_writer_rejects_unknown_tree_and_bad_params(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "something").write_text("")
    with pytest.raises(FileExistsError, match=r"x is not empty.*no _SUCCESS.json"):
        write_synthetic_imagenet(tmp_path / "x", **SMALL)
    with pytest.raises(ValueError, match=r"n_classes=500.*at most 100"):
        write_synthetic_imagenet(tmp_path / "y", **{**SMALL, "n_classes": 500})
    with pytest.raises(ValueError, match=r"synthetic_imagenet.n_val must be >= 1; got 0"):
        write_synthetic_imagenet(tmp_path / "y", **{**SMALL, "n_val": 0})
    assert not (tmp_path / "y").exists()


def test_class_recipes_are_distinct_and_pairs_share_a_hue():
    recipes = synth.class_recipes(len(WNIDS))  # the largest tree: all 100 classes
    assert len(set(recipes)) == len(WNIDS)
    for a, b in zip(recipes[0:10:2], recipes[1:10:2]):  # colour alone does not separate classes 2j, 2j + 1
        assert a[1] == b[1] and a[0] != b[0] and a[2] != b[2]


# ----------------------------------------------------------------------------- reader
def test_datamodule_reads_the_tree(tree):
    dm = ClassificationDataModule(tree, tree / "classes.txt", image_size=16, batch_size=5)
    assert dm.num_classes == 4 and dm.class_names == list(WNIDS[:4]) and dm.image_size == 16
    dm.setup("fit")  # val_fraction 0.1 of 6 train images per class: 1 per class held out
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (20, 4, 12)
    for loader in (dm.train_dataloader(), dm.val_dataloader(), dm.test_dataloader()):
        labels = []
        for x, y in loader:
            assert x.shape[1:] == (3, 16, 16) and x.dtype == torch.float32 and y.dtype == torch.int64
            assert 0 <= x.min() and x.max() <= 1 and x.max() > 0.5  # [0, 1], not normalized
            labels.append(y)
        assert sorted(torch.cat(labels).unique().tolist()) == [0, 1, 2, 3]
    assert dm.n_unreadable == 0


def test_val_transform_is_deterministic_resize_then_center_crop(tree):
    dm = ClassificationDataModule(tree, tree / "classes.txt", image_size=16)
    dm.setup()
    x0, y0 = dm.val_set[0]
    path, label = dm.val_set.samples[0]
    with Image.open(path) as im:  # independent: resize to int(16 / 0.875) = 18, center 16 x 16
        ref = np.asarray(im.convert("RGB").resize((18, 18), Image.BILINEAR), np.float32)[1:17, 1:17] / 255
    assert y0 == label and torch.equal(x0, dm.val_set[0][0])
    assert np.abs(x0.permute(1, 2, 0).numpy() - ref).mean() < 0.03


def _files(ds) -> list[str]:
    return [p for p, _ in ds.samples]


def test_validation_is_held_out_of_train_and_test_is_the_val_folder(tree):
    dm = ClassificationDataModule(tree, tree / "classes.txt", image_size=16, batch_size=64, val_fraction=0.34, seed=0)
    dm.setup()
    train, val, test = _files(dm.train_set), _files(dm.val_set), _files(dm.test_set)
    all_train = sorted(str(p) for p in (tree / "train").rglob("*.JPEG"))
    assert sorted(train + val) == all_train and not set(train) & set(val)  # a partition of train/
    assert sorted(test) == sorted(str(p) for p in (tree / "val").rglob("*.JPEG"))  # the val/ folder is the test split
    for ds, n in ((dm.val_set, 2), (dm.train_set, 4)):  # stratified: round(0.34 * 6) = 2 of every class held out
        labels = [t for _, t in ds.samples]
        assert [labels.count(c) for c in range(4)] == [n] * 4
        assert all(Path(p).parent.name == WNIDS[t] for p, t in ds.samples)
    # the loaders: val and test unshuffled in that order, with the deterministic transform
    yv = torch.cat([y for _, y in dm.val_dataloader()]).tolist()
    xt, yt = next(iter(dm.test_dataloader()))
    assert yv == [t for _, t in dm.val_set.samples] and yt.tolist() == [t for _, t in dm.test_set.samples]
    torch.testing.assert_close(xt[5], dm.test_set[5][0])
    x0 = dm.val_set[0][0]
    assert torch.equal(x0, dm.val_set[0][0]) and x0.shape == (3, 16, 16)
    # a fixed split: the same for another run seed (which only reshuffles training batches); split_seed changes it
    other = ClassificationDataModule(tree, tree / "classes.txt", image_size=16, val_fraction=0.34, seed=5)
    other.setup()
    assert _files(other.val_set) == val
    moved = ClassificationDataModule(tree, tree / "classes.txt", image_size=16, val_fraction=0.34, split_seed=1)
    moved.setup()
    assert _files(moved.val_set) != val


def test_held_out_images_of_a_class_do_not_depend_on_the_class_list(tree, tmp_path):
    cl = tmp_path / "two.txt"
    cl.write_text(f"{WNIDS[3]}\n{WNIDS[1]}\n")
    full = ClassificationDataModule(tree, tree / "classes.txt", image_size=16, val_fraction=0.34)
    sub = ClassificationDataModule(tree, cl, image_size=16, val_fraction=0.34)
    full.setup()
    sub.setup()
    for w in (WNIDS[1], WNIDS[3]):
        assert [p for p in _files(sub.val_set) if f"/{w}/" in p] == [p for p in _files(full.val_set) if f"/{w}/" in p]


def test_stratified_split_counts():
    targets = [0] * 10 + [1] * 20 + [2] * 1 + [3] * 3
    tr, va = stratified_split(targets, 0.1, seed=0)
    t = np.asarray(targets)
    # round(0.1 * n): 1 of 10, 2 of 20; a single image stays in train; at least 1 of 3
    assert [int((t[va] == c).sum()) for c in range(4)] == [1, 2, 0, 1]
    assert sorted(np.concatenate([tr, va]).tolist()) == list(range(len(targets)))
    assert np.array_equal(va, stratified_split(targets, 0.1, seed=0)[1])
    tr0, va0 = stratified_split(targets, 0.0)
    assert len(va0) == 0 and len(tr0) == len(targets)
    assert [int((t[stratified_split(targets, 0.9)[1]] == c).sum()) for c in range(4)] == [9, 18, 0, 2]  # never all


def test_val_fraction_zero_validates_on_the_test_split(tree):
    dm = ClassificationDataModule(tree, tree / "classes.txt", image_size=16, val_fraction=0)
    dm.setup()
    assert len(dm.train_set) == 24 and _files(dm.val_set) == _files(dm.test_set)


def test_classifier_evaluation_stimuli_are_the_test_split(tree):
    from neuroguide.evaluation.stimuli import classification_stimuli

    run_config = {"data": {"classification_root": str(tree), "classification_class_list": str(tree / "classes.txt")}}
    stim = classification_stimuli(run_config, {"image_size": 16}, None, {})
    files = sorted((tree / "val").rglob("*.JPEG"))  # the val/ folder, held out of training and selection
    assert len(stim) == len(files) == 12
    assert sorted(stim.labels.tolist()) == sorted(WNIDS.index(f.parent.name) for f in files)
    dm = ClassificationDataModule(tree, tree / "classes.txt", image_size=16)
    dm.setup()
    torch.testing.assert_close(stim.images, torch.stack([dm.test_set[i][0] for i in range(12)]))
    assert not {str(f) for f in files} & set(_files(dm.val_set))


def test_class_list_selects_subset_and_order(tree, tmp_path):
    chosen = [WNIDS[3], WNIDS[1]]
    cl = tmp_path / "subset.txt"
    cl.write_text(f"# two classes, reversed\n{chosen[0]}  # a trailing comment\n\n{chosen[1]} goldfish, Carassius\n")
    dm = ClassificationDataModule(tree, cl, image_size=16, batch_size=4)
    assert dm.num_classes == 2 and dm.class_names == chosen
    dm.setup()
    assert len(dm.train_set) + len(dm.val_set) == 2 * 6
    for ds in (dm.train_set, dm.val_set, dm.test_set):
        for path, label in ds.samples:  # the label is the position of the image's folder in the list
            assert Path(path).parent.name == chosen[label]
    ys = torch.cat([y for _, y in dm.train_dataloader()])
    assert sorted(ys.tolist()) == [0] * 5 + [1] * 5


def test_no_class_list_uses_all_train_folders(tree):
    dm = ClassificationDataModule(tree, None, image_size=16)
    assert dm.class_names == sorted(WNIDS[:4])


def test_val_limit_is_balanced(tree):
    dm = ClassificationDataModule(tree, tree / "classes.txt", image_size=16, val_limit=6, val_fraction=0.5)
    dm.setup()  # 3 of 6 per class held out (12), at most 6 kept; the test split stays complete
    assert (len(dm.val_set), len(dm.train_set), len(dm.test_set)) == (6, 12, 12)
    assert sorted(t for _, t in dm.val_set.samples) == [0, 0, 1, 1, 2, 3]  # round robin


# ----------------------------------------------------------------------------- errors
def test_missing_wnid_names_wnid_folder_and_class_list(tree, tmp_path):
    cl = tmp_path / "cl.txt"
    cl.write_text(f"{WNIDS[0]}\nn09999999\n")
    dm = ClassificationDataModule(tree, cl, image_size=16)
    with pytest.raises(FileNotFoundError) as e:
        dm.setup()
    msg = str(e.value)
    assert "n09999999" in msg and str(tree / "train") in msg and str(cl) in msg and WNIDS[0] + "," not in msg


def test_flat_val_folder_gets_a_hint(tree, tmp_path):
    root = copy_tree(tree, tmp_path / "in")
    for f in list((root / "val").rglob("*.JPEG")):
        f.rename(root / "val" / f.name)
    for d in (root / "val").iterdir():
        if d.is_dir():
            d.rmdir()
    with pytest.raises(FileNotFoundError, match=r"holds image files directly: sort them into class folders"):
        ClassificationDataModule(root, root / "classes.txt", image_size=16).setup()


def test_empty_class_folder_is_an_error(tree, tmp_path):
    root = copy_tree(tree, tmp_path / "in")
    for f in (root / "val" / WNIDS[2]).iterdir():
        f.unlink()
    with pytest.raises(FileNotFoundError, match=rf"no valid file for the classes {WNIDS[2]}.*in {root / 'val'}"):
        ClassificationDataModule(root, root / "classes.txt", image_size=16).setup()


def test_class_list_errors(tree, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing here\n\n   \n")
    with pytest.raises(ValueError, match=rf"class list {re.escape(str(empty))} is empty"):
        ClassificationDataModule(tree, empty).num_classes
    dup = tmp_path / "dup.txt"
    dup.write_text(f"{WNIDS[0]}\n{WNIDS[1]}\n{WNIDS[0]}\n")
    with pytest.raises(ValueError, match=rf"names '{WNIDS[0]}' twice \(lines 1 and 3\)"):
        read_class_list(dup)
    with pytest.raises(FileNotFoundError, match=r"class list .*nope.txt does not exist.*one wnid per line"):
        ClassificationDataModule(tree, tmp_path / "nope.txt").num_classes
    with pytest.raises(FileNotFoundError, match=r"missing/train does not exist.*<root>/train/<wnid>/\*.JPEG"):
        ClassificationDataModule(tmp_path / "missing").num_classes


def test_bad_arguments(tree):
    with pytest.raises(ValueError, match=r"dataset must be one of \('imagenet_subset', 'cifar100'\).*got 'mnist'"):
        ClassificationDataModule(tree, dataset="mnist")
    with pytest.raises(ValueError, match=r"unreadable must be one of \('skip', 'error'\); got 'ignore'"):
        ClassificationDataModule(tree, unreadable="ignore")
    with pytest.raises(ValueError, match=r"root is not set: set paths.imagenet_root"):
        ClassificationDataModule(None)
    with pytest.raises(ValueError, match=r"val_limit must be a positive"):
        ClassificationDataModule(tree, val_limit=0)
    with pytest.raises(ValueError, match=r"task.datamodule.val_fraction must lie in \[0, 1\).*got 1.0"):
        ClassificationDataModule(tree, val_fraction=1.0)


# ----------------------------------------------------------------------------- unreadable files
def _corrupt(root: Path) -> tuple[Path, Path]:
    """Make one train file garbage and truncate another; returns both."""
    files = sorted((root / "train" / WNIDS[1]).iterdir())
    files[0].write_bytes(b"this is not a JPEG")
    data = files[1].read_bytes()
    files[1].write_bytes(data[: len(data) // 3])
    return files[0], files[1]


def test_unreadable_skip_replaces_counts_and_warns(tree, tmp_path):
    root = copy_tree(tree, tmp_path / "in")
    garbage, truncated = _corrupt(root)
    dm = ClassificationDataModule(root, root / "classes.txt", image_size=16, batch_size=8, unreadable="skip",
                                  val_fraction=0)  # every train/ image in the training split
    dm.setup()
    idx = [p for p, _ in dm.train_set.samples].index(str(garbage))
    with pytest.warns(RuntimeWarning) as record:
        x, y = dm.train_set[idx]
    named = [str(w.message).split(" (")[0] for w in record]
    assert named == [f"unreadable image file {garbage}", f"unreadable image file {truncated}"]
    assert dm.n_unreadable == 2 and dm.unreadable_files == [str(garbage), str(truncated)]
    # the replacement is the next readable sample: idx + 1 is the truncated file, so idx + 2
    path2, label2 = dm.train_set.samples[idx + 2]
    assert y == label2 and Path(path2).parent.name == WNIDS[1]
    assert x.shape == (3, 16, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # known bad files are skipped without reading them again
        batches = list(dm.train_dataloader())
    assert sum(len(b[1]) for b in batches) == 24  # every item still yields an image
    assert dm.n_unreadable == 2 and set(dm.unreadable_files) == {str(garbage), str(truncated)}


def test_unreadable_files_met_in_workers_are_counted(tree, tmp_path):
    root = copy_tree(tree, tmp_path / "in")
    garbage, truncated = _corrupt(root)
    dm = ClassificationDataModule(root, root / "classes.txt", image_size=16, batch_size=8, num_workers=1,
                                  val_fraction=0)  # every train/ image in the training split
    n = sum(len(y) for _, y in dm.val_dataloader())  # val (= the val/ folder here) is clean
    assert (n, dm.n_unreadable) == (12, 0)
    assert sum(len(y) for _, y in dm.train_dataloader()) == 24
    assert dm.n_unreadable == 2 and set(dm.unreadable_files) == {str(garbage), str(truncated)}


def test_unreadable_error_names_the_file(tree, tmp_path):
    root = copy_tree(tree, tmp_path / "in")
    garbage, _ = _corrupt(root)
    dm = ClassificationDataModule(root, root / "classes.txt", image_size=16, unreadable="error", val_fraction=0)
    dm.setup()
    idx = [p for p, _ in dm.train_set.samples].index(str(garbage))
    with pytest.raises(UnreadableImageError, match=rf"cannot read image file {re.escape(str(garbage))}.*unreadable='skip'"):
        dm.train_set[idx]


# ----------------------------------------------------------------------------- CIFAR-100
def _write_fake_cifar100(root: Path, n_train=50, n_test=20) -> list[str]:
    """The real cifar-100-python/ pickle layout, tiny: labels cycle over the 100 classes."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    names = [f"class{i:02d}" for i in range(100)]
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("test", n_test)):
        labels = [i % 100 for i in range(n)]
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        with open(folder / split, "wb") as f:
            pickle.dump({"data": data, "fine_labels": labels, "coarse_labels": [0] * n}, f)
    with open(folder / "meta", "wb") as f:
        pickle.dump({"fine_label_names": names, "coarse_label_names": ["c"] * 20}, f)
    return names


def test_cifar100_from_local_folder(tmp_path):
    names = _write_fake_cifar100(tmp_path / "cifar", n_train=200)  # 2 images of every class
    dm = ClassificationDataModule(tmp_path / "cifar", dataset="cifar100", image_size=32, batch_size=8)
    dm.setup()
    assert dm.num_classes == 100 and dm.class_names == names
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (100, 100, 20)  # 1 of 2 per class held out
    assert sorted(dm.val_set.targets.tolist()) == list(range(100)) == sorted(dm.train_set.targets.tolist())
    with open(tmp_path / "cifar" / "cifar-100-python" / "train", "rb") as f:
        raw = pickle.load(f)["data"]
    rows = {r.tobytes() for r in raw}
    val_rows = {a.transpose(2, 0, 1).reshape(-1).tobytes() for a in dm.val_set.data}
    train_rows = {a.transpose(2, 0, 1).reshape(-1).tobytes() for a in dm.train_set.data}
    assert val_rows | train_rows == rows and not val_rows & train_rows  # validation: held out of train
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (8, 3, 32, 32) and 0 <= x.min() and x.max() <= 1
    xt, yt = next(iter(dm.test_dataloader()))  # the test split is CIFAR's test set, in order
    assert yt.tolist() == list(range(8))
    assert torch.equal(xt[3], torch.from_numpy(dm.test_set.data[3]).permute(2, 0, 1).float() / 255)

    cl = tmp_path / "cifar_subset.txt"
    cl.write_text("class07\nclass02\n")
    sub = ClassificationDataModule(tmp_path / "cifar", cl, dataset="cifar100", image_size=32)
    sub.setup()
    assert sub.class_names == ["class07", "class02"] and sub.num_classes == 2
    assert sorted(sub.train_set.targets.tolist()) == [0, 1]  # of the 2 images of class 7 and 2, one trains


def test_cifar100_missing_folder_names_expected_layout(tmp_path):
    dm = ClassificationDataModule(tmp_path / "nocifar", dataset="cifar100")
    with pytest.raises(FileNotFoundError, match=r"nocifar/cifar-100-python/ holding the files train, test and meta"):
        dm.setup()
    names = _write_fake_cifar100(tmp_path / "c")
    cl = tmp_path / "cl.txt"
    cl.write_text(f"{names[0]}\nelephant\n")
    with pytest.raises(ValueError, match=r"names \['elephant'\] which are not CIFAR-100 fine labels"):
        ClassificationDataModule(tmp_path / "c", cl, dataset="cifar100").setup()


# ----------------------------------------------------------------------------- planted structure
def _pixels(paths: list[str]) -> np.ndarray:
    """(N, 8 * 8 * 3) pixels of 8 x 8 downsampled images, in [0, 1]."""
    out = []
    for p in paths:
        with Image.open(p) as im:
            out.append(np.asarray(im.convert("RGB").resize((8, 8), Image.BOX), np.float32).ravel() / 255)
    return np.stack(out)


def _ncm_accuracy(xtr, ytr, xva, yva, k) -> float:
    means = np.stack([xtr[ytr == c].mean(0) for c in range(k)])
    pred = ((xva[:, None, :] - means[None]) ** 2).sum(-1).argmin(1)
    return float((pred == yva).mean())


def test_classes_are_learnable_and_shuffled_control_is_at_chance(tmp_path):
    """Nearest class mean on 8 x 8 pixels: well above chance; with shuffled train labels: chance."""
    k = 8
    root = write_synthetic_imagenet(tmp_path / "in", n_classes=k, n_train=25, n_val=15, image_size=24, seed=3)
    dm = ClassificationDataModule(root, root / "classes.txt", image_size=24)
    dm.setup()
    tr, va = dm.train_set.samples, dm.test_set.samples
    xtr, ytr = _pixels([p for p, _ in tr]), np.array([t for _, t in tr])
    xva, yva = _pixels([p for p, _ in va]), np.array([t for _, t in va])
    acc = _ncm_accuracy(xtr, ytr, xva, yva, k)
    rng = np.random.default_rng(0)
    shuffled = [_ncm_accuracy(xtr, rng.permutation(ytr), xva, yva, k) for _ in range(30)]
    chance = 1 / k
    # 120 test images (the val/ folder): the sd of a chance-level accuracy is about 0.03
    assert acc > chance + 0.15 and acc > max(shuffled), (acc, max(shuffled))
    assert abs(np.mean(shuffled) - chance) < 0.03, np.mean(shuffled)
