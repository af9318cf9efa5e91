"""Encoding models (McNeal & Murty; Brain-Score): a frozen pretrained backbone, pooled features of one of
its layers, and a voxelwise ridge readout to one NSD region, fitted in closed form.

``python train.py task=encoding region=FFA backbone=resnet50 backbone.weights=<file> backbone.layer=[layer3,layer4]``

1. The backbone's weights come from a local file only (:mod:`neuroguide.models.zoo`); ``weights=random`` is a
   loud control. 2. Features of every listed layer on the subject's images, pooled (``task.pool``), come from
   the feature cache (:mod:`neuroguide.models.feature_cache`). 3. Per layer, a ridge per voxel with its penalty
   chosen by exact leave-one-out error on the *fit* images (the training images minus a validation tenth,
   :mod:`neuroguide.models.ridge`); the layer whose median r on the validation images is highest is exported.
   4. The exported model (backbone to the layer + pooling + linear readout, :mod:`neuroguide.models.encoding`)
   is validated and tested through Lightning like a predictor: the same keys (``test/r_median``,
   ``test/r_nc_median``, ...; :func:`neuroguide.metrics.voxel_scores`). Per-layer scores (``layers.csv``,
   ``layers.png`` in the run folder; ``val/layer/<layer>/r_median``, ``test/layer/<layer>/r_nc_median`` in
   metrics.json) are reported for every layer; the test images never choose anything.

Several regions of one subject (``task.regions=[FFA,EBA,PPA]``, in place of ``region``) share the images and so
the features: they are extracted once per layer and one ridge is solved per layer on all their voxels side by side
(:meth:`EncodingTask.fit_regions`); each region is then an ordinary run of its own in ``<run>/regions/<region>/``
(``model.ckpt``, ``metrics.json``, ``config.yaml`` of the run ``region=<region>``, ``layers.csv``), the same model
it gets when fitted alone.

The task has no gradient steps: ``closed_form = True`` tells :func:`neuroguide.train.run` to validate and
test the model built by :meth:`EncodingTask.from_config` instead of fitting it.
"""
from __future__ import annotations

import copy
import csv
import logging
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf, open_dict

from neuroguide.config import output_dir
from neuroguide.data.nsd_datamodule import NSDDataModule
from neuroguide.data.nsd_regions import extract_regions, load_region
from neuroguide.data.nsd_stimuli import NSDStimuli
from neuroguide.metrics import nanmedian, nc_normalized, voxel_score_summary, voxel_scores
from neuroguide.models.backbones import build_network, check_layer, layer_root
from neuroguide.models.encoding import parse_pool
from neuroguide.models.feature_cache import cached_features, weights_fingerprint
from neuroguide.models.ridge import best_layer, fit_layers
from neuroguide.models.robust_weights import load_robust_weights
from neuroguide.models.zoo import backbone_weights
from neuroguide.tasks import register_task
from neuroguide.tasks.kinds import ModelKind
from neuroguide.tasks.regression import RegressionTask
from neuroguide.utils.io import atomic_path, file_fingerprint

log = logging.getLogger("neuroguide")


def region_list(regions) -> list[str]:
    """``task.regions``: null (the run's ``region`` only), a list of region names, or a comma-separated string."""
    if regions is None:
        return []
    if isinstance(regions, str):
        return [s.strip() for s in regions.split(",") if s.strip()]
    return [str(s) for s in regions]


def layer_list(layer) -> list[str]:
    """``backbone.layer``: one name, a list, or a comma-separated string -> the list of layer names."""
    if layer is None:
        return []
    if isinstance(layer, str):
        return [s.strip() for s in layer.split(",") if s.strip()]
    return [str(s) for s in layer]


def restrict_test_split(datamodule, cfg) -> np.ndarray:
    """``task.test_images=shared515``: keep the test images every subject saw three times
    (:func:`neuroguide.data.nsd_shared.shared_by_all`); returns the noise ceiling of the kept split (all 3 repeats)."""
    from neuroguide.data.nsd import effective_repeats, noise_ceiling
    from neuroguide.data.nsd_datamodule import ImageResponseDataset
    from neuroguide.data.nsd_shared import shared_by_all

    rd, ts = datamodule.region_data, datamodule.test_set
    per_session = int(rd.meta["trials"]) // max(int(rd.meta["sessions"]), 1)
    keep = np.isin(np.asarray(ts.stimuli.ids), shared_by_all(datamodule.nsd_root, per_session, datamodule.betas_format))
    keep &= np.asarray(rd.test_repeats) >= 3
    if not keep.any():
        raise ValueError("task.test_images=shared515: no test image was seen three times by all eight subjects in the "
                         "design and sessions found; use task.test_images=shared")
    rows = np.flatnonzero(keep)
    stimuli = NSDStimuli(ts.stimuli.path, np.asarray(ts.stimuli.ids)[rows], int(cfg.data.image_size))
    datamodule.test_set = ImageResponseDataset(stimuli, ts.responses.numpy()[rows])
    log.info("test split: %d of the subject's %d shared images, those all eight subjects saw three times", len(rows),
             len(keep))
    return noise_ceiling(np.asarray(rd.ncsnr), effective_repeats(np.asarray(rd.test_repeats)[rows])).astype(np.float32)


def check_nc(nc: np.ndarray, threshold: float, region: str) -> None:
    """A region must have voxels with a noise ceiling at or above ``data.nc_threshold`` to be scored."""
    nc = np.asarray(nc, np.float64)
    if not (nc >= threshold).any():
        best = float(np.nanmax(nc)) if nc.size else float("nan")
        raise ValueError(f"region {region}: no voxel has a noise ceiling >= data.nc_threshold={threshold} (percent; "
                         f"{nc.size} voxels, highest NC {best:.3g}), so r / sqrt(NC) has nothing to score. Lower "
                         "data.nc_threshold, or choose a region with reliable voxels")


KIND = ModelKind(
    penultimate_layer=None,
    stimuli="nsd",
    name_factors=("region", "backbone", "backbone.layer"),
    report_factors=("region", "backbone"),
)


@register_task("encoding", kind=KIND)
class EncodingTask(RegressionTask):
    closed_form = True  # fitted when built; train.run validates and tests it instead of calling trainer.fit

    def __init__(self, model_config: dict, run_config: dict | None = None, model=None, *, facts: dict | None = None,
                 nc: np.ndarray | None = None, nc_threshold: float = 0.0, layer_rows: list | None = None):
        super().__init__(model_config, run_config, model, facts=facts)
        self.register_buffer("nc", torch.tensor(np.asarray(nc if nc is not None else [], np.float32)),
                             persistent=False)
        self.nc_threshold = float(nc_threshold)
        self.layer_rows = list(layer_rows or [])

    # ------------------------------------------------------------------ config
    @classmethod
    def check_config(cls, cfg) -> None:
        parse_pool(cfg.task.pool)
        if not layer_list(cfg.backbone.layer):
            raise ValueError("backbone.layer is empty: name a layer (backbone.layer=layer4) or a list "
                             "(backbone.layer=[layer2,layer3,layer4])")
        alphas = list(cfg.task.alphas)
        if not alphas or min(float(a) for a in alphas) <= 0:
            raise ValueError(f"task.alphas={alphas}: expected a non-empty list of positive ridge penalties")
        if cfg.data.get("pca"):
            raise ValueError("task=encoding fits every voxel (no PCA): set data.pca=false")
        regions = region_list(cfg.task.get("regions"))
        for name in regions:
            load_region(name)  # a KeyError naming the known regions
        if len(set(regions)) != len(regions):
            raise ValueError(f"task.regions={regions} names a region twice; list each once")

    @classmethod
    def run_configs(cls, cfg) -> list:
        """``task.regions=[FFA,EBA,PPA]``: one run per region, ``<run>/regions/<name>/`` each (the config of the
        single-region run ``region=<name>``, with ``task.regions`` null), all fitted together; else ``[cfg]``."""
        regions = region_list(cfg.task.get("regions"))
        if not regions:
            return [cfg]
        out, runs = output_dir(cfg), []
        for name in regions:
            c = copy.deepcopy(cfg)
            with open_dict(c):
                c.region = OmegaConf.create(load_region(name))
                c.task.regions = None
                c.paths.output_dir = str(out / "regions" / name)
            runs.append(c)
        log.info("task.regions: %d regions of subject %d fitted together (features once per layer, one ridge "
                 "decomposition per layer), each exported to %s/regions/<region>/", len(runs), int(cfg.subject), out)
        return runs

    @classmethod
    def from_config(cls, cfg, datamodule) -> "EncodingTask":
        return cls.fit_regions([cfg], [datamodule])[0]

    @classmethod
    def from_configs(cls, cfgs: list, datamodules: list) -> list["EncodingTask"]:
        """The regions' datamodules set up (the regions not yet in the cache extracted in one pass over the
        sessions), then all fitted together by :meth:`fit_regions`."""
        nsd = [d for d in datamodules if isinstance(d, NSDDataModule)]
        if len(nsd) > 1 and nsd[0].cache_dir is not None and Path(str(nsd[0].nsd_root)).expanduser().is_dir():
            d = nsd[0]
            extract_regions(d.nsd_root, d.subject, [x.spec for x in nsd], cache_dir=d.cache_dir,
                            betas_format=d.betas_format, max_sessions=d.max_sessions, pca=d.pca,
                            pca_variance=d.pca_variance, read_workers=d.read_workers)
        for d in datamodules:
            d.prepare_data()
            d.setup("fit")
        return cls.fit_regions(cfgs, datamodules)

    @classmethod
    def fit_regions(cls, cfgs: list, datamodules: list) -> list["EncodingTask"]:
        """The encoding models of several regions of one subject (``cfgs``: their run configs, equal but for
        ``region`` and ``paths.output_dir``; ``datamodules``: set up): the backbone built once, its features on
        the images extracted once per layer, and per layer one ridge on all the regions' voxels side by side (one
        decomposition; each voxel's penalty and weights are its own, so each region's model is the one it would
        get alone). Each region then chooses its layer on its validation r and gets its own model and table."""
        cfg = cfgs[0]
        b, t = cfg.backbone, cfg.task
        threshold = float(cfg.data.get("nc_threshold") or 0.0)
        ncs = []
        for c, dm in zip(cfgs, datamodules):
            nc = np.asarray(dm.region_data.nc)
            if t.get("test_images", "shared") == "shared515":
                nc = restrict_test_split(dm, c)
            check_nc(nc, threshold, c.region.name)
            ncs.append(nc)
        layers, pool, size = layer_list(b.layer), parse_pool(t.pool), int(cfg.data.image_size)
        source = str(b.get("source") or "auto")
        weights = backbone_weights(b, cfg.paths.get("robust_weights"))
        net = build_network(str(b.name), source)
        root = layer_root(net)
        for layer in layers:
            check_layer(root, layer, str(b.name))
        if weights is not None:
            info = load_robust_weights(root, weights)
            log.info("backbone %s: loaded %d tensors from %s", b.name, info["loaded"], weights)
        else:
            log.warning("!!! backbone %s has RANDOM weights (backbone.weights=random): a control, not a pretrained "
                        "encoding model (metrics.json: backbone_random_weights=1) !!!", b.name)

        splits = ("fit", "val", "test")
        sets = [{"fit": dm.train_set, "val": dm.val_set, "test": dm.test_set} for dm in datamodules]
        ids = {k: np.asarray(sets[0][k].stimuli.ids) for k in splits}
        for c, s in zip(cfgs[1:], sets[1:]):
            if any(not np.array_equal(np.asarray(s[k].stimuli.ids), ids[k]) for k in splits):
                raise ValueError(f"task.regions: region {c.region.name} has other fit/val/test images than "
                                 f"{cfg.region.name}; regions fitted together must share the subject's images")
        all_ids = np.unique(np.concatenate(list(ids.values())))
        identity = {"backbone": str(b.name), "source": source, "weights": weights_fingerprint(weights, net),
                    "stimuli": file_fingerprint(sets[0]["fit"].stimuli.path)}  # rewritten images: other features
        feats = cached_features(net, root, NSDStimuli(sets[0]["fit"].stimuli.path, all_ids, size), all_ids, layers,
                                backbone=str(b.name), identity=identity, pool=pool, image_size=size,
                                cache_dir=t.get("feature_cache_dir"), batch_size=int(t.batch_size))
        rows = {k: np.searchsorted(all_ids, v) for k, v in ids.items()}
        per_layer = {layer: {k: np.asarray(feats[layer][r]) for k, r in rows.items()} for layer in layers}
        y = {k: np.concatenate([s[k].responses.numpy() for s in sets], 1) for k in splits}
        fits = fit_layers(per_layer, y["fit"], y["val"], y["test"], [float(a) for a in t.alphas],
                          str(t.get("ridge_device", "auto")))
        edges = np.cumsum([0] + [s["fit"].responses.shape[1] for s in sets])
        return [cls._region_model(c, dm, [f.columns(slice(lo, hi)) for f in fits], nc, net, layers, source, weights)
                for c, dm, nc, lo, hi in zip(cfgs, datamodules, ncs, edges[:-1], edges[1:])]

    @classmethod
    def _region_model(cls, cfg, datamodule, fits, nc, net, layers, source, weights) -> "EncodingTask":
        """One region's exported model: its layer chosen on its validation r, the backbone up to it + its readout."""
        rd, b, t = datamodule.region_data, cfg.backbone, cfg.task
        threshold = float(cfg.data.get("nc_threshold") or 0.0)
        size = int(cfg.data.image_size)
        chosen = best_layer(fits)
        log.info("%s: layer %s chosen on the validation images (median r %.3f)", cfg.region.name, chosen.layer,
                 chosen.val_r_median)
        model_config = {"backbone": str(b.name), "layer": chosen.layer, "source": source, "pool": parse_pool(t.pool),
                        "n_outputs": int(rd.n_voxels), "image_size": size}
        model = cls.build_model(**model_config)
        model.backbone.network.load_state_dict(net.state_dict())
        weight, bias = chosen.fit.linear()
        with torch.no_grad():
            model.readout.weight.copy_(weight)
            model.readout.bias.copy_(bias)
        layer_rows = layer_table(fits, chosen.layer, nc, threshold)
        write_layer_table(layer_rows, output_dir(cfg), f"{cfg.region.name} subj{int(cfg.subject):02d} {b.name}")
        facts = {"region": cfg.region.name, "subject": int(cfg.subject), "n_voxels": int(rd.n_voxels),
                 "image_size": size, "backbone": str(b.name), "layer": chosen.layer, "layers": layers,
                 "weights": str(weights) if weights is not None else "random", "random_weights": weights is None,
                 "shuffle": bool(t.get("shuffle", False)), "alpha_median": float(np.median(chosen.fit.alphas))}
        facts["test_images"] = str(t.get("test_images", "shared"))
        facts["n_test_images"] = len(datamodule.test_set)
        return cls(model_config, OmegaConf.to_container(cfg, resolve=True), model, facts=facts, nc=nc,
                   nc_threshold=threshold, layer_rows=layer_rows)

    # ------------------------------------------------------------------ scores
    def objective(self, pred: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"loss": ((pred - target) ** 2).mean()}

    def log_scores(self, split: str, pred: torch.Tensor, target: torch.Tensor) -> None:
        s = voxel_scores(pred, target, self.nc if self.nc.numel() else None, self.nc_threshold)
        for k, v in voxel_score_summary(split, s).items():
            self.log(k, v, prog_bar=k == "val/r_median")
        for row in self.layer_rows:  # every layer's ridge (only the chosen one is the exported model)
            keys = ("val_r_median",) if split == "val" else ("test_r_median", "test_r_nc_median", "test_r_nc_mean")
            for k in keys:
                self.log(f"{split}/layer/{row['layer']}/{k.split('_', 1)[1]}", float(row[k]))
        if split == "test":
            self.log("backbone_random_weights", float(bool(self.hparams["facts"].get("random_weights"))))
            self.log("selected_layer_index", float(next(i for i, r in enumerate(self.layer_rows) if r["selected"])))


def layer_table(fits, chosen: str, nc: np.ndarray, threshold: float) -> list[dict]:
    """One row per layer: validation and test scores (test: reported only), penalties, the chosen layer."""
    rows = []
    nc_t = torch.from_numpy(np.array(nc, np.float32))
    for f in fits:
        r = torch.as_tensor(f.test_r)
        kept = nc_normalized(r, nc_t, threshold)
        rows.append({"layer": f.layer, "n_features": f.n_features, "val_r_median": f.val_r_median,
                     "test_r_median": float(nanmedian(r)), "test_r_nc_median": float(nanmedian(kept)),
                     "test_r_nc_mean": float(torch.nanmean(kept)) if kept.numel() else float("nan"),
                     "alpha_median": float(np.median(f.fit.alphas)), "selected": f.layer == chosen})
    return rows


def write_layer_table(rows: list[dict], out: Path, title: str) -> None:
    """``layers.csv`` and (several layers) ``layers.png``: median r / sqrt(NC) on the test images per layer,
    the validation median r that chose the layer beside it."""
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "layers.csv") as tmp, open(tmp, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    if len(rows) < 2:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.5 + 0.8 * len(rows), 3.5))
    x = np.arange(len(rows))
    ax.plot(x, [r["test_r_nc_median"] for r in rows], "o-", label="test: median r / sqrt(NC)")
    ax.plot(x, [r["val_r_median"] for r in rows], "s--", label="validation: median r (chooses)")
    sel = next(i for i, r in enumerate(rows) if r["selected"])
    ax.axvline(sel, color="grey", lw=0.8, ls=":")
    ax.set_xticks(x, [r["layer"] for r in rows], rotation=30, ha="right")
    ax.set_ylabel("score")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(out / "layers.png", suffix=".png") as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)
