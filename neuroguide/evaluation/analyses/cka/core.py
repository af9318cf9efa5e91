"""``eval=[cka]``: linear CKA (:mod:`neuroguide.evaluation.metrics.cka`) of a model's layers against measured
regions (layer selection) and between layers, and, across models, between their layers."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from neuroguide.evaluation.metrics.cka import CKA_RANGE, cka_matrix
from neuroguide.evaluation.metrics.rdm import check_responses
from neuroguide.models.features import activations, layer_key


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
