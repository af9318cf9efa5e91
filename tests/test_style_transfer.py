"""Style transfer (AdaIN) with random weights on tiny images: the AdaIN statistics, the release's
weight-file layout, cue-conflict bookkeeping, the Geirhos layout round trip, and bad input."""
from __future__ import annotations

import csv

import pytest
import torch
from torch import nn

from neuroguide.evaluation.analyses import shape_bias as sb
from neuroguide.evaluation.analyses.shape_bias import style_transfer as st


@pytest.fixture(scope="module")
def weight_files(tmp_path_factory):
    """Random AdaIN weights saved as the release does: the WHOLE normalised VGG-19 (53 layers) and the decoder."""
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("adain")
    enc = st.vgg_encoder()
    full = list(enc.children()) + [nn.ReflectionPad2d(1), nn.Conv2d(512, 8, 3)]  # layers after relu4_1 (ignored)
    vgg = nn.Sequential(*full)
    for m in vgg.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.normal_(m.weight, std=0.05)
    torch.save(vgg.state_dict(), d / "vgg_normalised.pth")
    torch.save(st.decoder().state_dict(), d / "decoder.pth")
    return d / "vgg_normalised.pth", d / "decoder.pth"


def test_adain_takes_style_statistics():
    c = torch.randn(2, 5, 6, 6) * 3 + 1
    s = torch.randn(2, 5, 4, 4) * 0.5 - 2
    t = st.adain(c, s)
    tm, ts = st.mean_std(t, eps=0)
    sm, ss = st.mean_std(s)
    torch.testing.assert_close(tm, sm, atol=1e-5, rtol=0)
    torch.testing.assert_close(ts, ss, atol=1e-3, rtol=1e-3)
    # the content's spatial pattern survives: per channel, t is an increasing affine map of c
    corr = torch.corrcoef(torch.stack([t[0, 0].flatten(), c[0, 0].flatten()]))[0, 1]
    assert corr > 0.999


def test_release_layout_loads_and_stylizes(weight_files):
    net = st.AdaIN.from_files(*weight_files)
    assert len(net.encoder) == 31
    content, style = torch.rand(2, 3, 20, 20), torch.rand(2, 3, 16, 16)  # 20 px: not a multiple of 8
    with torch.no_grad():
        out = net(content, style)
        kept = net(content, style, alpha=0.0)
        direct = nn.functional.interpolate(net.decoder(net.encoder(content)), size=(20, 20), mode="bilinear",
                                           align_corners=False).clamp(0, 1)
    assert out.shape == (2, 3, 20, 20)
    assert out.min() >= 0 and out.max() <= 1
    torch.testing.assert_close(kept, direct)  # alpha = 0: the content's own features
    assert not torch.allclose(out, kept)


def test_bad_weight_files(weight_files, tmp_path):
    vgg, dec = weight_files
    with pytest.raises(ValueError, match=r"decoder.pth is not an AdaIN vgg state dict: missing"):
        st.AdaIN.from_files(dec, dec)
    bad = st.decoder().state_dict()
    bad["1.weight"] = torch.zeros(256, 512, 1, 1)
    torch.save(bad, tmp_path / "dec.pth")
    with pytest.raises(ValueError, match=r"tensor 1.weight has shape \(256, 512, 1, 1\).*needs \(256, 512, 3, 3\)"):
        st.AdaIN.from_files(vgg, tmp_path / "dec.pth")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        st.AdaIN.from_files(tmp_path / "none.pth", dec)
    with pytest.raises(ValueError, match="alpha"):
        st.AdaIN()(torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 8), alpha=1.5)
    with pytest.raises(ValueError, match="at least 16 x 16"):
        st.AdaIN()(torch.rand(1, 3, 8, 8), torch.rand(1, 3, 16, 16))


def test_cue_conflict_bookkeeping():
    g = torch.Generator().manual_seed(0)
    images = torch.rand(9, 3, 8, 8, generator=g)
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2])
    shape_only = st.cue_conflict_from_classes(images, labels, lambda c, s: c, n_images=14, batch_size=4)
    assert len(shape_only) == 14
    assert (shape_only.shape != shape_only.texture).all()
    torch.testing.assert_close(shape_only.images, images[shape_only.content_index])
    assert (labels[shape_only.content_index] == shape_only.shape).all()
    texture_only = st.cue_conflict_from_classes(images, labels, lambda c, s: s, n_images=14, batch_size=4)
    torch.testing.assert_close(texture_only.images, images[texture_only.style_index])
    assert (labels[texture_only.style_index] == texture_only.texture).all()
    with pytest.raises(ValueError, match="at least 2 classes"):
        st.cue_conflict_from_classes(images, torch.zeros(9, dtype=torch.long), lambda c, s: c, n_images=2)


def test_saved_set_reads_back_in_geirhos_layout(tmp_path):
    images = torch.rand(6, 3, 8, 8)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    names = ["n01440764", "n01443537", "n01484850"]
    cc = st.cue_conflict_from_classes(images, labels, lambda c, s: (c + s) / 2, n_images=6)
    cc.save(tmp_path / "cc", names)
    back = sb.read_cue_conflict(tmp_path / "cc", names)
    got = sorted((b.shape, b.texture) for b in back)
    want = sorted((names[int(s)], names[int(t)]) for s, t in zip(cc.shape, cc.texture))
    assert got == want


def test_evaluate_style_transfer(weight_files, tmp_path):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    images, labels = torch.rand(6, 3, 16, 16), torch.tensor([0, 0, 0, 1, 1, 1])
    m = sb.evaluate(model, tmp_path, images=images, labels=labels, style_vgg=weight_files[0],
                    style_decoder=weight_files[1], class_names=["a", "b"], n_style_images=8, progress=False,
                    save_style_images=True)
    key = "eval/shape_bias/style_transfer"
    assert m[f"{key}/n_images"] == 8
    rows = list(csv.DictReader(open(tmp_path / "shape_bias_style_transfer_decisions.csv")))
    n_s = sum(r["decision"] == r["shape"] for r in rows)
    n_t = sum(r["decision"] == r["texture"] for r in rows)
    assert (m[f"{key}/n_shape_decisions"], m[f"{key}/n_texture_decisions"]) == (n_s, n_t)
    assert n_s + n_t == 8  # two classes: every answer is the shape or the texture class
    assert m[key] == pytest.approx(n_s / 8)
    assert len(list((tmp_path / "cue_conflict").rglob("*.png"))) == 8
    assert (tmp_path / "shape_bias_style_transfer.png").is_file()
    with pytest.raises(ValueError, match="needs style_vgg, style_decoder"):
        sb.evaluate(model, tmp_path, style_vgg=weight_files[0], progress=False)
