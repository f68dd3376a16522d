"""The arithmetic of a whole ``dpldm demo`` run: FLOPs per stage, and the time they take at this machine's best rate.

Counts, with ``torch.utils.flop_counter.FlopCounterMode`` (matrix products and convolutions, forward and
backward; elementwise work such as normalisation and activations is not counted), the work per example
of each stage of the config's demo on its own models (random weights: the count does not depend on
them), and multiplies by the stage's size from the config:

- ``pretrain-ae``: ``autoencoder.train.steps`` x ``batch_size`` examples (forward, loss, backward);
- ``pretrain-ldm``: ``ldm.train.steps`` x ``batch_size`` latents (the diffusion loss and its backward);
- ``encode``: every private example through the encoder, once for all budgets;
- ``finetune`` and each ``sweep`` budget: ``steps`` x ``expected_batch_size`` examples of the DP
  engine's step (``bench/bench_dp_step.py``'s ``engine fast`` row: the config's trainable set, per-example
  norms, clipping and noise);
- ``sample (eval)`` per fine-tuned run: ``eval.num_per_class`` images per class, each
  ``ddim_steps`` UNet forwards at the evaluation's sampler (two per step when guidance is not 1) and one
  decoder pass; ``sample (grid)`` likewise with the ``sample`` settings.

The last columns divide by the rate of one large float32 matrix product in this process (``--threads``
threads): the time each stage would take if every operation ran as fast as the fastest kernel this
machine has, a lower bound for the stage on this machine. The downstream classifier's training is not
counted.

Usage: ``python bench/bench_flops.py [--config demo] [--threads 2] [--private-examples N] [--out FILE]
[KEY=VALUE ...]`` (overrides as for the ``dpldm`` command).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_dp_step import build_workload, device_name, engine_step  # noqa: E402
from trainer.config import Config, ConfigError, load_config  # noqa: E402
from trainer.stages.common import build_autoencoder, build_ldm, image_channels, load_image_source  # noqa: E402
from trainer.stages.demo import sweep_configs  # noqa: E402
from trainer.stages.pretrain_ae import reconstruction_loss  # noqa: E402

COUNT_BATCH = 8  # every count here is linear in the batch; a small one keeps the counting quick


def flops(fn: Callable[[], object]) -> int:
    """Matrix-product and convolution FLOPs of one call of ``fn``."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@dataclass
class PerExample:
    """FLOPs per example of each kind of work in the pipeline."""

    ae_train: float
    ldm_train: float
    encode: float
    decode: float
    unet_forward: float
    dp_step: float


def count_per_example(cfg: Config) -> PerExample:
    from trainer.models.autoencoder import kl_divergence
    b = COUNT_BATCH
    ae = build_autoencoder(cfg)
    size = int(cfg.autoencoder.ddconfig["resolution"])
    x = torch.randn(b, image_channels(cfg), size, size)

    def ae_step() -> None:
        rec, mean, std = ae(x)
        (reconstruction_loss(x, rec).mean() + kl_divergence(mean, std).mean()).backward()

    ae_train = flops(ae_step) / b
    with torch.no_grad():
        encode = flops(lambda: ae.encode(x)) / b
        z = ae.encode(x)[0]
        decode = flops(lambda: ae.decode(z)) / b
    ldm = build_ldm(cfg, 1.0)
    labels = torch.randint(0, cfg.ldm.conditioner.n_classes, (b,))
    gen = torch.Generator().manual_seed(0)
    ldm_train = flops(lambda: ldm.loss(z, labels, gen, cond_drop_prob=0.0).mean().backward()) / b
    workload, _ = build_workload(cfg, b, torch.device("cpu"))
    model = workload.fresh_model()
    dp_step = flops(engine_step("fast")(workload, model, 1.0).step) / b
    with torch.no_grad():
        unet_forward = flops(lambda: model(workload.z0, workload.labels)) / b
    return PerExample(ae_train, ldm_train, encode, decode, unet_forward, dp_step)


def unet_forwards_per_step(guidance_scale: float) -> int:
    """UNet forwards per sampler step: classifier-free guidance runs the unconditional branch too."""
    return 1 if guidance_scale == 1.0 else 2


def sampling_flops(per: PerExample, images: int, ddim_steps: int, guidance_scale: float) -> float:
    return images * (ddim_steps * unet_forwards_per_step(guidance_scale) * per.unet_forward + per.decode)


def stage_rows(cfg: Config, per: PerExample, private_examples: int, n_classes: int,
               sweep: list[Config]) -> list[tuple[str, str, float]]:
    """``(stage, size, FLOPs)`` for every stage of the demo of ``cfg`` with ``sweep``."""
    ae_tc, ldm_tc = cfg.autoencoder.train, cfg.ldm.train
    rows = [("pretrain-ae", f"{ae_tc.steps:,} x {ae_tc.batch_size}", ae_tc.steps * ae_tc.batch_size * per.ae_train),
            ("pretrain-ldm", f"{ldm_tc.steps:,} x {ldm_tc.batch_size}",
             ldm_tc.steps * ldm_tc.batch_size * per.ldm_train),
            ("encode", f"{private_examples:,}", private_examples * per.encode)]
    for run in [cfg, *sweep]:
        ft, name = run.finetune, f"eps {run.finetune.epsilon:g}"
        batch = round(ft.expected_batch_size)
        rows.append((f"finetune ({name})", f"{ft.steps:,} x {batch:,}", ft.steps * batch * per.dp_step))
        ev = run.eval_sampler()
        images = run.eval.num_per_class * n_classes
        rows.append((f"sample (eval, {name})", f"{images:,} x {ev['ddim_steps']} steps",
                     sampling_flops(per, images, ev["ddim_steps"], ev["guidance_scale"])))
        grid = run.sample.num_per_class * n_classes
        rows.append((f"sample (grid, {name})", f"{grid:,} x {run.sample.ddim_steps} steps",
                     sampling_flops(per, grid, run.sample.ddim_steps, run.sample.guidance_scale)))
    return rows


def matmul_rate(threads: int, n: int = 2048, repeats: int = 10) -> float:
    """FLOP/s of an n x n float32 matrix product (median of ``repeats`` after a warm-up)."""
    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t)
    return 2 * n ** 3 / sorted(times)[len(times) // 2]


def report(rows: list[tuple[str, str, float]], per: PerExample, rate: float, args: argparse.Namespace) -> list[str]:
    total = sum(f for _, _, f in rows)
    lines = ["# The demo's arithmetic", "",
             f"Measured by `python bench/bench_flops.py --config {args.config} --threads {args.threads}"
             + "".join(f" {o}" for o in args.overrides) + f"` on {device_name(torch.device('cpu'))} "
             f"({os.cpu_count()} CPU cores visible), torch {torch.__version__}.", "",
             "FLOPs per example (matrix products and convolutions, `FlopCounterMode`): autoencoder training step "
             f"{per.ae_train / 1e6:.1f} M, encoder {per.encode / 1e6:.1f} M, decoder {per.decode / 1e6:.1f} M, "
             f"LDM training step {per.ldm_train / 1e6:.1f} M, UNet forward {per.unet_forward / 1e6:.1f} M, "
             f"DP step (the engine's, the config's trainable set) {per.dp_step / 1e6:.1f} M.", "",
             f"Best rate here: a 2048 x 2048 float32 matrix product on {args.threads} thread(s), "
             f"**{rate / 1e9:.0f} GFLOP/s**; the minutes column is each stage's FLOPs at that rate (a lower bound).",
             "", "| stage | size | TFLOP | share | minutes at the best rate |", "| --- | --- | ---: | ---: | ---: |"]
    for stage, size, f in rows:
        lines.append(f"| {stage} | {size} | {f / 1e12:.1f} | {f / total:.0%} | {f / rate / 60:.1f} |")
    lines.append(f"| total | | {total / 1e12:.1f} | 100% | **{total / rate / 60:.1f}** |")
    return lines


def demo_parser(description: str, threads_help: str) -> argparse.ArgumentParser:
    """The arguments of a bench over a demo config: ``--config``, ``--threads``, ``--private-examples``,
    ``--out`` and ``KEY=VALUE`` overrides."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--config", default="demo", help="config name or YAML path (default: demo)")
    p.add_argument("--threads", type=int, default=2, help=f"{threads_help} (default: 2)")
    p.add_argument("--private-examples", type=int, default=None,
                   help="size of the private set (default: load data.private and count it)")
    p.add_argument("--out", type=Path, default=None, help="also write the report to this Markdown file")
    p.add_argument("overrides", nargs="*", help="KEY=VALUE config overrides")
    return p


def load_demo(p: argparse.ArgumentParser, args: argparse.Namespace, verb: str) -> tuple[Config, int, list[Config]]:
    """The parsed config (a class-conditional demo), its private set's size and its sweep; a bad one is
    ``p.error`` naming the key or flag."""
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:
        p.error(str(err))
    if cfg.ldm.conditioner.type != "class":
        p.error(f"ldm.conditioner.type: {verb} a class-conditional demo, got {cfg.ldm.conditioner.type!r}")
    if args.threads < 1:
        p.error(f"--threads must be >= 1, got {args.threads}")
    private = args.private_examples
    if private is None:
        private = len(load_image_source(cfg.data.private, "data.private", 1).labels)
    return cfg, private, sweep_configs(cfg, args.config, args.overrides, None)


def emit(lines: list[str], out: Path | None) -> None:
    """Print the report, and write it to ``out`` if given."""
    print("\n".join(lines))
    if out:
        out.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> list[tuple[str, str, float]]:
    p = demo_parser(__doc__.split("\n")[0], "torch threads for the rate")
    args = p.parse_args(argv)
    cfg, private, sweep = load_demo(p, args, "counts")
    n_classes = cfg.finetune.new_class_embedder or cfg.ldm.conditioner.n_classes
    torch.manual_seed(0)
    per = count_per_example(cfg)
    rows = stage_rows(cfg, per, private, n_classes, sweep)
    emit(report(rows, per, matmul_rate(args.threads), args), args.out)
    return rows


if __name__ == "__main__":
    main()
