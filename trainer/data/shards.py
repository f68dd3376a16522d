"""Write a :class:`~trainer.data.sources.Source` to webdataset tar shards (``dpldm prepare``).

Layout of ``OUT``::

    shard-000000.tar ...   one sample per image: KEY.png|KEY.jpg, KEY.txt (captions, one per line,
                           when known), KEY.cls (integer label, when known); KEY = source index, 8 digits
    meta.json              counts, label names, resolution policy, skipped items, the command
    progress.json          only while a run is unfinished: what --resume needs

Each shard is written to ``*.tar.tmp``, fsynced and renamed, so a file named ``shard-*.tar`` is
always complete. ``progress.json`` is rewritten (atomically) after every shard; ``--resume``
skips the source items already consumed and continues with the next shard index.

Bad input never passes silently: an item that cannot be read or does not meet the options
either stops the run with an error naming the file (``on_error="error"``, the default; complete
shards are kept) or is skipped, counted and listed in meta.json (``on_error="skip"``).

An item whose stored image is byte for byte one already written (a file twice in a folder, a
picture repeated in a dataset) is dropped and listed among the skipped items, whatever
``on_error``: a private set holding an example twice would have it drawn and clipped twice per
step, and the fine-tuning refuses such shards.

Image modes are converted as follows (counted in ``meta.json["conversions"]``):

- EXIF orientation is applied (the stored pixels are upright).
- ``RGBA``, ``PA`` and palette images with transparency: composited over white, to ``RGB``;
  ``LA``: composited over white, to ``L``.
- ``P`` (palette), ``CMYK``, ``YCbCr``, ``LAB``, ``HSV``: to ``RGB``; ``1`` (bilevel): to ``L``.
- 16/32-bit grayscale (``I;16*``, ``I``): clipped to 0..65535 and scaled to 8 bits (``round(v / 257)``).
- ``F`` (float) has no known scale and is a bad item.
- Then ``color``: ``auto`` keeps grayscale (``L``) as grayscale and everything else ``RGB``;
  ``rgb`` stores every image as RGB; ``gray`` stores every image as ``L`` (ITU-R 601-2 luma).
"""
from __future__ import annotations

import dataclasses
import io
import itertools
import json
import os
import re
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import webdataset as wds
from PIL import Image, ImageOps
from tqdm import tqdm

from trainer.data.reader import fingerprint as image_fingerprint
from trainer.data.reader import image_member, raw_samples
from trainer.data.sources import LoadedItem, SampleError, Source, SourceItem
from trainer.io import write_json

IMAGE_FORMATS = ("png", "jpg")
ON_ERROR = ("error", "skip")
COLORS = ("auto", "rgb", "gray")
SHARD_RE = re.compile(r"^shard-(\d{6})\.tar$")
META_FILE = "meta.json"
PROGRESS_FILE = "progress.json"
_TAR_MTIME = 0.0  # fixed member mtime: the same input gives byte-identical shards


class PrepareError(RuntimeError):
    """The job cannot go on (bad item with on_error=error, or an OUT folder it must not touch)."""


@dataclass
class WriteOptions:
    """How samples are written. ``require_captions=None`` takes the source's default."""
    samples_per_shard: int = 1000
    image_format: str = "png"
    jpeg_quality: int = 95
    color: str = "auto"
    min_size: int = 0                      # items whose short side is smaller are bad items
    max_size: Optional[int] = None         # downscale so the short side is at most this (aspect kept)
    require_captions: Optional[bool] = None
    caption_template: Optional[str] = None  # e.g. "a photo of a {label}" for items with a label, no caption
    on_error: str = "error"
    limit: Optional[int] = None            # read at most this many source items

    def validate(self) -> None:
        if self.samples_per_shard < 1:
            raise ValueError(f"samples_per_shard must be >= 1, got {self.samples_per_shard}")
        if self.image_format not in IMAGE_FORMATS:
            raise ValueError(f"image_format must be one of {IMAGE_FORMATS}, got {self.image_format!r}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality must be in 1..100, got {self.jpeg_quality}")
        if self.color not in COLORS:
            raise ValueError(f"color must be one of {COLORS}, got {self.color!r}")
        if self.on_error not in ON_ERROR:
            raise ValueError(f"on_error must be one of {ON_ERROR}, got {self.on_error!r}")
        if self.min_size < 0 or (self.max_size is not None and self.max_size < 1):
            raise ValueError(f"min_size must be >= 0 and max_size >= 1, got {self.min_size}, {self.max_size}")
        if self.max_size is not None and self.max_size < self.min_size:
            raise ValueError(f"max_size {self.max_size} is smaller than min_size {self.min_size}")
        if self.limit is not None and self.limit < 0:
            raise ValueError(f"limit must be >= 0, got {self.limit}")
        if self.caption_template is not None:
            check_caption_template(self.caption_template)


# --- images -----------------------------------------------------------------------------------

def check_caption_template(template: str) -> None:
    """Raise ValueError unless ``template`` is a format string of ``{label}`` only."""
    try:
        template.format(label="x")
    except (KeyError, IndexError, ValueError) as err:
        raise ValueError(f"may hold only {{label}} (the class name), got {template!r} ({type(err).__name__}: "
                         f"{err})") from None


def convert_mode(image: Image.Image, color: str = "auto") -> tuple[Image.Image, Optional[str]]:
    """Apply the documented mode conversions -> (``L`` or ``RGB`` image, "FROM->TO" or None)."""
    source_mode = image.mode
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba).convert("L" if source_mode in ("LA", "La") else "RGB")
    elif image.mode == "1":
        image = image.convert("L")
    elif image.mode.startswith("I"):  # I;16, I;16B, I;16L, I;16N, I
        values = np.asarray(image).astype(np.float64).clip(0, 65535)
        image = Image.fromarray(np.rint(values / 257.0).astype(np.uint8))
    elif image.mode == "F":
        raise ValueError("float (mode F) images have no known value range")
    elif image.mode not in ("L", "RGB"):
        image = image.convert("RGB")
    if color == "rgb" and image.mode != "RGB":
        image = image.convert("RGB")
    elif color == "gray" and image.mode != "L":
        image = image.convert("L")
    return image, (None if image.mode == source_mode else f"{source_mode}->{image.mode}")


def limit_size(image: Image.Image, max_size: Optional[int]) -> Image.Image:
    """Downscale (Lanczos) so that the short side is at most ``max_size``; never upscale."""
    w, h = image.size
    if max_size is None or min(w, h) <= max_size:
        return image
    scale = max_size / min(w, h)
    size = (max(max_size, round(w * scale)), max(max_size, round(h * scale)))
    return image.resize(size, Image.Resampling.LANCZOS)


def encode_image(image: Image.Image, image_format: str, jpeg_quality: int = 95) -> bytes:
    """PNG (lossless), or JPEG at ``jpeg_quality`` with full-resolution chroma (4:4:4): chroma
    subsampling would blur colour edges, which costs the most on small images."""
    buf = io.BytesIO()
    if image_format == "png":
        image.save(buf, format="PNG", compress_level=6)
    else:
        image.save(buf, format="JPEG", quality=jpeg_quality, subsampling=0)
    return buf.getvalue()


def clean_captions(captions: Optional[list[str]]) -> list[str]:
    """One caption per line: inner newlines and runs of whitespace become single spaces."""
    return [" ".join(c.split()) for c in (captions or []) if c and c.strip()]


# --- progress ---------------------------------------------------------------------------------

@dataclass
class Progress:
    """What has been committed to complete shards (rewritten after each shard)."""
    fingerprint: dict
    consumed: int = 0                                  # source items behind the complete shards
    shards: list = field(default_factory=list)         # [{"name", "count"}]
    skipped: list = field(default_factory=list)        # [{"source", "reason"}]
    with_captions: int = 0
    label_counts: dict = field(default_factory=dict)   # str(label) -> count
    conversions: dict = field(default_factory=dict)    # "RGBA->RGB" -> count
    short_side: list = field(default_factory=list)     # [min, max] of the stored images
    # random, new for each preparation (kept by --resume, not by --overwrite): a DP run records its folders'
    # ids, so that a folder prepared again since (other images behind the same shard names) is not judged
    # by its new contents
    preparation: str = field(default_factory=lambda: secrets.token_hex(8))

    @property
    def count(self) -> int:
        return sum(s["count"] for s in self.shards)


@dataclass
class _Pending:
    """Samples and statistics of the shard being filled (committed only when it is renamed)."""
    samples: list = field(default_factory=list)
    skipped: list = field(default_factory=list)
    with_captions: int = 0
    label_counts: dict = field(default_factory=dict)
    conversions: dict = field(default_factory=dict)
    short_side: list = field(default_factory=list)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


def complete_shards(out_dir: str | Path) -> list[Path]:
    """The ``shard-NNNNNN.tar`` files of ``out_dir``, sorted (``*.tar.tmp`` are never listed)."""
    return sorted(p for p in Path(out_dir).iterdir() if SHARD_RE.match(p.name))


def write_shard(path: Path, samples: list[dict]) -> None:
    """Write samples to ``path`` atomically: ``path.tmp``, fsync, rename, fsync the folder.

    An exception removes the ``.tmp`` file; a hard kill may leave it, and the next run deletes it.
    """
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as fh:
            writer = wds.TarWriter(fh, encoder=False, mtime=_TAR_MTIME)
            try:
                for sample in samples:
                    writer.write(sample)
            finally:
                writer.close()
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)
    _fsync_dir(path.parent)


# --- the job ----------------------------------------------------------------------------------

def _fingerprint(source: Source, options: WriteOptions) -> dict:
    # on_error only decides what happens to bad items; changing it must not block --resume
    opts = {k: v for k, v in dataclasses.asdict(options).items() if k != "on_error"}
    return {"source": source.description, "options": opts}


def _open_out_dir(out: Path, fingerprint: dict, resume: bool, overwrite: bool) -> Optional[Progress]:
    """Clean up ``out`` and return the committed progress (None: the job is already finished)."""
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("*.tmp"):  # left by an interrupted shard or JSON write
        stale.unlink()
    shards = complete_shards(out)
    progress_path, meta_path = out / PROGRESS_FILE, out / META_FILE
    if overwrite:
        for p in [*shards, progress_path, meta_path]:
            p.unlink(missing_ok=True)
        return Progress(fingerprint)
    if not resume:
        if shards or progress_path.exists() or meta_path.exists():
            raise PrepareError(f"{out} already holds shards; pass --resume to continue an interrupted "
                               "run or --overwrite to start again")
        return Progress(fingerprint)
    if meta_path.exists() and not progress_path.exists():  # the job had finished
        if json.loads(meta_path.read_text()).get("fingerprint") != fingerprint:
            raise PrepareError(f"--resume: {meta_path} was made from a different source or options")
        return None
    if not progress_path.exists():
        if shards:
            raise PrepareError(f"--resume: {out} has shards but no {PROGRESS_FILE}; use --overwrite")
        return Progress(fingerprint)
    progress = Progress(**json.loads(progress_path.read_text()))
    if progress.fingerprint != fingerprint:
        raise PrepareError(f"--resume: {out} was started with a different source or options:\n"
                           f"  then: {json.dumps(progress.fingerprint, sort_keys=True)}\n"
                           f"  now:  {json.dumps(fingerprint, sort_keys=True)}")
    done = {s["name"] for s in progress.shards}
    for p in shards:  # a shard renamed after the last progress write is rewritten identically
        if p.name not in done:
            p.unlink()
    missing = done - {p.name for p in complete_shards(out)}
    if missing:
        raise PrepareError(f"--resume: {out} lacks shards listed in {PROGRESS_FILE}: {sorted(missing)}")
    return progress


class _Duplicate(SampleError):
    """An item whose stored image an earlier sample holds: dropped whatever ``on_error``."""


def _make_sample(item: SourceItem, key: str, options: WriteOptions, require_captions: bool,
                 label_names: Optional[list[str]], pending: _Pending, written: dict[bytes, str]) -> dict:
    """The sample of ``item`` under ``key``, counted in ``pending`` and its image in ``written``."""
    loaded: LoadedItem = item.load()
    try:
        image = ImageOps.exif_transpose(loaded.image)
        image, conversion = convert_mode(image, options.color)
    except (ValueError, OSError) as exc:
        raise SampleError(item.origin, f"unsupported image mode {loaded.image.mode} ({exc})") from exc
    w, h = image.size
    if min(w, h) < options.min_size:
        raise SampleError(item.origin, f"image is {w}x{h}, smaller than --min-size {options.min_size}")
    label = loaded.label
    if label is not None and label_names is not None and not 0 <= label < len(label_names):
        raise SampleError(item.origin, f"label {label} is outside 0..{len(label_names) - 1}")
    captions = clean_captions(loaded.captions)
    if not captions and options.caption_template and label is not None:
        name = label_names[label] if label_names else str(label)
        captions = [options.caption_template.format(label=name)]
    if require_captions and not captions:
        raise SampleError(item.origin, "no caption (captions are required)")
    image = limit_size(image, options.max_size)
    encoded = encode_image(image, options.image_format, options.jpeg_quality)
    same = written.get(image_fingerprint(encoded))
    if same is not None:
        raise _Duplicate(item.origin, f"the same image as sample {same} (each image is written once)")
    written[image_fingerprint(encoded)] = key
    sample = {"__key__": key, options.image_format: encoded}
    if captions:
        sample["txt"] = "\n".join(captions).encode("utf-8")
        pending.with_captions += 1
    if label is not None:
        sample["cls"] = str(int(label)).encode("ascii")
        pending.label_counts[str(label)] = pending.label_counts.get(str(label), 0) + 1
    if conversion:
        pending.conversions[conversion] = pending.conversions.get(conversion, 0) + 1
    short = min(image.size)
    pending.short_side = [min(pending.short_side[0], short), max(pending.short_side[1], short)] \
        if pending.short_side else [short, short]
    return sample


def _written_images(out: Path, progress: Progress) -> dict[bytes, str]:
    """Image fingerprint -> key of every sample in the complete shards (a resumed run's)."""
    written = {}
    for sample in raw_samples([str(out / s["name"]) for s in progress.shards]):
        image = image_member(sample)
        if image is not None:
            written[image_fingerprint(image)] = sample["__key__"]
    return written


def _commit(progress: Progress, pending: _Pending, consumed: int, out: Path) -> None:
    if pending.samples:
        name = shard_name(len(progress.shards))
        write_shard(out / name, pending.samples)
        progress.shards.append({"name": name, "count": len(pending.samples)})
    progress.consumed = consumed
    progress.skipped.extend(pending.skipped)
    progress.with_captions += pending.with_captions
    for src, dst in ((pending.label_counts, progress.label_counts), (pending.conversions, progress.conversions)):
        for k, v in src.items():
            dst[k] = dst.get(k, 0) + v
    progress.label_counts = dict(sorted(progress.label_counts.items(), key=lambda kv: int(kv[0])))
    if pending.short_side:
        s = progress.short_side or pending.short_side
        progress.short_side = [min(s[0], pending.short_side[0]), max(s[1], pending.short_side[1])]
    write_json(dataclasses.asdict(progress), out / PROGRESS_FILE)


def write_shards(source: Source, out_dir: str | Path, options: Optional[WriteOptions] = None, *,
                 resume: bool = False, overwrite: bool = False, command: Optional[str] = None,
                 progress_bar: bool = True) -> dict:
    """Write ``source`` to shards in ``out_dir`` and return the meta.json content.

    Raises :class:`PrepareError` on a bad item (with ``on_error="error"``) after keeping the
    complete shards, or when ``out_dir`` holds another job's shards.
    """
    options = options or WriteOptions()
    options.validate()
    out = Path(out_dir)
    require_captions = options.require_captions if options.require_captions is not None \
        else bool(source.defaults.get("require_captions", False))
    fingerprint = _fingerprint(source, options)
    progress = _open_out_dir(out, fingerprint, resume, overwrite)
    if progress is None:
        return json.loads((out / META_FILE).read_text())

    items = source.items()
    total = source.count if options.limit is None else min(options.limit, source.count or options.limit)
    if options.limit is not None:
        items = itertools.islice(items, options.limit)
    consumed = progress.consumed
    items = itertools.islice(items, consumed, None)  # items are lazy: skipping reads nothing
    pending = _Pending()
    written = _written_images(out, progress)
    bar = tqdm(total=total, initial=consumed, unit="img", desc=f"prepare {out.name}",
               disable=not progress_bar)
    try:
        for item in items:
            key = f"{consumed:08d}"
            consumed += 1
            bar.update(1)
            try:
                pending.samples.append(
                    _make_sample(item, key, options, require_captions, source.label_names, pending, written))
            except _Duplicate as exc:
                pending.skipped.append({"source": exc.origin, "reason": exc.reason})
            except SampleError as exc:
                if options.on_error == "error":
                    kept = (f"{len(progress.shards)} complete shard(s) kept in {out}; fix the input and rerun with "
                            "--resume" if progress.shards else "no shard complete; fix the input and rerun")
                    raise PrepareError(f"{exc} (stopped: {kept}, or pass --on-error skip)") from exc
                pending.skipped.append({"source": exc.origin, "reason": exc.reason})
            if len(pending.samples) == options.samples_per_shard:
                _commit(progress, pending, consumed, out)
                pending = _Pending()
        _commit(progress, pending, consumed, out)
    finally:
        bar.close()

    if progress.count == 0:  # nothing to keep: leave no trace of this run
        (out / PROGRESS_FILE).unlink(missing_ok=True)
        if out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        reasons = "; ".join(f"{s['source']}: {s['reason']}" for s in progress.skipped[:3])
        raise PrepareError(f"no sample written to {out}: " + (
            f"all {len(progress.skipped)} items were skipped ({reasons}{'; ...' if len(progress.skipped) > 3 else ''})"
            if progress.skipped else "the source holds no items"))
    n_shards = len(progress.shards)
    meta = {
        "format": "dpldm-shards",
        "version": 1,
        "source": source.description,
        "command": command,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "count": progress.count,
        "num_shards": n_shards,
        "pattern": f"shard-{{000000..{n_shards - 1:06d}}}.tar" if n_shards else None,
        "samples_per_shard": options.samples_per_shard,
        "image_format": options.image_format,
        "jpeg_quality": options.jpeg_quality if options.image_format == "jpg" else None,
        "label_names": source.label_names,
        "captions": {"required": require_captions, "template": options.caption_template,
                     "with_captions": progress.with_captions},
        "resolution": {"policy": "original size" if options.max_size is None
                       else f"short side downscaled to at most {options.max_size}",
                       "min_size": options.min_size, "max_size": options.max_size, "color": options.color,
                       "short_side_range": progress.short_side or None,
                       "reader": "resizes the short side and centre-crops to the training resolution"},
        "skipped_count": len(progress.skipped),
        **dataclasses.asdict(progress),
    }
    write_json(meta, out / META_FILE)
    (out / PROGRESS_FILE).unlink()
    return meta
