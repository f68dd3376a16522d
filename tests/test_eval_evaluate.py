"""`evaluate_samples` and `dpldm evaluate` with MNIST standing in for labelled samples."""
import argparse
import re
import shutil
from pathlib import Path

import mlflow
import numpy as np
import pytest
from PIL import Image

from trainer.data.mnist import load_mnist
from trainer.errors import UsageError
from trainer.eval.images import images_from_array, open_images
from trainer.stages import evaluate


def _run(argv) -> int:
    parser = argparse.ArgumentParser(prog="dpldm")
    evaluate.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_accuracy_only_from_arrays_uses_the_mnist_test_split():
    x, y = load_mnist("train")
    results = evaluate.evaluate_samples(x[:1000], y[:1000], real="mnist-test", metrics=["accuracy"], num=800,
                                        num_real=500, classifier="mlp", epochs=2, progress=False)
    assert results["eval.num_samples"] == 800 and results["eval.num_real"] == 500
    assert results["eval.accuracy"] > 0.7
    assert 1 <= results["eval.accuracy_epoch"] <= 2
    assert "eval.fid" not in results


def test_bad_metrics_and_missing_labels_are_reported():
    x, _ = load_mnist("test")
    with pytest.raises(ValueError, match="ssim"):
        evaluate.evaluate_samples(x[:10], metrics=["ssim"])
    with pytest.raises(ValueError, match="labelled samples"):
        evaluate.evaluate_samples(images_from_array(x[:20]), metrics=["accuracy"], num_real=20)


def test_unlabelled_samples_and_bad_metrics_are_refused_in_one_line_before_any_features(tmp_path, monkeypatch,
                                                                                       capsys):
    from trainer.cli import main
    x, _ = load_mnist("test")
    for i in range(4):  # a flat folder: no class labels
        Image.fromarray(x[i]).save(tmp_path / f"{i}.png")
    monkeypatch.setattr(evaluate, "InceptionFeatures", lambda *a, **k: pytest.fail("features before the check"))
    assert main(["evaluate", "--samples", str(tmp_path), "--metrics", "fid,accuracy", "--num-real", "4"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("dpldm evaluate: error: accuracy needs labelled samples") and err.count("\n") == 1
    assert main(["evaluate", "--samples", str(tmp_path), "--metrics", "ssim"]) == 2
    assert capsys.readouterr().err.startswith("dpldm evaluate: error: --metrics: ['ssim']; choose from")
    for empty in ("", " , "):  # not the defaults (a scoring that can take long)
        assert main(["evaluate", "--samples", str(tmp_path), "--metrics", empty]) == 2
        assert capsys.readouterr().err.startswith("dpldm evaluate: error: --metrics: none given; choose from")


def test_samples_of_other_classes_than_the_test_sets_are_refused(tmp_path):
    """Letters scored against digits (or a digit class 12) would train a classifier that scores ~0 on the
    test set: refused before any work, naming the classes."""
    from trainer.eval.images import ImageSetError
    x, _ = load_mnist("test")
    for folder, classes in (("letters", ("a", "b")), ("twelve", ("3", "12"))):
        for i, name in enumerate(classes):
            (tmp_path / folder / name).mkdir(parents=True)
            Image.fromarray(x[i]).save(tmp_path / folder / name / "0.png")
    for folder, named in (("letters", "['a', 'b']"), ("twelve", "['12']")):
        with pytest.raises(ImageSetError, match=rf"the samples' classes {re.escape(named)} .*not the same task"):
            evaluate.evaluate_samples(str(tmp_path / folder), metrics=["accuracy"])


def test_evaluate_checks_run_before_any_work(tmp_path, monkeypatch, capsys):
    """A --run that is not in the store (or no store at all) is refused before sampling or scoring,
    in one line, and no store is created; --samples and --checkpoint exclude each other."""
    from trainer.cli import main
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    mlflow.set_tracking_uri(None)  # MLflow's default: sqlite ./mlflow.db, not there yet
    monkeypatch.setattr(evaluate, "evaluate_samples", lambda *a, **k: pytest.fail("scored before checking --run"))
    monkeypatch.setattr(evaluate, "evaluate_checkpoint", lambda *a, **k: pytest.fail("sampled before checking --run"))
    try:
        assert main(["evaluate", "--checkpoint", "runs/x/finetune", "--run", "0123abcd"]) == 1
        assert capsys.readouterr().err == (f"dpldm evaluate: error: --run: no MLflow store at {tmp_path}/mlflow.db "
                                           f"(set MLFLOW_TRACKING_URI to the store that holds the run)\n")
        assert list(tmp_path.iterdir()) == []
        mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
        mlflow.create_experiment("some")  # a store without that run
        assert main(["evaluate", "--samples", str(tmp_path), "--run", "0123abcd"]) == 1
        assert "--run: no MLflow run '0123abcd' in sqlite:///" in capsys.readouterr().err
        assert main(["evaluate", "--samples", str(tmp_path), "--checkpoint", "runs/x/finetune"]) == 2
        assert "give either --samples DIR or --checkpoint RUN_DIR" in capsys.readouterr().err
    finally:
        mlflow.set_tracking_uri(None)


@pytest.mark.slow
def test_evaluate_cli_logs_metrics_and_grid_to_the_run(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    mlflow.set_tracking_uri(None)
    experiment_id = mlflow.create_experiment("evaluate")  # explicit: another test's active experiment may linger
    with mlflow.start_run(run_name="finetune", experiment_id=experiment_id) as run:
        run_id = run.info.run_id
    x, y = load_mnist("train")
    samples = tmp_path / "samples"
    for i in range(200):
        (samples / str(y[i])).mkdir(parents=True, exist_ok=True)
        Image.fromarray(x[i]).save(samples / str(y[i]) / f"{i:05d}.png")

    code = _run(["evaluate", "--samples", str(samples), "--real", "mnist-test", "--metrics", "fid,accuracy,pr",
                 "--num", "16", "--num-real", "12", "--classifier", "logreg", "--epochs", "2",
                 "--cache-dir", str(tmp_path / "cache"), "--batch-size", "12", "--run", run_id])
    assert code == 0
    out = capsys.readouterr().out
    assert "FID: " in out and "accuracy: " in out and "precision: " in out

    logged = mlflow.get_run(run_id).data.metrics
    assert logged["eval.num_samples"] == 16 and logged["eval.num_real"] == 12
    assert logged["eval.fid"] > 0 and 0 <= logged["eval.accuracy"] <= 1
    assert 0 <= logged["eval.precision"] <= 1 and 0 <= logged["eval.recall"] <= 1
    artifacts = [a.path for a in mlflow.MlflowClient().list_artifacts(run_id, "eval")]
    assert "eval/samples_per_class.png" in artifacts
    grid = np.asarray(Image.open(mlflow.artifacts.download_artifacts(run_id=run_id,
                                                                     artifact_path="eval/samples_per_class.png")))
    classes_used = np.unique(open_images(samples, max_images=16).labels)  # the subset evaluated (seed 0)
    assert grid.shape[:2] == (len(classes_used) * 30 + 2, 8 * 30 + 2)  # a row of up to 8 per class
    mlflow.set_tracking_uri(None)


def test_scores_against_the_runs_private_set_are_logged_as_nonprivate(tmp_path, monkeypatch, capsys):
    """`--real` holding examples of the run's private set (here: shards prepared from MNIST's train split,
    the run private on trainval): the scores are not DP, so they go to nonprivate/eval.*, and the real
    images' features are not cached; against the test split they stay eval.*."""
    from trainer.data.shards import WriteOptions, write_shards
    from trainer.data.sources import mnist_source
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    mlflow.set_tracking_uri(None)
    experiment_id = mlflow.create_experiment("evaluate-private")
    with mlflow.start_run(run_name="finetune", experiment_id=experiment_id) as run:
        mlflow.log_params({"data.private.source": "mnist", "data.private.split": "trainval",
                           "data.private.path": "None"})
    write_shards(mnist_source("train"), tmp_path / "real", WriteOptions(limit=40), progress_bar=False)
    def export(split: str, folder: Path) -> Path:  # 40 digits of `split` as a folder of PNGs, one per class
        x, y = load_mnist(split)
        for i in range(40):
            (folder / str(y[i])).mkdir(parents=True, exist_ok=True)
            Image.fromarray(x[i]).save(folder / str(y[i]) / f"{i:05d}.png")
        return folder
    samples = export("test", tmp_path / "samples")  # not private: stand-ins for a model's samples
    class Features:  # a stand-in network: this test is about where the scores and features go
        def __init__(self, *a):
            pass

        def __call__(self, images, *a):
            return np.random.default_rng(len(images)).normal(size=(len(images), 8))

    def no_cache(*a, **kw):
        raise AssertionError("features of private images cached")
    monkeypatch.setattr(evaluate, "InceptionFeatures", Features)
    monkeypatch.setattr(evaluate, "cached_features", no_cache)
    common = ["evaluate", "--samples", str(samples), "--classifier", "logreg", "--epochs", "1", "--run",
              run.info.run_id]
    private_as_samples = ["evaluate", "--samples", str(tmp_path / "real"), "--run", run.info.run_id]
    with pytest.raises(UsageError, match="--samples: shares examples with the private set of run"):
        _run(private_as_samples)  # the private set's own images, their grid logged to its DP run: refused
    assert not mlflow.get_run(run.info.run_id).data.metrics
    assert _run(common + ["--metrics", "accuracy,fid", "--real", str(tmp_path / "real" / "shard-000000.tar")]) == 0
    assert "shares examples with the private set of run" in capsys.readouterr().err
    logged = mlflow.get_run(run.info.run_id).data.metrics
    assert {"nonprivate/eval.accuracy", "nonprivate/eval.fid"} <= set(logged) and "eval.accuracy" not in logged
    exported = export("val", tmp_path / "exported")  # private digits exported as image files
    with pytest.raises(UsageError, match=r"--samples: shares examples .*image files whose pixels are digits of MNIST"):
        _run(["evaluate", "--samples", str(exported), "--run", run.info.run_id])
    copy = tmp_path / "copy"  # the private shard copied elsewhere, without the meta.json that names its source
    copy.mkdir()
    shutil.copy(tmp_path / "real" / "shard-000000.tar", copy / "shard-000000.tar")
    with pytest.raises(UsageError, match=r"--samples: shares examples .*shard images whose pixels are digits of MNIST"):
        _run(["evaluate", "--samples", str(copy), "--run", run.info.run_id])
    assert _run(common + ["--metrics", "accuracy", "--real", str(exported)]) == 0
    assert "shares examples with the private set of run" in capsys.readouterr().err
    assert _run(common + ["--metrics", "accuracy", "--real", "mnist-test", "--num-real", "40"]) == 0
    assert "eval.accuracy" in mlflow.get_run(run.info.run_id).data.metrics
    assert "shares examples" not in capsys.readouterr().err
    with mlflow.start_run(run_name="finetune", experiment_id=experiment_id) as long_path:  # cut by the tracking
        mlflow.log_params({"data.private.source": "shards", "data.private.path": "/data/" + "s" * 5994})
    assert evaluate.shares_private_examples(long_path.info.run_id, "mnist-test") == [
        "a data.private.path cut to 6000 characters in the run's params: not comparable"]
    assert evaluate.shares_private_examples(run.info.run_id, "mnist-test") == [
        "a data.private.path cut to 6000 characters in the run's params: not comparable (the private set of the "
        "experiment's run finetune)"], "another run of the experiment that cannot be compared counts too"
    with mlflow.start_run(run_name="on-test", experiment_id=experiment_id):  # another DP run, private on the test split
        mlflow.log_params({"data.private.source": "mnist", "data.private.split": "test", "data.private.path": "None"})
    mlflow.delete_run(long_path.info.run_id)
    assert evaluate.shares_private_examples(run.info.run_id, "mnist-test") == [
        "MNIST's test split (the private set of the experiment's run on-test)"]
    mlflow.set_tracking_uri(None)


def test_samples_prepared_from_mnist_against_private_shards_of_its_digits_are_compared_by_pixels(tmp_path):
    """Shards prepared from MNIST's val split (JPEG: no byte in common) evaluated against private shards of
    val digits (PNG, their meta.json gone): the private shards' pixels are compared with the split the
    samples' meta.json names, so the scores are refused; against test digits nothing is shared."""
    from trainer.config import DataSource
    from trainer.data.shards import WriteOptions, write_shards
    from trainer.data.sources import mnist_source
    write_shards(mnist_source("val"), tmp_path / "samples", WriteOptions(limit=8, image_format="jpg"),
                 progress_bar=False)
    for split in ("val", "test"):
        write_shards(mnist_source(split), tmp_path / split, WriteOptions(limit=8), progress_bar=False)
        (tmp_path / split / "meta.json").unlink()  # what they were prepared from is forgotten
    shared = evaluate._shared_with(str(tmp_path / "samples"), DataSource(source="shards", path=str(tmp_path / "val")))
    assert shared and "shard images whose pixels are digits of MNIST's val split" in shared[0]
    assert evaluate._shared_with(str(tmp_path / "samples"),
                                 DataSource(source="shards", path=str(tmp_path / "test"))) == []
