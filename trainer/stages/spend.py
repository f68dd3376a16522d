"""What a private set has spent over the DP runs of one experiment, together.

Each fine-tune or audit on private data journals its plan and its steps in its folder's
``ledger.json`` before every step (its report has them too), and its private source in
``config.yaml``. Someone in the private sets of several runs is in all of their releases, so
their guarantees compose. The runs that count for a private set are the experiment's runs whose
sets are not provably disjoint from it (``trainer.data.provenance``: MNIST parts that do not
meet, or other shard files of one prepared folder with no image in common, the folder not prepared
again since the run; anything else counts),
and every folder with a DP run's traces (a lost record refuses), each for its steps
taken once it has ended (a report is written) and for its planned steps while it may still
resume.

The experiment's folder is searched, and the MLflow experiment of its name: a DP fine-tune whose
folder is gone counts from its logged plan. Runs on the same people under another experiment name or
tracking store, and runs started at the same moment, are not seen.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from trainer.distributed.checkpoint import CHECKPOINTS, EMA_FILE, STATE_FILE, WEIGHTS_FILE
from trainer.errors import RunError
from trainer.stages.common import PRIVACY_REPORT

LEDGER_FILE = "ledger.json"  # a DP run's plan and steps taken, written before each step
LOCK_FILE = ".session.lock"  # held by the session charging the run (trainer.io.try_lock)
EXPERIMENT_LOCK_FILE = ".experiment.lock"  # held while a run checks the total and journals its plan
AUDIT_REPORT = "audit-report.json"
ENDED = (PRIVACY_REPORT, AUDIT_REPORT)  # a run folder holding one of these has ended
# What a DP run writes in its folder only after its journal has charged a step: a folder holding any of them is
# a DP run whose steps count (with its records lost, what would have to count them refuses). Not finetune.json
# or config.yaml: a session that stopped before its first step leaves them and has charged nothing.
DP_TRACES = (WEIGHTS_FILE, EMA_FILE, STATE_FILE, CHECKPOINTS, *ENDED)


@dataclass(frozen=True)
class Charge:
    """One run's DP-SGD steps on the private set."""
    run: str                 # the run's folder name
    noise_multiplier: float
    sample_rate: float
    steps: int               # steps taken once ended, else planned
    delta: float
    ended: bool
    why: str                 # why it counts: what its set shares with this one, in words


@dataclass(frozen=True)
class Spend:
    """The runs together: ``(epsilon, delta)``-DP for anyone in the private set."""
    charges: tuple[Charge, ...]
    epsilon: float
    delta: float

    def line(self) -> str:
        runs = ", ".join(c.run + ("" if c.ended else f" (planned {c.steps} steps)") for c in self.charges)
        return (f"the experiment's {len(self.charges)} DP run(s) on this private set ({runs}) are "
                f"({self.epsilon:.4g}, {self.delta:g})-DP together")

    def to_dict(self) -> dict:
        return {"epsilon": self.epsilon, "delta": self.delta,
                "runs": [{"run": c.run, "noise_multiplier": c.noise_multiplier, "sample_rate": c.sample_rate,
                          "steps": c.steps, "delta": c.delta, "ended": c.ended, "counts_because": c.why}
                         for c in self.charges],
                "composition": "PRV accountant over all the runs' Poisson-subsampled Gaussian steps (adaptive "
                               "composition) at this delta"}


def _recorded_private(run_dir: Path) -> tuple[Any, str]:
    """The private set the config of the run in ``run_dir`` records -> (``DataSource``, "") or (None, why
    it cannot be read)."""
    from trainer.config import ConfigError, load_config
    path = run_dir / "config.yaml"
    try:
        theirs = load_config(str(path)).data.private
    except (ConfigError, OSError, ValueError) as err:
        return None, f"{path}: {err}"
    return (theirs, "") if theirs is not None else (None, f"{path} names none")


def ledger_field(run_dir: Path, *keys: str) -> Any:
    """``ledger.json[keys[0]][keys[1]]...`` of the run in ``run_dir``, or None."""
    try:
        value = json.loads((run_dir / LEDGER_FILE).read_text())
        for key in keys:
            value = value[key]
        return value
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _prepared_again(recorded: Any, theirs: Any) -> list[str]:
    """The folders of a run's private shards ``theirs`` prepared again since the run recorded their
    preparation ids (``recorded``, from its ledger; None or {} when it recorded none: then any id now
    is another preparation): the shard names there now hold other images than it trained on."""
    from trainer.data.provenance import preparations
    recorded = recorded if isinstance(recorded, dict) else {}
    return [folder for folder, now in preparations(theirs).items() if recorded.get(folder) != now]


def _why(private: Any, theirs: Any, recorded_preparations: Any) -> str:
    """Why a run on the private set ``theirs`` counts for ``private`` ('' only when the two provably
    share nothing)."""
    from trainer.data.provenance import provably_disjoint, shared_examples
    shared = shared_examples(private, theirs)
    if shared:
        return "; ".join(shared)
    if provably_disjoint(private, theirs):
        again = _prepared_again(recorded_preparations, theirs)
        return "" if not again else f"its private shards' folder {again[0]} was prepared again since it ran: " \
                                    "what it trained on cannot be shown disjoint from this set"
    return f"its private set ({theirs.source} {theirs.path or theirs.split}) cannot be shown disjoint from this one"


def _shares(private: Any, run_dir: Path) -> str:
    """Why the run in ``run_dir`` counts for ``private`` ('' only when its set provably shares nothing)."""
    theirs, unreadable = _recorded_private(run_dir)
    if theirs is None:
        return f"its private set cannot be read ({unreadable})"
    return _why(private, theirs, ledger_field(run_dir, "private_set", "preparations"))


def _journal(run_dir: Path) -> tuple[Path, dict]:
    """The run's record of its DP steps: its ledger journal, else (an older run, a lost journal) its
    report; raises RunError when it cannot be read."""
    for name in (LEDGER_FILE, PRIVACY_REPORT, AUDIT_REPORT):
        path = run_dir / name
        if path.is_file():
            try:
                state = json.loads(path.read_text())
                steps = _whole(state["steps"] if name != LEDGER_FILE else state["steps_taken"])
                return path, {"noise_multiplier": float(state["noise_multiplier"]),
                              "sample_rate": float(state["sample_rate"]), "delta": float(state["delta"]),
                              "taken": steps, "planned": _whole(state.get("planned_steps", steps))}
            except (OSError, ValueError, KeyError, TypeError) as err:
                raise RunError(f"{path}: unreadable ({err}): the privacy this run spent on the experiment's "
                               "private data cannot be counted; restore the file") from None
    raise RunError(f"{run_dir}: holds a DP run's weights or state but no record of its DP steps ({LEDGER_FILE} or "
                   "a report): what it spent on the private set cannot be counted; restore the file")


def _whole(value: Any) -> int:
    """A recorded step count: a whole number >= 0 (a record of 2.9 steps is broken, not 2 steps)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value != int(value) or value < 0:
        raise ValueError(f"steps must be a whole number >= 0, got {value!r}")
    return int(value)


def dp_runs(experiment_dir: Path) -> list[Path]:
    """The folders of ``experiment_dir`` that hold a DP run: a ledger journal or any of ``DP_TRACES`` (a run
    whose records were lost is one too: reading it refuses, rather than leaving its steps out)."""
    return sorted({p.parent for name in (LEDGER_FILE, *DP_TRACES) for p in Path(experiment_dir).glob(f"*/{name}")})


def shared_with_dp_runs(images: Any, experiment_dir: Path) -> list[str]:
    """What the image set ``images`` (a ``DataSource``) shares with the private set of each DP run of
    ``experiment_dir``, in words naming the run ([] for nothing provable): by their settings and
    ``meta.json``, else by their images' content (a copy of the private shards under another name, MNIST
    digits prepared into shards again); the runs whose folder is gone, from their MLflow params. A run
    whose config or private shards cannot be read counts too: nothing could be compared."""
    out, compared = [], {}
    folders = dp_runs(experiment_dir)
    for run_dir in folders:
        theirs, unreadable = _recorded_private(run_dir)
        if theirs is None:
            out.append(f"the private set of the DP run {run_dir} cannot be read ({unreadable})")
            continue
        shared = _shared_with_run(images, theirs, ledger_field(run_dir, "private_set", "preparations"), compared)
        out += [f"{words} (the private set of the DP run {run_dir})" for words in shared]
    for run in _unclaimed_logged_runs(Path(experiment_dir).name, folders):  # their folders are gone
        theirs = _logged_private(run)
        shared = ["its data.private.path was cut in its params: not comparable"] if theirs is None else \
            _shared_with_run(images, theirs, _logged_preparations(run), compared)
        out += [f"{words} (the private set of the DP run {run.name}, MLflow run {run.run_id})" for words in shared]
    return out


def _shared_with_run(images: Any, theirs: Any, recorded_preparations: Any,
                     compared: dict[str, list[str]]) -> list[str]:
    """What ``images`` shares with a run's private set ``theirs``: by settings and ``meta.json``, else by the
    images' content, and any shard of ``images`` in a folder of ``theirs`` prepared again since the run.
    ``compared``: the content comparisons made so far for other runs, by private set (each reads every image
    of both sets: once per private set, however many runs trained on it)."""
    from trainer.data.provenance import images_in_common, preparations, shared_examples
    shared = shared_examples(images, theirs)
    if not shared:
        key = repr(theirs)
        if key not in compared:
            compared[key] = images_in_common(images, theirs)
        shared = compared[key]
    return shared + [f"shards in {folder}, prepared again since the DP run trained on that folder"
                     for folder in _prepared_again(recorded_preparations, theirs) if folder in preparations(images)]


def refuse_private_as_public(public: Any, experiment_dir: Path) -> None:
    """Raise ConfigError when the public set ``public`` (a ``DataSource``) shares examples with the private
    set of a DP run of ``experiment_dir`` (or one that cannot be read): pretraining on them without DP
    would release what those runs protect."""
    from trainer.config import ConfigError
    shared = shared_with_dp_runs(public, experiment_dir)
    if shared:
        raise ConfigError(f"data.public: shares examples with, or cannot be checked against, the private set of a DP "
                          f"run of the experiment ({'; '.join(shared)}): pretraining on them without DP would release "
                          "what that run protects. Pretrain on other data, or in another experiment if they are "
                          "public; restore a run's config.yaml or private shards that cannot be read")


def charges(experiment_dir: Path, private: Any) -> list[Charge]:
    """The runs of ``experiment_dir`` that count for the private set ``private`` (a ``DataSource``):
    every folder with a ledger journal or a privacy or audit report, and every DP fine-tune the MLflow
    experiment of that name holds whose folder is not among them (deleted or moved: its MLflow run,
    where its model is shared, is then the record).

    Raises RunError for a record that cannot be read (its steps would go uncounted).
    """
    out = []
    folders = dp_runs(experiment_dir)
    for run_dir in folders:
        path, state = _journal(run_dir)
        why = _shares(private, run_dir)
        if why:
            ended = any((run_dir / name).is_file() for name in ENDED)
            steps = state["taken"] if ended else max(state["taken"], state["planned"])
            out.append(Charge(run_dir.name, state["noise_multiplier"], state["sample_rate"], steps, state["delta"],
                              ended, why))
    return out + _logged_charges(Path(experiment_dir).name, private, folders)


def _unclaimed_logged_runs(experiment: str, folders: list[Path]) -> list[Any]:
    """The DP fine-tunes of MLflow experiment ``experiment`` (``tracking.LoggedDPRun``) that no folder of
    ``folders`` holds (deleted or moved). A folder holds the run whose id its ledger records (a folder
    whose ledger records none: the run tagged with its path, or of its name)."""
    from trainer.tracking import logged_dp_runs
    ids, names = set(), set()
    for run_dir in folders:
        run_id = ledger_field(run_dir, "mlflow_run_id")
        if run_id:
            ids.add(run_id)
        else:
            names |= {str(run_dir.resolve()), run_dir.name}
    return [run for run in logged_dp_runs(experiment)
            if run.run_id not in ids and (run.checkpoint or run.name) not in names]


def _logged_private(run: Any) -> Any:
    """The private set (a ``DataSource``) a logged DP run's params name, or None when its path was cut
    (not comparable); RunError when they cannot be read."""
    from trainer.config import DataSource
    from trainer.tracking import PARAM_CHARS
    p = run.params
    if len(p.get("data.private.path", "")) >= PARAM_CHARS:
        return None
    try:
        given = {key: p.get(f"data.private.{key}", "None") for key in ("split", "path")}
        return DataSource(source=p["data.private.source"], **{k: v for k, v in given.items() if v != "None"})
    except (KeyError, TypeError) as err:
        raise RunError(f"MLflow run {run.run_id} ({run.name}): its private set cannot be read from its params "
                       f"({err})") from None


def _logged_preparations(run: Any) -> dict:
    """The preparation ids a logged DP run recorded for its private shards' folders ({}: none)."""
    try:
        recorded = json.loads(run.params.get("privacy.preparations", "{}"))
    except ValueError:
        return {}
    return recorded if isinstance(recorded, dict) else {}


def _logged_charges(experiment: str, private: Any, folders: list[Path]) -> list[Charge]:
    """The DP fine-tunes of MLflow experiment ``experiment`` that no folder of ``folders`` holds and
    that count for ``private``, from their logged plan: steps taken once ended, else planned."""
    out = []
    for run in _unclaimed_logged_runs(experiment, folders):
        theirs = _logged_private(run)
        why = "its data.private.path was cut in its params: not comparable" if theirs is None else \
            _why(private, theirs, _logged_preparations(run))
        if not why:
            continue
        p = run.params
        try:
            sigma, q, delta = float(p["privacy.sigma"]), float(p["privacy.q"]), float(p["finetune.delta"])
            steps = run.steps if run.steps is not None else _whole(float(p["finetune.steps"]))
        except (KeyError, ValueError, TypeError) as err:
            raise RunError(f"MLflow run {run.run_id} ({run.name}): its privacy plan cannot be read from its params "
                           f"({err}): what it spent on the experiment's private data cannot be counted") from None
        out.append(Charge(f"{run.name} (MLflow run {run.run_id}, no folder here)", sigma, q, steps, delta,
                          run.steps is not None, why))
    return out


def compose(charges_: Sequence[Charge], delta: float) -> Spend:
    """Bound the runs together at ``delta``: the PRV composition of all their steps. (Adding up
    their epsilons would hold only at the sum of their deltas, which for a few runs passes 1/N.)"""
    from trainer.privacy import Mechanism, composed_epsilon
    mechanisms = [Mechanism(c.noise_multiplier, c.sample_rate, c.steps) for c in charges_]
    return Spend(tuple(charges_), composed_epsilon(mechanisms, delta), delta)


def experiment_spend(cfg: Any, run: str, ledger: Any) -> Spend:
    """The private set ``cfg.data.private`` over the runs of ``cfg``'s experiment at the delta of
    ``ledger`` (a ``PrivacyLedger``), the run in folder ``run`` counted from it (its plan) rather
    than from its journal."""
    own = Charge(run, ledger.noise_multiplier, ledger.sample_rate, ledger.planned_steps, ledger.delta,
                 ledger.steps_taken >= ledger.planned_steps, "this run")
    others = [c for c in charges(Path(cfg.output_dir) / cfg.experiment, cfg.data.private) if c.run != run]
    return compose([*others, own], ledger.delta)
