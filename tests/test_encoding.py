"""Encoding models (task=encoding): planted-depth recovery, ridge vs closed form, export, evaluate, bad input."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import neuroguide
from neuroguide.config import compose_config
from neuroguide.train import run

# planted-depth synthetic NSD, larger than conftest's SMALL_NSD so that a 512-feature layer has enough images
DEPTH = ["task=encoding", "backbone=planted", "data.synthetic_nsd.planted=depth", "data.synthetic_nsd.n_stimuli=460",
         "data.synthetic_nsd.n_subject_images=400", "data.synthetic_nsd.n_shared=60",
         "task.alphas=[1,10,100,1000,10000,100000]"]
LAYERS = ["layer1", "layer2", "layer3", "layer4"]


@pytest.fixture(scope="module")
def depth_runs(tmp_path_factory):
    """Encoding models on the planted network for a shallow (V1) and a deep (FFA) region, and shuffled controls."""
    from conftest import small_overrides

    tmp = tmp_path_factory.mktemp("enc")

    def go(out, *o):
        return run(compose_config("train", small_overrides(tmp) + DEPTH + list(o), output_dir=tmp / out)), tmp / out

    runs = {(region, "false"): go(f"{region}", f"region={region}") for region in ("V1", "FFA")}
    # the controls: the same readout (at the planted layer) fitted to shuffled image-response pairs
    runs.update({(region, "true"): go(f"{region}_shuffle", f"region={region}", "predictor.shuffle=true",
                                      f"backbone.layer={layer}") for region, layer in (("V1", "layer1"), ("FFA", "layer4"))})
    return runs


@pytest.mark.slow  # trains for more than ~20 s: in the full suite, not the quick one
@pytest.mark.parametrize("region,planted", [("V1", "layer1"), ("FFA", "layer4")])
def test_per_layer_score_peaks_at_the_planted_depth(depth_runs, region, planted):
    m, out = depth_runs[(region, "false")]
    val = [m[f"val/layer/{lay}/r_median"] for lay in LAYERS]
    test = [m[f"test/layer/{lay}/r_nc_median"] for lay in LAYERS]
    print(region, "val median r per layer", np.round(val, 3), "test median r/sqrt(NC)", np.round(test, 3))
    assert LAYERS[int(np.argmax(val))] == planted and LAYERS[int(np.argmax(test))] == planted
    assert max(test) > sorted(test)[-2] + 0.05  # a clear peak, not a tie
    assert LAYERS[int(m["selected_layer_index"])] == planted
    rows = (out / "layers.csv").read_text().splitlines()
    assert rows[0].startswith("layer,") and len(rows) == 5 and (out / "layers.png").stat().st_size > 0
    # the exported model (backbone + pooling + readout through Lightning) scores what the ridge scored
    assert m["test/r_nc_median"] == pytest.approx(m[f"test/layer/{planted}/r_nc_median"], abs=1e-4)


@pytest.mark.parametrize("region", ["V1", "FFA"])
def test_fitted_region_beats_shuffled_pairs(depth_runs, region):
    real, shuffled = depth_runs[(region, "false")][0], depth_runs[(region, "true")][0]
    print(region, "test median r", real["test/r_median"], "shuffled", shuffled["test/r_median"])
    assert real["test/r_median"] > 0.4 and shuffled["test/r_median"] < 0.2
    assert real["test/r_nc_median"] > shuffled["test/r_nc_median"] + 0.4


def _closed_form(X, Y, alphas, X_test):
    """Independent ridge: numpy solve per voxel on the standardized features, the chosen penalty each."""
    mu, sd = X.mean(0), X.std(0)
    Xs, Xt = (X - mu) / sd, (X_test - mu) / sd
    pred = np.empty((len(X_test), Y.shape[1]))
    for v, a in enumerate(alphas):
        w = np.linalg.solve(Xs.T @ Xs + a * np.eye(X.shape[1]), Xs.T @ (Y[:, v] - Y[:, v].mean()))
        pred[:, v] = Xt @ w + Y[:, v].mean()
    return pred


def _problem(seed=0, n=120, d=15, v=8):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d)) * rng.uniform(0.5, 3, d) + rng.normal(size=d)
    noise = np.geomspace(0.05, 20, v)  # from clean to pure noise: the per-voxel penalties must differ
    Y = X @ rng.normal(size=(d, v)) + rng.normal(size=(n, v)) * noise
    return X, Y


def test_ridge_equals_closed_form_and_penalty_ignores_test_images():
    from neuroguide.metrics import pearson_r
    from neuroguide.models.ridge import fit_layers, fit_ridge

    X, Y = _problem()
    Xf, Yf, Xv, Yv, Xt, Yt = X[:80], Y[:80], X[80:100], Y[80:100], X[100:], Y[100:]
    fit = fit_ridge(Xf, Yf)
    assert len(set(fit.alphas.tolist())) > 2  # a penalty per voxel, not one for all
    ours, ref = fit.predict(Xt), _closed_form(Xf, Yf, fit.alphas, Xt)
    r_ours = pearson_r(torch.as_tensor(ours), torch.as_tensor(Yt)).numpy()
    r_ref = pearson_r(torch.as_tensor(ref), torch.as_tensor(Yt)).numpy()
    print("largest |r difference| vs closed form:", np.abs(r_ours - r_ref).max(), "alphas", fit.alphas)
    assert np.abs(r_ours - r_ref).max() < 1e-4 and np.abs(ours - ref).max() < 1e-6
    w, b = fit.linear()  # the exported nn.Linear on raw features predicts the same
    lin = torch.as_tensor(Xt, dtype=torch.float32) @ w.T + b
    assert np.abs(lin.numpy() - ours).max() < 1e-3
    feats = {"l": {"fit": Xf, "val": Xv, "test": Xt}}
    a = fit_layers(feats, Yf, Yv, Yt)[0]
    b2 = fit_layers(feats, Yf, Yv, np.random.default_rng(1).normal(size=Yt.shape))[0]  # only the test responses differ
    assert np.array_equal(a.fit.alphas, b2.fit.alphas) and np.array_equal(a.val_r, b2.val_r)
    assert not np.allclose(a.test_r, b2.test_r)


@pytest.fixture(scope="module")
def random_run(tmp_path_factory):
    from conftest import small_overrides

    tmp = tmp_path_factory.mktemp("enc_rand")
    cfg = compose_config("train", small_overrides(tmp) + ["task=encoding", "region=TO", "backbone=resnet18",
                                                          "backbone.weights=random", "backbone.layer=[layer2,layer3]",
                                                          "task.pool=2"], output_dir=tmp / "run")
    return tmp, run(cfg)


def test_load_model_round_trip_and_random_weights_flag(random_run):
    tmp, m = random_run
    written = json.loads((tmp / "run" / "metrics.json").read_text())
    assert written["backbone_random_weights"] == 1.0 and "test/r_nc_median" in written
    model = neuroguide.load_model(tmp / "run" / "model.ckpt")
    info = model.neuroguide_info
    assert info["model_kind"] == "encoding" and info["facts"]["weights"] == "random"
    assert info["model_config"]["layer"] in ("layer2", "layer3") and info["model_config"]["pool"] == 2
    x = torch.rand(3, 3, 32, 32)
    y = model(x)
    assert y.shape == (3, info["facts"]["n_voxels"])
    again = neuroguide.load_model(tmp / "run" / "model.ckpt")
    torch.testing.assert_close(again(x), y)
    model.train()  # the backbone stays frozen in eval mode
    assert not model.backbone.training and not any(p.requires_grad for p in model.backbone.parameters())


def test_evaluate_sensitivity_on_an_encoding_model(random_run):
    from neuroguide.evaluation.runner import run as evaluate

    tmp, _ = random_run
    cfg = compose_config("evaluate", [f"paths.log_dir={tmp}/outputs", f"ckpt={tmp}/run/model.ckpt", "eval=[sensitivity]",
                                      "n_images=4", "eval.sensitivity.units=3", "eval.sensitivity.n_images=2",
                                      "eval.sensitivity.steps=3", "eval.sensitivity.restarts=1",
                                      "eval.sensitivity.eps_list=[0.5]"], output_dir=tmp / "eval")
    m = evaluate(cfg)
    assert m["eval/sensitivity/l2_0.5/mean_norm"] > 0


def _fails(compose_train, *o):
    return run(compose_train("task=encoding", "region=TO", "backbone=resnet18", "backbone.weights=random", *o))


def test_bad_layer_names_the_nearest_valid_ones(compose_train):
    with pytest.raises(KeyError, match=r"backbone.layer='layer5' is not a layer of resnet18. Nearest valid names: "
                                       r"\['layer4', 'layer3'"):
        _fails(compose_train, "backbone.layer=[layer2,layer5]")


def test_weights_of_another_architecture_and_missing_weights(compose_train, tmp_path):
    from neuroguide.models.backbones import build_network

    wrong = tmp_path / "resnet18.pt"
    torch.save(build_network("resnet18").state_dict(), wrong)
    with pytest.raises(ValueError, match=r"does not fit AlexNet: \d+ missing keys \['features.0.weight'.*unexpected "
                                         r"keys \['conv1.weight'"):
        _fails(compose_train, "backbone=alexnet", f"backbone.weights={wrong}", "backbone.layer=features.5")
    with pytest.raises(FileNotFoundError, match=r"/no/such/file.pt does not exist.*published.*download.pytorch.org"):
        _fails(compose_train, "backbone=alexnet", "backbone.weights=/no/such/file.pt")


def test_pretrained_weights_only_from_the_local_torch_cache(tmp_path, monkeypatch):
    from neuroguide.models.zoo import backbone_weights

    cfg = {"name": "alexnet", "source": "torchvision", "weights": "pretrained"}
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(FileNotFoundError, match=r"hub/checkpoints/alexnet-owt-\w+.pth is not in the local torch cache.*"
                                                r"nothing is downloaded.*https://download.pytorch.org"):
        backbone_weights(cfg)
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    f = tmp_path / "hub" / "checkpoints" / "alexnet-owt-7be5be79.pth"
    f.write_bytes(b"")
    assert backbone_weights(cfg) == f
    assert backbone_weights({**cfg, "weights": "random"}) is None
    with pytest.raises(FileNotFoundError, match=r"no weights. Set backbone.weights"):
        backbone_weights({**cfg, "weights": None})


def test_region_without_reliable_voxels(compose_train):
    with pytest.raises(ValueError, match=r"region TO: no voxel has a noise ceiling >= data.nc_threshold=101.0"):
        _fails(compose_train, "data.nc_threshold=101")


def test_feature_cache_reused_and_refused_for_other_images(tmp_path):
    from neuroguide.models.feature_cache import cached_features

    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Conv2d(4, 5, 3))
    calls = []
    net.register_forward_hook(lambda *a: calls.append(1))
    images, ids = torch.rand(6, 3, 12, 12), np.arange(10, 16)
    kw = dict(backbone="toy", identity={"w": 1}, pool=2, image_size=12, cache_dir=tmp_path, batch_size=4,
              progress=False)
    a = cached_features(net, net, images, ids, ["0", "2"], **kw)
    assert a["2"].shape == (6, 5 * 2 * 2) and len(calls) == 2
    b = cached_features(net, net, images, ids, ["0", "2"], **kw)
    assert len(calls) == 2 and isinstance(b["2"], np.memmap)  # read back, not recomputed
    np.testing.assert_array_equal(a["2"], b["2"])
    folder = next((tmp_path / "features" / "toy").glob("2_*"))
    np.save(folder / "image_ids.npy", np.arange(20, 26))  # a cache folder holding other images' features
    with pytest.raises(ValueError, match=r"feature cache .* was written for other images.*Delete"):
        cached_features(net, net, images, ids, ["2"], **kw)


@pytest.mark.parametrize("name", ["alexnet", "vgg16", "resnet18", "resnet50", "mobilenet_v2", "densenet201", "vit_b_16",
                                  "resnet50_l2_eps3", "planted"])
def test_zoo_configs_build_with_valid_layers(name):
    from omegaconf import OmegaConf

    from neuroguide.config import CONF_DIR
    from neuroguide.models.backbones import build_network, check_layer, layer_root
    from neuroguide.tasks.encoding import layer_list

    b = OmegaConf.load(CONF_DIR / "backbone" / f"{name}.yaml")
    root = layer_root(build_network(b.name, b.get("source") or "auto"))
    for layer in layer_list(b.layer):
        check_layer(root, layer, b.name)


def test_shared515_from_the_design_and_each_subjects_sessions(tmp_path, compose_train):
    from conftest import SMALL_NSD

    from neuroguide.data.nsd import Design, NSDPaths
    from neuroguide.data.nsd_shared import shared_by_all
    from neuroguide.data.synthetic.nsd import betas_dir, write_synthetic_nsd

    root = write_synthetic_nsd(tmp_path / "nsd", **{**SMALL_NSD, "subjects": (1, 2)})
    design = Design.read(NSDPaths(root, 1).expdesign)
    everyone = shared_by_all(root, 150)  # both subjects have all 4 sessions; 3..8 NSD's counts (capped at the design)
    assert np.array_equal(everyone, np.sort(design.shared_images))
    for f in betas_dir(root, 2).glob("betas_session04.*"):
        f.unlink()  # subject 2 stopped after 3 sessions: 450 of 600 trials
    seen = design.trial_images(2, 450)
    expected = [i for i in design.shared_images if (seen == i).sum() >= 3]
    fewer = shared_by_all(root, 150)
    assert 0 < len(fewer) < len(everyone) and np.array_equal(fewer, np.sort(expected))


def test_regions_fitted_together_equal_each_fitted_alone(tmp_path, monkeypatch):
    """task.regions=[TO,V1]: one decomposition per layer for both regions, and each region's exported model, scores
    and per-layer table are those of the run of that region alone."""
    import csv

    import yaml
    from conftest import small_overrides

    import neuroguide.models.ridge as ridge
    import neuroguide.tasks.encoding as encoding

    base = small_overrides(tmp_path) + ["task=encoding", "backbone=resnet18", "backbone.weights=random",
                                        "backbone.layer=[layer2,layer3]", "task.feature_cache_dir=null"]
    calls = []
    column_space = ridge.column_space
    monkeypatch.setattr(ridge, "column_space", lambda xc: calls.append(xc.shape) or column_space(xc))
    extracted = []
    features = encoding.cached_features
    monkeypatch.setattr(encoding, "cached_features", lambda *a, **k: extracted.append(a[4]) or features(*a, **k))
    joint = run(compose_config("train", base + ["task.regions=[TO,V1]"], output_dir=tmp_path / "joint"))
    n_voxels = {}
    assert len(calls) == 2 and extracted == [["layer2", "layer3"]]  # one decomposition per layer, features once
    x = torch.rand(4, 3, 32, 32)
    for region in ("TO", "V1"):
        alone = run(compose_config("train", base + [f"region={region}"], output_dir=tmp_path / region))
        folder = tmp_path / "joint" / "regions" / region
        a, b = neuroguide.load_model(folder / "model.ckpt"), neuroguide.load_model(tmp_path / region / "model.ckpt")
        assert a.neuroguide_info["facts"]["region"] == region
        n_voxels[region] = a.neuroguide_info["facts"]["n_voxels"]
        with torch.no_grad():
            pa, pb = a(x), b(x)
        print(region, "largest |prediction difference| joint vs alone:", float((pa - pb).abs().max()))
        assert pa.shape == pb.shape and float((pa - pb).abs().max()) <= 1e-5
        for k in ("test/r_median", "test/r_nc_median", "val/r_median", "test/layer/layer2/r_nc_median"):
            assert joint[f"{region}/{k}"] == pytest.approx(alone[k], abs=1e-5)
        assert json.loads((folder / "metrics.json").read_text())["test/r_median"] == pytest.approx(alone["test/r_median"],
                                                                                                   abs=1e-5)
        rows = [list(csv.DictReader(open(f / "layers.csv"))) for f in (folder, tmp_path / region)]
        assert [r["layer"] for r in rows[0]] == ["layer2", "layer3"]
        for ra, rb in zip(*rows):
            assert float(ra["val_r_median"]) == pytest.approx(float(rb["val_r_median"]), abs=1e-6)
            assert ra["alpha_median"] == rb["alpha_median"] and ra["selected"] == rb["selected"]
        written = yaml.safe_load((folder / "config.yaml").read_text())  # the config of the run region=<region>
        assert written["region"]["name"] == region and written["task"]["regions"] is None
    assert n_voxels["TO"] != n_voxels["V1"]
    again = run(compose_config("train", base + ["task.regions=[TO,V1]"], output_dir=tmp_path / "joint"))
    assert len(calls) == 2 + 2 * 2 and again == joint  # finished: read back (the alone runs decomposed 2 x 2)
