"""MadryLab robust checkpoints -> torchvision weights; backbones cut at named layers; unsafe files refused."""
from __future__ import annotations

import pytest
import torch
import torchvision

import neuroguide
from neuroguide.models.backbones import Backbone, build_network
from neuroguide.models.checkpoints import read_checkpoint, safe_torch_load, save_model_file
from neuroguide.models.normalize import Normalize
from neuroguide.models.robust_weights import (convert_madrylab_state_dict, load_robust_weights,
                                              read_robust_state_dict, robust_weights_path)


def _madrylab(sd: dict, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), attacker=True) -> dict:
    """The layout of a MadryLab ``robustness`` ImageNet checkpoint, with its real key names."""
    out = {f"module.model.{k}": v.clone() for k, v in sd.items()}
    if attacker:
        out.update({f"module.attacker.model.{k}": v.clone() for k, v in sd.items()})
    m, s = torch.tensor(mean).view(3, 1, 1), torch.tensor(std).view(3, 1, 1)
    out.update({"module.normalizer.new_mean": m, "module.normalizer.new_std": s,
                "module.attacker.normalize.new_mean": m.clone(), "module.attacker.normalize.new_std": s.clone()})
    return out


def _evil():  # a pickled reference to this function is what weights-only loading must refuse
    return "code ran"


@pytest.fixture(scope="module")
def resnet50_source():
    torch.manual_seed(0)
    src = torchvision.models.resnet50(weights=None).eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics, so a dropped buffer would show
        for m in src.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return src


def test_madrylab_checkpoint_loads_into_torchvision_resnet50(tmp_path, resnet50_source):
    sd = _madrylab(resnet50_source.state_dict())
    assert "module.model.conv1.weight" in sd and "module.attacker.model.layer4.0.conv1.weight" in sd
    path = tmp_path / "imagenet_l2_3_0.pt"
    torch.save({"model": sd, "optimizer": {"state": {}}, "epoch": 90}, path)

    bb = Backbone("resnet50", "layer4.0").eval()  # the whole network is bb.network
    info = load_robust_weights(bb.root, path)
    assert info["dropped"] == ["module.attacker.normalize.new_mean", "module.attacker.normalize.new_std",
                               "module.normalizer.new_mean", "module.normalizer.new_std"]
    x = torch.rand(2, 3, 64, 64)
    s = resnet50_source
    with torch.no_grad():  # the source module saw MadryLab's normalized inputs
        torch.testing.assert_close(bb.network(x), s(Normalize()(x)))
        # the backbone cut at layer4.0 gives the source's layer4[0] output
        h = s.maxpool(s.relu(s.bn1(s.conv1(Normalize()(x)))))
        torch.testing.assert_close(bb(x), s.layer4[0](s.layer3(s.layer2(s.layer1(h)))))
    assert bb(x).shape == (2, 2048, 2, 2)


def test_other_layouts_convert_to_the_same_weights():
    sd = {"conv1.weight": torch.randn(2, 3, 1, 1), "fc.bias": torch.randn(4)}
    plain, _ = convert_madrylab_state_dict(sd)
    attacker_only, norm = convert_madrylab_state_dict(_madrylab(sd, attacker=False) | {
        f"module.attacker.model.{k}": v for k, v in sd.items()})
    only_attacker = {f"module.attacker.model.{k}": v for k, v in sd.items()}
    for got in (plain, attacker_only, convert_madrylab_state_dict(only_attacker)[0],
                convert_madrylab_state_dict({f"module.{k}": v for k, v in sd.items()})[0]):
        assert set(got) == set(sd) and all(torch.equal(got[k], sd[k]) for k in sd)
    assert len(norm) == 4


def test_state_dict_key_and_plain_files(tmp_path):
    net = build_network("resnet18")
    torch.save({"state_dict": net.state_dict()}, tmp_path / "a.pt")
    torch.save(net.state_dict(), tmp_path / "b.pt")
    for name in ("a.pt", "b.pt"):
        other = build_network("resnet18")
        load_robust_weights(other, tmp_path / name)
        assert torch.equal(other.conv1.weight, net.conv1.weight)


def test_wrong_architecture_lists_missing_and_unexpected_keys(tmp_path):
    torch.save({"model": _madrylab(build_network("resnet18").state_dict()), "epoch": 1}, tmp_path / "r18.pt")
    with pytest.raises(ValueError, match=r"does not fit NormalizedResNet: \d+ missing keys \[.*layer1.0.conv3.weight.*"
                                         r"unexpected keys.*shape mismatches.*backbone=resnet50"):
        load_robust_weights(build_network("resnet50"), tmp_path / "r18.pt")


def test_other_normalization_is_refused(tmp_path):
    torch.save({"model": _madrylab(build_network("resnet18").state_dict(), mean=(0.5, 0.5, 0.5))}, tmp_path / "c.pt")
    with pytest.raises(ValueError, match="normalizes inputs with module.normalizer.new_mean"):
        load_robust_weights(build_network("resnet18"), tmp_path / "c.pt")


def test_not_a_checkpoint(tmp_path):
    torch.save({"epoch": 3, "note": "x"}, tmp_path / "x.pt")
    with pytest.raises(ValueError, match="expected a MadryLab checkpoint"):
        read_robust_state_dict(tmp_path / "x.pt")


def test_pickled_callable_is_refused_by_every_loader(tmp_path):
    sd = build_network("resnet18").state_dict()
    evil_robust = tmp_path / "evil_robust.pt"
    torch.save({"model": _madrylab(sd), "epoch": 1, "hook": _evil}, evil_robust)
    evil_model = tmp_path / "evil_model.ckpt"
    save_model_file(evil_model, "it_encoding", {"backbone": "resnet18", "layer": "layer1", "n_sites": 2,
                                                "image_size": 16}, {})
    obj = torch.load(evil_model, weights_only=True)
    obj["metrics"] = {"hook": _evil}
    torch.save(obj, evil_model)
    for path in (evil_robust, evil_model):
        with pytest.raises(ValueError, match="refusing to load .* pickled callable"):
            safe_torch_load(path)
    with pytest.raises(ValueError, match="refusing to load"):
        neuroguide.load_model(evil_model)
    with pytest.raises(ValueError, match="refusing to load"):
        read_checkpoint(evil_model)  # what task.init_from uses
    with pytest.raises(ValueError, match="refusing to load"):
        load_robust_weights(build_network("resnet18"), evil_robust)
    with pytest.raises(ValueError, match="refusing to load"):
        read_robust_state_dict(evil_robust)


def test_backbone_layers_and_errors():
    bb = Backbone("resnet18", "layer2.1")
    assert bb(torch.rand(2, 3, 32, 32)).shape == (2, 128, 4, 4)
    assert bb.output_shape(64) == (128, 8, 8)
    with pytest.raises(KeyError, match=r"backbone.layer='layer9.0' is not a layer of resnet18.*Valid layer names: "
                                       r"normalize, conv1, bn1.*layer4.0"):
        Backbone("resnet18", "layer9.0")
    t = Backbone("resnet10t", "layer2")  # any timm model, by name, no download
    assert t(torch.rand(1, 3, 32, 32)).shape[:2] == (1, 128)
    assert isinstance(t.network.normalize, Normalize)
    with pytest.raises(KeyError, match="neither a torchvision ResNet"):
        Backbone("no_such_net", "layer1")


def test_robust_weights_path_names_the_config_key(tmp_path):
    w = tmp_path / "w.pt"
    w.write_bytes(b"")
    assert robust_weights_path(None, {}) is None
    assert robust_weights_path(2, {"2.0": str(w)}) == w and robust_weights_path(2.0, {2: str(w)}) == w
    assert robust_weights_path(8, {}, weights=str(w)) == w
    with pytest.raises(FileNotFoundError, match=r"backbone.at_eps=2 needs .* paths.robust_weights has none"):
        robust_weights_path(2, {0: str(w)})
    with pytest.raises(FileNotFoundError, match=r"paths.robust_weights\[4\]=.*missing.pt does not exist"):
        robust_weights_path(4, {4: str(tmp_path / "missing.pt")})
    with pytest.raises(FileNotFoundError, match="backbone.weights=.*does not exist"):
        robust_weights_path(None, {}, weights=str(tmp_path / "nope.pt"))
