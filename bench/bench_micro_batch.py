"""The DP step's micro-batch: the engine's time per example at several physical batch sizes.

``finetune.physical_batch_size`` changes memory and speed only: the logical batch is the Poisson draw,
whose micro-batches are summed before the step's one noise draw. On the config's UNet and trainable
set (``bench_dp_step.build_workload``: random latents, labels, timesteps and noise), one micro-batch of
each size per round (``DPGradientEngine`` mode fast + AdamW step, the forward in ``--precision``),
the sizes interleaved within every round in one process, so a host's drift hits them alike. Prints
the median and the minimum over the rounds, in ms per example.

Usage: ``python bench/bench_micro_batch.py [--sizes 256,512,1024] [--precision bf16] [--rounds 12]
[--threads 2] [--config demo] [--private-examples N] [--out FILE] [KEY=VALUE ...]`` (``--private-examples``:
skips counting the private set, which the timing does not use)
"""
from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_dp_step import build_workload, device_name  # noqa: E402
from bench_flops import demo_parser, emit, load_demo  # noqa: E402
from bench_precision import dp_step  # noqa: E402
from trainer.config import Config  # noqa: E402


def dp_step_of(cfg: Config, size: int, precision: str) -> Callable[[], None]:
    """One DP step over a fresh micro-batch of ``size`` examples of the config's workload."""
    workload, _ = build_workload(cfg, size, torch.device("cpu"))
    return dp_step(workload, cfg.finetune.max_grad_norm, size, precision)


def measure(cfg: Config, sizes: list[int], precision: str, rounds: int) -> dict[int, list[float]]:
    """ms per example of each size, one value per round (after one warm-up step each)."""
    steps = {size: dp_step_of(cfg, size, precision) for size in sizes}
    for step in steps.values():
        step()
    times: dict[int, list[float]] = {size: [] for size in sizes}
    for _ in range(rounds):
        for size, step in steps.items():
            start = time.perf_counter()
            step()
            times[size].append((time.perf_counter() - start) / size * 1e3)
    return times


def report(times: dict[int, list[float]], precision: str, threads: int) -> list[str]:
    first = next(iter(times.values()))
    lines = [f"DP step per example by micro-batch ({precision}, {threads} threads, "
             f"{device_name(torch.device('cpu'))}; {len(first)} interleaved rounds)", "",
             "| physical batch | median (ms/example) | min | vs the first |", "| ---: | ---: | ---: | ---: |"]
    for size, values in times.items():
        median = statistics.median(values)
        lines.append(f"| {size} | {median:.3f} | {min(values):.3f} | {median / statistics.median(first):.3f} |")
    return lines


def main(argv: list[str] | None = None) -> dict[int, list[float]]:
    p = demo_parser(__doc__.split("\n")[0], "torch threads")
    p.add_argument("--sizes", default="256,512,1024", help="physical batch sizes, comma-separated")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="bf16", help="the forward's (default: bf16)")
    p.add_argument("--rounds", type=int, default=12, help="timed rounds (default: 12)")
    args = p.parse_args(argv)
    try:
        sizes = [int(s) for s in args.sizes.split(",")]
    except ValueError:
        p.error(f"--sizes: comma-separated whole numbers, got {args.sizes!r}")
    if min(sizes) < 2 or args.rounds < 1:
        p.error("--sizes must be >= 2 and --rounds >= 1")
    cfg, _, _ = load_demo(p, args, "measures")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    times = measure(cfg, sizes, args.precision, args.rounds)
    emit(report(times, args.precision, args.threads), args.out)
    return times


if __name__ == "__main__":
    main()
