"""Representational similarity analysis (Kriegeskorte, Mur & Bandettini 2008): the entry points.

:func:`evaluate` compares one model's layers with measured responses of brain regions;
:func:`evaluate_models` compares models with each other (and with regions). The numbers live in
:mod:`neuroguide.evaluation.metrics.rdm` (RDMs, Spearman / Kendall tau-a / cosine comparisons), the pictures in
:mod:`neuroguide.evaluation.analyses.rsa.figures` (RDM panels, MDS); both are re-exported here, so
``rsa.rdm(...)``, ``rsa.compare(...)``, ``rsa.classical_mds(...)`` work as before. Activations come from
the project's one extractor, :func:`neuroguide.models.features.activations`.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from neuroguide.evaluation.metrics.rdm import (COMPARISONS, METHODS, PreparedRDM, check_comparisons,
                                       check_patterns, check_responses, compare, compare_all, cosine,
                                       kendall_tau_a, n_pairs, n_stimuli, prepare, rdm, spearman, squareform,
                                       sub_rdm)
from neuroguide.evaluation.analyses.rsa.figures import (SCORE_NAMES, classical_mds, mds_figure,
                                               models_mds_figure, rdm_figure, rdm_mds)
from neuroguide.models.features import activations, layer_key

log = logging.getLogger("neuroguide")

__all__ = ["evaluate", "evaluate_models",  # here; re-exported from rdm and rsa_figures:
           "COMPARISONS", "METHODS", "PreparedRDM", "check_comparisons", "check_patterns", "check_responses", "compare",
           "compare_all", "cosine", "kendall_tau_a", "n_pairs", "n_stimuli", "prepare", "rdm", "spearman",
           "squareform", "sub_rdm", "classical_mds", "rdm_mds", "rdm_figure", "mds_figure", "models_mds_figure"]


def evaluate(model: nn.Module, images: torch.Tensor, out_dir: str | os.PathLike, *,
             layers: str | Sequence[str | None] | None = None, responses=None, method: str = "correlation",
             comparisons: Sequence[str] = COMPARISONS, labels=None, batch_size: int = 128, chunk_size: int = 1024,
             key_prefix: str = "eval/rsa", progress: bool = True) -> dict:
    """RSA of one model against measured responses of one or more regions.

    Args:
        model: takes (B, 3, H, W) in [0, 1].
        images: (N, 3, H, W) stimuli.
        layers: one layer name or a list (None / "output": the model output, e.g. a predictor's voxels).
        responses: ``{region: (N, V) or (N, V, repeats)}`` measured responses to the same images
            (a bare tensor is called "region").
        method: RDM method, "correlation" or "euclidean".
        comparisons: any of "spearman", "tau-a", "cosine".
        labels: optional (N,) class labels, used only to colour the MDS figure.
    Returns:
        ``{key_prefix}/{region}/{comparison}`` (one layer) or ``{key_prefix}/{region}/{layer}/{comparison}``
        (several layers). Writes ``rsa.csv``, ``rsa_rdms.png`` (one panel per layer and region, the
        model-vs-region score in the layer titles) and ``rsa_mds.png`` (MDS of the stimuli) into ``out_dir``.
    """
    from neuroguide.evaluation.plots import save_figure, write_csv

    comparisons = check_comparisons(comparisons)
    layer_list = [layers] if layers is None or isinstance(layers, str) else list(layers)
    resp = check_responses(responses, len(images))
    acts = activations(model, images, layer_list, batch_size=batch_size, progress=progress)
    model_rdms = {n: rdm(a, method, chunk_size=chunk_size) for n, a in acts.items()}
    region_rdms = {r: rdm(v, method, chunk_size=chunk_size) for r, v in resp.items()}
    metrics, rows = {}, []
    if region_rdms:
        sims = compare_all(model_rdms, comparisons, others=region_rdms)
        for i, layer in enumerate(model_rdms):
            for j, region in enumerate(region_rdms):
                for c in comparisons:
                    v = float(sims[c][i, j])
                    key = f"{key_prefix}/{region}/{c}" if len(model_rdms) == 1 else f"{key_prefix}/{region}/{layer}/{c}"
                    metrics[key] = v
                    rows.append({"region": region, "layer": layer, "comparison": c, "value": v,
                                 "method": method, "n_stimuli": len(images)})
    else:
        log.info("rsa: no measured responses given; writing the model RDM figure only")
    out_dir = Path(out_dir)
    write_csv(out_dir / "rsa.csv", rows, ["region", "layer", "comparison", "value", "method", "n_stimuli"])
    main = "spearman" if "spearman" in comparisons else comparisons[0]
    panels = {**{_panel(k): v for k, v in model_rdms.items()}, **{f"region {k}": v for k, v in region_rdms.items()}}
    scores = {_panel(r["layer"]): [] for r in rows}
    for r in rows:
        if r["comparison"] == main:
            scores[_panel(r["layer"])].append(f"{SCORE_NAMES[main]} vs {r['region']} = {r['value']:.3f}")
    save_figure(rdm_figure(panels, method=method, scores=_at_most(scores, 3)), out_dir / "rsa_rdms.png")
    reference = f"region {next(iter(region_rdms))}" if region_rdms else None  # colour by the brain's geometry
    save_figure(mds_figure(panels, labels=labels, reference=reference), out_dir / "rsa_mds.png")
    return metrics


def _panel(layer: str) -> str:
    return "model output" if layer == "output" else f"model layer {layer}"


def _at_most(lines: Mapping[str, list[str]], k: int) -> dict[str, list[str]]:
    """Each panel's score lines cut to ``k`` (a last line says how many more are in the CSV)."""
    return {p: v if len(v) <= k else v[:k - 1] + [f"(+{len(v) - k + 1} more regions in rsa.csv)"]
            for p, v in lines.items()}


def evaluate_models(models: Mapping[str, nn.Module], images: torch.Tensor, out_dir: str | os.PathLike, *,
                    layer: str | Mapping[str, str | None] | None = None, responses=None, method: str = "correlation",
                    comparisons: Sequence[str] = COMPARISONS, batch_size: int = 128, chunk_size: int = 1024,
                    key_prefix: str = "eval/rsa", progress: bool = True) -> dict:
    """Model-vs-model RSA (and each model against each region, when ``responses`` are given).

    Args:
        models: ``{name: model}``, all run on the same ``images``.
        layer: one layer name for all models, or ``{name: layer}``.
    Returns:
        ``{key_prefix}/model_vs_model/{a}/{b}/{comparison}`` for each pair a before b in ``models``
        order, and ``{key_prefix}/{region}/{model}/{comparison}``. Writes ``rsa_model_vs_model.csv``
        (every pair, both orders), ``rsa_model_vs_model.png`` (heatmaps) and ``rsa_models_mds.png``
        (second-order MDS of the models and regions, distance 1 - Spearman or the first comparison).
    """
    from neuroguide.evaluation.plots import heatmap_figure, save_figure, write_csv

    comparisons = check_comparisons(comparisons)
    if len(models) < 2 and responses is None:
        raise ValueError(f"model-vs-model RSA needs at least 2 models, got {len(models)} ({list(models)})")
    resp = check_responses(responses, len(images))
    rdms = {}
    for name, m in tqdm(models.items(), desc="RDMs", disable=not progress, leave=False):
        lay = layer.get(name) if isinstance(layer, Mapping) else layer
        a = activations(m, images, [lay], batch_size=batch_size)[layer_key(lay)]
        rdms[name] = prepare(rdm(a, method, chunk_size=chunk_size))
    region_rdms = {r: prepare(rdm(v, method, chunk_size=chunk_size)) for r, v in resp.items()}
    everything = {**rdms, **{f"region {r}": v for r, v in region_rdms.items()}}
    sims = compare_all(everything, comparisons)
    names = list(everything)
    metrics, rows = {}, []
    for i, a in enumerate(names):
        for j, b in enumerate(names):
            for c in comparisons:
                rows.append({"a": a, "b": b, "comparison": c, "value": float(sims[c][i, j])})
            if i < j and a in rdms and b in rdms:
                for c in comparisons:
                    metrics[f"{key_prefix}/model_vs_model/{a}/{b}/{c}"] = float(sims[c][i, j])
            if a in rdms and b.startswith("region ") and b[7:] in region_rdms:
                for c in comparisons:
                    metrics[f"{key_prefix}/{b[7:]}/{a}/{c}"] = float(sims[c][i, j])
    out_dir = Path(out_dir)
    write_csv(out_dir / "rsa_model_vs_model.csv", rows, ["a", "b", "comparison", "value"])
    heatmap_figure([(c, sims[c]) for c in comparisons], names, names, out_dir / "rsa_model_vs_model.png",
                   xlabel="", ylabel="", cbar_label="RDM similarity", title=f"RSA ({method} RDMs), {len(images)} stimuli",
                   vmin=-1.0 if any(np.nanmin(sims[c]) < 0 for c in comparisons) else 0.0, vmax=1.0)
    main = "spearman" if "spearman" in comparisons else comparisons[0]
    if len(names) >= 3:
        fig = models_mds_figure(sims[main], names, f"models and regions by RDM similarity (1 - {SCORE_NAMES[main]})",
                                kinds=["region" if n not in rdms else "model" for n in names])
        save_figure(fig, out_dir / "rsa_models_mds.png")
    return metrics
