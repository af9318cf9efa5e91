"""Atomic writes and content hashes.

Every file another process may read (caches, checkpoints, metrics) is written to a
temporary name in the same folder and renamed into place, so a crash or a concurrent
writer never leaves a half-written file behind.
"""
from __future__ import annotations

import contextlib
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


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` on success, with the
    permissions a plain write would have under the user's umask.

    On an exception the temporary file (or folder) is removed and ``path`` is untouched.
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
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            if tmp.is_dir():
                shutil.rmtree(tmp)
            else:
                tmp.unlink()
        raise


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, complete: Callable[[Path], bool]) -> Iterator[Path]:
    """Yield a fresh temporary folder beside ``path`` to fill; on success rename it onto ``path`` (with
    the permissions ``mkdir`` would give under the umask).

    If another writer renamed its folder into place first and ``complete(path)`` says it is whole,
    theirs is kept and ours removed; otherwise the rename error is raised. An empty folder at ``path``
    is replaced. On an exception the temporary folder is removed and ``path`` is untouched.
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
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
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

    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(clean(json.loads(json.dumps(obj, default=_json_default))), indent=2, sort_keys=True))
    return Path(path)


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text())


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
