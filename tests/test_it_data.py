"""IT recordings: the synthetic writer, the reader's checks, splits, reliability, the datamodule."""
from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
import torch

from neuroguide.data.it import (ITDataModule, nanmean, read_it, split_by_image, split_half_reliability,
                               step_up_reliability)
from neuroguide.data.synthetic.it import write_synthetic_it

SMALL = dict(seed=0, n_images=60, n_sites=5, n_repeats=4, image_size=16)


@pytest.fixture(scope="module")
def it_file(tmp_path_factory):
    return write_synthetic_it(tmp_path_factory.mktemp("it"), **SMALL)


def _write(path, **datasets):
    with h5py.File(path, "w") as f:
        for k, v in datasets.items():
            f.create_dataset(k, data=v)
    return path


def _valid(n=6, sites=3, reps=2, size=8):
    rng = np.random.default_rng(0)
    return dict(images=rng.integers(0, 255, (n, size, size, 3), dtype=np.uint8),
                responses=rng.normal(size=(n, sites, reps)).astype(np.float32),
                site_ids=np.array([f"s{i}" for i in range(sites)], dtype="S"),
                image_ids=np.array([f"i{i}" for i in range(n)], dtype="S"))


def test_synthetic_file_has_the_real_format(it_file):
    rec = read_it(it_file)
    assert rec.responses.shape == (60, 5, 4) and rec.responses.dtype == np.float32
    assert rec.image_shape == (16, 16)
    assert list(rec.site_ids[:2]) == ["site000", "site001"] and rec.image_ids[0] == "img00000"
    assert rec.attrs["time_window_ms"] == [70, 170]
    nan = np.isnan(rec.responses)
    assert nan.any() and not nan.all(axis=2).any()  # missing repeats, never all of them
    with h5py.File(it_file) as f:
        assert f["images"].dtype == np.uint8 and f["images"].shape == (60, 16, 16, 3)
        assert json.loads(f.attrs["synthetic_params"])["n_sites"] == 5
    # the mean response is the mean over recorded repeats
    np.testing.assert_allclose(rec.mean_response()[3, 2], np.nanmean(rec.responses[3, 2]), rtol=1e-6)


def test_writer_skips_same_params_and_rewrites_others(tmp_path):
    p = write_synthetic_it(tmp_path, **SMALL)
    stamp = p.stat().st_mtime_ns
    assert write_synthetic_it(tmp_path, **SMALL) == p and p.stat().st_mtime_ns == stamp
    write_synthetic_it(tmp_path, **{**SMALL, "n_sites": 3})
    assert read_it(p).n_sites == 3
    assert not [q for q in tmp_path.iterdir() if q.name.startswith(".")]  # no temporary files left
    with pytest.raises(ValueError, match="at least 2 repeats"):
        write_synthetic_it(tmp_path / "b", **{**SMALL, "n_repeats": 1})


def test_split_by_image_is_a_partition_and_keeps_images_together():
    ids = np.array([f"im{i // 2}" for i in range(40)])  # every image twice
    rows = split_by_image(ids, val_fraction=0.2, test_fraction=0.3, seed=1)
    allrows = np.concatenate(list(rows.values()))
    assert sorted(allrows) == list(range(40))
    sets = {k: set(ids[v]) for k, v in rows.items()}
    assert not (sets["train"] & sets["test"]) and not (sets["train"] & sets["val"]) and not (sets["val"] & sets["test"])
    assert len(sets["test"]) == 6 and len(sets["val"]) == 4
    with pytest.raises(ValueError, match="too few"):
        split_by_image(ids[:6], 0.3, 0.3)


def test_split_half_reliability_matches_the_planted_noise():
    """Planted signal var 1 and noise sd s with R repeats: reliability of the mean = 1 / (1 + s^2 / R)."""
    rng = np.random.default_rng(0)
    n, reps = 10000, 4
    noise = np.array([0.5, 1.0, 2.0, 4.0])
    signal = rng.normal(size=(n, 4))
    resp = signal[..., None] + noise[None, :, None] * rng.normal(size=(n, 4, reps))
    expected = 1 / (1 + noise**2 / reps)
    np.testing.assert_allclose(split_half_reliability(resp, n_splits=4), expected, atol=0.03)
    # with missing repeats (skipped, not zeros) the truth is r(signal, mean over recorded repeats)^2
    resp[rng.random(resp.shape) < 0.15] = np.nan
    mean = nanmean(resp, 2)
    ok = np.isfinite(mean)
    truth = np.array([np.corrcoef(signal[ok[:, k], k], mean[ok[:, k], k])[0, 1] ** 2 for k in range(4)])
    np.testing.assert_allclose(split_half_reliability(resp, n_splits=4), truth, atol=0.03)
    # pure noise: reliability ~ 0
    assert np.all(np.abs(split_half_reliability(rng.normal(size=(4000, 3, 4)), n_splits=2)) < 0.08)


def _planted(rng, n, sites, reps, rho):
    """Signal var 1, noise var (1 - rho) / rho: single-trial reliability rho. (N, sites, reps)."""
    q = (1 - rho) / rho
    return rng.normal(size=(n, sites, 1)) + np.sqrt(q) * rng.normal(size=(n, sites, reps)), q


def test_split_half_reliability_of_three_repeats_is_not_spearman_brown():
    """3 repeats split 1 + 2: planted single-trial reliability rho, so the 3-repeat mean's reliability is
    3 rho / (1 + 2 rho) (= 0.5625 at rho 0.3). Spearman-Brown's 2 r / (1 + r) assumes equal halves and comes out
    low; the unequal-halves step-up does not."""
    rng = np.random.default_rng(0)
    rho, sites = 0.3, 20
    resp, _ = _planted(rng, 20000, sites, 3, rho)
    truth = 3 * rho / (1 + 2 * rho)
    est = float(split_half_reliability(resp, n_splits=4).mean())
    # independently: the split 1 vs 2 repeats by hand, and the old factor on it
    r = np.mean([np.corrcoef(resp[:, s, 0], resp[:, s, 1:].mean(1))[0, 1] for s in range(sites)])
    old = 2 * r / (1 + r)
    print(f"\n3 repeats, rho {rho}: truth {truth:.4f}, estimate {est:.4f}, Spearman-Brown {old:.4f}")
    assert abs(est - truth) < 0.005  # sd of the mean over 20 sites ~0.0015
    assert truth - old > 0.015  # the closed form of the old bias: 0.0201
    r_true = np.sqrt(rho * 2 * rho / (1 + rho))  # sqrt(R_1 R_2)
    np.testing.assert_allclose(step_up_reliability(r_true, 1.0, 0.5, 1 / 3), truth, rtol=1e-12)
    np.testing.assert_allclose(step_up_reliability(0.4, 0.25, 0.25, 0.125), 0.8 / 1.4, rtol=1e-12)  # equal halves


def test_split_half_reliability_with_missing_repeats_per_image():
    """Repeats missing at random (1..4 of 4 recorded per image): the reliability of each image's mean over its k
    recorded repeats is 1 / (1 + q mean(1 / k)) over the images with k >= 1, with q = (1 - rho) / rho planted."""
    rng = np.random.default_rng(1)
    rho, sites = 0.3, 20
    resp, q = _planted(rng, 20000, sites, 4, rho)
    resp[rng.random(resp.shape) < 0.3] = np.nan
    k = (~np.isnan(resp)).sum(2)
    truth = np.array([1 / (1 + q * np.mean(1 / k[k[:, s] > 0, s])) for s in range(sites)])
    est = split_half_reliability(resp, n_splits=4)
    print(f"\nmissing repeats, rho {rho}: truth {truth.mean():.4f}, estimate {est.mean():.4f}")
    assert abs(float((est - truth).mean())) < 0.005


def test_datamodule_batches(it_file):
    dm = ITDataModule(str(it_file), image_size=24, batch_size=8, val_fraction=0.2, test_fraction=0.2, seed=0)
    dm.setup("fit")
    x, y = next(iter(dm.val_dataloader()))
    assert x.shape == (8, 3, 24, 24) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    assert y.shape == (8, 5)
    rows = dm.rows["val"][:8]
    np.testing.assert_allclose(y.numpy(), nanmean(dm.recordings.responses[rows], 2), rtol=1e-6)
    assert dm.n_sites == 5 and dm.train_mean.shape == (5,)
    assert set(dm.reliability) == {"train", "val", "test"} and dm.reliability["test"].shape == (5,)
    assert sum(len(dm.sets[s]) for s in ("train", "val", "test")) == 60


def test_bad_images_are_refused_with_clear_messages(tmp_path):
    v = _valid()
    with pytest.raises(ValueError, match=r"images must be uint8 .*found dtype float32.*astype\(np.uint8\)"):
        read_it(_write(tmp_path / "a.h5", **{**v, "images": v["images"].astype(np.float32) / 255}))
    with pytest.raises(ValueError, match=r"shape \(N, H, W, 3\); found \(6, 3, 8, 8\) \(channels first"):
        read_it(_write(tmp_path / "b.h5", **{**v, "images": v["images"].transpose(0, 3, 1, 2)}))
    with pytest.raises(ValueError, match=r"found \(6, 8, 8\)"):
        read_it(_write(tmp_path / "c.h5", **{**v, "images": v["images"][..., 0]}))


def test_bad_responses_and_ids_are_refused(tmp_path):
    v = _valid()
    with pytest.raises(ValueError, match=r"\(N, sites, repeats\); found \(6, 3\).*responses\[\.\.\., None\]"):
        read_it(_write(tmp_path / "a.h5", **{**v, "responses": v["responses"][..., 0]}))
    with pytest.raises(ValueError, match="responses has 5 rows but images has 6"):
        read_it(_write(tmp_path / "b.h5", **{**v, "responses": v["responses"][:5]}))
    with pytest.raises(ValueError, match="site_ids has 2 entries but responses has 3 sites"):
        read_it(_write(tmp_path / "c.h5", **{**v, "site_ids": v["site_ids"][:2]}))
    with pytest.raises(ValueError, match="image_ids has 5 entries but there are 6 images"):
        read_it(_write(tmp_path / "d.h5", **{**v, "image_ids": v["image_ids"][:5]}))
    with pytest.raises(ValueError, match="must be float"):
        read_it(_write(tmp_path / "e.h5", **{**v, "responses": np.zeros((6, 3, 2), dtype="S1")}))
    missing = {k: x for k, x in v.items() if k != "responses"}
    with pytest.raises(KeyError, match=r"lacks dataset\(s\) \['responses'\]"):
        read_it(_write(tmp_path / "f.h5", **missing))
    with pytest.raises(FileNotFoundError, match="paths.it_file"):
        read_it(tmp_path / "nope.h5")
    ints = {**v, "responses": np.ones((6, 3, 2), dtype=np.int32)}  # spike counts are fine
    assert read_it(_write(tmp_path / "g.h5", **ints)).responses.dtype == np.float32


# ---------------------------------------------------------------------- issue 21: nothing lost, nothing silently wrong
def test_duplicate_image_ids_are_refused_naming_the_file_count_ids_and_fix(tmp_path):
    v = _valid(n=8)
    ids = v["image_ids"].copy()
    ids[5], ids[6], ids[7] = ids[0], ids[0], ids[1]  # i0 three times, i1 twice
    p = _write(tmp_path / "dup.h5", **{**v, "image_ids": ids})
    with pytest.raises(ValueError, match=rf"{p}: 2 image ids occur more than once \(5 of 8 rows\), e\.g\. i0, i1; "
                                         r".*average the repeats of an image into one row.*distinct ids"):
        read_it(p)
    with pytest.raises(ValueError, match="occur more than once"):  # the datamodule (train.py task=it_encoding) too
        ITDataModule(str(p), image_size=8).setup("fit")


def test_images_without_any_response_are_dropped_with_one_warning(tmp_path, caplog):
    """50 of 200 images all NaN: left out with one warning naming the file and the count; the kept rows still
    show their own images (the file rows map through ITRecordings.rows)."""
    import logging

    v = _valid(n=200, sites=3, reps=2, size=8)
    v["images"][:] = np.arange(200, dtype=np.uint8)[:, None, None, None]  # image of file row j: every pixel j
    blank = np.random.default_rng(1).choice(200, 50, replace=False)
    v["responses"][blank] = np.nan
    p = _write(tmp_path / "blank.h5", **v)
    with caplog.at_level(logging.WARNING, logger="neuroguide"):
        rec = read_it(p)
    msgs = [r.getMessage() for r in caplog.records if "no recorded response" in r.getMessage()]
    assert len(msgs) == 1 and msgs[0].startswith(f"{p}: 50 of 200 images have no recorded response")
    assert rec.n_images == 150 and not np.isnan(rec.responses).all(axis=(1, 2)).any()
    assert not set(rec.file_rows()) & set(blank) and len(set(rec.file_rows())) == 150
    np.testing.assert_array_equal(rec.image_ids, v["image_ids"].astype(str)[rec.file_rows()])
    dm = ITDataModule(str(p), image_size=8, batch_size=4, val_fraction=0.1, test_fraction=0.2)
    dm.setup("fit")
    assert sum(len(dm.sets[s]) for s in ("train", "val", "test")) == 150
    ds, rows = dm.sets["train"], dm.rows["train"]
    for i in (0, 7, len(ds) - 1):  # image and target of the same file row
        j = int(rec.file_rows(rows)[i])
        x, y = ds[i]
        assert round(float(x[0, 0, 0]) * 255) == j and j not in blank
        np.testing.assert_allclose(y.numpy(), np.nanmean(v["responses"][j], axis=1), rtol=1e-6)
    kept = read_it(p, unrecorded="keep")  # the closed loop keeps every proposal's row
    assert kept.n_images == 200 and np.isnan(kept.responses[blank]).all()


def test_a_file_without_any_response_is_refused(tmp_path):
    v = _valid()
    v["responses"][:] = np.nan
    p = _write(tmp_path / "none.h5", **v)
    with pytest.raises(ValueError, match=rf"{p}: none of its 6 images has a recorded response"):
        read_it(p)


def test_a_missing_file_names_the_key_that_gave_it(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"set paths\.it_file= .*data=synthetic"):
        read_it(tmp_path / "nope.h5")
    with pytest.raises(FileNotFoundError, match=r"set recordings= to an existing") as e:
        read_it(tmp_path / "nope.h5", key="recordings")
    assert "paths.it_file" not in str(e.value) and "synthetic" not in str(e.value)
