"""A trained pipeline as an MLflow logged model (pyfunc), so runs can be pulled by id and sampled.

The model's artifacts are the run folder with its base LDM and autoencoder (see
:func:`trainer.runs.export_bundle`). ``predict`` takes a table with a ``class`` column (class
models), a ``prompt`` column (text models) or a ``count`` (unconditional), and optional ``seed``
and ``guidance_scale`` parameters (default: the run's ``sample.guidance_scale``, drawn for grids;
a synthetic training set may want the run's ``eval.guidance_scale``); it returns the images as
uint8 arrays [n, H, W, C].

Prompts are the caller's inputs: the bundle holds no private captions to check them against (it is
shared with the model). Images drawn from a private example's caption are not a DP release (`dpldm
sample` refuses such prompts where the private shards are at hand).
"""
from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path

import mlflow.models
import mlflow.pyfunc
import numpy as np
import pandas as pd
import torch
from mlflow.models import ModelSignature
from mlflow.types.schema import ParamSchema, ParamSpec

BUNDLE = "pipeline"
# MLflow passes a caller's params to `predict` only when the signature declares them (else it drops them)
SIGNATURE = ModelSignature(params=ParamSchema([ParamSpec("seed", "long", 0),
                                               ParamSpec("guidance_scale", "double", None)]))


class PipelineModel(mlflow.pyfunc.PythonModel):
    """DDIM sampling from a run folder logged with :func:`log_pipeline_model`."""

    def load_context(self, context) -> None:
        from trainer.runs import load_pipeline
        from trainer.runtime import resolve_device
        self.ldm, self.autoencoder, self.meta, self.cfg = load_pipeline(Path(context.artifacts[BUNDLE]) / "run",
                                                                        resolve_device("auto"))

    # A table type: MLflow infers no schema from it, so it neither validates the input nor warns for a missing hint
    def predict(self, context, model_input: pd.DataFrame, params=None) -> np.ndarray:
        from trainer.runs import generate
        from trainer.stages.common import to_uint8
        columns = model_input if isinstance(model_input, dict) else {c: list(model_input[c]) for c in model_input}
        if "class" in columns:
            conds = torch.tensor([int(c) for c in columns["class"]])
        elif "prompt" in columns:
            conds = [str(p) for p in columns["prompt"]]
        else:
            conds = [None] * int(columns.get("count", [1])[0])
        params = params or {}
        seed = int(params.get("seed", 0))
        scale = params.get("guidance_scale")
        images = generate(self.ldm, self.autoencoder, conds, tuple(self.meta["latent_shape"]), self.cfg,
                          torch.Generator().manual_seed(seed), progress=False,
                          guidance_scale=None if scale is None else float(scale))
        return to_uint8(images)


def log_pipeline_model(run_dir: str | Path, name: str = "model") -> str:
    """Log the pipeline of ``run_dir`` to the active MLflow run as a logged model; returns its URI."""
    from trainer.runs import export_bundle
    quiet = os.environ.get("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    try:
        with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
            # no input example: MLflow would sample from the model to save one
            warnings.filterwarnings("ignore", message=".*An input example was not provided")
            export_bundle(run_dir, Path(tmp) / BUNDLE)
            # "models from code": this file defines the model, so nothing is pickled
            info = mlflow.pyfunc.log_model(name=name, python_model=__file__,
                                           artifacts={BUNDLE: str(Path(tmp) / BUNDLE)},
                                           pip_requirements=["dpldm"], signature=SIGNATURE)
    finally:
        if quiet is None:
            os.environ.pop("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
        else:
            os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = quiet
    return info.model_uri


mlflow.models.set_model(PipelineModel())
