"""Reading the voxels of one NSD session file, against plain decompression of the same file.

Writes one session of betas at the real NSD size (81 x 104 x 83 x 750 int16, ``.nii.gz``; zero
outside an ellipsoidal "brain", inside smooth signal + noise in int16, so that it compresses like
real betas), then in this process times, on the same file with its pages in the OS cache:

- the decompression floor: the standard library's ``gzip`` decompressing the whole file into one
  preallocated buffer (``readinto``, 16 MiB per call), and nibabel's full load
  ``np.asarray(nib.load(f).dataobj)``; with ``isal`` installed also ``isal.igzip`` the same way;
- ``read_session`` of this project on 20,000 voxels (one blob, like a region), with the standard
  gzip and, when installed, with isal, and
- ``read_session_old``, the implementation before this benchmark (a copy is kept below),

checks that old and new give bit-identical arrays, and prints the times, the ratio of the new read
to the decompression floor, the speed-up over the old read, and each side's peak memory
(tracemalloc: numpy and Python allocations; and the process's peak RSS at the end).

    python benchmarks/nsd_session.py [--size real|small] [--file /tmp/betas_session01.nii.gz]

``--size real`` (the default) writes a ~1 GB (decompressed) session once to ``--file`` (default
``$TMPDIR/nsd_bench_<size>/betas_session01.nii.gz``) and reuses it on later runs: on a 2-core
machine writing it takes about 1 minute and the timings 2-3 minutes more (mostly the old read). ``--size small``
(40 x 48 x 36 x 150) is a smoke run of a few seconds.
"""
from __future__ import annotations

import argparse
import gzip
import resource
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import nibabel as nib
import numpy as np

from neuroguide.data import nsd
from neuroguide.data.nsd import read_session

SIZES = {"real": (81, 104, 83, 750), "small": (40, 48, 36, 150)}


def read_session_old(path: Path, flat_index: np.ndarray, volume_shape: tuple) -> np.ndarray:
    """``read_session`` for ``.nii.gz`` as it was before (commit 0f46e66): the C-order reshape of
    nibabel's Fortran-ordered array is a transposing copy of the whole session."""
    img = nib.load(str(path))
    data = np.asarray(img.dataobj)  # (X, Y, Z, T)
    out = data.reshape(-1, data.shape[-1])[flat_index].T
    out = out.astype(np.float32) / nsd.BETA_SCALE
    if not np.isfinite(out).all():
        raise ValueError(f"{path} holds NaN or inf betas inside the requested regions")
    return out


def brain_mask(shape3: tuple) -> np.ndarray:
    """An ellipsoid filling about half of the volume (NSD betas are 0 outside the brain)."""
    g = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape3], indexing="ij")
    return sum((a / r) ** 2 for a, r in zip(g, (0.9, 0.9, 0.85))) <= 1


def write_session(path: Path, shape: tuple, seed: int = 0) -> None:
    """int16 betas (X, Y, Z, T): 8 smooth spatial patterns mixed per trial, plus noise, inside the brain."""
    from scipy.ndimage import zoom

    X, Y, Z, T = shape
    rng = np.random.default_rng(seed)
    K = 8
    coarse = rng.normal(size=(K, 6, 7, 6))
    base = np.stack([zoom(c, (X / 6, Y / 7, Z / 6), order=3)[:X, :Y, :Z] for c in coarse], -1).astype(np.float32)
    mask = brain_mask((X, Y, Z))
    weights = rng.normal(size=(K, T)).astype(np.float32) * 150  # betas x 300: ~1-2 % signal change
    vol = np.zeros(shape, np.int16, order="F")
    for z in range(Z):  # one slab at a time keeps the float temporaries small
        slab = base[:, :, z] @ weights + rng.standard_normal((X, Y, T), np.float32) * 120
        vol[:, :, z] = np.where(mask[:, :, z, None], np.clip(np.rint(slab), -32768, 32767), 0).astype(np.int16)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.nii.gz")
    nib.save(nib.Nifti1Image(vol, np.eye(4)), str(tmp))
    tmp.rename(path)


def blob_voxels(shape3: tuple, n: int) -> np.ndarray:
    """C-order flat indices (sorted, as extract_regions passes them) of the n brain voxels nearest
    a point at the back of the brain: one compact region."""
    mask = brain_mask(shape3)
    idx = np.flatnonzero(mask.ravel())
    c = np.array(np.unravel_index(idx, shape3)).T
    d = np.linalg.norm(c - np.array([shape3[0] * 0.5, shape3[1] * 0.15, shape3[2] * 0.4]), axis=1)
    return np.sort(idx[np.argsort(d)[:n]])


def measure(fn, repeat: int = 1, times: list | None = None):
    """(result, best wall seconds, best CPU seconds of this process, peak traced bytes). CPU time is
    the steadier number on a shared machine. ``times``: a list each run's (wall, cpu) seconds are appended to."""
    best, best_cpu, peak, out = float("inf"), float("inf"), 0, None
    for _ in range(repeat):
        out = None
        tracemalloc.start()
        t, c = time.perf_counter(), time.process_time()
        out = fn()
        wall, cpu = time.perf_counter() - t, time.process_time() - c
        best, best_cpu = min(best, wall), min(best_cpu, cpu)
        if times is not None:
            times.append((wall, cpu))
        peak = max(peak, tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
    return out, best, best_cpu, peak


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=sorted(SIZES), default="real")
    ap.add_argument("--file", type=Path, default=None, help="session file to write once and reuse")
    ap.add_argument("--voxels", type=int, default=20000)
    ap.add_argument("--repeat", type=int, default=1, help="runs per side (the best time is printed)")
    ap.add_argument("--skip-old", action="store_true", help="do not time the old implementation")
    ap.add_argument("--sessions", type=int, default=0,
                    help="also time reading this many copies of the session serially vs data.read_workers=auto")
    ap.add_argument("--write-numbers", action="store_true",
                    help="also write docs/numbers/nsd_session.json (times as mean +- sd over >= 3 --repeat runs)")
    args = ap.parse_args()
    if args.write_numbers and (args.repeat < 3 or args.size != "real"):
        ap.error("--write-numbers reports the real size's times over runs: give --size real --repeat 3 (or more)")
    shape = SIZES[args.size]
    path = args.file or Path(tempfile.gettempdir()) / f"nsd_bench_{args.size}" / "betas_session01.nii.gz"
    if not path.exists():
        print(f"writing {path} {shape} int16 ...", flush=True)
        t = time.perf_counter()
        write_session(path, shape)
        print(f"  written in {time.perf_counter() - t:.1f} s", flush=True)
    raw_mb = np.prod(shape) * 2 / 2**20
    print(f"{path}: {shape} int16, {raw_mb:.0f} MiB decompressed, {path.stat().st_size / 2**20:.0f} MiB on disk")
    flat = blob_voxels(shape[:3], min(args.voxels, int(brain_mask(shape[:3]).sum())))
    path.read_bytes()  # the file's pages in the OS cache for every side

    def gz_read():
        with gzip.open(path) as f:
            return len(f.read())

    header = nib.load(str(path)).dataobj
    n_bytes = header.offset + int(np.prod(header.shape)) * header.dtype.itemsize

    def decompress(module):  # the whole file into one preallocated buffer, 16 MiB per call: no second copy
        buf, n = memoryview(bytearray(n_bytes)), 0
        with module.open(path, "rb") as f:
            while k := f.readinto(buf[n:n + 2**24]):
                n += k
        assert n == n_bytes
        return n

    def new_read(module):  # the project's read with the given gzip module
        saved, nsd._gzip = nsd._gzip, module
        try:
            return read_session(path, flat, shape[:3])
        finally:
            nsd._gzip = saved

    try:
        from isal import igzip
    except ImportError:
        igzip = None
    sides = [("floor: gzip (stdlib) decompression", lambda: decompress(gzip)),
             ("floor: nibabel full load", lambda: np.asarray(nib.load(str(path)).dataobj).shape),
             ("new read_session, stdlib gzip", lambda: new_read(gzip))]
    if igzip is not None:
        sides += [("floor: isal decompression", lambda: decompress(igzip)),
                  ("new read_session, isal", lambda: new_read(igzip))]
    if not args.skip_old:
        sides.append(("old read_session_old", lambda: read_session_old(path, flat, shape[:3])))
    res, runs, peaks = {}, {}, {}
    for name, fn in sides:
        runs[name] = []
        out, t, cpu, m = measure(fn, args.repeat, runs[name])
        res[name], peaks[name] = (out, t, cpu), m
        print(f"{name:38s} {t:7.2f} s wall {cpu:7.2f} s cpu   peak {m / 2**20:6.0f} MiB", flush=True)
    new = res["new read_session, stdlib gzip"][0]
    if igzip is not None:
        assert np.array_equal(new, res["new read_session, isal"][0]), "isal and stdlib reads differ"
    if not args.skip_old:
        old = res["old read_session_old"][0]
        assert old.dtype == new.dtype and old.shape == new.shape and np.array_equal(old, new), "old != new"
        print(f"old and new reads are bit-identical: {new.shape} {new.dtype}")

    def ratio(a, b):
        return f"{res[a][1] / res[b][1]:.2f}x wall, {res[a][2] / res[b][2]:.2f}x cpu"

    print(f"new (stdlib) / gzip floor   : {ratio('new read_session, stdlib gzip', 'floor: gzip (stdlib) decompression')}")
    print(f"new (stdlib) / nibabel load : {ratio('new read_session, stdlib gzip', 'floor: nibabel full load')}")
    if igzip is not None:
        print(f"new (isal) / isal floor     : {ratio('new read_session, isal', 'floor: isal decompression')}")
        print(f"new (isal) / gzip floor     : {ratio('new read_session, isal', 'floor: gzip (stdlib) decompression')}")
    if not args.skip_old:
        print(f"old / gzip floor            : {ratio('old read_session_old', 'floor: gzip (stdlib) decompression')}")
        print(f"speed-up old / new (stdlib) : {ratio('old read_session_old', 'new read_session, stdlib gzip')}")
        if igzip is not None:
            print(f"speed-up old / new (isal)   : {ratio('old read_session_old', 'new read_session, isal')}")
    print(f"process peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10:.0f} MiB")
    if args.write_numbers:
        sys.path.insert(0, str(Path(__file__).resolve().parent / "numbers"))
        from _common import summary, write_numbers

        rows = [[name, summary([w for w, _ in runs[name]], 2), summary([c for _, c in runs[name]], 2),
                 round(peaks[name] / 2**20)] for name, _ in sides]
        write_numbers("nsd_session", {
            "table": {"columns": ["side", "wall s", "CPU s", "peak MiB (traced)"], "rows": rows},
            "shape": list(shape), "voxels": int(len(flat)), "isal": igzip is not None,
            "bit_identical": not args.skip_old, "repeats": args.repeat})
    if args.sessions:
        parallel_sessions(path, flat, shape, args.sessions)


def parallel_sessions(path: Path, flat: np.ndarray, shape: tuple, n: int) -> None:
    """``read_sessions`` (what extract_regions runs) over n links to the session: serial vs auto workers."""
    from neuroguide.data.nsd_sessions import read_sessions, read_workers

    with tempfile.TemporaryDirectory() as tmp:
        files = [Path(tmp) / f"betas_session{i:02d}.nii.gz" for i in range(1, n + 1)]
        for f in files:
            f.symlink_to(path)
        w = read_workers("auto", files)
        t = time.perf_counter()
        serial = read_sessions(files, flat, shape[:3], workers=1, progress=False)
        t_serial = time.perf_counter() - t
        t = time.perf_counter()
        par = read_sessions(files, flat, shape[:3], workers="auto", progress=False)
        t_par = time.perf_counter() - t
        assert all(np.array_equal(a, b) for a, b in zip(serial, par))
        print(f"{n} sessions: serial {t_serial:.1f} s, read_workers=auto ({w} processes) {t_par:.1f} s: "
              f"{t_serial / t_par:.2f}x, identical arrays")


if __name__ == "__main__":
    main()
