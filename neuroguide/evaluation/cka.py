"""Linear centered kernel alignment (Kornblith et al. 2019), beside RSA; used for layer selection.

For patterns X (N, K1) and Y (N, K2) of the same N stimuli, columns centered::

    CKA(X, Y) = ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F)
              = <X X^T, Y Y^T>_F / (||X X^T||_F ||Y Y^T||_F)

(the feature-space and the stimulus-space forms; the cheaper one is used). It is 1 for identical
inputs and invariant to orthogonal transforms and isotropic scaling of either side, but not to
arbitrary invertible linear maps (e.g. scaling features by different factors).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from neuroguide.evaluation.rdm import check_patterns, check_responses
from neuroguide.models.features import activations, layer_key

CKA_RANGE = (0.0, 1.0)  # linear CKA is in [0, 1]: figures use this colour range, not the data's


def linear_cka(x, y, *, dtype: torch.dtype = torch.float64) -> float:
    """Linear CKA of (N, K1) and (N, K2) patterns (extra dims flattened). NaN if one side is constant."""
    x = check_patterns(x, "x").to(dtype)
    y = check_patterns(y, "y").to(dtype=dtype, device=x.device)
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"linear_cka: x has {x.shape[0]} stimuli, y has {y.shape[0]}: both must hold the patterns of "
                         "the same stimuli, in the same order")
    x = x - x.mean(dim=0, keepdim=True)
    y = y - y.mean(dim=0, keepdim=True)
    n, k1, k2 = x.shape[0], x.shape[1], y.shape[1]
    if k1 * k2 + k1 * k1 + k2 * k2 <= 3 * n * n:  # feature space: (K, K) matrices
        hsic = (y.T @ x).square().sum()
        nx = (x.T @ x).square().sum().sqrt()
        ny = (y.T @ y).square().sum().sqrt()
    else:  # stimulus space: (N, N) Gram matrices
        gx, gy = x @ x.T, y @ y.T
        hsic = (gx * gy).sum()
        nx, ny = gx.square().sum().sqrt(), gy.square().sum().sqrt()
    if nx == 0 or ny == 0:
        return float("nan")
    return float(hsic / (nx * ny))


def cka_matrix(rows: Mapping[str, torch.Tensor], cols: Mapping[str, torch.Tensor] | None = None) -> np.ndarray:
    """(len(rows), len(cols)) linear CKA between every pair of pattern sets (``cols`` defaults to ``rows``)."""
    symmetric = cols is None
    cols = rows if cols is None else cols
    out = np.full((len(rows), len(cols)), np.nan)
    for i, a in enumerate(rows.values()):
        for j, b in enumerate(cols.values()):
            if symmetric and j < i:
                out[i, j] = out[j, i]
                continue
            out[i, j] = linear_cka(a, b)
    return out


def evaluate(model: nn.Module, images: torch.Tensor, out_dir: str | os.PathLike, *,
             layers: Sequence[str | None] | str | None = None, responses=None, batch_size: int = 128,
             key_prefix: str = "eval/cka", progress: bool = True) -> dict:
    """CKA of each layer against each region (layer selection) and between layers.

    Args:
        layers: layer names (None / "output" = the model output).
        responses: ``{region: (N, V)}`` measured responses to ``images`` (a bare tensor is "region").
    Returns:
        ``{key_prefix}/{region}/{layer}`` and ``{key_prefix}/{region}/best_layer_index`` (position in
        ``layers`` of the layer with the highest CKA). Writes ``cka.csv``, ``cka.png`` (layer x layer)
        and, with responses, ``cka_regions.png`` (layer x region) into ``out_dir``.
    """
    from neuroguide.evaluation.plots import heatmap_figure, write_csv

    out_dir = Path(out_dir)
    layer_list = [layers] if layers is None or isinstance(layers, str) else list(layers)
    resp = check_responses(responses, len(images))
    acts = activations(model, images, layer_list, batch_size=batch_size, progress=progress)
    names = list(acts)
    metrics, rows = {}, []
    mats = [("layer x layer", cka_matrix(acts))]
    if resp:
        lr = cka_matrix(acts, resp)
        for j, region in enumerate(resp):
            for i, layer in enumerate(names):
                metrics[f"{key_prefix}/{region}/{layer}"] = float(lr[i, j])
                rows.append({"a": layer, "b": f"region {region}", "cka": float(lr[i, j])})
            col = np.nan_to_num(lr[:, j], nan=-np.inf)
            metrics[f"{key_prefix}/{region}/best_layer_index"] = int(np.argmax(col))
        heatmap_figure([("layer x region", lr)], names, list(resp), out_dir / "cka_regions.png", xlabel="region",
                       ylabel="layer", cbar_label="linear CKA", vmin=CKA_RANGE[0], vmax=CKA_RANGE[1])
    for i, a in enumerate(names):
        for j, b in enumerate(names):
            rows.append({"a": a, "b": b, "cka": float(mats[0][1][i, j])})
    write_csv(out_dir / "cka.csv", rows, ["a", "b", "cka"])
    heatmap_figure(mats, names, names, out_dir / "cka.png", xlabel="layer", ylabel="layer", cbar_label="linear CKA",
                   vmin=CKA_RANGE[0], vmax=CKA_RANGE[1])
    return metrics


def evaluate_models(models: Mapping[str, nn.Module], images: torch.Tensor, out_dir: str | os.PathLike, *,
                    layer: str | Mapping[str, str | None] | None = None, batch_size: int = 128,
                    key_prefix: str = "eval/cka", progress: bool = True) -> dict:
    """Model-vs-model linear CKA at one layer: ``{key_prefix}/model_vs_model/{a}/{b}`` for a before b.

    Writes ``cka_model_vs_model.csv`` and ``cka_model_vs_model.png``.
    """
    from neuroguide.evaluation.plots import heatmap_figure, write_csv

    if len(models) < 2:
        raise ValueError(f"model-vs-model CKA needs at least 2 models, got {len(models)} ({list(models)})")
    acts = {}
    for name, m in tqdm(models.items(), desc="activations", disable=not progress, leave=False):
        lay = layer.get(name) if isinstance(layer, Mapping) else layer
        acts[name] = activations(m, images, [lay], batch_size=batch_size)[layer_key(lay)]
    mat = cka_matrix(acts)
    names = list(acts)
    metrics, rows = {}, []
    for i, a in enumerate(names):
        for j, b in enumerate(names):
            rows.append({"a": a, "b": b, "cka": float(mat[i, j])})
            if i < j:
                metrics[f"{key_prefix}/model_vs_model/{a}/{b}"] = float(mat[i, j])
    out_dir = Path(out_dir)
    write_csv(out_dir / "cka_model_vs_model.csv", rows, ["a", "b", "cka"])
    heatmap_figure([("linear CKA", mat)], names, names, out_dir / "cka_model_vs_model.png", xlabel="", ylabel="",
                   cbar_label="linear CKA", vmin=CKA_RANGE[0], vmax=CKA_RANGE[1])
    return metrics
