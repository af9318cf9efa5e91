"""The closed loop as steps a lab can run (``closed_loop.py step=...``; folder layout in :mod:`.layout`).

- :func:`propose` (day t): day t's clean images, per site and eps the attacks of day t's model, the controls;
  written to ``day_t/stimuli.h5`` (day 0 first writes its model: the backbone + a random readout).
- :func:`record` (day t, simulation): the simulated brain records ``day_t/stimuli.h5`` -> ``day_t/recordings.h5``.
- :func:`refit` (after day t): checks and stores the day's recordings (a lab's file, ``recordings=``), refits
  day t's model on days 0..t -> ``day_{t+1}/model.pt``.
- :func:`report`: every recorded day's lower bounds and controls -> ``report/``.
- :func:`simulate`: propose, record and refit for ``days`` days with the simulated brain, the brain's white-box
  sensitivity (``truth.json``), then the report.

A step whose output exists is skipped, so rerunning a command continues at the first unfinished step.
"""
from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import torch

from neuroguide.closed_loop import layout, stimuli as stim
from neuroguide.closed_loop.brain import brain_from_config
from neuroguide.closed_loop.recordings import aligned_responses, noise_free_rates, write_recordings
from neuroguide.closed_loop.refit import initial_model, load_day_model, refit as refit_model, save_day_model
from neuroguide.closed_loop.report import clean_sigma, day_rows, summarize, write_report
from neuroguide.data.synthetic.nsd import render_images
from neuroguide.evaluation.plots import check_eps_list
from neuroguide.utils.io import read_json, write_json
from neuroguide.utils.seeding import derive_seed

log = logging.getLogger("neuroguide")
STIMULI, RECORDINGS, MODEL = "stimuli.h5", "recordings.h5", "model.pt"


class Loop:
    """One experiment: ``loop`` (the configuration that defines it, stored in each day folder) and how to run it."""

    def __init__(self, loop: dict, out_dir: str | Path, *, device: str = "cpu", progress: bool = True,
                 robust_weights: dict | None = None, allow_empty_sites: bool = False):
        self.loop, self.out = dict(loop), Path(out_dir)
        self.device, self.progress, self.robust_weights = device, bool(progress), dict(robust_weights or {})
        self.allow_empty_sites = bool(allow_empty_sites)
        # sorted, distinct: the grid every step uses; L2 only (a k/255 value is warned about)
        self.eps = check_eps_list(loop.get("eps"), "loop.eps", norm="l2",
                                  fix="the closed loop attacks in L2 balls only (Guo et al.), it has no Linf norm")
        for tmp in self.out.glob("**/.*.tmp*") if self.out.is_dir() else []:  # left by a killed run (one writer
            if tmp.is_file():                                                 # per out_dir): never complete
                tmp.unlink()
        self.brain = brain_from_config(dict(loop["brain"])).to(device) if loop.get("brain") else None
        if self.brain is not None:
            if int(self.brain.config["image_size"]) != int(loop["image_size"]):
                raise ValueError(f"loop.brain.image_size={self.brain.config['image_size']} but loop.image_size="
                                 f"{loop['image_size']}: the brain sees the stimuli as the model does; make them equal")
            self.site_ids = self.brain.site_ids
        elif loop.get("sites"):
            self.site_ids = [str(s) for s in loop["sites"]]
        else:
            raise ValueError("loop.sites is empty and loop.brain is null: list the recorded site ids (the site_ids of "
                             "the lab's recordings), or give loop.brain to simulate")

    # ------------------------------------------------------------------ helpers
    def day(self, t: int) -> Path:
        """Day t's folder, after checking it was made with this experiment's configuration."""
        folder = layout.day_dir(self.out, t)
        layout.check_day_config(folder, self.loop)
        return folder

    def claim(self, folder: Path) -> Path:
        """Record the configuration in ``folder`` (just before the day's first output is written)."""
        layout.check_day_config(folder, self.loop, create=True)
        return folder

    def recorded_days(self) -> list[int]:
        t, days = 0, []
        while (layout.day_dir(self.out, t) / RECORDINGS).is_file():
            days.append(t)
            t += 1
        return days

    def first_missing(self, name: str) -> int:
        t = 0
        while (layout.day_dir(self.out, t) / name).is_file():
            t += 1
        return t

    def _generator(self, *keys: int) -> torch.Generator:
        return torch.Generator().manual_seed(derive_seed(int(self.loop["seed"]), *keys))

    def _day_data(self, t: int) -> tuple[dict, np.ndarray]:
        folder = self.day(t)
        s = stim.read_stimuli(folder / STIMULI)
        return s, aligned_responses(folder / RECORDINGS, s, self.site_ids, self.allow_empty_sites)

    # ------------------------------------------------------------------ steps
    def propose(self, t: int) -> Path:
        """Write ``day_t/stimuli.h5`` (skipped when it exists)."""
        folder = self.day(t)
        if (folder / STIMULI).is_file():
            return folder / STIMULI
        if not (folder / MODEL).is_file():
            if t > 0:
                raise FileNotFoundError(f"{folder / MODEL} does not exist: day {t}'s attacks are made by the model "
                                        f"refitted after day {t - 1}; run step=refit day={t - 1} first")
            model, config = initial_model(self.loop, self.site_ids, self.robust_weights, self.brain)
            save_day_model(self.claim(folder) / MODEL, model, config,
                           {"day": 0, "site_ids": self.site_ids, "fitted_days": 0})
        model = load_day_model(folder / MODEL, self.device)
        clean_u8, clean_ids, others_u8 = layout.day_images(self.loop, t)
        clean, others = stim.from_uint8(clean_u8), stim.from_uint8(others_u8)
        n, sites, eps = len(clean), len(self.site_ids), self.eps
        per_site = min(int(self.loop["images_per_site"]), n)
        # site k is attacked on per_site clean images, taken in turn from the day's images
        src = torch.tensor([(k * per_site + j) % n for k in range(sites) for j in range(per_site)])
        site = torch.arange(sites).repeat_interleave(per_site)
        a_src, a_site = src.repeat(len(eps)), site.repeat(len(eps))
        a_eps = torch.tensor(eps, dtype=torch.float64).repeat_interleave(len(src))
        a = self.loop["attack"]
        log.info("day %d: attacking %d sites x %d images x %d eps (both directions, %d steps)", t, sites, per_site,
                 len(eps), a["steps"])
        att = stim.attack_sites(model, clean[a_src], a_site, a_eps, steps=a["steps"], step_factor=a["step_factor"],
                                target=a["target"], batch_size=a["batch_size"], generator=self._generator(t, 21))
        c_src = torch.arange(n).repeat(len(eps))
        c_eps = torch.tensor(eps, dtype=torch.float64).repeat_interleave(n)
        gauss = stim.gaussian_control(clean[c_src], c_eps.float(), self._generator(t, 22))
        interp = stim.interpolation_control(clean[c_src], others[c_src], c_eps.float())
        shown = stim.to_uint8(torch.cat([clean, att["x_adv"], gauss, interp]))  # what the brain sees, 8-bit
        images = stim.from_uint8(shown)
        m_att, m_c = len(a_src), len(c_src)
        kind = ["clean"] * n + ["attack"] * m_att + ["gaussian"] * m_c + ["interpolation"] * m_c
        prefix = {"clean": None, "attack": "atk", "gaussian": "gau", "interpolation": "int"}
        ids = list(clean_ids) + [f"day{t:03d}_{prefix[k]}{j:05d}" for k, m in
                                 (("attack", m_att), ("gaussian", m_c), ("interpolation", m_c)) for j in range(m)]
        zeros_c = np.zeros(m_c)
        meta = {"kind": np.array(kind),
                "site": np.concatenate([-np.ones(n), a_site.numpy(), -np.ones(2 * m_c)]).astype(np.int32),
                "eps": np.concatenate([np.zeros(n), a_eps.double().numpy(), c_eps.double().numpy(),
                                       c_eps.double().numpy()]),
                "direction": np.concatenate([np.zeros(n), att["direction"].numpy(), zeros_c, zeros_c]).astype(np.int8),
                "source": np.array(list(clean_ids) + [clean_ids[i] for i in a_src.tolist()]
                                   + [clean_ids[i] for i in c_src.tolist()] * 2),
                "norm": np.concatenate([np.zeros(n), stim.l2(images[n:] - clean[torch.cat(
                    [a_src, c_src, c_src])]).numpy()]).astype(np.float32)}
        pred = stim.predict(model, images).numpy()
        return stim.write_stimuli(self.claim(folder) / STIMULI, shown, ids, meta, pred, self.site_ids,
                                  {"day": t, "model": str(folder / MODEL)})

    def record(self, t: int) -> Path:
        """The simulated brain records day t's stimuli -> ``day_t/recordings.h5`` (skipped when it exists)."""
        if self.brain is None:
            raise ValueError("step=record needs a simulated brain (loop.brain); a lab passes its own recordings to "
                             "step=refit with recordings=<file>")
        folder = self.day(t)
        if (folder / RECORDINGS).is_file():
            return folder / RECORDINGS
        if not (folder / STIMULI).is_file():
            raise FileNotFoundError(f"{folder / STIMULI} does not exist: run step=propose day={t} first")
        s = stim.read_stimuli(folder / STIMULI)
        x = stim.from_uint8(s["images"])
        resp = self.brain.record(x, int(self.loop["repeats"]), generator=self._generator(t, 31))
        return write_recordings(self.claim(folder) / RECORDINGS, s["images"], s["image_ids"], self.site_ids,
                                resp.numpy(), rates=self.brain.rates(x).numpy(), attrs={"day": t, "simulated": True})

    def store_recordings(self, t: int, path: str | Path) -> Path:
        """Check a lab's recordings of day t against the proposals and keep a copy as ``day_t/recordings.h5``."""
        folder = self.day(t)
        if not (folder / STIMULI).is_file():
            raise FileNotFoundError(f"{folder / STIMULI} does not exist: propose day {t}'s stimuli before refitting")
        s = stim.read_stimuli(folder / STIMULI)
        resp = aligned_responses(path, s, self.site_ids, self.allow_empty_sites)
        return write_recordings(self.claim(folder) / RECORDINGS, s["images"], s["image_ids"], self.site_ids, resp,
                                attrs={"day": t, "source_file": str(path)})

    def refit(self, t: int, recordings: str | Path | None = None) -> Path:
        """Refit day t's model on days 0..t -> ``day_{t+1}/model.pt`` (skipped when it exists)."""
        folder = self.day(t)
        if recordings is not None:
            if not Path(recordings).expanduser().is_file():  # the key the user gave (not paths.it_file)
                raise FileNotFoundError(f"recordings={recordings}: no such file. Give the lab's IT file of day {t}'s "
                                        f"stimuli (step=refit day={t} recordings=<IT file>, format in "
                                        "neuroguide/data/it.py)")
            self.store_recordings(t, recordings)
        if not (folder / RECORDINGS).is_file():
            raise FileNotFoundError(f"{folder / RECORDINGS} does not exist: pass the day's recordings "
                                    f"(step=refit day={t} recordings=<IT file>), or record them (step=record)")
        target = self.day(t + 1) / MODEL
        if target.is_file():
            return target
        data = [self._day_data(d) for d in range(t + 1)]
        images = torch.cat([stim.from_uint8(s["images"]) for s, _ in data])
        targets = torch.cat([torch.from_numpy(r).nanmean(2) for _, r in data])  # (N, sites) repeat means
        model = load_day_model(folder / MODEL, self.device)
        info = model.neuroguide_info
        r = self.loop["refit"]
        log.info("refit after day %d on %d recorded images (days 0..%d)", t, len(images), t)
        losses = refit_model(model, images, targets, steps=r["steps"], batch_size=r["batch_size"], lr=r["lr"],
                             backbone_lr=r["backbone_lr"], l1_spatial=r["l1_spatial"], l1_features=r["l1_features"],
                             seed=derive_seed(int(self.loop["seed"]), t), first=info["facts"].get("fitted_days") == 0,
                             progress=self.progress)
        return save_day_model(self.claim(target.parent) / MODEL, model, info["model_config"],
                              {"day": t + 1, "site_ids": self.site_ids, "fitted_days": t + 1,
                               "final_loss": losses[-1] if losses else None})

    def truth(self) -> dict:
        """The simulated brain's white-box sensitivity (unit_sensitivity with the Guo schedule) -> truth.json."""
        path = self.out / "truth.json"
        if path.is_file():
            return read_json(path)
        from neuroguide.evaluation.analyses.sensitivity import unit_sensitivity

        tcfg, size, seed = self.loop["truth"], int(self.loop["image_size"]), int(self.loop["seed"])
        x = stim.from_uint8(render_images(int(tcfg["n_images"]), size, np.random.default_rng(derive_seed(seed, 41))))
        xs = stim.from_uint8(render_images(int(tcfg["n_sigma"]), size, np.random.default_rng(derive_seed(seed, 42))))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = unit_sensitivity(self.brain, x, None, self.eps, sigma_images=xs,
                                   steps=int(tcfg["steps"]), restarts=int(tcfg["restarts"]), schedule="guo",
                                   generator=self._generator(43), progress=self.progress)
        out = {"eps": list(self.eps), "s": res.s.tolist(), "s_norm_noise_free": res.s_norm.tolist(),
               "sigma_noise_free": res.sigma.tolist(), "n_images": int(tcfg["n_images"])}
        write_json(path, out)
        return out

    def report(self) -> dict:
        """Lower bounds, controls (and the truth, in simulation) of every recorded day -> ``report/``."""
        days = self.recorded_days()
        if not days:
            raise FileNotFoundError(f"no day in {self.out} has recordings yet: propose, record and refit day 0 first")
        data = [self._day_data(t) for t in days]
        sigma = clean_sigma(data)
        rows = []
        for t, (s, r) in zip(days, data):
            rows += day_rows(t, s, r, sigma, self.site_ids, noise_free_rates(layout.day_dir(self.out, t) / RECORDINGS))
        truth = None
        if self.brain is not None:
            truth = {**self.truth(), "sigma_report": sigma.tolist()}
        summary = summarize(rows, truth)
        return write_report(self.out / "report", rows, summary, truth)

    def simulate(self, days: int) -> dict:
        """``days`` days of propose, record and refit with the simulated brain, the truth, and the report."""
        if self.brain is None:
            raise ValueError("step=simulate needs loop.brain (the simulated brain's config)")
        for t in range(int(days)):
            self.propose(t)
            self.record(t)
            if t + 1 < int(days):
                self.refit(t)
        return self.report()
