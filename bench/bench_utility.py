"""Where the downstream accuracy goes: ceilings and DP runs in one table, DPImageBench's protocol.

Every row trains the downstream classifier (the config's ``eval.classifier``, ``eval.epochs``) on
a labelled, class-balanced training set of ``--per-class`` images per class, picks its epoch on a
held-out tenth of that set, and tests once on the full 10,000-image MNIST test split; each row
is repeated with ``--seeds`` classifier seeds (mean and spread reported). DPImageBench itself
generates 60,000 images for MNIST (``--per-class 6000 --no-ceilings``: the real rows cannot take more
than the smallest real class, 5,421); 1,000 per class is the cheaper default. Rows:

- ``real``: real MNIST training digits at the config's resolution (the classifier's ceiling);
- ``autoencoder``: the same digits after the autoencoder of ``--ae`` (encode, posterior mean,
  decode): what the latent space keeps, the ceiling of any LDM built on it;
- one per ``--finetune`` run: ``--per-class`` samples per class from the fine-tuned model
  (its config's evaluation sampler: ``eval.sampler``, ``eval.guidance_scale``, ``eval.ddim_steps``,
  ``eval.eta``; or ``--sampler``/``--guidance``/``--ddim-steps``/``--eta``), with its epsilon;
- one per ``--nonprivate`` run: the same fine-tuning as that finetune run (its base, policy,
  fresh embedder and its initial rows, AdamW, lr and its schedule, condition dropout, steps,
  expected batch size, noise multiplicity) with no clipping and no noise (uniform batches),
  sampled and scored the same way: the ceiling of DP fine-tuning.

With ``--fid``, every row also gets its FID against the 10,000 test digits (TF-Inception; the
test split's features are computed once and cached).

The real and non-private rows read the private training set: they are diagnostics, never a DP
artifact (the non-private model is never saved). Usage: ``python bench/bench_utility.py --ae runs/demo/ae [--finetune runs/demo/finetune
...] [--nonprivate runs/demo/finetune] [--per-class 1000] [--seeds 3] [--out docs/utility-demo.md]``
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from trainer.cli import unit_float  # noqa: E402
from trainer.config import SAMPLERS, load_config  # noqa: E402
from trainer.data.mnist import load_mnist  # noqa: E402
from trainer.eval.downstream import CLASSIFIERS, downstream_accuracy  # noqa: E402
from trainer.eval.fid import fid  # noqa: E402
from trainer.eval.images import images_from_array  # noqa: E402
from trainer.pipeline import encode_images  # noqa: E402
from trainer.runs import generate, load_pipeline, override_sampler  # noqa: E402
from trainer.runtime import adamw  # noqa: E402
from trainer.stages.common import (conditions, load_autoencoder, load_image_source, resolve_recorded,  # noqa: E402
                                   to_uint8)

SAMPLER_NAMES = {"ddim": "DDIM", "dpmpp_2m": "DPM-Solver++(2M)"}


def balanced(labels: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    """Indices of ``per_class`` random examples of every class (sorted by class)."""
    rng = np.random.default_rng(seed)
    out = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        if len(idx) < per_class:
            raise ValueError(f"class {c}: {len(idx)} examples, fewer than --per-class {per_class}")
        out.append(rng.choice(idx, per_class, replace=False))
    return np.concatenate(out)


def scores(images: np.ndarray, labels: np.ndarray, test: tuple[np.ndarray, np.ndarray], cfg,
           seeds: int) -> tuple[list[float], list[float]]:
    """Test accuracy of each classifier seed, and each test class's accuracy (mean over the seeds)."""
    results = [downstream_accuracy(images, labels, *test, classifier=cfg.eval.classifier, epochs=cfg.eval.epochs,
                                   seed=s) for s in range(seeds)]
    per_class = [statistics.mean(c) for c in zip(*(r["per_class_accuracy"] for r in results))]
    return [r["accuracy"] for r in results], per_class


@torch.no_grad()
def reconstruct(autoencoder, images: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    out = []
    for i in range(0, len(images), batch_size):
        mean, _ = autoencoder.encode(images[i:i + batch_size])
        out.append(autoencoder.decode(mean).clamp(-1, 1))
    return torch.cat(out)


def nonprivate_finetune(run: str | Path, seed: int = 0):
    """The fine-tuning of the finetune run folder ``run`` redone without DP -> (ldm, autoencoder, meta, config)."""
    from tqdm import tqdm

    from trainer.models import new_class_embedder
    from trainer.selection import select_trainable
    from trainer.stages.finetune import base_rows, cond_drop_prob, learning_rate, set_learning_rate
    run = Path(run)
    cfg = load_config(str(run / "config.yaml"))
    ft_meta = json.loads((run / "finetune.json").read_text())
    base_dir = resolve_recorded(ft_meta["base"], run)
    ldm, autoencoder, base_meta, _ = load_pipeline(base_dir)
    meta = {**base_meta, "label_names": ft_meta.get("label_names") or base_meta["label_names"]}
    ft = cfg.finetune
    torch.manual_seed(cfg.seed)
    if ft.new_class_embedder:  # as the DP run: its public initialisation (new_class_from rows or random)
        ldm.cond_stage_model = new_class_embedder(ldm.cond_stage_model, ft.new_class_embedder,
                                                  base_rows(ft.new_class_from, base_meta, base_dir))
    select_trainable(ldm, ft.policy, ft.attention_from, ft.text_encoder_layers, ft.lora_rank, ft.lora_alpha,
                     ft.context_grad)
    params = [p for p in ldm.parameters() if p.requires_grad]
    optimizer = adamw(params, ft.lr, ft.weight_decay)
    private = load_image_source(cfg.data.private, "data.private", autoencoder.ddconfig["in_channels"])
    mean, std = encode_images(autoencoder, private.images, desc="encode private set")
    g = torch.Generator().manual_seed(seed)
    batch = round(ft.expected_batch_size)
    ldm.train()
    for step in tqdm(range(ft.steps), desc="non-private fine-tuning"):
        set_learning_rate(optimizer, learning_rate(ft, step))
        idx = torch.randint(0, len(mean), (batch,), generator=g)
        z0 = mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=g)
        conds = ldm.drop_conditions(conditions(cfg.ldm.conditioner.type, private.labels[idx], None),
                                    cond_drop_prob(cfg), g)
        loss = ldm.loss(z0 * ldm.scale_factor, conds, g, multiplicity=ft.noise_multiplicity, t_range=ft.t_range).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    ldm.eval().requires_grad_(False)
    return ldm, autoencoder, meta, cfg


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ae", required=True, help="a pretrain-ae run folder (its config gives data and eval)")
    parser.add_argument("--finetune", nargs="*", default=[], help="finetune run folders to sample and score")
    parser.add_argument("--nonprivate", nargs="*", default=[],
                        help="finetune run folders whose fine-tuning is redone without clipping or noise, then scored")
    parser.add_argument("--per-class", type=int, default=1000, help="training images per class in every row")
    parser.add_argument("--seeds", type=int, default=3, help="classifier seeds per row")
    parser.add_argument("--guidance", type=float,
                        help="override the runs' evaluation guidance (eval.guidance_scale, else sample.guidance_scale)")
    parser.add_argument("--sampler", choices=SAMPLERS,
                        help="override the runs' evaluation sampler (eval.sampler, else sample.sampler; dpmpp_2m: eta 0)")
    parser.add_argument("--ddim-steps", type=int,
                        help="override the runs' evaluation sampler steps (eval.ddim_steps, else sample.ddim_steps)")
    parser.add_argument("--eta", type=unit_float, help="override the runs' evaluation eta (eval.eta, else sample.eta; "
                                                  "0 = deterministic DDIM, 1 = DDPM-like noise)")
    parser.add_argument("--batch-size", type=int, default=500, help="images per sampling batch")
    parser.add_argument("--classifier", choices=CLASSIFIERS,
                        help="the downstream classifier of every row (default: the --ae run's eval.classifier)")
    parser.add_argument("--epochs", type=int, help="its training epochs (default: the --ae run's eval.epochs)")
    parser.add_argument("--fid", action="store_true", help="also the FID of every row against the test split")
    parser.add_argument("--no-ceilings", action="store_true",
                        help="leave out the real and autoencoder rows (when they were measured already)")
    parser.add_argument("--out", help="write the markdown table here")
    args = parser.parse_args(argv)
    if args.epochs is not None and args.epochs < 1:
        parser.error(f"--epochs {args.epochs}: need at least 1")
    for flag, folders in (("--ae", [args.ae]), ("--finetune", args.finetune), ("--nonprivate", args.nonprivate)):
        for folder in folders:  # before any work: a wrong path would otherwise fail after the ceilings' rows
            if not Path(folder, "config.yaml").is_file():
                parser.error(f"{flag} {folder}: not a run folder (no config.yaml)")
    samplers = {}
    for run in args.finetune + args.nonprivate:
        try:
            samplers[run] = override_sampler(load_config(str(Path(run) / "config.yaml")).eval_sampler(),
                                             sampler=args.sampler, guidance_scale=args.guidance,
                                             ddim_steps=args.ddim_steps, eta=args.eta)
        except ValueError as err:
            parser.error(f"--{err} ({run}: its eval.sampler)")
    torch.manual_seed(0)
    cfg = load_config(str(Path(args.ae) / "config.yaml"))
    if args.classifier is not None:
        cfg.eval.classifier = args.classifier
    if args.epochs is not None:
        cfg.eval.epochs = args.epochs
    test = load_mnist("test")
    rows: list[dict] = []
    # FID reference: the test split at the config's resolution, as the rows' images
    reference = images_from_array(to_uint8(load_image_source(cfg.data.test, "data.test", 1).images)) if args.fid else None

    def add(name: str, images: np.ndarray, labels: np.ndarray, note: str, seconds: float = 0.0) -> None:
        acc, per_class = scores(images, labels, test, cfg, args.seeds)
        value = fid(reference, images_from_array(images)) if args.fid else None
        rows.append({"row": name, "accuracy": acc, "per_class": per_class, "note": note, "sample_s": seconds,
                     "fid": value})
        print(f"{name}: accuracy {statistics.mean(acc):.4f} (+- {statistics.pstdev(acc):.4f})"
              f"{'' if value is None else f', FID {value:.1f}'} {note}", flush=True)

    if not args.no_ceilings:
        private = load_image_source(cfg.data.private, "data.private", 1)  # grey digits for the classifier
        try:
            idx = torch.from_numpy(balanced(private.labels.numpy(), args.per_class, seed=0))
        except ValueError as err:  # the real rows need --per-class real digits of every class
            parser.error(f"{err} (the real and autoencoder rows); add --no-ceilings")
        real, labels = private.images[idx], private.labels[idx].numpy()
        add("real", to_uint8(real), labels,
            f"MNIST {cfg.data.private.split} digits (non-private ceiling of the classifier)")
        autoencoder, _ = load_autoencoder(args.ae)
        add("autoencoder", to_uint8(reconstruct(autoencoder, real)), labels,
            f"reconstructions by {args.ae} (latent {cfg.autoencoder.embed_dim} channels, f = "
            f"{2 ** (len(cfg.autoencoder.ddconfig['ch_mult']) - 1)})")

    runs = [(run, False) for run in args.finetune] + [(run, True) for run in args.nonprivate]
    for run, nonprivate in runs:
        ldm, ae, meta, run_cfg = nonprivate_finetune(run) if nonprivate else load_pipeline(run, torch.device("cpu"))
        sampler = samplers[run]
        names = meta["label_names"]
        cond = torch.arange(len(names)).repeat_interleave(args.per_class)
        t0 = time.perf_counter()
        images = generate(ldm, ae, cond, tuple(meta["latent_shape"]), run_cfg, torch.Generator().manual_seed(0),
                          batch_size=args.batch_size, **sampler)
        seconds = time.perf_counter() - t0
        report = json.loads((Path(run) / "privacy-report.json").read_text())
        privacy = "no clipping, no noise" if nonprivate else f"epsilon {report['epsilon']:.3g}"
        add(Path(run).name + (" non-private" if nonprivate else ""), to_uint8(images), cond.numpy(),
            f"{privacy}, guidance {sampler['guidance_scale']:g}, {sampler['ddim_steps']} "
            f"{SAMPLER_NAMES[sampler['sampler']]} steps, eta {sampler['eta']:g}",
            seconds)

    lines = [f"| row | accuracy (mean of {args.seeds}) | spread (std) | FID | what | sampling (s) |",
             "| --- | ---: | ---: | ---: | --- | ---: |"]
    for r in rows:
        fid_text = "-" if r["fid"] is None else f"{r['fid']:.1f}"
        lines.append(f"| {r['row']} | {statistics.mean(r['accuracy']):.4f} | {statistics.pstdev(r['accuracy']):.4f} | "
                     f"{fid_text} | {r['note']} | {r['sample_s']:.0f} |")
    if rows:
        classes = range(len(rows[0]["per_class"]))
        lines += ["", f"Test accuracy per class (the share of the test digits of each class recognised, mean of "
                  f"{args.seeds} seeds): a class the generator draws badly scores low.", "",
                  "| row | " + " | ".join(str(c) for c in classes) + " |", "| --- |" + " ---: |" * len(classes)]
        lines += [f"| {r['row']} | " + " | ".join(f"{a:.3f}" for a in r["per_class"]) + " |" for r in rows]
    text = "\n".join([f"Measured by `python bench/bench_utility.py {' '.join(argv or sys.argv[1:])}`: "
                      f"{args.per_class} training images per class per row, classifier "
                      f"`{cfg.eval.classifier}` ({cfg.eval.epochs} epochs, epoch picked on a held-out tenth), "
                      "tested on the 10,000 MNIST test digits.", "", *lines, ""])
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return rows


if __name__ == "__main__":
    main()
