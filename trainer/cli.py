"""``dpldm``: the command line. Each stage module registers its own sub-command.

Errors a user can act on (a bad key, a missing file, a refused plan) are printed as one line
``dpldm <cmd>: error: ...`` (exit 2 for usage and config, 1 at run time); ``DPLDM_DEBUG=1``
shows the traceback instead.
"""
from __future__ import annotations

import argparse
import importlib
import os
import re
import sys

from trainer.config import QUICK_DEMO, ConfigError, dump_config, load_config
from trainer.errors import DataError, RunError, UsageError, first_line, user_message

STAGE_MODULES = [
    "trainer.stages.prepare",
    "trainer.stages.encode",
    "trainer.stages.pretrain_ae",
    "trainer.stages.pretrain_ldm",
    "trainer.stages.finetune",
    "trainer.stages.sample",
    "trainer.stages.evaluate",
    "trainer.stages.import_compvis",
    "trainer.stages.demo",
]


def plain(doc: str | None) -> str:
    """A docstring as plain help text: reStructuredText roles and literals unwrapped."""
    text = re.sub(r":[a-z]+:`~?([^`]+)`", r"\1", doc or "")
    return re.sub(r"``([^`]+)``", r"\1", text).strip()


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed
    try:
        return installed("dpldm")
    except PackageNotFoundError:
        return "unknown (not installed)"


def number_in_range(text: str, kind: type, low: float, noun: str, high: float | None = None):
    """``text`` as a finite ``kind`` (int or float) >= ``low`` (and <= ``high``), else argparse's error."""
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {noun}") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    if high is not None and not low <= value <= high:
        raise argparse.ArgumentTypeError(f"must be in [{low}, {high}], got {value}")
    if value < low:
        raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
    return value


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    return number_in_range(text, int, 1, "an integer")


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    return number_in_range(text, int, 0, "an integer")


def non_negative_float(text: str) -> float:
    """argparse type: a number >= 0."""
    return number_in_range(text, float, 0, "a number")


def unit_float(text: str) -> float:
    """argparse type: a number in [0, 1]."""
    return number_in_range(text, float, 0, "a number", high=1)


def add_config_args(p: argparse.ArgumentParser) -> None:
    """``--config NAME_OR_PATH`` plus ``key=value`` overrides (e.g. ``finetune.epsilon=5``)."""
    p.add_argument("--config", default="demo",
                   help="experiment YAML: a path, or a name from configs/ (default: demo)")
    p.add_argument("--seed", type=int, help="override the config's seed")
    p.add_argument("--output-dir", help="override output_dir (runs are written to OUTPUT_DIR/EXPERIMENT/STAGE)")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved config (after overrides) as YAML and exit without running")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="config overrides, dotted keys, values in YAML (e.g. finetune.steps=50 ldm.train.lr=2e-4)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dpldm",
        description="Differentially private latent diffusion models: public pretraining, DP-SGD fine-tuning "
                    "of the attention modules, sampling and evaluation. Every stage is logged to MLflow.")
    parser.add_argument("--version", action="version", version=f"dpldm {version()}")
    # the deepspeed launcher passes --local_rank=N before the sub-command; the rank comes from the environment
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in STAGE_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def _config_of(args: argparse.Namespace):
    overrides = (QUICK_DEMO if getattr(args, "quick", False) else []) + list(args.overrides)
    if args.seed is not None:
        overrides.append(f"seed={args.seed}")
    if args.output_dir:
        overrides.append(f"output_dir={args.output_dir}")
    return load_config(args.config, overrides)


# what an interrupted command leaves, and how to go on (the stages resume from their checkpoints)
RESUMES = {"pretrain-ae", "pretrain-ldm", "finetune", "demo", "encode"}
TRACKED = {"pretrain-ae", "pretrain-ldm", "finetune", "demo", "audit", "evaluate", "compare"}  # use the store


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except KeyboardInterrupt:  # before the command started (imports, parsing)
        print("dpldm: interrupted", file=sys.stderr)
        return 130


def _main(argv: list[str] | None) -> int:
    from trainer.eval.images import ImageSetError
    from trainer.models.checkpoint import CheckpointError

    parser = build_parser()
    args = parser.parse_args(argv)
    prefix = f"dpldm {args.command}"
    try:
        if hasattr(args, "overrides") and args.command != "demo":
            args.config_obj = _config_of(args)
            if args.print_config:
                dump_config(args.config_obj, sys.stdout)
                return 0
        if args.command in TRACKED and not (args.command == "evaluate" and not (args.run or args.checkpoint)):
            from trainer.tracking import unreachable_server
            server = unreachable_server()
            if server:  # before any work: MLflow would retry for minutes, silently
                raise RunError(f"MLflow tracking server (MLFLOW_TRACKING_URI): {server}")
        return int(args.func(args) or 0)
    except (ConfigError, UsageError) as err:
        if os.environ.get("DPLDM_DEBUG"):
            raise
        kind = "config error" if isinstance(err, ConfigError) else "error"
        print(f"{prefix}: {kind}: {err}", file=sys.stderr)
        return 2
    # OSError: a file where a folder must be, ...; DataError: a shard's sample that cannot be read
    except (RunError, DataError, OSError, CheckpointError, ImageSetError) as err:
        if os.environ.get("DPLDM_DEBUG"):
            raise
        print(f"{prefix}: error: {user_message(err)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        again = ("; run the same command again to resume" if args.command in RESUMES else
                 "; run it again with --resume to go on" if args.command == "prepare" else "")
        print(f"{prefix}: interrupted{again}", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - the tracking store's errors: one line, the setting named
        if os.environ.get("DPLDM_DEBUG") or not type(err).__module__.startswith("mlflow"):
            raise
        from trainer.tracking import shown_uri
        store = shown_uri(os.environ.get("MLFLOW_TRACKING_URI") or "unset: ./mlflow.db")
        print(f"{prefix}: error: MLflow: {first_line(err).strip()} (tracking store MLFLOW_TRACKING_URI={store})",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
