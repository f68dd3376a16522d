"""MLflow tracking: every stage is one run (params = the resolved config, metrics, artifacts).

The store is MLflow's default (sqlite ``./mlflow.db``, artifacts in ``./mlruns``) unless
``MLFLOW_TRACKING_URI`` is set. Only the process with ``RANK`` 0 (or no RANK) logs.
"""
from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

from trainer.config import flatten


PARAM_CHARS = 6000  # MLflow keeps a param value's first 6,000 characters: longer ones are cut here


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


class Run:
    """A thin handle on the active MLflow run; a no-op on non-main ranks."""

    def __init__(self, active: bool):
        self.active = active
        self.run_id: Optional[str] = None
        if active:
            import mlflow
            self._mlflow = mlflow
            self.run_id = mlflow.active_run().info.run_id

    def log_params(self, params: dict) -> None:
        if self.active:
            flat = {k: str(v)[:PARAM_CHARS] for k, v in flatten(params).items()}
            items = list(flat.items())
            for i in range(0, len(items), 100):  # MLflow caps a batch at 100 params
                self._mlflow.log_params(dict(items[i:i + 100]))

    def log_metrics(self, metrics: dict[str, float], step: Optional[int] = None) -> None:
        if self.active:
            self._mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)

    def log_artifact(self, path: str | Path, artifact_path: Optional[str] = None) -> None:
        if self.active:
            self._mlflow.log_artifact(str(path), artifact_path=artifact_path)

    def set_tags(self, tags: dict[str, str]) -> None:
        if self.active:
            self._mlflow.set_tags(tags)

    def log_result(self, run_dir: Path, *artifacts: Path) -> None:
        """A stage's end: its artifacts (grids, reports, ``config.yaml``) and the checkpoint folder as a tag."""
        for path in (*artifacts, run_dir / "config.yaml"):
            self.log_artifact(path)
        self.set_tags({"checkpoint": str(Path(run_dir).resolve())})

    def log_pipeline(self, run_dir: Path, weights: list[str]) -> None:
        """The run's own files (``weights``: trained parameters, their description, the privacy report)
        as artifacts under ``weights/``, and the whole pipeline (with its base and autoencoder) as the
        run's logged model ``model``: ``mlflow.pyfunc.load_model("runs:/<run id>/model")`` samples from it."""
        if not self.active:
            return
        for name in weights:
            self.log_artifact(Path(run_dir) / name, "weights")
        from trainer.mlflow_model import log_pipeline_model
        log_pipeline_model(run_dir)


@contextlib.contextmanager
def start_run(experiment: str, run_name: str, config: Optional[dict] = None,
              tags: Optional[dict[str, str]] = None, run_id: Optional[str] = None) -> Iterator[Run]:
    """Open (or resume, with ``run_id``) an MLflow run; log the config as params.

    The run ends FINISHED, KILLED when interrupted (Ctrl-C: the stage resumes), or FAILED.
    """
    if not is_main_process():
        yield Run(active=False)
        return
    import mlflow
    mlflow.set_experiment(experiment)
    if run_id is not None and not store_has_run(run_id):
        # The checkpoint was trained under another tracking store (a moved folder, another
        # MLFLOW_TRACKING_URI): its history stays there, the resumed steps go to a new run here.
        print(f"note: MLflow run {run_id} of this checkpoint is not in {mlflow.get_tracking_uri()}; "
              f"logging the resumed {run_name} to a new run", file=sys.stderr)
        tags = {**(tags or {}), "resumed_from_run": run_id}
        run_id = None
    mlflow.start_run(run_name=None if run_id else run_name, run_id=run_id)
    status = "FAILED"
    try:
        run = Run(active=True)
        if tags:
            run.set_tags(tags)
        if config is not None and run_id is None:
            run.log_params(config)
        yield run
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        mlflow.end_run(status)


def store_has_run(run_id: str) -> bool:
    import mlflow
    from mlflow.exceptions import MlflowException
    try:
        mlflow.get_run(run_id)
    except MlflowException:
        return False
    return True


def tracking_hint() -> str:
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return f"mlflow ui --backend-store-uri {uri}"
    return f"mlflow ui --backend-store-uri sqlite:///{Path('mlflow.db').resolve()}"


def unreachable_server(timeout_s: float = 10.0) -> Optional[str]:
    """Why the tracking server ``MLFLOW_TRACKING_URI`` names (http or https) cannot be reached, else None
    (a server that answers at all, or a local store). MLflow itself retries for minutes, silently."""
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    if not uri.startswith(("http://", "https://")):
        return None
    import requests
    insecure = os.environ.get("MLFLOW_TRACKING_INSECURE_TLS", "").lower() == "true"  # MLflow's own settings
    verify = False if insecure else os.environ.get("MLFLOW_TRACKING_SERVER_CERT_PATH") or True
    try:
        requests.get(uri.rstrip("/") + "/health", timeout=timeout_s, verify=verify)
    except requests.RequestException as err:
        return f"{shown_uri(uri)} cannot be reached ({type(err).__name__})"
    return None


def shown_uri(uri: str) -> str:
    """``uri`` with any user and password in it replaced by ``***`` (for messages)."""
    from urllib.parse import urlsplit, urlunsplit
    parts = urlsplit(uri)
    if "@" not in parts.netloc:
        return uri
    return urlunsplit(parts._replace(netloc="***@" + parts.netloc.rsplit("@", 1)[1]))


def missing_store() -> Optional[str]:
    """The sqlite file of the tracking store when it does not exist yet (or is no SQLite database), else None.

    Reading runs from a store that is not there would create it (an empty ``mlflow.db``): the
    commands that only read check this first and refuse instead.
    """
    import mlflow
    uri = mlflow.get_tracking_uri()
    if not uri.startswith("sqlite:///"):
        return None  # a server or a file store: nothing is created by reading it
    path = Path(uri[len("sqlite:///"):])
    try:
        with open(path, "rb") as fh:
            sqlite = fh.read(16) == b"SQLite format 3\x00" or path.stat().st_size == 0
        return None if sqlite else f"{path} (a file that is no SQLite database)"
    except OSError:
        return str(path)


def find_run_by_checkpoint(experiment: str, run_dir: Path) -> Optional[str]:
    """The id of the newest MLflow run of ``experiment`` tagged with this checkpoint folder."""
    if not is_main_process():
        return None
    import mlflow
    exp = mlflow.get_experiment_by_name(experiment)
    if exp is None:
        return None
    path = str(Path(run_dir).resolve()).replace("'", "\\'")
    runs = mlflow.search_runs(experiment_ids=[exp.experiment_id], filter_string=f"tags.checkpoint = '{path}'",
                              order_by=["attributes.start_time DESC"], max_results=1, output_format="list")
    return runs[0].info.run_id if runs else None


@dataclass(frozen=True)
class LoggedDPRun:
    """A DP fine-tune as its MLflow run records it: ``params`` (the config and the privacy plan, as
    strings), ``checkpoint`` (its folder, tagged when it ended) and ``steps`` (its steps taken, logged
    when it ended; None before)."""
    run_id: str
    name: str
    checkpoint: Optional[str]
    params: dict
    steps: Optional[int]


def logged_dp_runs(experiment: str) -> list[LoggedDPRun]:
    """Every DP fine-tune (tag ``privacy: dp-sgd``) of the MLflow experiment ``experiment`` in the
    tracking store, all pages; [] when the store or the experiment does not exist (nothing is created)."""
    if missing_store() is not None:
        return []
    import mlflow
    from mlflow import MlflowClient
    from mlflow.entities import ViewType
    found = mlflow.get_experiment_by_name(experiment)
    if found is None:
        return []
    client, out, token = MlflowClient(), [], None
    while True:  # every page: a run left out would leave its steps uncounted
        # deleted runs too: a run in the trash keeps its model until the store's garbage collection
        page = client.search_runs([found.experiment_id], "tags.privacy = 'dp-sgd'", run_view_type=ViewType.ALL,
                                  max_results=1000, page_token=token)
        for run in page:
            steps = run.data.metrics.get("privacy.steps")
            out.append(LoggedDPRun(run.info.run_id, run.info.run_name or "", run.data.tags.get("checkpoint"),
                                   dict(run.data.params), None if steps is None else int(steps)))
        token = page.token
        if not token:
            return out
