"""Atomic writes and content hashes.

Every file another process may read (caches, checkpoints, metrics) is written to a
temporary name in the same folder and renamed into place, so a crash or a concurrent
writer never leaves a half-written file behind. A write that finds the disk full raises
:class:`DiskFull`, naming the folder, its free space and (where the size is known before
writing, :func:`atomic_write_bytes`) the space the file needs; the temporary file is removed.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator


def require(path: str | os.PathLike, what: str, fix: str = "check paths.nsd_root") -> Path:
    """``path`` as a Path if it is a file, else a FileNotFoundError naming what it is, where, and the fix."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{what} not found: {path} ({fix})")
    return Path(path)


def current_umask() -> int:
    """The process's umask (read without changing it where /proc allows)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def plain_permissions(path: str | os.PathLike) -> None:
    """Give ``path`` the mode a plain ``open``/``mkdir`` would have under the umask (0644 / 0755 under
    umask 022): ``mkstemp``/``mkdtemp`` make private 0600 / 0700 temporaries, which a cache or a
    checkpoint shared with the group must not keep."""
    base = 0o777 if Path(path).is_dir() else 0o666
    os.chmod(path, base & ~current_umask())


NO_ROOM = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))


class DiskFull(OSError):
    """A file could not be written for lack of room (ENOSPC, or EDQUOT: a quota); the message names the
    file, its folder's free space, the space the file needs when known, and the fix. Nothing partial is
    left under the file's name (the writers write to a temporary name first and remove it)."""

    def __init__(self, path: str | os.PathLike, needed: int | None = None, written: int | None = None):
        path = Path(path)
        folder = path.parent
        free = _free_bytes(folder)
        has = f"{folder} has {_size(free) if free is not None else 'an unknown amount'} free"
        if needed is None:
            need = f"more than the {_size(written or 0)} written before the disk filled are needed"
        elif free is not None and free < needed:
            need = f"the file needs {_size(needed)} (free at least {_size(needed - free)} more there)"
        else:
            need = (f"the file needs {_size(needed)}, but writing it ran out of room (a disk quota, or another process "
                    "filling the disk)")
        super().__init__(errno.ENOSPC, f"no room to write {path}: {has}, {need}. Nothing partial was kept under that "
                         "name. Free space on that disk, or write the run elsewhere (paths.log_dir=... or "
                         "hydra.run.dir=... on a disk with room)")
        self.path, self.needed, self.free = path, needed, free


def _size(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if abs(n) >= 1e5 else f"{n / 1e3:.1f} kB"


def _free_bytes(folder: Path) -> int | None:
    """Free bytes on the disk of ``folder`` (or of its nearest existing parent: it may not be made yet)."""
    folder = Path(folder).absolute()
    while not folder.exists() and folder.parent != folder:
        folder = folder.parent
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def check_room(path: str | os.PathLike, size: int) -> None:
    """Raise :class:`DiskFull` before writing ``size`` bytes to ``path`` when its folder has less free space."""
    free = _free_bytes(Path(path).parent)
    if free is not None and free < size:
        raise DiskFull(path, needed=size)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "", size: int | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` on success, with the
    permissions a plain write would have under the user's umask.

    On an exception the temporary file (or folder) is removed and ``path`` is untouched; a full disk
    (ENOSPC, EDQUOT) raises :class:`DiskFull` (``size``: the bytes the file needs, when known).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        plain_permissions(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        written = tmp.stat().st_size if tmp.is_file() else None
        with contextlib.suppress(FileNotFoundError):
            if tmp.is_dir():
                shutil.rmtree(tmp)
            else:
                tmp.unlink()
        if isinstance(e, OSError) and not isinstance(e, DiskFull) and e.errno in NO_ROOM:
            raise DiskFull(path, needed=size, written=written) from e
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically, after checking its folder has room (:class:`DiskFull` if not)."""
    check_room(path, len(data))
    with atomic_path(path, size=len(data)) as tmp:
        tmp.write_bytes(data)
    return Path(path)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, complete: Callable[[Path], bool]) -> Iterator[Path]:
    """Yield a fresh temporary folder beside ``path`` to fill; on success rename it onto ``path`` (with
    the permissions ``mkdir`` would give under the umask).

    If another writer renamed its folder into place first and ``complete(path)`` says it is whole,
    theirs is kept and ours removed; otherwise the rename error is raised. An empty folder at ``path``
    is replaced. On an exception the temporary folder is removed and ``path`` is untouched (a full disk
    raises :class:`DiskFull`).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        plain_permissions(tmp)
        try:
            if path.is_dir() and not any(path.iterdir()):
                path.rmdir()
            tmp.rename(path)
        except OSError:
            if not complete(path):
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and not isinstance(e, DiskFull) and e.errno in NO_ROOM:
            raise DiskFull(path) from e
        raise


def _json_default(o: Any):
    try:
        import numpy as np

        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
    except ImportError:  # pragma: no cover
        pass
    try:
        import torch

        if isinstance(o, torch.Tensor):
            return o.item() if o.numel() == 1 else o.tolist()
    except ImportError:  # pragma: no cover
        pass
    return str(o)


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented JSON, atomically. NaN/inf are written as null."""

    def clean(v):
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v

    text = json.dumps(clean(json.loads(json.dumps(obj, default=_json_default))), indent=2, sort_keys=True)
    return atomic_write_bytes(path, text.encode())


def read_json(path: str | os.PathLike) -> Any:
    """The JSON in ``path``; a file that is not valid JSON raises a ``json.JSONDecodeError`` naming it."""
    text = Path(path).read_text()
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise json.JSONDecodeError(f"{path} is not valid JSON (cut short while being written or copied?): {e.msg}",
                                   e.doc, e.pos) from None


def hash_inputs(*parts: Any) -> str:
    """A short stable hash of JSON-serialisable parts (params, file names, sizes, mtimes)."""
    h = hashlib.sha256()
    for p in parts:
        h.update(json.dumps(p, sort_keys=True, default=_json_default).encode())
    return h.hexdigest()[:16]


def file_fingerprint(path: str | os.PathLike) -> dict:
    """Name, size and modification time of a file: cheap identity for cache keys."""
    st = Path(path).stat()
    return {"path": str(Path(path).resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """SHA-256 of a file's content (hex): the identity of a file stored by reference."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def marker_holds(marker: str | os.PathLike, key: str) -> bool:
    """True when the JSON marker file of a written tree exists and records ``key`` (the writer's hash of
    its parameters): the completeness test of the synthetic writers' :func:`atomic_dir`."""
    try:
        return read_json(marker).get("key") == key
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError):
        return False


def pin_by_content(path: str | os.PathLike, store: str | os.PathLike | None = None) -> Path:
    """A copy of ``path`` named by its content, ``<store>/<sha256><suffix>`` (``store`` defaults to
    ``<path's folder>/.by-sha256``): a hard link when the file system allows (no extra disk), else a copy.
    Referring to the pinned file keeps the reference valid when ``path`` is later replaced (the project's
    writers replace files by renaming, which leaves the linked content alone)."""
    path = Path(path)
    store = Path(store) if store is not None else path.parent / ".by-sha256"
    target = store / f"{file_sha256(path)}{path.suffix}"
    if target.is_file():
        return target
    store.mkdir(parents=True, exist_ok=True)
    tmp = store / f".{target.name}.{os.getpid()}.tmp"
    try:
        os.link(path, tmp)
    except OSError:  # no hard links here (another file system, some network mounts): a copy
        shutil.copyfile(path, tmp)
    os.replace(tmp, target)
    return target
