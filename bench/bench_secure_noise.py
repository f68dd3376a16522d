"""Cost of ``finetune.secure_noise``: the DP noise of one logical step, default vs secure Gaussian.

Both sides are measured in this process on the same parameter shapes (the demo's attention
policy: 1,662,080 trainable elements by default), interleaved, median of ``--repeats``:

- default: ``torch.randn`` from a generator seeded once from OS entropy;
- secure: OS CSPRNG bytes, Box-Muller in float64, 4 draws summed per coordinate / 2.

Usage: ``python bench/bench_secure_noise.py [--numel 1662080] [--repeats 7] [--out docs/bench-secure-noise.md]``
"""
from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from trainer.privacy.noise import entropy_generator, secure_standard_normal  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--numel", type=int, default=1_662_080, help="noised coordinates per step")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", default="docs/bench-secure-noise.md")
    args = parser.parse_args()
    torch.set_num_threads(1)
    generator = entropy_generator()
    shape = (args.numel,)
    times: dict[str, list[float]] = {"default (torch generator, OS-entropy seed)": [], "secure (CSPRNG, 4 draws)": []}
    draws = {name: (lambda: torch.randn(shape, generator=generator)) if "default" in name
             else (lambda: secure_standard_normal(shape)) for name in times}
    for _ in range(args.repeats):
        for name, draw in draws.items():
            start = time.perf_counter()
            draw()
            times[name].append(time.perf_counter() - start)
    base = statistics.median(times["default (torch generator, OS-entropy seed)"])
    lines = [f"Noise of one DP-SGD step, {args.numel:,} coordinates, 1 thread, median of {args.repeats} "
             f"({platform.processor() or platform.machine()}, torch {torch.__version__})", "",
             "| noise | median per step (ms) | vs default |", "| --- | ---: | ---: |"]
    for name, ts in times.items():
        t = statistics.median(ts)
        lines.append(f"| {name} | {1000 * t:.1f} | {t / base:.1f}x |")
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
