"""Two processes building the same synthetic tree and NSD cache at once end with one valid cache."""
from __future__ import annotations

import multiprocessing as mp
from pathlib import Path

import numpy as np
import pytest

from conftest import SMALL_NSD

pytestmark = pytest.mark.slow  # spawns processes: outside the quick loop (pytest -m "not slow")


def _build(root: str, cache: str, q) -> None:
    try:
        from neuroguide.data.nsd_regions import RegionSpec, extract_regions
        from neuroguide.data.synthetic.nsd import write_synthetic_nsd

        write_synthetic_nsd(Path(root), **SMALL_NSD)
        rd = extract_regions(root, 1, [RegionSpec("TO", "Kastner2015", (12, 13), "nsdgeneral"),
                                       RegionSpec("V1", "Kastner2015", (1, 2), "nsdgeneral")],
                             cache_dir=cache, progress=False)
        q.put(("ok", float(np.asarray(rd["TO"].train).sum())))
    except Exception as e:  # pragma: no cover - reported to the parent
        q.put(("error", repr(e)))


def test_two_processes_same_cache(tmp_path):
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    root, cache = str(tmp_path / "nsd"), str(tmp_path / "cache")
    procs = [ctx.Process(target=_build, args=(root, cache, q)) for _ in range(2)]
    for p in procs:
        p.start()
    results = [q.get(timeout=300) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    assert all(r[0] == "ok" for r in results), results
    assert results[0][1] == results[1][1]  # both read the same numbers
    entries = sorted(p.name for p in Path(cache).iterdir())
    assert len(entries) == 2 and not [e for e in entries if e.startswith(".")]  # one folder per region, no temp left
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".nsd")]  # no half-written synthetic tree
    from neuroguide.data.nsd_regions import RegionData

    for e in entries:  # each cached region is complete and loadable
        rd = RegionData.load(Path(cache) / e)
        assert rd.train.shape[0] > 0 and np.isfinite(np.asarray(rd.train)).all()
