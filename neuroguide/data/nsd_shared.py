"""The test images every NSD subject saw three times ("shared515"): computed from the design and each
subject's sessions, beside the default test split (the subject's own shared images).

NSD shows the 1000 shared images to all eight subjects, but four subjects did not complete all 40 sessions, so
only 515 of them were seen three times by everyone. Subject ``s`` saw the first ``sessions_s x trials_per_session``
trials of the design; ``sessions_s`` is counted from that subject's beta files when they are present
(``betas_sessionNN``), and otherwise taken from NSD's published session counts (:data:`NSD_SESSIONS`), capped at
the design's length.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from neuroguide.data.nsd import Design, NSDPaths, session_number

log = logging.getLogger("neuroguide")

NSD_SESSIONS = {1: 40, 2: 40, 3: 32, 4: 30, 5: 40, 6: 32, 7: 40, 8: 30}  # sessions completed per NSD subject


def subject_sessions(root: str | Path, subject: int, betas_format: str = "nii.gz") -> tuple[int, str]:
    """(number of sessions of ``subject``, where the number came from)."""
    try:
        files = NSDPaths(root, subject).sessions(betas_format)
    except FileNotFoundError:
        files = []
    if files:
        return max(session_number(p) for p in files), "beta files"
    return NSD_SESSIONS[int(subject)], "NSD's published session counts"


def shared_by_all(root: str | Path, trials_per_session: int, betas_format: str = "nii.gz",
                  repeats: int = 3) -> np.ndarray:
    """Sorted 0-based ids of the shared images that every one of the eight subjects saw ``repeats`` times."""
    paths = NSDPaths(root, 1)
    design = Design.read(paths.expdesign)
    keep = np.asarray(design.shared_images)
    for s in range(1, 9):
        n_sess, source = subject_sessions(root, s, betas_format)
        n_trials = min(n_sess * int(trials_per_session), len(design.masterordering))
        seen = design.trial_images(s, n_trials)
        ids, counts = np.unique(seen, return_counts=True)
        enough = set(ids[counts >= repeats].tolist())
        keep = keep[[i in enough for i in keep]]
        log.debug("subject %d: %d sessions (%s), %d shared images seen %d times by all so far", s, n_sess, source,
                  len(keep), repeats)
    return np.sort(keep)
