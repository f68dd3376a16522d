"""Data-parallel public pretraining: the project's runtime against PyTorch DDP, same model, same batch.

On the config's LDM (the demo's by default), ``--world`` processes (gloo on CPU, NCCL on CUDA,
one GPU each) each take ``--batch / --world`` random latents per step and compute the diffusion
loss. Two ways to average the gradients, timed in the same processes, in interleaved rounds:

1. ``runtime``: what ``dpldm pretrain-ldm`` does (``Runtime.average_gradients``: one flat
   all-reduce after the backward);
2. ``DDP``: ``torch.nn.parallel.DistributedDataParallel`` (bucketed all-reduces overlapped with
   the backward), the usual baseline.

Both rows end with an AdamW step; both start from the same weights. Reported: the median step
time of rank 0 over ``--repeats`` steps after a warm-up, examples per second, and the ratio to
DDP; the updated weights of the two rows after the first step are compared (they must agree).

Usage: ``python bench/bench_pretrain.py [--config demo] [--world 2] [--batch 64] [--repeats 10]
[--device cpu|cuda] [--threads 1] [--out docs/bench-pretrain.md] [KEY=VALUE ...]``
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from trainer.config import Config, load_config  # noqa: E402
from trainer.distributed import _free_port  # noqa: E402
from trainer.runtime import Placement, Runtime, adamw  # noqa: E402
from trainer.stages.common import build_ldm  # noqa: E402

ROWS = ("runtime", "DDP")


def _model(cfg: Config) -> torch.nn.Module:
    torch.manual_seed(0)
    ldm = build_ldm(cfg)
    with torch.no_grad():  # zero-initialised output layers would give zero gradients to most weights
        for p in ldm.parameters():
            if p.dim() > 1 and not p.any():
                p.normal_(0, 0.02)
    return ldm


def _worker(rank: int, world: int, port: int, cfg: Config, args: argparse.Namespace, out: dict) -> None:
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    device = torch.device(args.device if args.device == "cpu" else f"cuda:{rank}")
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    else:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world)
    rt = Runtime(Placement(device), rank, world)
    per_rank = args.batch // world
    unet = cfg.ldm.unet
    shape = (unet["in_channels"], unet["image_size"], unet["image_size"])
    n_classes = cfg.ldm.conditioner.n_classes
    gen = torch.Generator().manual_seed(100 + rank)
    z = torch.randn(per_rank, *shape, generator=gen).to(device)
    labels = torch.randint(0, n_classes, (per_rank,), generator=gen).to(device)

    base = _model(cfg).to(device)
    ours = copy.deepcopy(base)
    ddp_inner = copy.deepcopy(base)
    ddp_inner.forward = ddp_inner.loss  # DDP's reducer sees only backwards of forwards run through DDP
    ddp = torch.nn.parallel.DistributedDataParallel(ddp_inner, device_ids=[rank] if device.type == "cuda" else None)

    def stepper(loss_fn, params: list, average: bool):
        opt = adamw(params, cfg.ldm.train.lr, cfg.ldm.train.weight_decay)

        def step() -> None:
            loss = loss_fn(z, labels, torch.Generator().manual_seed(7)).mean()  # same draws in both rows
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if average:
                rt.average_gradients(params)
            opt.step()
        return step

    steps = {"runtime": stepper(ours.loss, list(ours.parameters()), True),
             "DDP": stepper(ddp, list(ddp.parameters()), False)}

    for name in ROWS:  # warm-up, and the check that both give the same update
        steps[name]()
    diff = max(float((a - b).abs().max()) for a, b in zip(ours.parameters(), ddp_inner.parameters()))
    moved = max(float((a - b).abs().max()) for a, b in zip(ours.parameters(), base.parameters()))
    times: dict[str, list[float]] = {name: [] for name in ROWS}
    for _ in range(args.repeats):
        for name in ROWS:
            rt.barrier()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            steps[name]()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times[name].append(time.perf_counter() - t0)
    if rank == 0:
        out.update({"times": times, "weight_diff": diff, "update": moved,
                    "params": sum(p.numel() for p in base.parameters()), "shape": shape})
    dist.destroy_process_group()


def _spawned(rank: int, world: int, port: int, cfg: Config, args: argparse.Namespace, queue) -> None:
    out: dict = {}
    _worker(rank, world, port, cfg, args, out)
    if rank == 0:
        queue.put(out)


def report(out: dict, cfg_name: str, args: argparse.Namespace) -> str:
    where = torch.cuda.get_device_name(0) if args.device != "cpu" else (
        f"CPU, {os.cpu_count()} cores visible, {args.threads} torch thread(s) per process")
    ddp = statistics.median(out["times"]["DDP"])
    lines = [
        "# Data-parallel pretraining benchmark",
        "",
        f"Measured by `python bench/bench_pretrain.py --config {cfg_name} --world {args.world} --batch {args.batch} "
        f"--repeats {args.repeats} --device {args.device}" + (f" --threads {args.threads}" if args.device == "cpu" else "")
        + "".join(f" {o}" for o in args.overrides) + f"` on {where}, torch {torch.__version__}.",
        "",
        f"- Model: config `{cfg_name}` LDM ({out['params']:,} parameters, all trained); {args.world} processes, "
        f"{args.batch // args.world} latents {'x'.join(map(str, out['shape']))} each per step "
        f"(global batch {args.batch}); AdamW.",
        f"- Median step time of rank 0 over {args.repeats} steps per row, in interleaved rounds after a warm-up "
        f"step each; after the warm-up step the weights differ by at most {out['weight_diff']:.1e} between rows "
        f"(the step moved them by up to {out['update']:.1e}).",
        "",
        "| gradient averaging | median step (s) | examples/s | time vs DDP |",
        "| --- | ---: | ---: | ---: |",
    ]
    for name in ROWS:
        t = statistics.median(out["times"][name])
        lines.append(f"| {name} | {t:.4f} | {args.batch / t:.1f} | {t / ddp:.2f}x |")
    return "\n".join(lines + [""])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="demo", help="config name (configs/NAME.yaml) or path")
    parser.add_argument("--world", type=int, default=2, help="processes (GPUs on CUDA)")
    parser.add_argument("--batch", type=int, default=64, help="global examples per step")
    parser.add_argument("--repeats", type=int, default=10, help="timed steps per row (after one warm-up)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads per process")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "docs" / "bench-pretrain.md"))
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")
    args = parser.parse_args(argv)
    if args.world < 1 or args.batch % args.world:
        parser.error(f"--batch {args.batch} must split evenly over --world {args.world} (>= 1) processes")
    if args.device == "cuda" and torch.cuda.device_count() < args.world:
        parser.error(f"--world {args.world}: only {torch.cuda.device_count()} CUDA device(s)")
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    cfg = load_config(args.config, args.overrides)
    if cfg.ldm.conditioner.type != "class":
        parser.error(f"ldm.conditioner.type: the benchmark needs a class conditioner, got {cfg.ldm.conditioner.type!r}")
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.start_processes(_spawned, args=(args.world, _free_port(), cfg, args, queue), nprocs=args.world,
                       join=True, start_method="spawn")
    out = queue.get()
    text = report(out, args.config, args)
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    return out


if __name__ == "__main__":
    main()
