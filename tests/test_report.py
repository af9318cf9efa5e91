"""neuroguide.report gathers every run's metrics.json into one table and figures."""
from __future__ import annotations

import csv
import json

import pytest
import yaml

from neuroguide.report import NotASweep, collect, main, region_order, report, robustness_by_region


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


def test_region_order_comes_from_the_region_configs(tmp_path):
    order = region_order()
    assert order[:2] == ("none", "random")  # baselines first
    assert order.index("V1") < order.index("V2") < order.index("V4") < order.index("TO")
    from neuroguide.config import CONF_DIR

    assert set(order) == {p.stem for p in (CONF_DIR / "region").glob("*.yaml")}
    (tmp_path / "region").mkdir()
    for name, spec in {"V1": "order: 1", "hV5": "order: 1.5", "V2": "order: 2", "none": "baseline: none\norder: 0"}.items():
        (tmp_path / "region" / f"{name}.yaml").write_text(f"name: {name}\n{spec}\n")
    assert region_order(str(tmp_path)) == ("none", "V1", "hV5", "V2")  # a new region sorts by its own config
    (tmp_path / "region" / "MT.yaml").write_text("name: MT\nbaseline: null\n")
    with pytest.raises(ValueError, match=r"MT.yaml: expected a number `order`.*add e.g. `order: 3`"):
        region_order(str(tmp_path))


def _evaluation(folder, sweep_dir):
    """What evaluate.py writes: metrics.json and its own config.yaml (no `task`)."""
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text(json.dumps({"eval/rsa/TO/spearman": 0.3}))
    (folder / "config.yaml").write_text(yaml.safe_dump({"eval": {"rsa": {}}, "sweep_dir": str(sweep_dir),
                                                        "ckpt": None, "n_images": 64}))


def test_not_a_sweep_says_so_and_exits_nonzero(tmp_path, capsys):
    _evaluation(tmp_path / "evals" / "e1", "outputs/multirun/sweep1")
    with pytest.raises(NotASweep, match=r"not a sweep.*1 evaluate.py output folder.*neuroguide.report "
                                        r"outputs/multirun/sweep1"):
        collect(tmp_path / "evals")
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / "evals")])
    assert exit_info.value.code != 0
    assert "is not a sweep" in capsys.readouterr().err
    assert not (tmp_path / "evals" / "report.csv").exists()
    # beside real runs, an evaluation folder is not counted as a run
    _run(tmp_path / "sweep", "region=TO", "TO", 0.5, 0.8)
    _evaluation(tmp_path / "sweep" / "eval", tmp_path / "sweep")
    assert [r["run"] for r in collect(tmp_path / "sweep")] == ["region=TO"]


def test_robustness_by_region(tmp_path):
    runs = {"region=V1": ("V1", (0.9, 0.5, 0.2)), "region=none": ("none", (0.9, 0.3, 0.1))}
    for name, (region, accs) in runs.items():
        _run(tmp_path, name, region, 0.5, accs[0])
    assert robustness_by_region(tmp_path, tmp_path / "out") is None  # no run evaluated for robustness yet
    for name, (_, accs) in runs.items():
        table = tmp_path / name / "eval" / "robustness"
        table.mkdir(parents=True)
        rows = ["attack,norm,eps,acc", f"clean,none,0.0,{accs[0]}", f"pgd,l2,0.5,{accs[1]}", f"pgd,l2,1.0,{accs[2]}"]
        (table / "robustness.csv").write_text("\n".join(rows) + "\n")
    png = robustness_by_region(tmp_path, tmp_path / "out")
    assert png == tmp_path / "out" / "robust_accuracy_by_region.png" and png.stat().st_size > 1000
