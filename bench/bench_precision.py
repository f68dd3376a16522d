"""bf16 autocast against float32 on this machine: one step of each of the demo's stages, timed in one process.

``precision: bf16`` runs every stage's forward (and so its backward) under ``torch.autocast`` with
float32 weights; the DP engine's norms, clipping, sums and noise stay float32. Whether that pays
depends on the processor: a CPU with AVX-512 BF16 (or AMX) multiplies bf16 matrices about twice as
fast as float32 ones, one without it emulates them and is slower. For the config's demo this
measures, on random weights and data (cost and agreement, not utility), with the demo's batch sizes:

- ``pretrain-ae``: an autoencoder training step (reconstruction + KL loss, backward, AdamW);
- ``pretrain-ldm``: an LDM training step (the diffusion loss, backward, AdamW);
- ``finetune``: the DP engine's step on one physical batch (the config's trainable set, mode fast,
  per-example clipping, noise), as ``bench/bench_dp_step.py``'s ``engine fast`` row;
- ``sample (UNet forward)``: one UNet forward over ``sample.batch_size`` latents, without autograd
  (one DDIM step of the evaluation's guidance-1 sampling); ``sample (decoder)``: decoding them;
- ``encode (encoder)``: the autoencoder's encoder on a batch of images (the public set for the LDM's
  pretraining, the private set for the fine-tunes).

Each row: the median time of a step in float32 and in bf16 over ``--repeats`` interleaved rounds
(after a warm-up each), the ratio, and how far bf16's result is from float32's from the same
weights and data: the cosine similarity of the gradients (the clipped noiseless sum for the DP
step) or of the outputs (sampling). The last columns multiply the step times by the number of such
steps in ``dpldm demo`` (every budget of the sweep, the evaluations' samples; not the grids):
what the two precisions predict for the demo's stages on this machine.

Usage: ``python bench/bench_precision.py [--config demo] [--repeats 10] [--threads 2] [--private-examples N]
[--out FILE] [KEY=VALUE ...]`` (overrides as for the ``dpldm`` command).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_dp_step import Workload, build_workload, device_name  # noqa: E402
from bench_flops import demo_parser, emit, load_demo, unet_forwards_per_step  # noqa: E402
from trainer.config import Config  # noqa: E402
from trainer.privacy import DPGradientEngine  # noqa: E402
from trainer.privacy.engine import SELF_CHECK_RTOL, SELF_CHECK_RTOL_BF16  # noqa: E402
from trainer.runtime import adamw, native_bf16, resolve_precision  # noqa: E402
from trainer.stages.common import build_autoencoder, build_ldm, image_channels  # noqa: E402
from trainer.stages.pretrain_ae import reconstruction_loss  # noqa: E402

PRECISIONS = ("fp32", "bf16")
ENCODE_BATCH = 256  # `trainer.pipeline.encode_images`' batch


def autocast(precision: str) -> contextlib.AbstractContextManager:
    """What ``Runtime.autocast`` does on a CPU for ``precision``."""
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")


@dataclass
class Work:
    """One stage's step. ``make(precision)`` -> ``(step, result)``: ``step()`` is what is timed (on a
    copy of the model of its own); ``result()`` is the gradient or output compared between precisions,
    computed from the shared starting weights."""

    stage: str
    size: str
    make: Callable[[str], tuple[Callable[[], None], Callable[[], Tensor]]]
    demo_steps: float  # how many such steps `dpldm demo` takes


def flat_grad(model: nn.Module) -> Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def training_work(stage: str, size: str, model: nn.Module, loss_fn: Callable[[nn.Module], Tensor], lr: float,
                  demo_steps: float) -> Work:
    """A public stage's step: ``loss_fn(model)`` under autocast, backward, AdamW."""
    def make(precision: str):
        own = copy.deepcopy(model)
        opt = adamw([p for p in own.parameters() if p.requires_grad], lr, 0.0)

        def step() -> None:
            with autocast(precision):
                loss = loss_fn(own)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        def result() -> Tensor:
            fresh = copy.deepcopy(model)
            with autocast(precision):
                loss = loss_fn(fresh)
            loss.backward()
            return flat_grad(fresh)

        return step, result

    return Work(stage, size, make, demo_steps)


def dp_engine(model: nn.Module, max_grad_norm: float, sigma: float, batch: int, precision: str) -> DPGradientEngine:
    """The DP engine (mode fast, a fixed noise seed) over ``model`` for one micro-batch of ``batch``."""
    return DPGradientEngine(model, max_grad_norm=max_grad_norm, noise_multiplier=sigma, expected_batch_size=batch,
                            mode="fast", generator=torch.Generator().manual_seed(7),
                            self_check_rtol=SELF_CHECK_RTOL_BF16 if precision == "bf16" else SELF_CHECK_RTOL)


def dp_step(workload: Workload, max_grad_norm: float, batch: int, precision: str) -> Callable[[], None]:
    """One DP step (losses in ``precision``, the engine's clipping and noise, AdamW) over the workload's
    micro-batch of ``batch`` examples (``bench_dp_step.build_workload``), on a model of its own."""
    model = workload.fresh_model()
    optimizer, engine = workload.optimizer(model), dp_engine(model, max_grad_norm, 1.0, batch, precision)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast(precision):
            losses = model(workload.z0, workload.labels)
        engine.accumulate(losses.float())
        engine.finalize()
        optimizer.step()
    return step


def build_works(cfg: Config, sweep: list[Config], private_examples: int) -> list[Work]:
    from trainer.models.autoencoder import kl_divergence
    gen = torch.Generator().manual_seed(0)
    ae_tc, ldm_tc, ft = cfg.autoencoder.train, cfg.ldm.train, cfg.finetune
    size = int(cfg.autoencoder.ddconfig["resolution"])
    x = torch.randn(ae_tc.batch_size, image_channels(cfg), size, size, generator=gen).clamp(-1, 1)

    def ae_loss(ae: nn.Module) -> Tensor:
        torch.manual_seed(1)  # the posterior's sample: the same draw in both precisions
        rec, mean, std = ae(x)
        return reconstruction_loss(x, rec.float()).mean() + ae_tc.kl_weight * kl_divergence(mean.float(),
                                                                                           std.float()).mean()

    ae = build_autoencoder(cfg)
    with torch.no_grad():
        z_shape = ae.encode(x[:1])[0].shape[1:]
    works = [training_work("pretrain-ae", f"{ae_tc.batch_size} images", ae, ae_loss, ae_tc.lr, ae_tc.steps)]

    ldm = build_ldm(cfg, 1.0)
    with torch.no_grad():  # a fresh UNet's zeroed output convolution would give most weights no gradient
        for p in ldm.parameters():
            if p.dim() > 1 and not p.any():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    z = torch.randn(ldm_tc.batch_size, *z_shape, generator=gen)
    labels = torch.randint(0, cfg.ldm.conditioner.n_classes, (ldm_tc.batch_size,), generator=gen)

    def ldm_loss(model: nn.Module) -> Tensor:
        draws = torch.Generator().manual_seed(1)  # the same timesteps and noise in both precisions
        return model.loss(z, labels, draws, cond_drop_prob=ldm_tc.cond_drop_prob).float().mean()

    works.append(training_work("pretrain-ldm", f"{ldm_tc.batch_size} latents", ldm, ldm_loss, ldm_tc.lr, ldm_tc.steps))

    physical = ft.physical_batch_size
    workload, _ = build_workload(cfg, physical, torch.device("cpu"))
    dp_steps = sum(run.finetune.steps * run.finetune.expected_batch_size / physical for run in [cfg, *sweep])

    def make_dp(precision: str):
        def result() -> Tensor:
            fresh = workload.fresh_model()
            checker = dp_engine(fresh, ft.max_grad_norm, 0.0, physical, precision)
            with autocast(precision):
                losses = fresh(workload.z0, workload.labels)
            checker.accumulate(losses.float())
            checker.finalize()
            checker.detach()
            return flat_grad(fresh)

        return dp_step(workload, ft.max_grad_norm, physical, precision), result

    works.append(Work("finetune (DP step)", f"{physical} examples", make_dp, dp_steps))

    batch = cfg.sample.batch_size
    xt = torch.randn(batch, *z_shape, generator=gen)
    t = torch.randint(0, ldm.schedule.timesteps, (batch,), generator=gen)
    conds = torch.randint(0, cfg.ldm.conditioner.n_classes, (batch,), generator=gen)
    n_classes = ft.new_class_embedder or cfg.ldm.conditioner.n_classes
    forwards = 0.0
    for run in [cfg, *sweep]:
        ev = run.eval_sampler()
        steps = ev["ddim_steps"] * unet_forwards_per_step(ev["guidance_scale"])
        forwards += run.eval.num_per_class * n_classes / batch * steps

    def make_sample(precision: str):
        def forward() -> Tensor:
            with torch.no_grad(), autocast(precision):
                return ldm.eps(xt, t, ldm.context(conds)).float()
        return forward, forward

    works.append(Work("sample (UNet forward)", f"{batch} latents", make_sample, forwards))

    def forward_work(stage: str, fn: Callable[[], Tensor], size: str, demo_steps: float) -> Work:
        def make(precision: str):
            def run() -> Tensor:
                with torch.no_grad(), autocast(precision):
                    return fn().float()
            return run, run
        return Work(stage, size, make, demo_steps)

    images = torch.randn(ENCODE_BATCH, image_channels(cfg), size, size, generator=gen).clamp(-1, 1)
    works.append(forward_work("encode (encoder)", lambda: ae.encode(images)[0], f"{ENCODE_BATCH} images",
                              (cfg.data.public.num_examples + private_examples) / ENCODE_BATCH))
    latents = torch.randn(batch, *z_shape, generator=gen).contiguous(memory_format=torch.channels_last)
    decoded = sum(run.eval.num_per_class * n_classes for run in [cfg, *sweep])
    works.append(forward_work("sample (decoder)", lambda: ae.decode(latents), f"{batch} latents", decoded / batch))
    return works


@dataclass
class Row:
    work: Work
    times: dict[str, list[float]]
    cosine: float

    def median(self, precision: str) -> float:
        return statistics.median(self.times[precision])


def measure(works: list[Work], repeats: int) -> list[Row]:
    rows = []
    for work in works:
        a, b = (work.make(p)[1]() for p in PRECISIONS)
        cosine = float(torch.nn.functional.cosine_similarity(a.double().flatten(), b.double().flatten(), dim=0))
        rows.append(Row(work, {p: [] for p in PRECISIONS}, cosine))
    steps = {(i, p): works[i].make(p)[0] for i in range(len(works)) for p in PRECISIONS}
    for fn in steps.values():  # warm-up (and the DP engine's self-check)
        fn()
    for _ in range(repeats):
        for (i, p), fn in steps.items():
            start = time.perf_counter()
            fn()
            rows[i].times[p].append(time.perf_counter() - start)
    return rows


def report(rows: list[Row], args: argparse.Namespace) -> list[str]:
    lines = ["# bf16 autocast against float32", "",
             f"Measured by `python bench/bench_precision.py --config {args.config} --repeats {args.repeats} --threads "
             f"{args.threads}" + "".join(f" {o}" for o in args.overrides) + f"` in one process on "
             f"{device_name(torch.device('cpu'))} ({os.cpu_count()} CPU cores visible, {args.threads} torch "
             f"thread(s)), torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
             f"bf16 in hardware: {'yes' if native_bf16(torch.device('cpu')) else 'no'} (what `precision: auto` picks: "
             f"{resolve_precision('auto', torch.device('cpu'))}).", "",
             "Median step over interleaved rounds; cosine: bf16's gradient (DP: clipped noiseless sum; sampling: "
             "output) against float32's from the same weights and data; minutes: the step times the number of such "
             "steps in `dpldm demo`.", "",
             "| stage | step | fp32 (ms) | bf16 (ms) | fp32 / bf16 | cosine | demo minutes fp32 | bf16 |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    totals = {p: 0.0 for p in PRECISIONS}
    for row in rows:
        minutes = {p: row.median(p) * row.work.demo_steps / 60 for p in PRECISIONS}
        for p in PRECISIONS:
            totals[p] += minutes[p]
        lines.append(f"| {row.work.stage} | {row.work.size} | {row.median('fp32') * 1e3:.1f} | "
                     f"{row.median('bf16') * 1e3:.1f} | {row.median('fp32') / row.median('bf16'):.2f}x | "
                     f"{row.cosine:.5f} | {minutes['fp32']:.1f} | {minutes['bf16']:.1f} |")
    lines.append(f"| these stages | | | | {totals['fp32'] / totals['bf16']:.2f}x | | **{totals['fp32']:.1f}** | "
                 f"**{totals['bf16']:.1f}** |")
    return lines


def main(argv: list[str] | None = None) -> list[Row]:
    p = demo_parser(__doc__.split("\n")[0], "torch threads")
    p.add_argument("--repeats", type=int, default=10, help="timed rounds (default: 10)")
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error(f"--repeats must be >= 1, got {args.repeats}")
    cfg, private, sweep = load_demo(p, args, "measures")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = measure(build_works(cfg, sweep, private), args.repeats)
    emit(report(rows, args), args.out)
    return rows


if __name__ == "__main__":
    main()
