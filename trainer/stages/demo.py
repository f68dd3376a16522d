"""``dpldm demo``: the whole pipeline on the embedded default (configs/demo.yaml).

Rendered letters (public) -> autoencoder and LDM pretraining -> DP fine-tuning on MNIST at
epsilon = 10, delta = 1e-5 (SpatialTransformers + a fresh class embedder) -> DDIM samples of
each digit -> downstream accuracy on the MNIST test split -> MLflow runs with grids, metrics
and the privacy report. ``--quick`` is a one-minute smoke run of the same stages on less data
and fewer steps (its numbers mean nothing). ``--text`` runs the same pipeline text-conditioned
(configs/demo-text.yaml): captioned letters and digits written as webdataset shards, the frozen
MiniLM encoder, samples and evaluation from public prompts. After the main fine-tune, the demo
fine-tunes the same pretrained base again at each budget of the config's ``sweep`` (the embedded
default: epsilon 1; ``--also-epsilon`` gives other budgets), evaluates it, and prints
the quality-vs-epsilon table and plot (``dpldm compare``).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Sequence

from trainer.config import QUICK_DEMO as QUICK
from trainer.config import MAX_EPSILON, SWEEP_KEYS, Config, dump_config, load_config
from trainer.stages.spend import charges, compose
from trainer.tracking import tracking_hint


TEXT_CAPTIONS = {"public": "the letter {label}", "private": "a handwritten digit {label}"}


def prepare_captioned_shards(cfg: Config) -> None:
    """Write the text demo's shards (idempotent) and point ``data.{public,private}.path`` at them.

    Public: ``data.public.num_examples`` rendered letters, in ``<experiment>/data/letters``; private:
    the first ``data.private.num_examples`` MNIST training digits, in ``<experiment>/private/mnist`` (the
    experiment's one folder of private data, never results); each captioned from its label with
    ``dpldm prepare``'s ``--caption-template`` (:data:`TEXT_CAPTIONS`). The digits' captions are
    private data like the digits.
    """
    from trainer.data.shards import WriteOptions, write_shards
    from trainer.data.sources import letters_source, mnist_source
    experiment = Path(cfg.output_dir) / cfg.experiment
    public, private = cfg.data.public, cfg.data.private
    style = (f" --fonts {public.fonts}" if public.fonts != "default" else "") + \
        (f" --elastic {public.elastic:g}" if public.elastic else "")
    jobs = {"public": ("letters",
                       lambda: letters_source(public.num_examples, 28, public.seed, public.fonts, public.elastic), None,
                       f"--count {public.num_examples} --size 28 --seed {public.seed}{style}"),
            "private": ("mnist", lambda: mnist_source("train"), private.num_examples,
                        "--split train" + (f" --limit {private.num_examples}" if private.num_examples else ""))}
    for key, (name, source, limit, args) in jobs.items():
        if getattr(cfg.data, key).path:  # the user's own shards
            continue
        out = experiment / ("data" if key == "public" else "private") / name
        options = WriteOptions(caption_template=TEXT_CAPTIONS[key], limit=limit)
        command = f"dpldm prepare {name} {args} --caption-template '{TEXT_CAPTIONS[key]}' {out}"
        write_shards(source(), out, options, resume=True, command=command)  # finished: kept; interrupted: resumed
        getattr(cfg.data, key).path = str(out)


def run_demo(cfg: Config, sweep: Sequence[Config] = ()) -> dict:
    """Pretrain, fine-tune ``cfg``, evaluate; then fine-tune and evaluate each config of ``sweep``
    (the same experiment at other budgets: they share the pretrained base)."""
    from trainer.stages import finetune, pretrain_ae, pretrain_ldm
    from trainer.stages.evaluate import evaluate_checkpoint
    from trainer.stages.finetune import EncodingMemo
    t0 = time.time()
    if cfg.ldm.conditioner.type == "text":
        prepare_captioned_shards(cfg)
    ae_dir = pretrain_ae.run(cfg)
    ldm_dir = pretrain_ldm.run(cfg)
    encodings = EncodingMemo()  # the private set is encoded once for every fine-tune
    ft_dir = finetune.run(cfg, encodings)
    metrics = evaluate_checkpoint(ft_dir, device=cfg.device)
    others = []
    for other in sweep:
        if other.ldm.conditioner.type == "text":
            prepare_captioned_shards(other)  # only points data paths at the shards written above
        run_dir = finetune.run(other, encodings)
        others.append((run_dir, evaluate_checkpoint(run_dir, device=other.device)))
    return {"autoencoder": ae_dir, "ldm": ldm_dir, "finetune": ft_dir, "metrics": metrics, "sweep": others,
            "minutes": (time.time() - t0) / 60}


def sweep_configs(cfg: Config, name: str, overrides: list[str], epsilons: Sequence[float] | None) -> list[Config]:
    """One config per extra budget, over the same base: ``epsilons`` (default: those of ``cfg.sweep``).

    A budget's run is named ``eps<E>``; its step count, batch size and learning rate are those of the
    ``sweep`` entry with the same epsilon, if any, unless ``overrides`` set ``finetune.steps``,
    ``finetune.expected_batch_size`` or ``finetune.lr`` (``--quick`` sets the first two). Loaded (and so
    validated) before anything runs: a bad epsilon refuses the demo with nothing written.
    """
    entries = {float(entry["epsilon"]): entry for entry in cfg.sweep}
    out = []
    for eps in dict.fromkeys(entries if epsilons is None else epsilons):  # a budget given twice runs once
        if eps == cfg.finetune.epsilon:  # the main run is that budget already
            continue
        entry = entries.get(eps, {})
        own = [f"finetune.{key}={entry[key]}" for key in SWEEP_KEYS if key in entry]
        extra = [f"finetune.name=eps{eps:g}", f"finetune.epsilon={eps!r}", "finetune.noise_multiplier=null"]
        out.append(load_config(name, own + overrides + extra))
    return out


def epsilon_list(text: str) -> list[float]:
    """argparse type: ``1`` or ``1,3.5`` (comma-separated budgets), or ``none``."""
    if text.strip().lower() == "none":
        return []
    try:
        budgets = [float(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers or 'none', got {text!r}") from None
    bad = [eps for eps in budgets if not 0 < eps <= MAX_EPSILON]  # NaN too
    if bad:
        raise argparse.ArgumentTypeError(f"each budget must be in (0, {MAX_EPSILON:g}], got {bad}")
    return budgets


def main(args: argparse.Namespace) -> int:
    quick = QUICK if not args.text else [o.replace("=demo-quick", "=demo-text-quick") for o in QUICK]
    overrides = (quick if args.quick else []) + list(args.overrides)
    if args.seed is not None:
        overrides.append(f"seed={args.seed}")
    if args.output_dir:
        overrides.append(f"output_dir={args.output_dir}")
    name = args.config or ("demo-text" if args.text else "demo")
    cfg = load_config(name, overrides)
    sweep = sweep_configs(cfg, name, overrides, args.also_epsilon)  # validated before anything runs
    if args.print_config:
        dump_config(cfg, sys.stdout)
        return 0
    out = run_demo(cfg, sweep)
    what = "prompted digits" if args.text else "digits"
    print("\n== DP-LDM demo finished in {:.1f} min ==".format(out["minutes"]))
    print(f"public letters, pretrained LDM samples: {out['ldm'] / 'samples.png'}")
    print(f"DP fine-tuned {what}:{' ' * (24 - len(what))}{out['finetune'] / 'samples.png'}")
    print(f"privacy report:                         {out['finetune'] / 'privacy-report.json'}")
    from trainer.stages.evaluate import compare_runs, format_value, split_per_class
    metrics, per_class = split_per_class(out["metrics"])
    for key, value in metrics.items():
        print(f"{key}: {format_value(key, value)}")
    if per_class:
        print(f"eval.accuracy per class: {per_class}")
    if out["sweep"]:
        for run_dir, results in out["sweep"]:
            metrics, per_class = split_per_class(results)
            print(f"{run_dir.name}: " + ", ".join(f"{k} {format_value(k, v)}" for k, v in metrics.items())
                  + (f"; per class: {per_class}" if per_class else ""))
        table, plot = compare_runs(cfg.experiment, "accuracy", Path(cfg.output_dir) / cfg.experiment)
        print(f"\nThe runs of experiment '{cfg.experiment}' (`dpldm compare --experiment {cfg.experiment}`):")
        print(table)
        print(f"accuracy vs epsilon: {plot}")
        spend = compose(charges(Path(cfg.output_dir) / cfg.experiment, cfg.data.private), cfg.finetune.delta)
        print(f"These models are fine-tuned on the same private set: each report holds for that model alone; "
              f"{spend.line()}.")
    print(f"MLflow runs (experiment '{cfg.experiment}'): {tracking_hint()}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    from trainer.cli import plain
    p = sub.add_parser("demo", help="run the whole pipeline on the embedded default",
                       description=plain(__doc__), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a one-minute smoke run (tiny data and steps)")
    p.add_argument("--text", action="store_true",
                   help="the text-conditioned demo (configs/demo-text.yaml): captioned letters and digits as "
                        "webdataset shards, the MiniLM text encoder, sampling from public prompts")
    p.add_argument("--config", help="experiment YAML (default: the embedded demo, or demo-text with --text)")
    p.add_argument("--seed", type=int, help="override the config's seed")
    p.add_argument("--output-dir", help="override output_dir")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved config of the main fine-tune (after overrides) as YAML and exit")
    p.add_argument("--also-epsilon", type=epsilon_list, metavar="EPS[,EPS...]",
                   help="after the main fine-tune, DP fine-tune the same pretrained base at each EPS too "
                        "(folder finetune-eps<EPS>), evaluate it and print the accuracy-vs-epsilon table "
                        "(default: the budgets of the config's sweep, for the embedded demo 1; none with "
                        "--text; 'none': no extra run)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")
    p.set_defaults(func=main)
