"""The synthetic cue-conflict set: its stored (shape, texture) pairs, and shape bias with a planted truth
(a tiny CNN that can only use shape scores near 1, one that can only use texture near 0), through the
public ``shape_bias.evaluate``; and ``evaluate.py ckpt=... eval=[shape_bias]`` on the embedded default."""
from __future__ import annotations

import collections
import csv
import time

import numpy as np
import pytest
import torch
from torch import nn

from neuroguide.data.synthetic import cue_conflict as cc
from neuroguide.data.synthetic.imagenet import WNIDS
from neuroguide.evaluation.analyses import shape_bias as sb

pytestmark = pytest.mark.usefixtures("one_thread")  # a shared 2-core CPU: one thread is several times faster

K, SIZE, PER_PAIR = 6, 32, 3
CLASSES = list(WNIDS[:K])
SYNTHETIC = {"n_per_pair": PER_PAIR, "seed": 0}  # image_size: the run's data.image_size


@pytest.fixture(scope="module")
def cue_set(tmp_path_factory):
    return cc.write_cue_conflict(tmp_path_factory.mktemp("cc") / "cue_conflict", CLASSES, n_per_pair=PER_PAIR,
                                 image_size=SIZE)


def test_stored_pairs_differ_and_cover_every_class(cue_set):
    stimuli = sb.read_cue_conflict(cue_set)  # categories from the set's categories.txt
    assert sb.folder_categories(cue_set) == CLASSES
    assert len(stimuli) == K * (K - 1) * PER_PAIR
    assert all(s.shape != s.texture for s in stimuli)
    pairs = collections.Counter((s.shape, s.texture) for s in stimuli)
    assert set(pairs) == {(a, b) for a in CLASSES for b in CLASSES if a != b}  # every ordered pair ...
    assert set(pairs.values()) == {PER_PAIR}  # ... equally often
    assert {s.shape for s in stimuli} == {s.texture for s in stimuli} == set(CLASSES)
    with torch.no_grad():
        x = sb.load_images([stimuli[0].path])
    assert x.shape == (1, 3, SIZE, SIZE) and 0 <= x.min() and x.max() <= 1
    # idempotent; a different set in the same place is refused, with the fix; nothing half-written beside it
    stamp = (cue_set / cc.MARKER).stat().st_mtime_ns
    cc.write_cue_conflict(cue_set, CLASSES, n_per_pair=PER_PAIR, image_size=SIZE)
    assert (cue_set / cc.MARKER).stat().st_mtime_ns == stamp
    with pytest.raises(FileExistsError, match="Delete the folder, or choose another eval.shape_bias.synthetic.root"):
        cc.write_cue_conflict(cue_set, CLASSES[:4], n_per_pair=PER_PAIR, image_size=SIZE)
    assert [p.name for p in cue_set.parent.iterdir()] == [cue_set.name]
    with pytest.raises(ValueError, match="needs 2 to 16 classes"):
        cc.class_cues(17)
    with pytest.raises(ValueError, match="letters and digits"):
        cc.write_cue_conflict(cue_set.parent / "bad", ["a-b", "c"])


def training_images(cue: str, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, 3, SIZE, SIZE) images in [0, 1] and (n,) labels: class y's ``cue`` (shape or texture) with the other
    cue drawn at random from the K classes, so that only ``cue`` predicts the class."""
    rng = np.random.default_rng(seed)
    cues = cc.class_cues(K)
    y = np.arange(n) % K
    other = rng.integers(0, K, n)
    pairs = zip(y, other) if cue == "shape" else zip(other, y)
    imgs = np.stack([cc.render_cue_image(cues[a][0], cues[b][1], SIZE, rng) for a, b in pairs])
    return torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 255, torch.from_numpy(y)


def train_tiny_cnn(cue: str, epochs: int = 8) -> tuple[nn.Module, float]:
    """A 3-layer CNN trained on 600 images where only ``cue`` predicts the class; returns it and its accuracy on
    300 new such images."""
    torch.manual_seed(0)
    x, y = training_images(cue, 600, seed=1)
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Flatten(), nn.Linear(32 * (SIZE // 8) ** 2, K))
    opt = torch.optim.Adam(net.parameters(), 3e-3)
    for _ in range(epochs):
        for b in torch.randperm(len(x)).split(50):
            loss = nn.functional.cross_entropy(net(x[b]), y[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
    xt, yt = training_images(cue, 300, seed=2)
    with torch.no_grad():
        acc = (net(xt).argmax(1) == yt).float().mean().item()
    return net, acc


def test_planted_shape_and_texture_models(cue_set, tmp_path):
    t0 = time.time()
    shape_net, shape_acc = train_tiny_cnn("shape")
    # as evaluate.py sees a model trained on data=synthetic: stimuli_dir=auto picks the synthetic set (here the
    # one of the fixture: same parameters, so it is found, not written again)
    shape_net.neuroguide_info = {"run_config": {"data": {"synthetic": True, "image_size": SIZE}}}
    shape_net.imagenet_classes = CLASSES
    m = sb.evaluate(shape_net, tmp_path / "shape", stimuli_dir="auto", geirhos_dir=tmp_path / "absent",
                    synthetic={"root": cue_set, **SYNTHETIC}, progress=False)
    texture_net, texture_acc = train_tiny_cnn("texture")
    m2 = sb.evaluate(texture_net, tmp_path / "texture", stimuli_dir=cue_set, classes=CLASSES, progress=False)
    print(f"\nshape-only CNN: acc {shape_acc:.3f}, shape bias {m['eval/shape_bias']:.3f} "
          f"({m['eval/shape_bias/n_shape_decisions']} shape / {m['eval/shape_bias/n_texture_decisions']} texture); "
          f"texture-only CNN: acc {texture_acc:.3f}, shape bias {m2['eval/shape_bias']:.3f} "
          f"({m2['eval/shape_bias/n_shape_decisions']} / {m2['eval/shape_bias/n_texture_decisions']}); "
          f"{time.time() - t0:.1f} s")
    assert shape_acc > 0.6 and texture_acc > 0.6  # both learned their cue (chance 1/6)
    assert m["eval/shape_bias"] > 0.8
    assert m2["eval/shape_bias"] < 0.2
    for met in (m, m2):
        assert met["eval/shape_bias/n_images"] == K * (K - 1) * PER_PAIR
        assert met["eval/shape_bias/n_unmapped_categories"] == 0
        assert met["eval/shape_bias/n_shape_decisions"] + met["eval/shape_bias/n_texture_decisions"] >= 0.8 * K * (K - 1) * PER_PAIR
    rows = list(csv.DictReader(open(tmp_path / "shape" / "shape_bias.csv")))
    assert [r["category"] for r in rows] == CLASSES + ["all"]


def test_auto_source_and_bad_input(tmp_path, cue_set):
    real = nn.Linear(2, 2)
    real.neuroguide_info = {"run_config": {"data": {"synthetic": False}}}
    assert sb.resolve_stimuli_dir(real, "auto", geirhos_dir="~/mvh/cue-conflict") == \
        sb.resolve_stimuli_dir(real, "~/mvh/cue-conflict").expanduser()
    with pytest.raises(FileNotFoundError, match="eval.shape_bias.geirhos_dir"):
        sb.evaluate(real, tmp_path / "o", stimuli_dir="auto", geirhos_dir=tmp_path / "absent", progress=False)
    # a synthetic run whose class list is gone: the synthetic ImageNet's wnids, by data.synthetic_imagenet.n_classes
    synth = nn.Linear(2, 3)
    synth.neuroguide_info = {"run_config": {"data": {"synthetic": True, "image_size": 16,
                                                     "synthetic_imagenet": {"n_classes": 3}}}}
    root = sb.resolve_stimuli_dir(synth, "auto", synthetic={"root": tmp_path / "cc3", "n_per_pair": 1})
    assert sb.folder_categories(root) == list(WNIDS[:3]) and len(sb.read_cue_conflict(root)) == 6
    # a model whose classes are not those of the set, or that does not say its classes
    with pytest.raises(ValueError, match="none of the model's 6 classes .* is a category of"):
        sb.evaluate(nn.Sequential(nn.Flatten(), nn.Linear(3 * SIZE * SIZE, 6)), tmp_path / "o", stimuli_dir=cue_set,
                    classes=[f"c{k}" for k in range(6)], progress=False)
    with pytest.raises(ValueError, match="name their categories in categories.txt .* Fix: pass classes="):
        sb.evaluate(nn.Sequential(nn.Flatten(), nn.Linear(3 * SIZE * SIZE, 6)), tmp_path / "o", stimuli_dir=cue_set,
                    progress=False)


def test_evaluate_py_on_the_embedded_default(tmp_path):
    """`python train.py region=none` on the synthetic data, then `python evaluate.py ckpt=... eval=[shape_bias]`
    with no shape-bias setting: the synthetic cue-conflict set is written for the run's classes and used."""
    from conftest import small_overrides

    from neuroguide.config import compose_config
    from neuroguide.data.imagenet import read_class_list
    from neuroguide.evaluation.runner import run as evaluate
    from neuroguide.train import run as train

    train(compose_config("train", small_overrides(tmp_path) + ["+trainer.fast_dev_run=true", "region=none"],
                         output_dir=tmp_path / "run"))
    cfg = compose_config("evaluate", [f"paths.data_dir={tmp_path}/data", f"paths.log_dir={tmp_path}/outputs",
                                      f"ckpt={tmp_path}/run/model.ckpt", "eval=[shape_bias]"], output_dir=tmp_path / "ev")
    m = evaluate(cfg)
    root = tmp_path / "data" / "synthetic" / "cue_conflict"
    classes = read_class_list(tmp_path / "data" / "synthetic" / "imagenet" / "classes.txt")  # 4 (small_overrides)
    assert sb.folder_categories(root) == classes
    assert m["eval/shape_bias/n_images"] == len(classes) * (len(classes) - 1) * 4  # n_per_pair 4 (the config)
    assert m["eval/shape_bias/n_unmapped_categories"] == 0
    assert {f"eval/shape_bias/{c}" for c in classes} <= set(m)
    assert m["eval/shape_bias/n_shape_decisions"] + m["eval/shape_bias/n_texture_decisions"] <= m["eval/shape_bias/n_images"]
    assert (tmp_path / "ev" / "shape_bias" / "shape_bias.png").is_file()
    assert sb.load_images([next(root.rglob("*.png"))]).shape[-1] == 32  # the run's data.image_size
