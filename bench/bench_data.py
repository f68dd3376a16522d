"""Data-layer throughput: shard decode + resize to 256x256, and autoencoder encoding into latents.

Writes synthetic CelebA-HQ-like JPEG shards (1024x1024, quality 95) to a temporary folder, then
measures in this process:

- decode + resize/crop to the resolution (images/s): full JPEG decode, libjpeg reduced-scale
  decode (``fast_jpeg``), and the DataLoader with several workers;
- encoding with a small ``AutoencoderKL`` (latents/s) at that resolution on ``--device``.

Usage: ``python bench/bench_data.py [--images 64] [--workers 2] [--device cpu] [--out docs/bench-data.md]``
"""
from __future__ import annotations

import argparse
import io
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from trainer.data.reader import make_dataset, make_loader  # noqa: E402
from trainer.data.shards import write_shard  # noqa: E402


def synthetic_jpeg(rng: np.random.Generator, size: int) -> bytes:
    """A smooth random colour field with mild noise: compresses like a photo, not like noise."""
    coarse = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    field = np.asarray(Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC), dtype=np.int16)
    field = np.clip(field + rng.integers(-6, 7, field.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(field).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def write_bench_shards(folder: Path, n_images: int, size: int, per_shard: int) -> None:
    rng = np.random.default_rng(0)
    for s in range(0, n_images, per_shard):
        samples = [{"__key__": f"{i:08d}", "jpg": synthetic_jpeg(rng, size), "txt": b"a face", "cls": b"0"}
                   for i in range(s, min(n_images, s + per_shard))]
        write_shard(folder / f"shard-{s // per_shard:06d}.tar", samples)


def images_per_second(batches, repeats: int = 2) -> float:
    best = 0.0
    for _ in range(repeats):
        start, n = time.perf_counter(), 0
        for batch in batches():
            n += len(batch["key"])
        best = max(best, n / (time.perf_counter() - start))
    return best


def encode_throughput(resolution: int, batch_size: int, device: str, batches: int = 3) -> tuple[float, str]:
    from trainer.models import AutoencoderKL
    ddconfig = dict(double_z=True, z_channels=4, resolution=resolution, in_channels=3, out_ch=3, ch=32,
                    ch_mult=[1, 2, 4], num_res_blocks=1, attn_resolutions=[], dropout=0.0)
    model = AutoencoderKL(ddconfig, embed_dim=4).to(device).eval()
    x = torch.rand(batch_size, 3, resolution, resolution, device=device) * 2 - 1
    with torch.no_grad():
        model.encode(x)  # warm-up
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(batches):
            mean, _ = model.encode(x)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    shape = "x".join(str(d) for d in mean.shape[1:])
    return batches * batch_size / elapsed, f"AutoencoderKL ch=32 ch_mult=[1,2,4] -> {shape}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--size", type=int, default=1024, help="stored JPEG size (CelebA-HQ: 1024)")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--encode-batch", type=int, default=8)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "docs" / "bench-data.md"))
    args = parser.parse_args()

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        write_bench_shards(folder, args.images, args.size, per_shard=max(1, args.images // 4))
        common = dict(shuffle_buffer=0, shardshuffle=False)
        R = args.resolution
        for label, fast in (("full JPEG decode", False), ("reduced-scale JPEG decode (fast_jpeg)", True)):
            rate = images_per_second(lambda: make_dataset(str(folder), R, args.batch_size, fast_jpeg=fast, **common))
            rows.append((f"decode + resize/crop {args.size}->{R}, {label}, 1 process", f"{rate:.1f} images/s"))
        if args.workers > 0:
            rate = images_per_second(lambda: make_loader(str(folder), R, args.batch_size,
                                                         num_workers=args.workers, **common))
            rows.append((f"decode + resize/crop {args.size}->{R}, fast_jpeg, DataLoader {args.workers} workers",
                         f"{rate:.1f} images/s"))
    rate, what = encode_throughput(R, args.encode_batch, args.device)
    rows.append((f"encode {R}x{R} on {args.device}, batch {args.encode_batch}: {what}", f"{rate:.1f} latents/s"))

    device = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else platform.processor() or "cpu"
    lines = [
        "# Data-layer throughput",
        "",
        f"Measured by `python bench/bench_data.py` on {device} ({os.cpu_count()} CPU cores visible), "
        f"torch {torch.__version__}; {args.images} synthetic {args.size}x{args.size} JPEGs (quality 95) "
        f"in webdataset shards, best of two passes.",
        "",
        "| measurement | throughput |",
        "| --- | --- |",
        *[f"| {name} | {value} |" for name, value in rows],
        "",
    ]
    text = "\n".join(lines)
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
