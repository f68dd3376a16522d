"""MLflow runs of resumed stages: the recorded run when the store has it, a new tagged run when not."""
from __future__ import annotations

import mlflow

from conftest import mlflow_store
from trainer.tracking import start_run


def _runs(experiment: str) -> list:
    return mlflow.search_runs(experiment_names=[experiment], output_format="list")


def test_resume_continues_the_recorded_run(tmp_path):
    with mlflow_store(tmp_path):
        with start_run("exp", "pretrain-ldm", {"seed": 0}) as run:
            first = run.run_id
        with start_run("exp", "pretrain-ldm", {"seed": 0}, run_id=first) as run:
            assert run.run_id == first
        assert [r.info.run_id for r in _runs("exp")] == [first]


def test_resume_under_another_store_opens_a_new_run(tmp_path, capsys):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with mlflow_store(tmp_path / "a"):
        with start_run("exp", "pretrain-ldm", {"seed": 0}) as run:
            recorded = run.run_id
    with mlflow_store(tmp_path / "b"):  # the checkpoint folder moved to a machine with its own store
        with start_run("exp", "pretrain-ldm", {"seed": 0}, {"stage": "pretrain-ldm"}, run_id=recorded) as run:
            assert run.run_id != recorded
            run.log_metrics({"loss": 1.0}, step=1)
        (new,) = _runs("exp")
        assert new.info.status == "FINISHED" and new.info.run_name == "pretrain-ldm"
        assert new.data.tags["resumed_from_run"] == recorded and new.data.tags["stage"] == "pretrain-ldm"
        assert new.data.params["seed"] == "0"
    assert f"MLflow run {recorded} of this checkpoint is not in" in capsys.readouterr().err
