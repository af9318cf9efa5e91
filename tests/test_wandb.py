"""W&B without a server: offline runs into the run folder, final metrics in the summary, never a prompt."""
from __future__ import annotations

import pytest

import neuroguide.train
from neuroguide.loggers import finish_wandb
from neuroguide.train import run


def test_offline_run_ends_once_with_the_final_metrics(compose_train, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no_netrc"))
    calls = []

    def recording(wb_run, metrics, figures_dir=None):
        at_finish = {}
        real_finish = wb_run.finish

        def finish(*args, **kwargs):  # the summary as the run ends
            at_finish.update(dict(wb_run.summary))
            return real_finish(*args, **kwargs)

        wb_run.finish = finish
        finish_wandb(wb_run, metrics, figures_dir)
        calls.append((wb_run.id, dict(metrics), at_finish))

    monkeypatch.setattr(neuroguide.train, "finish_wandb", recording)
    cfg = compose_train("task=predictor", "region=V1", "logger=default", "task.max_epochs=1", "callbacks=none",
                        "+trainer.limit_train_batches=2")  # not fast_dev_run: it swaps the loggers for a dummy
    metrics = run(cfg)
    assert len(calls) == 1
    run_id, passed, summary = calls[0]
    assert passed == metrics and summary["test/r_median"] == pytest.approx(metrics["test/r_median"])
    assert (tmp_path / "run" / "wandb_run_id.txt").read_text().strip() == run_id
    offline = list((tmp_path / "run" / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(offline) == 1 and "finishing run" in (offline[0] / "logs" / "debug.log").read_text()


def test_finish_never_raises_and_logs_why(caplog):
    class Broken:
        summary = None  # .update fails

        def finish(self):  # pragma: no cover - not reached
            raise AssertionError

    with caplog.at_level("WARNING"):
        finish_wandb(Broken(), {"a": 1.0})
    assert "W&B summary not written" in caplog.text
