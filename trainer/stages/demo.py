"""``dpldm demo``: the whole pipeline on the embedded default (configs/demo.yaml).

Rendered letters (public) -> autoencoder and LDM pretraining -> DP fine-tuning on MNIST at
epsilon = 10, delta = 1e-5 (SpatialTransformers + a fresh class embedder) -> DDIM samples of
each digit -> downstream accuracy on the MNIST test split -> MLflow runs with grids, metrics
and the privacy report. ``--quick`` is a smoke run of a
few minutes with the same stages on less data and fewer steps (its numbers mean nothing).
"""
from __future__ import annotations

import argparse
import time

from trainer.config import Config, load_config
from trainer.tracking import tracking_hint

QUICK = [
    "experiment=demo-quick",
    "data.public.num_examples=1040",
    "data.private.num_examples=2000",
    "autoencoder.train.steps=20", "autoencoder.train.batch_size=16", "autoencoder.train.checkpoint_every=10",
    "ldm.train.steps=30", "ldm.train.batch_size=32", "ldm.train.checkpoint_every=10",
    "finetune.steps=4", "finetune.expected_batch_size=64", "finetune.physical_batch_size=32",
    "finetune.log_every=1", "finetune.checkpoint_every=2",
    "sample.ddim_steps=10", "sample.num_per_class=2",
    "eval.num_per_class=10", "eval.num_real=200", "eval.epochs=2",
]


def run_demo(cfg: Config) -> dict:
    from trainer.stages import finetune, pretrain_ae, pretrain_ldm
    t0 = time.time()
    ae_dir = pretrain_ae.run(cfg)
    ldm_dir = pretrain_ldm.run(cfg)
    ft_dir = finetune.run(cfg)
    from trainer.stages.evaluate import evaluate_checkpoint
    metrics = evaluate_checkpoint(ft_dir)
    return {"autoencoder": ae_dir, "ldm": ldm_dir, "finetune": ft_dir, "metrics": metrics,
            "minutes": (time.time() - t0) / 60}


def main(args: argparse.Namespace) -> int:
    overrides = (QUICK if args.quick else []) + list(args.overrides)
    if args.output_dir:
        overrides.append(f"output_dir={args.output_dir}")
    cfg = load_config(args.config, overrides)
    out = run_demo(cfg)
    print("\n== DP-LDM demo finished in {:.1f} min ==".format(out["minutes"]))
    print(f"public letters, pretrained LDM samples: {out['ldm'] / 'samples.png'}")
    print(f"DP fine-tuned digits:                   {out['finetune'] / 'samples.png'}")
    print(f"privacy report:                         {out['finetune'] / 'privacy-report.json'}")
    for key, value in out["metrics"].items():
        print(f"{key}: {value:.4f}")
    print(f"MLflow runs (experiment '{cfg.experiment}'): {tracking_hint()}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the whole pipeline on the embedded default",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a few-minute smoke run (tiny data and steps)")
    p.add_argument("--config", default="demo", help="experiment YAML (default: the embedded demo)")
    p.add_argument("--output-dir", help="override output_dir")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")
    p.set_defaults(func=main)
