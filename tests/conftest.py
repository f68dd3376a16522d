"""Helpers shared by the test modules."""
from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
BENCH_DIR = ROOT / "bench"


@pytest.fixture(autouse=True, scope="session")
def _session_in_tmp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Module- and session-scoped fixtures start in a folder of their own too (they run before ``_work_in_tmp``)."""
    old = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("cwd"))
    yield
    os.chdir(old)


@pytest.fixture(autouse=True)
def _work_in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test runs in its own folder: what the code writes relative to the working folder
    (MLflow puts a sqlite store's artifacts in ``./mlruns``, stages their ``runs/``) stays out of the checkout."""
    monkeypatch.chdir(tmp_path)


_CHECKOUT = pytest.StashKey[set]()  # the checkout's top-level names when the session starts


def _outputs(root: Path) -> set[str]:
    return {p.name for p in root.iterdir() if not p.name.startswith(".") and p.name != "__pycache__"
            and not p.name.endswith(".egg-info")}


def pytest_sessionstart(session: pytest.Session) -> None:
    session.config.stash[_CHECKOUT] = _outputs(ROOT)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """A session that leaves new files in the checkout fails: runs of the suite would pile them up."""
    new = sorted(_outputs(ROOT) - session.config.stash.get(_CHECKOUT, _outputs(ROOT)))
    if new:
        print(f"\nerror: the tests left {new} in {ROOT}", file=sys.stderr)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def load_bench(name: str) -> ModuleType:
    """The script ``bench/<name>.py`` as a module (registered in ``sys.modules``: dataclasses look it up)."""
    spec = importlib.util.spec_from_file_location(name, BENCH_DIR / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def torch_threads_restored() -> Iterator[None]:
    """Benches set torch's thread count; the next tests get the one they had."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@contextlib.contextmanager
def mlflow_store(root: Path) -> Iterator[Path]:
    """MLflow tracks into ``root/mlflow.db`` inside the block; the previous setting comes back after."""
    old = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root}/mlflow.db"
    try:
        yield root
    finally:
        if old is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = old


def assert_engine_matches_brute_force(model: torch.nn.Module, losses_of: Callable[[torch.Tensor], torch.Tensor],
                                      n: int, rtol: dict[str, float] | None = None) -> None:
    """The DP engine (fast and reference modes, noise off) against a brute-force loop: one backward per
    example, flatten, clip to C, sum. C is the median per-example norm, so some examples are clipped and
    some are not. ``losses_of(rows)`` must be deterministic (the model in eval mode)."""
    from trainer.privacy import DPGradientEngine
    rtol = rtol or {"fast": 1e-4, "reference": 1e-4}
    params = [p for p in model.parameters() if p.requires_grad]
    flat = torch.stack([torch.cat([g.flatten() for g in torch.autograd.grad(losses_of(torch.tensor([i])).sum(),
                                                                             params)]).double() for i in range(n)])
    C = float(flat.norm(dim=1).median())
    want = ((C / (flat.norm(dim=1) + 1e-6)).clamp(max=1)[:, None] * flat).sum(0)
    for mode, tolerance in rtol.items():
        engine = DPGradientEngine(model, C, 0.0, 1.0, mode=mode)
        engine.check(losses_of, n)
        engine.accumulate(losses_of(torch.arange(n)))
        engine.finalize()
        engine.detach()
        got = torch.cat([p.grad.flatten() for p in params]).double()
        model.zero_grad(set_to_none=True)
        assert float((got - want).norm() / want.norm()) < tolerance, mode
