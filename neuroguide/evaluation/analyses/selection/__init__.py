"""Choosing the base network of the IT model (Guo et al., Appendix 6.1): ``python evaluate.py eval=[selection]``
(backbones x layers, no trained model).

Modules: :mod:`.core` (criteria A and B, the table and figure, ``run_selection``), :mod:`.brain_transfer`
(criterion C: layer-targeted perturbations shown to a brain), :mod:`.lab` (criterion C's stimuli for a recording
session, and reading the recordings back).
"""
from __future__ import annotations

from pathlib import Path

from neuroguide.evaluation.registry import standalone


@standalone("selection")
def _selection(params: dict, out: Path) -> dict:
    """The table as flat metrics: ``eval/selection/<at_eps>/<layer>/<column>``."""
    from neuroguide.evaluation.analyses.selection.core import run_selection

    res = run_selection({**params, "out_dir": str(out)})
    return {f"eval/selection/{r['at_eps']}/{r['layer']}/{k}": v for r in res["rows"] for k, v in r.items()
            if isinstance(v, float)}
