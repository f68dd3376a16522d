"""``dpldm``: the command line. Each stage module registers its own sub-command."""
from __future__ import annotations

import argparse
import importlib
import sys

from trainer.config import QUICK_DEMO, ConfigError, load_config
from trainer.errors import RunError

STAGE_MODULES = [
    "trainer.stages.prepare",
    "trainer.stages.encode",
    "trainer.stages.pretrain_ae",
    "trainer.stages.pretrain_ldm",
    "trainer.stages.finetune",
    "trainer.stages.sample",
    "trainer.stages.evaluate",
    "trainer.stages.demo",
]


def add_config_args(p: argparse.ArgumentParser) -> None:
    """``--config NAME_OR_PATH`` plus ``key=value`` overrides (e.g. ``finetune.epsilon=5``)."""
    p.add_argument("--config", default="demo",
                   help="experiment YAML: a path, or a name from configs/ (default: demo)")
    p.add_argument("--seed", type=int, help="override the config's seed")
    p.add_argument("--output-dir", help="override output_dir (runs are written to OUTPUT_DIR/EXPERIMENT/STAGE)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="config overrides, dotted keys, values in YAML (e.g. finetune.steps=50 ldm.train.lr=2e-4)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dpldm",
        description="Differentially private latent diffusion models: public pretraining, DP-SGD fine-tuning "
                    "of the attention modules, sampling and evaluation. Every stage is logged to MLflow.")
    # the deepspeed launcher passes --local_rank=N before the sub-command; the rank comes from the environment
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in STAGE_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if hasattr(args, "overrides") and args.command != "demo":
            overrides = (QUICK_DEMO if getattr(args, "quick", False) else []) + list(args.overrides)
            if args.seed is not None:
                overrides.append(f"seed={args.seed}")
            if args.output_dir:
                overrides.append(f"output_dir={args.output_dir}")
            args.config_obj = load_config(args.config, overrides)
        return int(args.func(args) or 0)
    except ConfigError as err:
        print(f"dpldm {args.command}: config error: {err}", file=sys.stderr)
        return 2
    except RunError as err:
        print(f"dpldm {args.command}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"dpldm {args.command}: interrupted; run the same command again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
