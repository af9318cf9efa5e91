"""Linear CKA: its invariances (and a non-invariance as control), an independent HSIC formula,
both computation paths, layer selection on a planted region, and bad input."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from neuroguide.evaluation.analyses.cka import core as cka
from neuroguide.evaluation.metrics.cka import linear_cka


def data(n=40, k=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g, dtype=torch.float64) @ torch.randn(k, k, generator=g, dtype=torch.float64)


def hsic_formula(x, y):
    """CKA from tr(K H L H) with the centering matrix H (Kornblith et al. eq. 3), in numpy."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    n = len(x)
    h = np.eye(n) - 1.0 / n
    k, ly = x @ x.T, y @ y.T
    hsic = lambda a, b: np.trace(a @ h @ b @ h)  # noqa: E731
    return hsic(k, ly) / np.sqrt(hsic(k, k) * hsic(ly, ly))


def test_identical_is_one():
    x = data()
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)


def test_invariant_to_orthogonal_transform_and_isotropic_scaling():
    x, y = data(seed=1), data(seed=2)
    q, _ = torch.linalg.qr(torch.randn(10, 10, dtype=torch.float64))
    base = linear_cka(x, y)
    assert linear_cka(x @ q, y) == pytest.approx(base, abs=1e-10)
    assert linear_cka(x * 7.5, y * 0.01) == pytest.approx(base, abs=1e-10)
    assert linear_cka(x, x @ q * 3.0) == pytest.approx(1.0, abs=1e-10)


def test_not_invariant_to_non_isotropic_scaling():
    x = data(seed=3)
    scale = torch.logspace(-2, 2, 10, dtype=torch.float64)
    assert abs(linear_cka(x, x * scale) - 1.0) > 1e-2


def test_equals_hsic_formula_on_both_paths():
    # feature-space path (K small relative to N) and Gram path (K large)
    for n, k1, k2 in [(50, 4, 6), (8, 60, 40)]:
        g = torch.Generator().manual_seed(n)
        x = torch.randn(n, k1, generator=g, dtype=torch.float64)
        y = x[:, :1] * torch.ones(1, k2, dtype=torch.float64) + torch.randn(n, k2, generator=g, dtype=torch.float64)
        assert linear_cka(x, y) == pytest.approx(hsic_formula(x, y), abs=1e-10)


def test_different_number_of_stimuli_refused():
    with pytest.raises(ValueError, match="x has 10 stimuli, y has 9"):
        linear_cka(torch.randn(10, 3), torch.randn(9, 3))


def net(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 6), nn.Tanh())


def test_evaluate_layer_selection(tmp_path):
    model = net(0)
    images = torch.rand(25, 3, 10, 10)
    with torch.no_grad():
        planted = model[:4](images)  # the region "is" layer 3 up to a rotation and scaling
    q, _ = torch.linalg.qr(torch.randn(6, 6))
    m = cka.evaluate(model, images, tmp_path, layers=["1", "3"], responses={"IT": planted @ q * 4}, progress=False)
    assert m["eval/cka/IT/3"] == pytest.approx(1.0, abs=1e-5)
    assert m["eval/cka/IT/best_layer_index"] == 1
    assert m["eval/cka/IT/1"] < m["eval/cka/IT/3"]
    for f in ("cka.csv", "cka.png", "cka_regions.png"):
        assert (tmp_path / f).is_file()


def test_evaluate_models(tmp_path):
    images = torch.rand(12, 3, 10, 10)
    m = cka.evaluate_models({"a": net(0), "b": net(1), "a2": net(0)}, images, tmp_path, layer="3", progress=False)
    assert m["eval/cka/model_vs_model/a/a2"] == pytest.approx(1.0, abs=1e-6)
    assert m["eval/cka/model_vs_model/a/b"] < 0.999
    with pytest.raises(ValueError, match="at least 2 models"):
        cka.evaluate_models({"a": net(0)}, images, tmp_path, progress=False)


def test_heatmaps_use_ckas_range_and_write_values(tmp_path, monkeypatch):
    """CKA heatmaps span [0, 1] (not the data's 0.19-0.21, which exaggerates differences), with the
    values in the cells of small matrices only."""
    from PIL import Image

    from neuroguide.evaluation import plots

    figs, save = {}, plots.save_figure

    def keep(fig, path):  # the figures as drawn, by file name (the PNGs are still written)
        figs[Path(path).name] = fig
        return save(fig, path)

    monkeypatch.setattr(plots, "save_figure", keep)
    model = net(0)
    images = torch.rand(25, 3, 10, 10)
    cka.evaluate(model, images, tmp_path, layers=["1", "3", "4"], responses={"V1": torch.randn(25, 8)}, progress=False)
    cka.evaluate_models({"a": net(0), "b": net(1)}, images, tmp_path, layer="3", progress=False)
    assert set(figs) == {"cka.png", "cka_regions.png", "cka_model_vs_model.png"}
    for name, fig in figs.items():
        image = fig.axes[0].images[0]
        assert image.get_clim() == (0.0, 1.0), name
        assert len(fig.axes[0].texts) == image.get_array().size  # one value per cell
        assert Image.open(tmp_path / name).size[0] <= 2000
    narrow = np.linspace(0.186, 0.214, 13 * 13).reshape(13, 13)
    fig = plots.heatmap([("CKA", narrow)], range(13), range(13), vmin=cka.CKA_RANGE[0], vmax=cka.CKA_RANGE[1])
    assert fig.axes[0].images[0].get_clim() == (0.0, 1.0)
    assert len(fig.axes[0].texts) == 0  # 13 x 13: too many cells to write in
    assert len(plots.heatmap([("CKA", narrow[:12, :12])], range(12), range(12)).axes[0].texts) == 144
