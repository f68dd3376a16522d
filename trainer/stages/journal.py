"""A DP run's journal, and one session's claim on its run folder.

A fine-tune or audit journals its privacy plan and the steps it has charged in its folder's
``ledger.json`` before every step (``trainer.stages.spend`` reads the journals of the experiment's
runs to total a private set's spend). Here: loading a run's journal into its ledger on resume
(refusing a lost, older or changed one), and holding the run folder for one session while it
charges steps, admitted under the experiment's ``finetune.total_epsilon``.
"""
from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Union

from trainer.config import Config, ConfigError
from trainer.distributed import Checkpoint
from trainer.errors import RunError
from trainer.io import try_lock, write_json
from trainer.stages.spend import (DP_TRACES, EXPERIMENT_LOCK_FILE, LEDGER_FILE, LOCK_FILE, Spend, experiment_spend,
                                  ledger_field)

if TYPE_CHECKING:
    from trainer.distributed import DistributedRun, SingleProcess


def write_journal(run_dir: Path, ledger, mlflow_run_id: str | None = None) -> None:
    """``ledger.json``: the ledger's state and the id of the run's MLflow run (``mlflow_run_id``, else
    the one the journal already names), so that the spend knows which logged run this folder holds."""
    run_id = mlflow_run_id or ledger_field(run_dir, "mlflow_run_id")
    write_json({**ledger.state_dict(), **({"mlflow_run_id": run_id} if run_id else {})}, run_dir / LEDGER_FILE)


def load_journal(run_dir: Path, ledger) -> None:
    """Load the run's ledger journal into ``ledger``; refuse when it is missing from a started run
    or records another plan or another private set."""
    path = run_dir / LEDGER_FILE
    traces = [name for name in DP_TRACES if (run_dir / name).exists()]
    if not path.is_file():
        if traces:
            raise RunError(f"{path}: missing, but the run folder holds {', '.join(traces)}: the steps already "
                           "charged cannot be recovered and the run is never re-accounted from zero; restore "
                           "ledger.json, or start another run (finetune.name=...)")
        return
    try:
        ledger.load_state_dict(json.loads(path.read_text()))
    except (ValueError, KeyError) as err:
        raise ConfigError(f"{path}: {err}: the privacy plan of a run and its private set (data.private) cannot "
                          "change once it has started (start another run with finetune.name=..., or restore the "
                          "run's settings)") from None


@contextmanager
def session_lock(cfg: Config, run_dir: Path, ledger, rt: Union["SingleProcess", "DistributedRun"]) -> Iterator[None]:
    """Hold the run folder for this session (rank 0 decides, see :func:`_claim`); a refusal is
    raised on every rank (RunError) before any step."""
    handle, problem = None, None
    if rt.is_main:
        try:
            handle, problem = _claim(cfg, run_dir, ledger)
        except Exception as err:  # noqa: BLE001 - the other ranks wait in the collective below
            problem = f"{run_dir}: {err}"
    try:
        if rt.any_rank(problem is not None):
            raise RunError(problem or "refused on rank 0 (its message says why)")
        yield
    finally:
        if handle is not None:
            handle.close()


def _claim(cfg: Config, run_dir: Path, ledger) -> tuple[object | None, str | None]:
    """Lock the run folder (creating it) and admit the session (:func:`_admit`) -> (lock handle,
    None), or (None, why not)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    handle = try_lock(run_dir / LOCK_FILE)
    if handle is None:
        return None, (f"{run_dir}: another session is running this run ({(run_dir / LOCK_FILE).read_text().strip()}); "
                      "wait for it to end or stop it")
    try:
        problem = _admit(cfg, run_dir, ledger)
    except BaseException:
        handle.close()
        raise
    if problem:
        handle.close()
        return None, problem
    return handle, None


def _admit(cfg: Config, run_dir: Path, ledger) -> str | None:
    """Why this session may not charge the run (None: it may, and its plan is journaled): another
    session charged steps since this one read the journal (two would each count only their own),
    or the plan would now take the private set past ``finetune.total_epsilon`` (a run of the
    experiment started meanwhile). The cap check and the journal happen under the experiment's
    lock, so runs starting together see each other."""
    journal = run_dir / LEDGER_FILE
    if (json.loads(journal.read_text())["steps_taken"] if journal.is_file() else 0) != ledger.steps_taken:
        return (f"{journal}: another session charged steps since this one read it ({ledger.steps_taken} then); "
                "start again to go on from there")
    experiment = try_lock(run_dir.parent / EXPERIMENT_LOCK_FILE, wait_s=120)
    if experiment is None:
        return f"{run_dir.parent / EXPERIMENT_LOCK_FILE}: held by another session for 2 minutes; try again"
    try:
        problem = over_total(cfg, run_dir, ledger) if cfg.finetune.total_epsilon is not None else None
        if problem:
            return problem
        write_journal(run_dir, ledger)  # visible to the experiment's other runs from now on
    finally:
        experiment.close()
    return None


def over_total(cfg: Config, run_dir: Path, ledger) -> str | None:
    """Why this run's plan may not start under ``finetune.total_epsilon`` (None: it may)."""
    cap = cfg.finetune.total_epsilon
    try:
        spend = experiment_spend(cfg, run_dir.name, ledger)
    except Exception as err:  # noqa: BLE001 - a cap that cannot be checked refuses
        return f"finetune.total_epsilon: the private set's total over the experiment's runs cannot be computed: {err}"
    return f"finetune.total_epsilon: {cap:g} would be exceeded: {spend.line()}" if spend.epsilon > cap else None


def spend_or_warn(cfg: Config, run: str, ledger, command: str = "finetune") -> Spend | None:
    """The private set's total over the experiment's runs (``experiment_spend``) for the report of
    a run that has ended, or None with a warning when another run's record cannot be read (the
    run's own report does not depend on it)."""
    try:
        return experiment_spend(cfg, run, ledger)
    except Exception as err:  # noqa: BLE001 - rank 0 alone computes it, the others wait in collectives
        print(f"dpldm {command}: warning: the private set's total over the experiment's runs is not reported: {err}",
              file=sys.stderr)
        return None


def check_journal_covers(run_dir: Path, ledger, checkpoint: Checkpoint) -> None:
    """Refuse a journal (loaded by :func:`load_journal`) that counts fewer steps than the checkpoint."""
    path = run_dir / LEDGER_FILE
    charged = max(checkpoint.step, checkpoint.steps_charged)
    if ledger.steps_taken < charged:
        raise RunError(f"{path}: counts {ledger.steps_taken} steps, but the checkpoint is at step {checkpoint.step} "
                       f"with {checkpoint.steps_charged} charged: the journal is behind (an older copy?); restore it")
