"""`dpldm compare` over tiny MLflow runs in a temporary sqlite store."""
import argparse

import mlflow
import pytest

from trainer.cli import main
from trainer.errors import RunError
from trainer.stages import evaluate


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # artifacts of the sqlite store land in ./mlruns
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    mlflow.set_tracking_uri(None)  # back to the environment's URI
    experiment_id = mlflow.create_experiment("mnist-dp")  # not set_experiment: no global state leaks out
    # attn-eps1 ran after attn-eps10 on the same private set: their composition is the set's epsilon
    runs = [("attn-eps1", {"privacy.epsilon": 1.0, "privacy.private_set_epsilon": 10.37, "privacy.delta": 1e-5,
                           "privacy.steps": 200,
                           "eval.fid": 40.5, "eval.accuracy": 0.81, "wall_time_s": 12.25}, "all"),
            ("attn-eps10", {"privacy.epsilon": 10.0, "privacy.delta": 1e-5, "privacy.steps": 400,
                            "eval.fid": 21.0, "wall_time_s": 30.0}, "all"),
            ("late-eps5", {"privacy.epsilon": 5.0, "eval.fid": 33.0}, "from-block-2")]
    for name, metrics, policy in runs:
        with mlflow.start_run(run_name=name, experiment_id=experiment_id):
            mlflow.log_params({"finetune.policy": policy, "params.trainable": 12345})
            mlflow.log_metrics(metrics)
    # a fine-tuning run of an older version: run name "finetune", its folder name in finetune.name
    with mlflow.start_run(run_name="finetune", experiment_id=experiment_id, tags={"stage": "finetune"}):
        mlflow.log_params({"finetune.policy": "all", "finetune.name": "eps3"})
        mlflow.log_metrics({"privacy.epsilon": 3.0, "eval.accuracy": 0.7})
    yield tmp_path
    mlflow.set_tracking_uri(None)


def _run(argv) -> int:
    parser = argparse.ArgumentParser(prog="dpldm")
    evaluate.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_compare_prints_every_run_and_writes_the_plot(store, capsys):
    out = store / "report"
    assert _run(["compare", "--experiment", "mnist-dp", "--out", str(out)]) == 0
    assert not mlflow.search_runs(experiment_names=["mnist-dp"], filter_string="tags.`dpldm.stage` = 'compare'",
                                  output_format="list")  # reading runs adds none
    assert (out / "accuracy_vs_epsilon.png").is_file()  # the default metric: the one every evaluation has
    capsys.readouterr()
    assert _run(["compare", "--experiment", "mnist-dp", "--out", str(out), "--metric", "fid", "--log"]) == 0
    text = capsys.readouterr().out
    lines = {line.split()[0]: line for line in text.splitlines() if line.strip()}
    assert "attn-eps1" in lines and "attn-eps10" in lines and "late-eps5" in lines and "finetune-eps3" in lines
    assert "40.5" in lines["attn-eps1"] and "0.81" in lines["attn-eps1"] and "12345" in lines["attn-eps1"]
    assert " - " in lines["attn-eps10"] + " "  # no accuracy logged for that run
    assert lines["late-eps5"].split()[1:5] == ["5", "-", "-", "12345"]  # no set epsilon recorded: not guessed
    assert lines["attn-eps1"].split()[1:3] == ["1", "10.37"]  # the set's epsilon over the runs, not the run's
    assert text.splitlines()[0].split()[:4] == ["run", "epsilon", "set", "epsilon"]
    plot = out / "fid_vs_epsilon.png"
    assert plot.is_file() and plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "runs.txt").read_text().count("\n") == 5  # header + 4 runs

    # the comparison is logged as its own run, and later comparisons do not list it
    compare_runs = mlflow.search_runs(experiment_names=["mnist-dp"], filter_string="tags.`dpldm.stage` = 'compare'",
                                      output_format="list")
    assert len(compare_runs) == 1
    artifacts = [a.path for a in mlflow.MlflowClient().list_artifacts(compare_runs[0].info.run_id, "compare")]
    assert "compare/fid_vs_epsilon.png" in artifacts
    table, _ = evaluate.compare_runs("mnist-dp", "accuracy", out, log=False)
    assert "compare" not in [line.split()[0] for line in table.splitlines()]
    with pytest.raises(RunError, match="no-such-experiment"):
        evaluate.compare_runs("no-such-experiment")


def test_compare_refuses_an_unknown_experiment_in_one_line(store, capsys):
    assert main(["compare", "--experiment", "no-such-experiment", "--out", str(store / "report")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("dpldm compare: error: --experiment: no MLflow experiment named 'no-such-experiment'")
    assert "Traceback" not in err and err.count("\n") == 1
    assert not (store / "report").exists()


def test_compare_without_a_store_refuses_and_creates_none(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    mlflow.set_tracking_uri(None)  # MLflow's default: sqlite ./mlflow.db
    try:
        assert main(["compare", "--out", str(tmp_path / "report")]) == 1
    finally:
        mlflow.set_tracking_uri(None)
    err = capsys.readouterr().err
    assert err.startswith("dpldm compare: error: no MLflow store at ") and "mlflow.db" in err
    assert list(tmp_path.iterdir()) == []  # neither an empty store nor the report folder
