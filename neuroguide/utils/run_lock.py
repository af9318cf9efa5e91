"""One writer per run folder: ``with one_writer(folder): ...`` around everything a run writes there.

Two runs of one config at once would write one folder: each other's checkpoints, ``csv/metrics.csv`` and
``metrics.json`` (one deleting the checkpoints the other is about to test). The writer holds
``<folder>/.run.lock`` with ``fcntl.flock`` on the open file: the operating system releases the lock when the
holding process ends in any way (SIGKILL, out of memory, a node reboot), so a killed run never leaves it
stuck. The holder writes its pid, host, start time and command into the file; a second writer finds the lock
held and is refused at once with :class:`RunFolderBusy`, naming the folder and the holder. The file is
removed when the holder finishes (a stale file left by a killed run holds no lock and is taken over).

Only global rank 0 of a distributed run takes the lock (the other ranks write nothing into the folder):
a process whose ``RANK``, ``LOCAL_RANK``, ``NODE_RANK``, ``GROUP_RANK``, ``SLURM_PROCID`` or
``JSM_NAMESPACE_RANK`` is set to something other than 0 does not. A file system without ``flock`` (some
Lustre or NFS mounts) is warned about and the run goes on unlocked.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import socket
import sys
import time
from pathlib import Path
from typing import Iterator

LOCK_NAME = ".run.lock"
RANK_VARIABLES = ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK")
log = logging.getLogger("neuroguide")


class RunFolderBusy(RuntimeError):
    """Another process holds the run folder's lock; ``holder``: what it wrote (pid, host, started, command)."""

    def __init__(self, folder: Path, holder: dict | None):
        self.folder, self.holder = folder, holder or {}
        h = self.holder
        who = (f"pid {h.get('pid')} on {h.get('host')}, started {h.get('started')} ({h.get('command', '?')})"
               if h else "a process that has not yet written who it is")
        stop = f" (kill {h.get('pid')} on {h.get('host')})" if h else ""
        super().__init__(
            f"{folder} is being written by another run: {who}. Two runs writing one folder corrupt each other's "
            f"checkpoints and metrics, so this one stops before writing anything. Wait for that run to finish (the "
            f"same command then returns its result, or resumes it), stop it{stop}, or give this run its own folder "
            "(hydra.run.dir=...)")


def is_global_zero() -> bool:
    """True unless a rank variable of :data:`RANK_VARIABLES` says this process is another rank."""
    return all(os.environ.get(k, "0") in ("", "0") for k in RANK_VARIABLES)


def _read_holder(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text()) or None
    except (OSError, ValueError):
        return None


def lock_holder(folder: str | os.PathLike) -> dict | None:
    """What the process writing ``folder`` wrote about itself (pid, host, started, command) while it holds
    the lock; None when no process holds it."""
    path = Path(folder) / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    except BlockingIOError:
        return _read_holder(path) or {}
    except OSError:  # no flock on this file system: nothing can be said
        return None
    finally:
        os.close(fd)


@contextlib.contextmanager
def one_writer(folder: str | os.PathLike) -> Iterator[None]:
    """Hold ``folder``'s run lock for the block (global rank 0 only); :class:`RunFolderBusy` when another
    process holds it."""
    folder = Path(folder)
    if not is_global_zero():
        yield
        return
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    fd = _acquire(path)
    try:
        yield
    finally:
        if fd is not None:
            with contextlib.suppress(OSError):
                path.unlink()  # while still held: a process waiting on the old file sees it replaced
            os.close(fd)  # releases the lock


def _acquire(path: Path) -> int | None:
    """The open, locked lock file (its holder info written), or None where the file system has no flock."""
    for _ in range(20):  # another process may remove the file between our open and our lock: try again
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            holder = _read_holder(path)
            if holder is None:  # the holder has just opened it and is writing who it is
                time.sleep(0.05)
                holder = _read_holder(path)
            raise RunFolderBusy(path.parent, holder) from None
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                log.warning("%s: this file system has no file locks (%s): nothing stops a second run of this "
                            "config from writing the same folder at the same time", path.parent, e.strerror)
                return None
            raise
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if not same:  # we locked a file its last holder had already removed
            os.close(fd)
            continue
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                "command": " ".join(sys.argv)[:300]}
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(info).encode())
        return fd
    raise RuntimeError(f"could not take the lock {path}: it was replaced 20 times in a row")  # pragma: no cover
