"""Public pretraining on several processes (torchrun, gloo on CPU) against the one-process update.

Run as a script by the tests: ``python -m torch.distributed.run --nproc_per_node 2 THIS_FILE update OUT``.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from trainer.config import load_config
from trainer.runtime import Runtime

BATCH, LR = 8, 0.5


def tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.SiLU(), torch.nn.Linear(16, 3))


def fixed_batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(BATCH, 6, generator=g), torch.randint(0, 3, (BATCH,), generator=g)


def update(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, rt: Runtime) -> None:
    """One data-parallel SGD step: this rank's mean loss, gradients averaged over the ranks."""
    params = list(model.parameters())
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    rt.average_gradients(params)
    with torch.no_grad():
        for p in params:
            p -= LR * p.grad
            p.grad = None


def _worker_update(out: str) -> None:
    rt = Runtime.start(load_config("demo", ["device=cpu"]))
    model = tiny_model()
    if rt.rank:  # a rank that starts elsewhere is brought to rank 0's weights
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
    rt.broadcast_parameters(model)
    x, y = fixed_batch()
    rows = slice(rt.rank, None, rt.world_size)  # each rank its own examples
    for _ in range(2):
        update(model, x[rows], y[rows], rt)
    assert rt.world_size == 2 and rt.sum_over_ranks([1.0, rt.rank]) == [2.0, 1.0]
    assert rt.any_rank(rt.rank == 1) and not rt.any_rank(False) and rt.broadcast(10.0 + rt.rank) == 10.0
    if rt.is_main:
        torch.save({k: v.detach() for k, v in model.state_dict().items()}, out)
    rt.close(finished=True)


def _run(cmd: list[str], cwd: Path, env_extra: dict | None = None) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def _torchrun(nproc: int, *args: str) -> list[str]:
    from trainer.distributed import _free_port
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
            str(_free_port()), *args]


def test_a_runtime_waits_for_every_rank_before_leaving_only_when_the_work_finished(monkeypatch):
    """``with runtime:`` ends in a barrier then the group's teardown on success (no rank tears its
    connections down while another still writes), and in the teardown alone after an error (the
    other ranks may never reach a barrier)."""
    import torch.distributed as dist
    calls: list[str] = []
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "barrier", lambda: calls.append("barrier"))
    monkeypatch.setattr(dist, "destroy_process_group", lambda: calls.append("destroy"))

    def joined() -> Runtime:
        rt = Runtime(rank=1, world_size=2)
        rt._joined = True
        return rt

    with joined():
        pass
    assert calls == ["barrier", "destroy"]
    calls.clear()
    with pytest.raises(ValueError):
        with joined():
            raise ValueError("a rank failed")
    assert calls == ["destroy"]
    calls.clear()
    rt = joined()
    rt.close(finished=True)
    rt.close(finished=True)  # leaves once
    assert calls == ["barrier", "destroy"]


def test_two_process_update_equals_the_one_process_update(tmp_path):
    _run(_torchrun(2, __file__, "update", str(tmp_path / "two.pt")), tmp_path)
    model = tiny_model()
    x, y = fixed_batch()
    for _ in range(2):
        update(model, x, y, Runtime())
    two = torch.load(tmp_path / "two.pt", weights_only=True)
    for name, value in model.state_dict().items():
        assert torch.allclose(two[name], value, atol=1e-6), name


@pytest.mark.slow
def test_pretraining_on_two_processes_writes_once_and_resumes_on_one(tmp_path):
    """pretrain-ae and pretrain-ldm under torchrun (2 ranks, gloo): rank 0 alone writes the run folders and
    the MLflow runs; the LDM then resumes on one process from the step the two ranks reached."""
    tiny = ["experiment=dp2", "data.public.num_examples=260", "autoencoder.train.steps=4",
            "autoencoder.train.batch_size=8", "autoencoder.train.checkpoint_every=2", "ldm.train.steps=4",
            "ldm.train.batch_size=8", "ldm.train.checkpoint_every=2", "sample.ddim_steps=2", "sample.num_per_class=1",
            f"output_dir={tmp_path / 'runs'}"]
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db"}
    for stage in ("pretrain-ae", "pretrain-ldm"):
        log = _run(_torchrun(2, "-m", "trainer.cli", stage, "--config", "demo", *tiny), tmp_path, env)
        assert "2 processes" in log, log[-2000:]
    ldm = tmp_path / "runs" / "dp2" / "ldm"
    state = torch.load(ldm / "train-state.pt", weights_only=True)
    assert state["step"] == 4 and state["world_size"] == 2
    assert not list(ldm.glob("*.tmp")), "no half-written file from a second writer"
    _run([sys.executable, "-m", "trainer.cli", "pretrain-ldm", "--config", "demo", *tiny, "ldm.train.steps=6"],
         tmp_path, env)
    assert torch.load(ldm / "train-state.pt", weights_only=True)["step"] == 6
    import mlflow
    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    try:
        runs = mlflow.search_runs(experiment_names=["dp2"], output_format="list")
    finally:
        mlflow.set_tracking_uri(None)
    assert sorted(r.info.run_name for r in runs) == ["pretrain-ae", "pretrain-ldm"], "one run per stage"
    assert json.loads((ldm / "ldm.json").read_text())["latent_shape"]


if __name__ == "__main__":
    if sys.argv[1] == "update":
        _worker_update(sys.argv[2])
