"""Reading the session files of one subject, in parallel worker processes when cores and memory allow.

A real session decompresses to about 1 GB (81 x 104 x 83 x 750 int16) and takes tens of seconds to read,
nearly all of it gzip decompression on one core, so sessions are read by up to ``workers`` processes at
once. A worker decompresses a session a 16 MB block of trials at a time (``nsd.read_session``); the count is
still bounded by the available memory as if each held a decompressed session (a conservative bound), as well as
by the cores this process may use (``os.sched_getaffinity``) and the number of sessions.
The result is the same as reading the sessions one after the other, in session order.
"""
from __future__ import annotations

import logging
import multiprocessing
import os
from collections import deque
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from neuroguide.data.nsd import read_session, reading, zscore_session

log = logging.getLogger("neuroguide")

#: below this many decompressed bytes per session, starting processes costs more than it saves (auto: serial)
SMALL_SESSION_BYTES = 64 * 2**20
#: memory a worker needs beyond the decompressed session (interpreter, libraries, the gathered voxels)
WORKER_OVERHEAD_BYTES = 300 * 2**20


def session_header(path: Path) -> tuple[tuple, np.dtype]:
    """Shape and stored dtype of a session's betas, from the file's header (nothing else is read): NIfTI
    (X, Y, Z, trials), HDF5 ``betas`` (trials, Z, Y, X); ((), uint8) for an HDF5 file without ``betas``."""
    path = Path(path)
    with reading(path):
        if path.name.endswith(".hdf5"):
            import h5py

            with h5py.File(path, "r") as f:
                d = f["betas"] if "betas" in f else None
                return (tuple(d.shape), d.dtype) if d is not None else ((), np.dtype(np.uint8))
        import nibabel as nib

        img = nib.load(str(path))
        return tuple(img.shape), img.get_data_dtype()


def session_nbytes(path: Path) -> int:
    """Decompressed size of a session's betas, from the file's header (nothing else is read)."""
    shape, dtype = session_header(path)
    return int(np.prod(shape) * dtype.itemsize) if shape else 0


def session_trials(path: Path) -> int:
    """Trials of a session (the header's trial axis: the last of a NIfTI file, the first of an HDF5 ``betas``)."""
    shape, _ = session_header(path)
    if len(shape) != 4:
        raise ValueError(f"{path}: betas of shape {shape}; expected 4 axes (NIfTI X, Y, Z, trials; HDF5 dataset "
                         "'betas' trials, Z, Y, X)")
    return int(shape[0] if Path(path).name.endswith(".hdf5") else shape[-1])


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity, e.g. a SLURM allocation), else the machine's."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def idle_cores() -> int:
    """Cores the machine's 1-minute load average leaves idle (at least 1): on a machine shared with other
    jobs a second process only competes for a busy core, and was slower than reading serially."""
    try:
        return max(1, int((os.cpu_count() or 1) - os.getloadavg()[0] + 0.5))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def available_memory() -> int | None:
    """Bytes that can be allocated without swapping: MemAvailable, lowered to a cgroup (v2) memory limit's
    headroom where one is set (containers, SLURM jobs). None when unknown."""
    avail = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            room = int(limit) - int(Path("/sys/fs/cgroup/memory.current").read_text())
            avail = room if avail is None else min(avail, room)
    except (OSError, ValueError):
        pass
    return avail


def read_workers(workers: int | str | None, sessions: Sequence[Path]) -> int:
    """How many processes read ``sessions`` (config key ``data.read_workers``).

    ``auto`` (or None): min(sessions, usable cores, idle cores, memory bound), and 1 (this process) when
    sessions are small (< SMALL_SESSION_BYTES decompressed). An integer N: min(N, sessions, memory bound); 1 reads in
    this process. The memory bound is the available memory over (session size + WORKER_OVERHEAD_BYTES).
    """
    if not sessions:
        return 1
    auto = workers is None or str(workers).lower() == "auto"
    if not auto:
        try:
            n = int(workers)
        except (TypeError, ValueError):
            n = 0
        if n < 1 or str(workers).strip() != str(n):
            raise ValueError(f"data.read_workers must be 'auto' or an integer >= 1 (1: read sessions in this "
                             f"process), got {workers!r}")
    else:
        n = min(usable_cores(), idle_cores())
    n = min(n, len(sessions))
    if n <= 1:
        return 1
    per = session_nbytes(sessions[0])
    if auto and per < SMALL_SESSION_BYTES:
        return 1
    avail = available_memory()
    if avail is not None:
        bound = max(1, int(avail // (per + WORKER_OVERHEAD_BYTES)))
        if bound < n:
            log.info("reading NSD sessions with %d processes, not %d: %.1f GiB available, %.1f GiB per session",
                     bound, n, avail / 2**30, per / 2**30)
            n = bound
    return n


def read_zscored_session(path: Path, flat_index: np.ndarray, volume_shape: tuple) -> np.ndarray:
    """One session's betas at the voxels, z-scored per voxel: (trials, voxels) float32."""
    return zscore_session(read_session(path, flat_index, volume_shape))


def read_sessions(sessions: Sequence[Path], flat_index: np.ndarray, volume_shape: tuple, *,
                  workers: int | str | None = "auto", progress: bool = True, desc: str = "NSD sessions") -> list:
    """:func:`read_zscored_session` of each session, in session order, by :func:`read_workers` processes
    (all of them held at once: :func:`iter_sessions` hands them over one at a time)."""
    return list(iter_sessions(sessions, flat_index, volume_shape, workers=workers, progress=progress, desc=desc))


def iter_sessions(sessions: Sequence[Path], flat_index: np.ndarray, volume_shape: tuple, *,
                  workers: int | str | None = "auto", progress: bool = True,
                  desc: str = "NSD sessions") -> Iterator[np.ndarray]:
    """:func:`read_zscored_session` of each session, yielded in session order, read by :func:`read_workers`
    processes: (trials, voxels) float32 each. A caller that folds each session into its result as it comes holds
    one session's voxels (and, in parallel, those read ahead by the workers), never all sessions at once.

    An error in a worker is raised here with its message (which names the file, see ``nsd.reading``);
    the sessions not yet started are cancelled.
    """
    from tqdm.auto import tqdm

    n = read_workers(workers, sessions)
    if n <= 1:
        for s in tqdm(sessions, desc=desc, disable=not progress):
            yield read_zscored_session(s, flat_index, volume_shape)
        return
    log.info("reading %d NSD sessions with %d worker processes", len(sessions), n)
    # forkserver / spawn, not fork: the caller may hold threads (torch, CUDA, data loaders) that fork would copy
    method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
    ex = ProcessPoolExecutor(n, mp_context=multiprocessing.get_context(method))
    try:
        with tqdm(total=len(sessions), desc=desc, disable=not progress) as bar:
            # at most 2 n sessions submitted ahead: a slow caller does not pile up the sessions read
            futures = deque(ex.submit(read_zscored_session, s, flat_index, volume_shape) for s in sessions[:2 * n])
            queued, pending = len(futures), set(futures)
            while futures:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for f in done:
                    if f.exception() is not None:
                        raise f.exception()
                while futures and futures[0].done():  # the next sessions in order, as soon as they are read
                    f = futures.popleft()
                    bar.update(1)
                    if queued < len(sessions):
                        futures.append(ex.submit(read_zscored_session, sessions[queued], flat_index, volume_shape))
                        pending.add(futures[-1])
                        queued += 1
                    yield f.result()
                    del f
    except BaseException:
        ex.shutdown(wait=False, cancel_futures=True)  # sessions not started are dropped; no wait for the rest
        raise
    ex.shutdown()
