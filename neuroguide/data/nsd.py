"""Natural Scenes Dataset (NSD) reader for the real on-disk layout.

Paths are relative to ``nsd_root`` (see DESIGN.md):

- betas ``nsddata_betas/ppdata/subjXX/func1pt8mm/betas_fithrf_GLMdenoise_RR/betas_sessionNN.{nii.gz,hdf5}``;
  int16 = percent signal change x 300 (divided by 300 here). NIfTI is (X, Y, Z, trials); the HDF5
  dataset ``betas`` stores the axes reversed (trials, Z, Y, X). Trials per session come from the file.
- ROI volumes ``nsddata/ppdata/subjXX/func1pt8mm/roi/<atlas>.nii.gz``: 0 unlabeled, -1 outside brain.
- design ``nsddata/experiments/nsd/nsd_expdesign.mat``: image of trial t of subject s is
  ``subjectim[s - 1, masterordering[t] - 1] - 1`` (0-based 73k id); ``sharedix`` are 1-based 73k ids.
- stimuli ``nsddata_stimuli/stimuli/nsd/nsd_stimuli.hdf5`` dataset ``imgBrick`` (73000, 425, 425, 3) uint8.

:mod:`neuroguide.data.nsd_regions` builds on these readers: regions, their one-pass extraction and
the cache.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
import zlib
from contextlib import contextmanager
from typing import Iterator, Sequence

import h5py
import nibabel as nib
import numpy as np
import scipy.io

from neuroguide.utils.io import require


log = logging.getLogger("neuroguide")

BETA_SCALE = 300.0
BETAS_SUBDIR = "betas_fithrf_GLMdenoise_RR"


# ----------------------------------------------------------------------------- paths
@dataclass(frozen=True)
class NSDPaths:
    """Where each NSD file of one subject lives under ``root``."""

    root: Path
    subject: int

    def __post_init__(self):
        if not isinstance(self.subject, int) or not 1 <= self.subject <= 8:
            raise ValueError(f"subject must be an integer 1..8 (config key `subject`), got {self.subject!r}")
        object.__setattr__(self, "root", Path(self.root).expanduser())

    @property
    def subj(self) -> str:
        return f"subj{self.subject:02d}"

    @property
    def betas_dir(self) -> Path:
        return self.root / "nsddata_betas" / "ppdata" / self.subj / "func1pt8mm" / BETAS_SUBDIR

    @property
    def roi_dir(self) -> Path:
        return self.root / "nsddata" / "ppdata" / self.subj / "func1pt8mm" / "roi"

    @property
    def expdesign(self) -> Path:
        return self.root / "nsddata" / "experiments" / "nsd" / "nsd_expdesign.mat"

    @property
    def stimuli(self) -> Path:
        return self.root / "nsddata_stimuli" / "stimuli" / "nsd" / "nsd_stimuli.hdf5"

    @property
    def ncsnr(self) -> Path:
        return self.betas_dir / "ncsnr.nii.gz"

    def roi(self, atlas: str) -> Path:
        return self.roi_dir / f"{atlas}.nii.gz"

    def sessions(self, fmt: str = "nii.gz") -> list[Path]:
        """Session beta files present, sorted by session number (see :func:`session_number`)."""
        if fmt not in ("nii.gz", "hdf5"):
            raise ValueError(f"betas_format must be 'nii.gz' or 'hdf5', got {fmt!r}")
        if not self.betas_dir.is_dir():
            raise FileNotFoundError(
                f"NSD betas folder {self.betas_dir} does not exist. Set paths.nsd_root to the folder that "
                f"holds nsddata_betas/ (and subject=1..8 to a subject you have).")
        pat = re.compile(r"betas_session(\d+)\." + re.escape(fmt) + "$")
        found = sorted((int(m.group(1)), p) for p in self.betas_dir.iterdir() if (m := pat.match(p.name)))
        if not found:
            raise FileNotFoundError(f"no betas_sessionNN.{fmt} files in {self.betas_dir} (data.betas_format={fmt})")
        return [p for _, p in found]


def session_number(path: Path) -> int:
    """``betas_session07.nii.gz`` -> 7."""
    m = re.search(r"betas_session(\d+)\.", Path(path).name)
    if not m:
        raise ValueError(f"{path} is not named betas_sessionNN.<format>")
    return int(m.group(1))


def session_offsets(sessions: Sequence[Path], counts: Sequence[int]) -> np.ndarray:
    """Global index of the first trial of each session file: trial t of session s is global trial
    ``(s - 1) * trials_per_session + t``, so a missing session never shifts the ones after it.

    Sessions 1..N all present: the cumulative counts (any counts). With a gap, every session present
    must hold the same number of trials (750 in NSD), which is then the trials per session (a warning
    names the missing files); otherwise a ValueError names them and the fix.
    """
    numbers = [session_number(p) for p in sessions]
    counts = [int(c) for c in counts]
    if numbers == list(range(1, len(numbers) + 1)):
        return np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    folder, suffix = Path(sessions[0]).parent, Path(sessions[0]).name.split(".", 1)[1]
    missing = sorted(set(range(1, max(numbers) + 1)) - set(numbers))
    names = ", ".join(f"betas_session{m:02d}.{suffix}" for m in missing)
    if len(set(counts)) > 1:
        raise ValueError(
            f"{folder}: {names} missing, and the sessions present hold different numbers of trials "
            f"({dict(zip(numbers, counts))}), so the trials after the gap cannot be paired with their images. "
            f"Restore the missing files, or read only the sessions before the first gap with "
            f"data.max_sessions={missing[0] - 1}.")
    log.warning("%s: %s missing; trials are paired with images by session number (%d trials per session)",
                folder, names, counts[0])
    return np.asarray([(n - 1) * counts[0] for n in numbers], np.int64)


# ----------------------------------------------------------------------------- design
@dataclass
class Design:
    """``nsd_expdesign.mat``: masterordering (T,), subjectim (8, n), sharedix (n_shared,), all 1-based."""

    masterordering: np.ndarray
    subjectim: np.ndarray
    sharedix: np.ndarray

    @classmethod
    def read(cls, path: Path) -> "Design":
        d = scipy.io.loadmat(require(path, "NSD design file nsd_expdesign.mat"))
        for k in ("masterordering", "subjectim", "sharedix"):
            if k not in d:
                raise KeyError(f"{path} has no variable {k!r}; is it the NSD nsd_expdesign.mat?")
        return cls(np.asarray(d["masterordering"]).ravel().astype(np.int64),
                   np.asarray(d["subjectim"]).astype(np.int64),
                   np.asarray(d["sharedix"]).ravel().astype(np.int64))

    def trial_images(self, subject: int, trials: int | np.ndarray) -> np.ndarray:
        """0-based 73k image id of each trial of ``subject``: of the first ``trials`` trials (an int), or
        of the given 0-based global trial indices (an array)."""
        t = np.arange(trials) if np.ndim(trials) == 0 else np.asarray(trials, np.int64)
        if len(t) and t.max() >= len(self.masterordering):
            raise ValueError(f"the beta files hold trial {t.max() + 1} but masterordering has only "
                             f"{len(self.masterordering)} trials")
        return self.subjectim[subject - 1, self.masterordering[t] - 1] - 1

    @property
    def shared_images(self) -> np.ndarray:
        """0-based 73k ids of the shared images (the test split)."""
        return self.sharedix - 1


# ----------------------------------------------------------------------------- betas, ROIs
@contextmanager
def reading(path: Path) -> Iterator[None]:
    """Errors of a damaged file (truncated gzip, broken HDF5, bad NIfTI header) name the file and the fix."""
    try:
        yield
    except (EOFError, zlib.error, OSError, nib.filebasedimages.ImageFileError) as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise ValueError(f"{path} could not be read ({type(e).__name__}: {e or 'no detail'}): the file is truncated "
                         "or damaged (an interrupted download or copy?). Copy it again from the NSD release") from e


def read_volume(path: Path) -> np.ndarray:
    """A NIfTI volume as a numpy array (X, Y, Z[, T])."""
    with reading(path):
        return np.asarray(nib.load(str(require(path, "NIfTI volume"))).dataobj)


def read_session(path: Path, flat_index: np.ndarray, volume_shape: tuple) -> np.ndarray:
    """Betas of one session at the given voxels: (trials, n_voxels) float32, in percent signal change.

    ``flat_index`` indexes the C-order flattened (X, Y, Z) volume. The file is read once, a block of
    whole trials at a time into one reused buffer (never the whole session at once); the voxels are
    gathered from each block, in the file's integer type, and only they are scaled.
    """
    path = Path(path)
    with reading(path):
        out = _read_session(path, flat_index, volume_shape)
    out = out.astype(np.float32) / BETA_SCALE
    if not np.isfinite(out).all():
        raise ValueError(f"{path} holds NaN or inf betas inside the requested regions")
    return out


def _read_session(path: Path, flat_index: np.ndarray, volume_shape: tuple) -> np.ndarray:
    # Both formats store each trial's volume with X fastest: NIfTI (X, Y, Z, T) in Fortran order, the HDF5
    # dataset (T, Z, Y, X) in C order. So a block of trials is a (t, X*Y*Z) C-order array whose columns are the
    # Fortran-order flat indices of the voxels: the file is read a block of trials at a time, and only the voxels'
    # columns of each block are kept.
    x, y, z = np.unravel_index(np.asarray(flat_index, np.intp), volume_shape)
    columns = np.ravel_multi_index((x, y, z), volume_shape, order="F")
    n_vox = int(np.prod(volume_shape))
    if path.name.endswith(".hdf5"):
        with h5py.File(path, "r") as f:
            if "betas" not in f:
                raise KeyError(f"{path} has no dataset 'betas'")
            d = f["betas"]  # (T, Z, Y, X)
            if d.shape[1:] != tuple(volume_shape)[::-1]:
                raise ValueError(f"{path}: betas shape {d.shape} does not match ROI volume {volume_shape} "
                                 "(expected trials x Z x Y x X)")
            step = max(1, _PIECE_BYTES // (n_vox * d.dtype.itemsize))
            out = np.empty((d.shape[0], len(columns)), d.dtype)
            for t in range(0, d.shape[0], step):
                block = d[t:t + step]
                np.take(block.reshape(len(block), n_vox), columns, axis=1, out=out[t:t + len(block)])
            return out
    img = nib.load(str(path))
    if tuple(img.shape[:3]) != tuple(volume_shape):
        raise ValueError(f"{path}: betas shape {img.shape} does not match ROI volume {volume_shape}")
    proxy = img.dataobj
    return _scale_like_nibabel(proxy, _gather_unscaled(path, proxy, columns))


try:  # optional: isal's gzip decompresses about twice as fast as the standard library's (pip install isal)
    from isal import igzip as _gzip
except ImportError:
    import gzip as _gzip

_PIECE_BYTES = 16 * 2**20  # bytes of whole trials decompressed (or read) per block


def _gather_unscaled(path: Path, proxy, columns: np.ndarray) -> np.ndarray:
    """(trials, len(columns)) of the NIfTI data as stored (unscaled, the file's dtype): columns of the (trials,
    X*Y*Z) array of the session's trial volumes.

    A ``.gz`` file is decompressed (``isal.igzip`` when installed, else the standard ``gzip``) a block of whole
    trials (about ``_PIECE_BYTES``) at a time into one reused buffer, and the columns of each block are gathered
    from it: the peak is the voxels kept plus one block, not the decompressed session (1 GB for a real one).
    Other files: nibabel's memory map, gathered the same way.
    """
    n_vox = int(np.prod(proxy.shape[:3]))
    n_trials = int(np.prod(proxy.shape[3:]))
    out = np.empty((n_trials, len(columns)), proxy.dtype)
    if not path.name.endswith(".gz"):
        raw = proxy.get_unscaled()  # (X, Y, Z, T) Fortran order (a memory map)
        return np.take(raw.reshape(n_vox, n_trials, order="F").T, columns, axis=1, out=out)
    trial_bytes = n_vox * proxy.dtype.itemsize
    step = max(1, _PIECE_BYTES // trial_bytes)
    buf = memoryview(bytearray(step * trial_bytes))
    try:
        with _gzip.open(path, "rb") as f:
            f.seek(proxy.offset)
            for t in range(0, n_trials, step):
                want, n = min(step, n_trials - t) * trial_bytes, 0
                while n < want and (k := f.readinto(buf[n:want])):
                    n += k
                if n != want:
                    raise EOFError(f"expected {n_trials * trial_bytes} bytes of betas {proxy.shape} {proxy.dtype} "
                                   f"after the header, got {t * trial_bytes + n}")
                block = np.frombuffer(buf[:want], proxy.dtype).reshape(-1, n_vox)  # (trials, X*Y*Z)
                np.take(block, columns, axis=1, out=out[t:t + len(block)])
    except Exception as e:
        if type(e).__name__ == "IsalError":  # isal's zlib.error
            raise zlib.error(str(e)) from e
        raise
    return out


def _scale_like_nibabel(proxy, values: np.ndarray) -> np.ndarray:
    """The header's scl_slope / scl_inter applied as ``np.asarray(img.dataobj)`` applies them
    (``ArrayProxy._get_scaled``, elementwise, so applying it to the gathered voxels only is identical)."""
    from nibabel.volumeutils import apply_read_scaling

    slope, inter = np.asanyarray(proxy.slope), np.asanyarray(proxy.inter)
    if np.can_cast(inter, slope.dtype):
        inter = inter.astype(slope.dtype)
    return apply_read_scaling(values, slope, inter)


def zscore_session(b: np.ndarray) -> np.ndarray:
    """Z-score each voxel (column) over the trials of one session; constant voxels become 0."""
    mu = b.mean(0, keepdims=True)
    sd = b.std(0, keepdims=True)
    return np.where(sd > 0, (b - mu) / np.where(sd > 0, sd, 1), 0).astype(np.float32)


try:  # scipy's kernel behind ``csr_matrix @ dense``: Y += A X, row by row, each row's entries in order (maybe fused
    from scipy.sparse._sparsetools import csr_matvecs as _csr_matvecs  # multiply-adds): summing on from partial sums
except ImportError:  # pragma: no cover                                  repeats its rounding exactly
    _csr_matvecs = None


def _fold_by_scipy_kernel(avg, x: np.ndarray, y: np.ndarray) -> bool:
    """``y += avg @ x`` in place by scipy's private kernel (csr ``avg`` (m, t), x (t, V) and y (m, V) float64, C
    order), which continues each row's sum exactly as one product over all trials would; False (y untouched) when
    this scipy lacks it or it refuses the call: the caller then uses the public product."""
    global _csr_matvecs
    if _csr_matvecs is None:
        return False
    try:
        _csr_matvecs(avg.shape[0], avg.shape[1], x.shape[1], avg.indptr, avg.indices, avg.data, x.ravel(), y.ravel())
    except (TypeError, ValueError) as e:  # pragma: no cover - another scipy's private signature
        log.warning("scipy.sparse._sparsetools.csr_matvecs refused the call (%s): per-image means by the public "
                    "sparse product from now on (equal within an ulp of float64)", e)
        _csr_matvecs = None
        return False
    return True


class RepeatMeans:
    """The mean of the trials of each image, accumulated from consecutive blocks of trials (sessions) as they are
    read, so that the trials are never held all at once.

    ``image_ids`` (T,): the image of every trial, in the order the blocks will come; ``n_columns``: voxels. Each
    block (t, V) is folded into per-image sums of ``response / repeats`` in float64 (t from :meth:`add`'s first
    unused trial on), continued from the sums so far by the kernel of ``sparse @ dense`` itself: :meth:`result` is
    what one sparse product over all T trials at once gives, bit for bit (each image's sum is taken in trial order
    either way). Memory: (images, V) float64, plus one block.
    """

    def __init__(self, image_ids: np.ndarray, n_columns: int):
        self.images, self.inverse, self.counts = np.unique(np.asarray(image_ids), return_inverse=True,
                                                           return_counts=True)
        self.sums = np.zeros((len(self.images), int(n_columns)), np.float64)
        self.added = 0

    def add(self, block: np.ndarray) -> None:
        """Fold in the next ``len(block)`` trials: block (t, V)."""
        import scipy.sparse

        t = len(block)
        if self.added + t > len(self.inverse) or block.shape[1:] != self.sums.shape[1:]:
            raise ValueError(f"a block of {block.shape} after {self.added} of {len(self.inverse)} trials of "
                             f"{self.sums.shape[1]} columns: more trials than image ids, or other columns")
        rows = self.inverse[self.added:self.added + t]
        touched, local = np.unique(rows, return_inverse=True)
        # a sparse (images in the block, t) averaging matrix: row i holds 1/count_i at the block's trials of image i
        avg = scipy.sparse.csr_matrix((1.0 / self.counts[rows], (local, np.arange(t))), shape=(len(touched), t))
        x = np.ascontiguousarray(block, np.float64)
        y = self.sums[touched]  # a copy, C order
        if not _fold_by_scipy_kernel(avg, x, y):  # a scipy without that private kernel (or with another
            y += avg @ x                           # signature): each partial sum rounded once more, within an ulp
        self.sums[touched] = y
        self.added += t

    def result(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """images (n,), mean (n, V) float32, repeats (n,); the sums are released."""
        if self.added != len(self.inverse):
            raise ValueError(f"{self.added} of {len(self.inverse)} trials added")
        means, self.sums = self.sums.astype(np.float32), None
        return self.images, means, self.counts


def average_repeats(responses: np.ndarray, image_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Average trials of the same image: (T, V), (T,) -> images (n,), mean (n, V) float32, repeats (n,)."""
    acc = RepeatMeans(image_ids, responses.shape[1])
    acc.add(responses)
    return acc.result()


def noise_ceiling(ncsnr: np.ndarray, n: float | np.ndarray) -> np.ndarray:
    """NSD noise ceiling in percent of variance: ``NC = 100 * ncsnr^2 / (ncsnr^2 + 1/n)``.

    ``n`` is the number of trials averaged per image; with mixed repeat counts pass
    :func:`effective_repeats` of the counts (``1/n`` = the mean of ``1/n_i``), not their mean.
    """
    ncsnr = np.asarray(ncsnr, np.float64)
    return 100.0 * ncsnr**2 / (ncsnr**2 + 1.0 / np.asarray(n, np.float64))


def effective_repeats(counts: np.ndarray) -> float:
    """The ``n`` of NSD's noise ceiling for images averaged over ``counts`` (n_i,) trials each:
    ``1/n = mean_i 1/n_i``, i.e. ``(A/3 + B/2 + C/1) / (A + B + C)`` for A, B, C images with 3, 2, 1 repeats
    (the harmonic mean of the counts; their arithmetic mean would overstate the ceiling)."""
    counts = np.asarray(counts, np.float64)
    if counts.size == 0 or (counts < 1).any():
        raise ValueError(f"repeat counts must be >= 1 for every image, got {counts}")
    return float(1.0 / np.mean(1.0 / counts))
