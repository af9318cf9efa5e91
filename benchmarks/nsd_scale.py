"""NSD at its real size: one subject's extraction and image loading, each figure against its goal.

Writes one subject in the real NSD layout that ``neuroguide.data.nsd`` reads, at NSD's dimensions: 81 x 104 x 83
volumes; ``nsdgeneral`` (~15,700 voxels, two posterior blobs) and the atlases of the ten regions (Kastner2015,
floc-faces, floc-bodies, floc-places) with voxel counts like subject 1's at 1.8 mm; ``--sessions`` (8) sessions of
750 trials, ``betas_sessionNN.nii.gz`` int16 (percent signal change x 300, 0 outside an ellipsoidal brain; smooth
patterns plus noise, so that they compress like real betas: ``benchmarks/nsd_session.py``'s writer), sessions up to
``--link-sessions`` as links to those; ``ncsnr.nii.gz``; the design (10,000 images x 3 repeats over 40 sessions,
1,000 shared); and the 73k-image ``nsd_stimuli.hdf5`` ``imgBrick`` (73000 x 425 x 425 x 3 uint8) chunked per image
with only the subject's 10,000 images written (unwritten chunks take no space; the real file is uncompressed, 36.8 GiB
= 73000 x 425^2 x 3 bytes, so by default the chunks are too: ``--stim-compression gzip|lzf`` to compress them).

Then measures, each in a fresh child process (its peak RSS from ``wait4``, the process tree's from /proc samples):

a) the extraction of all ten regions (``extract_regions`` as ``train.py`` calls it, no cache) of ``--sessions``
   sessions, serial, against the decompression floor (every session decompressed once into one buffer by the gzip
   module the reader uses; and nibabel's full load): goal <= 1.3x the floor; and the parallel reader
   (``read_workers`` = the cores) against serial;
b) the peak RSS of the serial extraction at ``--rss-sessions`` (2 4 8 16) sessions: the fitted slope and its
   projection to 40 sessions, goal flat and < 4 GB at 40;
c) the training loader (``NSDDataModule``'s dataset, ``NSDStimuli`` at 224 px, through ``train_loader``) in images per
   second with one worker, and how many workers a ResNet18 at 2,500 images/s needs.

    python benchmarks/nsd_scale.py [--root /tmp/nsd_scale] [--keep] [--repeat 3 --write-numbers]
    python benchmarks/nsd_scale.py --quick      # tiny dimensions, a smoke run of seconds

``--repeat N`` interleaves N runs of the timings of a) and c) (mean ± sd); ``--write-numbers`` (with N >= 3) writes
``docs/numbers/nsd_scale.json``. The written root is reused when ``--root`` holds a complete tree with the same dimensions (``--keep`` keeps it;
without ``--keep`` it is deleted at the end). Writing the real size takes about 10-15 minutes on 2 cores and about
10 GB of disk (5.4 GB of images, ~0.5 GB per session).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from nsd_session import brain_mask, write_session  # noqa: E402  (the real-size session writer)

REGIONS = ("V1", "V2", "V4", "VO", "PHC", "LO", "TO", "FFA", "EBA", "PPA")
REAL = dict(volume=(81, 104, 83), sessions=8, trials=750, total_sessions=40, n_stimuli=73000, image_size=425,
            subject_images=10000, shared=1000, nsdgeneral=15700)
QUICK = dict(volume=(24, 28, 24), sessions=4, trials=30, total_sessions=40, n_stimuli=3000, image_size=48,
             subject_images=400, shared=40, nsdgeneral=700)
# voxels per label at 1.8 mm, roughly subject 1's: Kastner2015 (before the nsdgeneral intersection) and the floc atlases
KASTNER = {1: 700, 2: 700, 3: 650, 4: 650, 5: 550, 6: 550, 7: 650, 8: 300, 9: 250, 10: 200, 11: 200, 12: 200,
           13: 300, 14: 250, 15: 300, 16: 200, 17: 400}
FLOC = {"floc-faces": {1: 300, 2: 450, 3: 350, 4: 150, 5: 100}, "floc-bodies": {1: 2500, 2: 200, 3: 200, 4: 100},
        "floc-places": {1: 800, 2: 1000, 3: 500}}
MARKER = "_NSD_SCALE.json"
GOALS = {"ratio": 1.3, "rss_40_gb": 4.0, "resnet18_images_per_s": 2500}


# ----------------------------------------------------------------------------------------------- writing
def _grow(coords: np.ndarray, free: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Indices (into ``coords`` (N, 3)) of a compact blob of ``n`` voxels among the ``free`` ones: the n free voxels
    nearest a random free seed. Marks them taken in ``free``."""
    cand = np.flatnonzero(free)
    n = min(n, len(cand))
    seed = coords[rng.choice(cand)]
    d = ((coords[cand] - seed) ** 2).sum(1)
    pick = cand[np.argpartition(d, n - 1)[:n]] if n < len(cand) else cand
    free[pick] = False
    return pick


def roi_volumes(shape: tuple, dims: dict, seed: int = 0) -> dict[str, np.ndarray]:
    """The ROI atlases (X, Y, Z) int16 (-1 outside the brain, 0 unlabelled): ``nsdgeneral`` two posterior blobs of
    ``dims["nsdgeneral"]`` voxels in all; Kastner2015 labels drawn in and around it (a tenth of a label may lie
    outside nsdgeneral); the floc labels inside nsdgeneral (overlapping the Kastner labels, as in NSD). Counts are
    scaled by the volume's size relative to NSD's."""
    rng = np.random.default_rng(seed)
    brain = brain_mask(shape)
    scale = np.prod(shape) / np.prod(REAL["volume"])
    count = lambda n: max(3, int(round(n * scale))) if scale < 1 else n  # noqa: E731
    idx = np.flatnonzero(brain.ravel())
    coords = np.array(np.unravel_index(idx, shape)).T.astype(np.float32)
    X, Y, Z = shape
    centers = [np.array([X * f, Y * 0.16, Z * 0.38]) for f in (0.3, 0.7)]  # left and right, at the back
    d = [((coords - c) ** 2).sum(1) for c in centers]
    side = np.argmin(d, 0)
    general = np.zeros(len(idx), bool)
    wider = np.zeros(len(idx), bool)  # where the Kastner labels may lie: nsdgeneral and a margin around it
    for h in (0, 1):
        on = np.flatnonzero(side == h)
        order = on[np.argsort(d[h][on])]
        general[order[:dims["nsdgeneral"] // 2]] = True
        wider[order[:int(dims["nsdgeneral"] // 2 * 1.15)]] = True
    def atlas(free: np.ndarray, labels: dict[int, int]) -> np.ndarray:
        """Each label grown in both hemispheres inside ``free``, regions of one atlas disjoint."""
        free, v = free.copy(), np.zeros(len(idx), np.int16)
        for lab, n in labels.items():
            for h in (0, 1):
                v[_grow(coords, free & (side == h), count(n) // 2, rng)] = lab
                free &= v == 0
        return v

    vols = {"Kastner2015": atlas(wider, KASTNER)}  # Kastner's maps reach beyond nsdgeneral; the floc ones do not
    for name, labels in FLOC.items():
        vols[name] = atlas(general, labels)
    vols["nsdgeneral"] = general.astype(np.int16)
    out = {}
    for name, v in vols.items():
        full = np.full(int(np.prod(shape)), -1, np.int16)
        full[idx] = v
        out[name] = full.reshape(shape)
    return out


def _params(dims: dict, stim_compression: str) -> dict:
    return {**{k: list(v) if isinstance(v, tuple) else v for k, v in dims.items()}, "stim_compression": stim_compression,
            "version": 1}


def write_design(path: Path, dims: dict, rng: np.random.Generator) -> np.ndarray:
    """``nsd_expdesign.mat`` for 8 subjects: each sees ``subject_images`` images (the ``shared`` ones first) 3 times
    over ``total_sessions`` x ``trials`` trials in random order. Returns subject 1's 0-based 73k ids."""
    import scipy.io

    n_img, n_shared = dims["subject_images"], dims["shared"]
    if 3 * n_img != dims["total_sessions"] * dims["trials"]:
        raise ValueError("3 x subject_images must equal total_sessions x trials")
    if n_shared + 8 * (n_img - n_shared) > dims["n_stimuli"]:
        raise ValueError(f"n_stimuli={dims['n_stimuli']}: 8 subjects need shared + 8 x (subject_images - shared) = "
                         f"{n_shared + 8 * (n_img - n_shared)} images")
    perm = rng.permutation(dims["n_stimuli"])
    shared, rest = perm[:n_shared], perm[n_shared:]
    subjectim = np.stack([np.concatenate([shared, rest[s * (n_img - n_shared):(s + 1) * (n_img - n_shared)]])
                          for s in range(8)]) + 1
    order = rng.permutation(np.tile(np.arange(1, n_img + 1), 3))
    path.parent.mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(path, {"masterordering": order[None].astype(np.float64), "subjectim": subjectim.astype(np.float64),
                            "sharedix": (np.sort(shared) + 1)[None].astype(np.float64)})
    return subjectim[0] - 1


def write_stimuli(path: Path, ids: np.ndarray, dims: dict, compression: str, rng: np.random.Generator) -> None:
    """``imgBrick`` (n_stimuli, S, S, 3) uint8, one chunk per image, only images ``ids`` written: each a rendered
    scene (a pool of 64) shifted and flipped at random."""
    import h5py

    from neuroguide.data.synthetic.nsd import render_images

    S = dims["image_size"]
    pool = render_images(64, S, rng)
    comp = {"none": {}, "gzip": {"compression": "gzip", "compression_opts": 1}, "lzf": {"compression": "lzf"}}[compression]
    tmp = path.with_name(path.name + ".tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(tmp, "w") as f:
        d = f.create_dataset("imgBrick", shape=(dims["n_stimuli"], S, S, 3), dtype=np.uint8, chunks=(1, S, S, 3), **comp)
        for i in np.sort(ids):
            img = np.roll(pool[rng.integers(len(pool))], tuple(rng.integers(0, S, 2)), axis=(0, 1))
            d[int(i)] = img[:, ::-1] if rng.random() < 0.5 else img
    tmp.rename(path)


def _write_session(args):
    path, shape, seed = args
    write_session(Path(path), shape, seed)
    return path


def write_tree(root: Path, dims: dict, stim_compression: str = "none", link_sessions: int = 0, seed: int = 0,
               workers: int = 2) -> Path:
    """Write (or complete) the tree under ``root``; a complete tree with the same parameters is reused. Sessions
    ``sessions + 1 .. link_sessions`` are links to the written ones (session k -> ((k - 1) mod sessions) + 1)."""
    from neuroguide.data.synthetic.nsd import _nifti, betas_dir, subject_dir

    root = Path(root)
    params = _params(dims, stim_compression)
    marker = root / MARKER
    if marker.exists():
        old = json.loads(marker.read_text())
        if old != params:
            raise FileExistsError(f"{root} holds an NSD tree written with other parameters ({marker}: {old}); delete "
                                  "it or give another --root")
    shape, T = tuple(dims["volume"]), dims["trials"]
    rng = np.random.default_rng(seed)
    bdir, rdir = betas_dir(root, 1), subject_dir(root, 1) / "roi"
    t0 = time.perf_counter()
    if not marker.exists():
        bdir.mkdir(parents=True, exist_ok=True)
        rdir.mkdir(parents=True, exist_ok=True)
        for name, v in roi_volumes(shape, dims, seed).items():
            _nifti(rdir / f"{name}.nii.gz", v)
        brain = brain_mask(shape)
        _nifti(bdir / "ncsnr.nii.gz", np.where(brain, rng.gamma(2.0, 0.15, shape), 0).astype(np.float32))
        ids = write_design(root / "nsddata" / "experiments" / "nsd" / "nsd_expdesign.mat", dims, rng)
        stim = root / "nsddata_stimuli" / "stimuli" / "nsd" / "nsd_stimuli.hdf5"
        todo = [(str(bdir / f"betas_session{s:02d}.nii.gz"), (*shape, T), 1000 + s) for s in range(1, dims["sessions"] + 1)
                if not (bdir / f"betas_session{s:02d}.nii.gz").exists()]
        print(f"writing {root}: ROIs, design, {len(todo)} sessions of {(*shape, T)} int16 ({workers} processes) and "
              f"the imgBrick ({len(ids)} of {dims['n_stimuli']} images of {dims['image_size']} px) ...", flush=True)
        if workers <= 1:  # in this process
            for a in todo:
                _write_session(a)
            if not stim.exists():
                write_stimuli(stim, ids, dims, stim_compression, rng)
        else:
            with ProcessPoolExecutor(workers) as ex:
                futures = [ex.submit(_write_session, a) for a in todo]
                if not stim.exists():
                    write_stimuli(stim, ids, dims, stim_compression, rng)
                    print(f"  imgBrick written ({time.perf_counter() - t0:.0f} s)", flush=True)
                for f in futures:
                    print(f"  {Path(f.result()).name} written ({time.perf_counter() - t0:.0f} s)", flush=True)
        marker.write_text(json.dumps(params))
    for s in range(dims["sessions"] + 1, link_sessions + 1):
        link = bdir / f"betas_session{s:02d}.nii.gz"
        if not link.exists():
            link.symlink_to(f"betas_session{(s - 1) % dims['sessions'] + 1:02d}.nii.gz")
    return root


# ----------------------------------------------------------------------------------------------- children
def _tree_rss() -> int:
    """Resident bytes of this process and all its descendants now (from /proc)."""
    total, stack = 0, [os.getpid()]
    while stack:
        pid = stack.pop()
        try:
            with open(f"/proc/{pid}/statm") as f:
                total += int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
            for t in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{t}/children") as f:
                    stack += [int(c) for c in f.read().split()]
        except (OSError, ValueError):
            pass
    return total


class TreePeak:
    """Samples :func:`_tree_rss` every ``every`` seconds in a thread; ``peak`` is the largest sample."""

    def __init__(self, every: float = 0.05):
        self.every, self.peak, self._stop = every, 0, threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _tree_rss())
            self._stop.wait(self.every)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, _tree_rss())


def digest(a: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(a).tobytes()).hexdigest()[:12]


def child_floor(root: Path, n: int, how: str) -> dict:
    """Every one of the first ``n`` sessions decompressed once: ``gzip`` into one preallocated buffer (by the gzip
    module the reader uses), or ``nibabel``'s full load ``np.asarray(nib.load(f).dataobj)``."""
    import nibabel as nib

    from neuroguide.data import nsd

    sessions = nsd.NSDPaths(root, 1).sessions()[:n]
    t = time.perf_counter()
    for p in sessions:
        if how == "nibabel":
            np.asarray(nib.load(str(p)).dataobj)
            continue
        proxy = nib.load(str(p)).dataobj
        buf, k = memoryview(bytearray(proxy.offset + int(np.prod(proxy.shape)) * proxy.dtype.itemsize)), 0
        with nsd._gzip.open(p, "rb") as f:
            while m := f.readinto(buf[k:k + 2**24]):
                k += m
        assert k == buf.nbytes, (k, buf.nbytes)
        del buf
    return {"seconds": time.perf_counter() - t, "sessions": len(sessions), "gzip_module": nsd._gzip.__name__}


def child_extract(root: Path, n: int, workers) -> dict:
    """``extract_regions`` of the ten regions (``conf/region``), no cache, the first ``n`` sessions."""
    from neuroguide.data.nsd_regions import extract_regions, load_region
    from neuroguide.data.nsd_sessions import read_workers

    specs = [load_region(r) for r in REGIONS]
    from neuroguide.data.nsd import NSDPaths

    w = read_workers(workers, NSDPaths(root, 1).sessions()[:n])
    t = time.perf_counter()
    out = extract_regions(root, 1, specs, cache_dir=None, max_sessions=n, progress=False, read_workers=workers)
    dt = time.perf_counter() - t
    return {"seconds": dt, "sessions": n, "workers": w, "voxels": {r: out[r].n_voxels for r in REGIONS},
            "union_voxels": int(len(np.unique(np.concatenate([out[r].voxel_index for r in REGIONS])))),
            "train_images": int(len(out["V1"].train_images)), "test_images": int(len(out["V1"].test_images)),
            "digest": {r: digest(np.concatenate([np.asarray(out[r].train).ravel(), np.asarray(out[r].test).ravel()]))
                       for r in REGIONS}}


def child_loader(root: Path, workers: int, batches: int, batch_size: int, image_size: int) -> dict:
    """The training loader of ``NSDDataModule``: ``ImageResponseDataset(NSDStimuli(imgBrick, train ids, size))``
    through ``train_loader``; images per second over ``batches`` batches after the first (worker start-up)."""
    import torch

    from neuroguide.data.loaders import train_loader
    from neuroguide.data.nsd import Design, NSDPaths
    from neuroguide.data.nsd_datamodule import ImageResponseDataset
    from neuroguide.data.nsd_stimuli import NSDStimuli

    torch.set_num_threads(1)  # as in a data-loader worker
    paths = NSDPaths(root, 1)
    design = Design.read(paths.expdesign)
    ids = np.setdiff1d(design.subjectim[0] - 1, design.shared_images)
    ds = ImageResponseDataset(NSDStimuli(paths.stimuli, ids, image_size), np.zeros((len(ids), 16), np.float32))
    out = {"workers": workers, "batch_size": batch_size, "image_size": image_size}
    if workers == 0:  # per-image stages in this process
        rng = np.random.default_rng(0)
        rows = rng.choice(len(ids), min(200, len(ids)), replace=False)
        import h5py

        with h5py.File(paths.stimuli, "r") as f:  # the row's read alone, by a handle of our own
            d = f["imgBrick"]
            d[int(ids[0])]
            t = time.perf_counter()
            for i in rows:
                d[int(ids[i])]
            out["read_ms"] = (time.perf_counter() - t) / len(rows) * 1e3
        ds[0]
        t = time.perf_counter()
        for i in rows:
            ds[int(i)]
        out["item_ms"] = (time.perf_counter() - t) / len(rows) * 1e3
    loader = train_loader(ds, batch_size, workers, seed=0)
    it = iter(loader)
    x, _ = next(it)
    assert tuple(x.shape[1:]) == (3, image_size, image_size), x.shape
    n, t = 0, time.perf_counter()
    for _, (x, _y) in zip(range(batches), it):  # at most one epoch
        n += len(x)
    dt = time.perf_counter() - t
    out.update(images=n, seconds=dt, images_per_s=n / dt)
    return out


def run_child(argv: list[str]) -> dict:
    """Run this script as ``--child ...`` in a fresh process; its JSON result with ``maxrss_mb`` (the child's peak
    RSS, from wait4), ``cpu_s`` (user + system of it and its reaped children) and ``wall_s``."""
    cmd = [sys.executable, str(Path(__file__).resolve()), *argv]
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    out = proc.stdout.read()
    _, status, ru = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}); its output:\n{out}")
    res = json.loads(out.strip().splitlines()[-1])
    res.update(maxrss_mb=ru.ru_maxrss / 1024, cpu_s=ru.ru_utime + ru.ru_stime, wall_s=time.perf_counter() - t)
    return res


# ----------------------------------------------------------------------------------------------- main
def fit_line(x, y) -> tuple[float, float]:
    slope, intercept = np.polyfit(np.asarray(x, float), np.asarray(y, float), 1)
    return float(slope), float(intercept)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", type=Path, default=None, help="tree to write / reuse (default: $TMPDIR/nsd_scale[_quick])")
    ap.add_argument("--keep", action="store_true", help="keep the written tree (else deleted at the end)")
    ap.add_argument("--quick", action="store_true", help="tiny dimensions: a smoke run of seconds")
    ap.add_argument("--sessions", type=int, default=None, help="sessions written and extracted in a) (8)")
    ap.add_argument("--rss-sessions", type=int, nargs="+", default=None, help="sessions of b) (2 4 8 16)")
    ap.add_argument("--stim-compression", default="none", choices=["none", "gzip", "lzf"])
    ap.add_argument("--batches", type=int, default=20, help="batches of 64 timed in c)")
    ap.add_argument("--skip", nargs="*", default=[], choices=["floor", "extract", "parallel", "rss", "loader"])
    ap.add_argument("--repeat", type=int, default=1, help="interleaved runs of the timings of a) and c)")
    ap.add_argument("--write-numbers", action="store_true",
                    help="also write docs/numbers/nsd_scale.json (the real size, --repeat 3 or more)")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        kind, root, *rest = args.child
        fn = {"floor": lambda: child_floor(Path(root), int(rest[0]), rest[1]),
              "extract": lambda: child_extract(Path(root), int(rest[0]), rest[1]),
              "loader": lambda: child_loader(Path(root), *map(int, rest))}[kind]
        with TreePeak() as peak:
            c = time.process_time()
            res = fn()
            res["cpu_inside"] = time.process_time() - c  # this process's CPU seconds in the call (not its workers')
        res["tree_peak_mb"] = peak.peak / 2**20
        import neuroguide

        res["neuroguide"] = str(Path(neuroguide.__file__).parent)
        print(json.dumps(res))
        return
    if args.write_numbers and (args.quick or args.repeat < 3):
        ap.error("--write-numbers reports the real size's times over runs: give --repeat 3 (or more), not --quick")
    dims = dict(QUICK if args.quick else REAL)
    if args.sessions:
        dims["sessions"] = args.sessions
    rss_sessions = args.rss_sessions or ([1, 2, 4] if args.quick else [2, 4, 8, 16])
    root = args.root or Path(tempfile.gettempdir()) / ("nsd_scale_quick" if args.quick else "nsd_scale")
    if not (root / MARKER).exists():
        need = 1.3 * (np.prod(dims["volume"]) * dims["trials"] * dims["sessions"] + dims["subject_images"]
                      * dims["image_size"] ** 2 * 3)
        free = shutil.disk_usage(root.parent if not root.exists() else root).free
        if free < need:
            sys.exit(f"{root}: {free / 1e9:.1f} GB free, writing the tree needs about {need / 1e9:.1f} GB")
    try:
        t = time.perf_counter()
        write_tree(root, dims, args.stim_compression, link_sessions=max([dims["sessions"], *rss_sessions]))
        print(f"tree {root} ready ({time.perf_counter() - t:.0f} s; {du(root) / 1e9:.2f} GB on disk)", flush=True)
        report(root, dims, rss_sessions, args)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
            print(f"deleted {root} (--keep keeps it)")


def du(path: Path) -> int:
    """Bytes on disk under ``path`` (allocated blocks: the imgBrick's unwritten chunks take none)."""
    return sum(p.lstat().st_blocks * 512 for p in Path(path).rglob("*") if p.is_file() and not p.is_symlink())


def _summ(xs: list[float]) -> dict:
    xs = [float(x) for x in xs]
    sd = float(np.std(xs, ddof=1)) if len(xs) > 1 else float("nan")
    return {"mean": float(np.mean(xs)), "sd": sd, "runs": xs}


def _pm(v: dict, fmt: str = ".2f") -> str:
    """``mean ± sd`` of a :func:`_summ` (the mean alone for one run)."""
    return f"{v['mean']:{fmt}}" + (f" ± {v['sd']:{fmt}}" if len(v["runs"]) > 1 else "")


def report(root: Path, dims: dict, rss_sessions: list[int], args) -> None:
    from neuroguide.data.nsd_sessions import idle_cores, usable_cores

    import neuroguide

    n, skip, rep, vals, rows = dims["sessions"], set(args.skip), max(1, args.repeat), {}, []
    cores = usable_cores()
    print(f"\nmachine: {os.cpu_count()} cores, {cores} usable, {idle_cores()} idle by the load average "
          f"({os.getloadavg()[0]:.1f})", flush=True)
    print(f"neuroguide from {Path(neuroguide.__file__).parent} (PYTHONPATH picks the checkout measured)")
    print(f"volume {dims['volume']}, {n} sessions x {dims['trials']} trials written; ten regions {', '.join(REGIONS)}")
    # a) extraction against the floor, the parallel reader; the sides interleaved, --repeat times
    w = max(2, cores)
    sides = [("floor_gzip", ["floor", str(n), "gzip"]), ("floor_nibabel", ["floor", str(n), "nibabel"]),
             ("extract_serial", ["extract", str(n), "1"]), ("extract_parallel", ["extract", str(n), str(w)])]
    part = {"floor_gzip": "floor", "floor_nibabel": "floor", "extract_serial": "extract", "extract_parallel": "parallel"}
    sides = [(k, a) for k, a in sides if part[k] not in skip]
    runs = {k: [] for k, _ in sides}
    for i in range(rep):
        for key, a in sides:
            r = run_child(["--child", a[0], str(root), *a[1:]])
            runs[key].append(r)
            tag = f"[run {i + 1}/{rep}] " if rep > 1 else ""
            if key.startswith("floor"):
                print(f"a) {tag}floor, {key[6:]:7s} decompression of {n} sessions: {r['seconds']:7.1f} s wall, "
                      f"{r['cpu_inside']:7.1f} s CPU ({r['gzip_module']}; process {r['wall_s']:.1f} s with imports)",
                      flush=True)
            else:
                print(f"a) {tag}extract_regions, 10 regions, {n} sessions, read_workers={r['workers']}: "
                      f"{r['seconds']:7.1f} s wall, {r['cpu_inside']:7.1f} s CPU here ({r['cpu_s']:.1f} s for the process with imports; forkserver workers not counted), "
                      f"peak RSS {r['maxrss_mb']:.0f} MB, of the process tree {r['tree_peak_mb']:.0f} MB", flush=True)
    vals["runs"] = runs
    if runs.get("extract_serial"):
        r = runs["extract_serial"][0]
        print(f"   voxels per region {r['voxels']}, union {r['union_voxels']}; {r['train_images']} train + "
              f"{r['test_images']} test images; digests {r['digest']}")
        assert all(x["digest"] == r["digest"] for x in runs["extract_serial"] + runs.get("extract_parallel", []))
        print("   every run and the parallel reader give bit-identical arrays")
    if runs.get("floor_gzip") and runs.get("floor_nibabel") and runs.get("extract_serial"):
        for key, what in (("seconds", "wall"), ("cpu_inside", "CPU")):
            ratios = [e[key] / min(g[key], b[key]) for e, g, b in
                      zip(runs["extract_serial"], runs["floor_gzip"], runs["floor_nibabel"])]
            v = vals[f"ratio_{what.lower()}"] = _summ(ratios)
            print(f"a) extraction / floor ({what}, from the call on, imports excluded): {_pm(v)}x   "
                  f"goal <= {GOALS['ratio']}x  {'MET' if v['mean'] <= GOALS['ratio'] else 'MISSED'}")
            rows.append([f"extraction / decompression floor, {what}", f"{_pm(v)}x", f"<= {GOALS['ratio']}x"])
    if runs.get("extract_parallel") and runs.get("extract_serial"):
        v = vals["parallel_speedup"] = _summ([s["seconds"] / p["seconds"] for s, p in
                                              zip(runs["extract_serial"], runs["extract_parallel"])])
        print(f"a) parallel reader, read_workers={w}: speed-up {_pm(v)}x over serial (wall) on {cores} usable cores, "
              f"{idle_cores()} idle now")
        rows.append([f"parallel reader speed-up ({w} workers, {cores} cores)", f"{_pm(v)}x", f"up to {cores}x"])
    # b) peak RSS against sessions
    if "rss" not in skip:
        pts = []
        for k in rss_sessions:
            r = runs["extract_serial"][0] if k == n and runs.get("extract_serial") else run_child(
                ["--child", "extract", str(root), str(k), "1"])
            # the result itself: the per-image means (float64 sums and their float32 copy, 12 bytes per value at
            # the peak), which grow with the images seen (saturating at subject_images), not with the sessions
            means = (r["train_images"] + r["test_images"]) * r["union_voxels"] * 12 / 2**20
            pts.append((k, r["maxrss_mb"], r["maxrss_mb"] - means))
            print(f"b) peak RSS, serial extraction of {k:2d} sessions: {r['maxrss_mb']:7.0f} MB "
                  f"({r['seconds']:.0f} s); of it the means of {r['train_images'] + r['test_images']} images "
                  f"{means:.0f} MB, the rest {r['maxrss_mb'] - means:.0f} MB", flush=True)
        ks, rss, rest = (np.array(v, float) for v in zip(*pts))
        slope, icpt = fit_line(ks, rss)
        rslope, ricpt = fit_line(ks, rest)
        T = dims["total_sessions"]
        proj_line = (icpt + slope * T) / 1024
        # at T sessions every image has been seen: the rest's fit plus the means of all the subject's images
        proj = (ricpt + rslope * T + dims["subject_images"] * r["union_voxels"] * 12 / 2**20) / 1024
        vals.update(rss_mb={str(int(k)): v for k, v in zip(ks, rss)}, rss_slope_mb_per_session=slope,
                    rss_rest_slope_mb_per_session=rslope, rss_projected_40_gb=proj, rss_projected_40_line_gb=proj_line)
        print(f"b) fitted slope {slope:.1f} MB per session (a straight line to {T} sessions: {proj_line:.2f} GB); "
              f"without the means {rslope:.1f} MB per session")
        print(f"b) projected to {T} sessions (the rest's line + the means of all {dims['subject_images']} images): "
              f"{proj:.2f} GB   goal flat, < {GOALS['rss_40_gb']} GB  "
              f"{'MET' if proj < GOALS['rss_40_gb'] and abs(rslope) < 5 else 'MISSED'}")
        rows += [["peak RSS, serial, at " + ", ".join(f"{int(k)}" for k in ks) + " sessions",
                  ", ".join(f"{v / 1024:.2f}" for v in rss) + " GB", ""],
                 ["peak RSS slope (all; without the per-image means)", f"{slope:.1f}; {rslope:.1f} MB / session",
                  "flat"],
                 [f"peak RSS projected to {T} sessions", f"{proj:.2f} GB", f"< {GOALS['rss_40_gb']} GB"]]
    # c) the training loader
    if "loader" not in skip:
        size = 224 if not args.quick else 32
        r0 = run_child(["--child", "loader", str(root), "0", str(max(2, args.batches // 4)), "64", str(size)])
        print(f"c) in-process, per image: h5py read {r0['read_ms']:.2f} ms, dataset item (read + to float + resize "
              f"to {size}) {r0['item_ms']:.2f} ms; loader with 0 workers {r0['images_per_s']:.0f} images/s", flush=True)
        r1 = [run_child(["--child", "loader", str(root), "1", str(args.batches), "64", str(size)]) for _ in range(rep)]
        v = _summ([r["images_per_s"] for r in r1])
        need = math.ceil(GOALS["resnet18_images_per_s"] / v["mean"])
        vals.update(loader_0=r0, loader_1=r1, images_per_s_per_worker=v, workers_for_resnet18=need)
        print(f"c) train_loader, 1 worker, batch 64 at {size} px: {_pm(v, '.0f')} images/s per worker; a ResNet18 at "
              f"{GOALS['resnet18_images_per_s']} images/s needs {need} workers", flush=True)
        rows += [[f"loader images/s per worker at {size} px", _pm(v, ".0f"), ""],
                 [f"workers for a ResNet18 at {GOALS['resnet18_images_per_s']} images/s", f"{need}", ""]]
    if args.write_numbers:
        sys.path.insert(0, str(HERE / "numbers"))
        from _common import write_numbers

        write_numbers("nsd_scale", {"table": {"columns": ["figure", "measured", "goal"], "rows": rows},
                                    "sessions": n, "repeats": rep, "dims": dict(dims), "cores": cores,
                                    "measurements": vals})


if __name__ == "__main__":
    main()
