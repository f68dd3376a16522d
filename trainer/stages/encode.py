"""Stage ``encode``: private shards -> latent cache with the frozen autoencoder.

``dpldm encode --autoencoder RUN_DIR SHARDS OUT`` encodes every image of SHARDS (a folder of
shards, a brace pattern or a list) once and stores the posterior mean and std per example (see
:mod:`trainer.data.latent_cache`). The encoder is frozen and never sees a gradient. Run it
again after an interruption: finished shards are kept. Several ranks (``--rank/--world-size``,
default from ``RANK``/``WORLD_SIZE``) share the shards.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from trainer.data.latent_cache import DTYPES, CacheMismatchError, build_latent_cache
from trainer.errors import RunError, UsageError
from trainer.runtime import resolve_device
from trainer.pipeline import autoencoder_encode_fn


def run(args: argparse.Namespace) -> int:
    from trainer.data.reader import expand_urls
    from trainer.stages.common import load_autoencoder, refuse_file_as_folder
    try:
        expand_urls(args.shards)
    except (ValueError, OSError) as err:
        raise UsageError(f"SHARDS: {err}") from None
    refuse_file_as_folder("OUT", args.out)
    if not (Path(args.autoencoder) / "config.yaml").is_file():
        raise RunError(f"--autoencoder: {args.autoencoder} is not a pretrain-ae run folder (no config.yaml)")
    try:
        model, encoder_hash = load_autoencoder(args.autoencoder)
    except (FileNotFoundError, ValueError, RuntimeError) as err:
        print(f"dpldm encode: error: cannot load the autoencoder of {args.autoencoder}: {err}", file=sys.stderr)
        return 1
    ddconfig = model.ddconfig
    resolution = args.resolution or int(ddconfig["resolution"])
    factor = 2 ** (len(ddconfig["ch_mult"]) - 1)  # the encoder halves the image at each level but the last
    if resolution % factor:
        raise UsageError(f"--resolution: must be a multiple of the autoencoder's downsampling factor {factor}, "
                         f"got {resolution}")
    if args.rank >= args.world_size:
        raise UsageError(f"--rank: must be below --world-size ({args.world_size}), got {args.rank}")
    device = resolve_device(args.device, "--device")  # a device this machine lacks: refused naming the flag
    channels = int(ddconfig["in_channels"])
    if channels not in (1, 3):
        print(f"dpldm encode: error: the autoencoder takes {channels} channels; shards give 1 or 3", file=sys.stderr)
        return 1
    try:
        manifest = build_latent_cache(
            autoencoder_encode_fn(model, device), args.shards, args.out, encoder_hash, resolution,
            args.batch_size, rank=args.rank, world_size=args.world_size, dtype=args.dtype,
            channels=channels, pad_small=args.pad_small, progress_bar=not args.no_progress)
    except (CacheMismatchError, ValueError, OSError) as err:
        print(f"dpldm encode: error: {err}", file=sys.stderr)
        return 1
    if manifest["complete"]:
        print(f"latent cache: {manifest['count']} examples of shape {manifest['latent_shape']} "
              f"({manifest['dtype']}) in {args.out}")
    else:
        print(f"rank {args.rank}: its shards are encoded in {args.out}; the cache completes when every rank has run")
    return 0


def register(subparsers) -> None:
    """Add ``encode`` to the ``dpldm`` parser."""
    from trainer.cli import non_negative_int, plain, positive_int
    p = subparsers.add_parser("encode", help="encode private shards into a latent cache (frozen encoder)",
                              description=plain(__doc__), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--autoencoder", required=True, metavar="RUN_DIR",
                   help="a pretrain-ae run folder (config.yaml + autoencoder.safetensors)")
    p.add_argument("shards", metavar="SHARDS", help="shard folder, brace pattern (shard-{000000..000009}.tar) or a::b list")
    p.add_argument("out", metavar="OUT", help="output folder of the latent cache")
    p.add_argument("--resolution", type=positive_int, help="image size fed to the encoder (default: the autoencoder's)")
    p.add_argument("--batch-size", type=positive_int, default=64, help="images encoded together (default 64)")
    p.add_argument("--dtype", choices=list(DTYPES), default="float16", help="storage dtype of mean and std")
    p.add_argument("--device", default="auto", help="auto (CUDA when visible), cpu, cuda or cuda:N (default: auto)")
    p.add_argument("--pad-small", action="store_true",
                   help="centre images smaller than the resolution on black instead of upscaling (MNIST 28 -> 32)")
    p.add_argument("--rank", type=non_negative_int, default=int(os.environ.get("RANK", 0)),
                   help="this process's share: shards rank, rank + world size, ... (default: RANK, else 0)")
    p.add_argument("--world-size", type=positive_int, default=int(os.environ.get("WORLD_SIZE", 1)),
                   help="processes sharing the shards; the last to finish completes the cache (default: "
                        "WORLD_SIZE, else 1)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
