"""neuroguide.report gathers every run's metrics.json into one table and figures."""
from __future__ import annotations

import csv
import json

import pytest
import yaml

from neuroguide.report import collect, main, report


def _run(root, name, region, alpha, acc):
    d = root / name
    d.mkdir(parents=True)
    (d / "metrics.json").write_text(json.dumps({"val/acc": acc, "val/neural_r": 0.1}))
    (d / "config.yaml").write_text(yaml.safe_dump({"task": {"name": "guidance"}, "region": {"name": region},
                                                   "alpha": alpha, "at": {"eps": 0.0}, "seed": 0, "subject": 1}))


def test_report_table_and_figure(tmp_path, capsys):
    _run(tmp_path, "region=TO,alpha=0.5", "TO", 0.5, 0.8)
    _run(tmp_path, "region=V1,alpha=0.5", "V1", 0.5, 0.6)
    _run(tmp_path, "region=none,alpha=0", "none", 0.0, 0.7)
    (tmp_path / "region=TO,alpha=0.5" / "predictor_TO").mkdir()
    (tmp_path / "region=TO,alpha=0.5" / "predictor_TO" / "metrics.json").write_text("{}")  # not a sweep run
    rows = collect(tmp_path)
    assert len(rows) == 3
    res = report(tmp_path)
    table = list(csv.DictReader(open(res["csv"])))
    assert [r["region"] for r in table] == ["none", "V1", "TO"]  # ordered along the ventral stream
    assert {r["region"]: float(r["val/acc"]) for r in table} == {"none": 0.7, "V1": 0.6, "TO": 0.8}
    assert any(p.name == "val_acc.png" and p.stat().st_size > 1000 for p in res["figures"])
    main([str(tmp_path)])
    assert "val/acc" in capsys.readouterr().out


def test_report_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a folder"):
        collect(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="no metrics.json"):
        collect(tmp_path)
