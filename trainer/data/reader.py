"""Stream batches of images from webdataset shards (the files ``dpldm prepare`` writes).

``make_dataset`` / ``make_loader`` read local shard paths, brace patterns
(``shard-{000000..000099}.tar``), ``a.tar::b.tar`` lists, ``pipe:`` URLs, or a folder of
``shard-*.tar``. Shards are split across ranks (``rank``/``world_size`` arguments, else
``wds.split_by_node``: the ``RANK``/``WORLD_SIZE`` environment or ``torch.distributed``) and then
across DataLoader workers (``wds.split_by_worker``), so each sample is read by exactly one
(rank, worker) per epoch; a worker without a shard yields nothing, a rank without one is an
error. Ranks can receive different numbers of samples when shards differ in size or do not divide
evenly: loops that synchronise ranks should run a fixed number of steps.

Each sample is decoded, converted to RGB (or grayscale with ``channels=1``), its short side
resized to ``resolution`` (bicubic) and centre-cropped, then scaled to [-1, 1] float CHW. Batches::

    {"image": float [B, C, R, R], "caption": list[str] (one random caption per sample, "" if none),
     "captions": list[list[str]] (all of them), "label": LongTensor [B] (-1 if none), "key": list[str]}

Everything random (shard order, shuffle buffer, caption choice) derives from ``seed`` and the
epoch (``set_epoch``), so a run is reproducible for a seed with any number of workers.
"""
from __future__ import annotations

import glob
import hashlib
import io
import random
import tarfile
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, NamedTuple, Optional, Sequence, TypeVar

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset

from trainer.data.sources import split_caption_lines
from trainer.errors import DataError, first_line

# image members of a sample (and image files of a folder), in order of preference
IMAGE_KEYS = ("png", "jpg", "jpeg", "webp", "bmp", "ppm", "pgm", "tif", "tiff")
T = TypeVar("T")


# --- urls -------------------------------------------------------------------------------------

def expand_urls(urls: str | Path | Sequence[str | Path], present_only: bool = False) -> list[str]:
    """Shard URLs: a folder (its ``shard-*.tar``), a brace pattern, a glob (``shards/*.tar``),
    ``a::b``, or a list of those. The one shard-list rule of training, caching and evaluation.

    Local files must exist (FileNotFoundError names them), or with ``present_only`` those that do not
    are left out; ``pipe:`` and ``scheme://`` URLs are opened by webdataset when read.
    """
    items = [urls] if isinstance(urls, (str, Path)) else list(urls)
    out: list[str] = []
    for item in items:
        item = str(item)
        if not item.startswith("pipe:") and Path(item).is_dir():
            found = sorted(str(p) for p in Path(item).glob("shard-*.tar"))
            if not found:
                raise ValueError(f"folder {item} holds no shard-*.tar files")
            out.extend(found)
        else:
            for url in wds.shardlists.expand_urls(item):  # braces and "::"
                local = not url.startswith("pipe:") and "://" not in url
                if local and any(ch in url for ch in "*?["):
                    matched = sorted(glob.glob(url))
                    if not matched and not present_only:
                        raise FileNotFoundError(f"pattern {url} matches no file")
                    out.extend(matched)
                else:
                    out.append(url)
    missing = [u for u in out if not u.startswith("pipe:") and "://" not in u and not Path(u).is_file()]
    if present_only:
        out = [u for u in out if u not in missing]
    elif missing:
        raise FileNotFoundError(f"no such shard file(s): {', '.join(missing[:3])}"
                                + (f" and {len(missing) - 3} more" if len(missing) > 3 else ""))
    if not out:
        raise ValueError(f"{urls!r} names no shards")
    return out


class ShardCount(NamedTuple):
    """What :func:`count_distinct_samples` read: ``count`` samples, ``digest`` (a sha256 over their
    contents in order), ``images`` (the :func:`fingerprint` of every image member), ``captioned`` (how
    many samples have a ``txt`` member), ``captions`` (every caption line) and ``labels`` (the class labels
    they carry, -1 for a sample without one)."""
    count: int
    digest: str
    images: frozenset[bytes]
    captioned: int
    captions: frozenset[str]
    labels: frozenset[int]


def count_distinct_samples(urls: Sequence[str]) -> ShardCount:
    """The samples in the shards ``urls`` (as the reader groups a tar's members), read once without
    decoding: their number, a sha256 over their contents, their images' fingerprints, their
    captions and labels (DataError for captions that are not UTF-8, a label that is not a number). Refuses
    (ValueError) a shard whose samples are those of another (the same file twice, a copy, a
    ``pipe:cat`` of it), and an image file held by two samples (in one shard or two, under any key).

    For a private set, where N sets the sampling rate q = B / N: an example read twice would be in
    the set twice, with two chances per step to be drawn and two clipped gradients, and the
    accountant would under-state epsilon for whoever it shows. A shard's identity is the hash of its
    samples' members (names and bytes; not their keys or URL), so streamed and remote shards are
    compared by content too; images by their bytes as stored (the same picture encoded twice
    differently is not seen).
    """
    seen: dict[str, str] = {}
    images: dict[bytes, tuple[str, int]] = {}  # image fingerprint -> (shard, position in it) of its first sample
    total, captioned, captions, labels, digest = 0, 0, set(), set(), hashlib.sha256()
    for url in urls:
        content, count, twice = hashlib.sha256(), 0, None
        for sample in raw_samples([url]):
            image = image_member(sample)
            if image is not None and twice is None:
                first = images.setdefault(fingerprint(image), (url, count))
                if first != (url, count):
                    twice = (*first, count)
            count += 1
            captioned += "txt" in sample
            captions.update(sample_captions(sample))
            labels.add(sample_label(sample))
            for name in sorted(k for k in sample if not k.startswith("__")):
                content.update(f"{name}\0{len(sample[name])}\0".encode())
                content.update(sample[name])
        identity = content.hexdigest()
        if identity in seen:
            raise ValueError(f"{url}: the same samples as shard {seen[identity]}: they would count twice in the "
                             "set; list each shard once")
        if twice is not None:  # after the shard's identity: a whole shard repeated gets the plainer message
            first, at, again = twice
            raise ValueError(f"{url}: its sample {again} (from 0, in shard order) holds the same image as sample {at} "
                             f"of {first}: one example twice in a private set would be drawn and clipped twice per "
                             "step, and the epsilon reported would not hold for it; remove the copy")
        seen[identity] = url
        digest.update(f"{identity}\n".encode())
        total += count
    return ShardCount(total, digest.hexdigest(), frozenset(images), captioned, frozenset(captions), frozenset(labels))


def image_files(folder: Path) -> list[Path]:
    """The image files under ``folder`` (recursive, by an ``IMAGE_KEYS`` suffix), sorted."""
    return sorted(p for p in Path(folder).rglob("*") if p.is_file() and p.suffix.lower().lstrip(".") in IMAGE_KEYS)


def shard_captions(urls: Sequence[str]) -> set[str]:
    """Every caption of the shards ``urls`` (their ``txt`` members, one caption per line)."""
    return {caption for sample in raw_samples(urls) for caption in sample_captions(sample)}


def _where(sample: dict) -> str:
    return f"{sample.get('__url__', '?')}: sample {sample.get('__key__', '?')}"


def sample_captions(sample: dict) -> list[str]:
    """A raw sample's captions (its ``txt`` member, one per line; [] without one); DataError when they
    are not UTF-8 text (the message names the sample, not the bytes)."""
    if "txt" not in sample:
        return []
    try:
        return split_caption_lines(sample["txt"].decode("utf-8"))
    except UnicodeDecodeError:
        raise DataError(f"{_where(sample)}: its .txt captions are not UTF-8 text") from None


def sample_label(sample: dict) -> int:
    """A raw sample's class label (its ``cls`` member; -1 without one); DataError when it is not an
    integer (the message names the sample, not the label)."""
    if "cls" not in sample:
        return -1
    try:
        return int(sample["cls"].decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        raise DataError(f"{_where(sample)}: its .cls is not an integer class label") from None


def shard_image_bytes(urls: Sequence[str]) -> Iterator[bytes]:
    """Each sample's image member as stored (encoded bytes, whatever its key), in shard order; samples
    without an image are left out."""
    for sample in raw_samples(urls):
        image = image_member(sample)
        if image is not None:
            yield image


def image_fingerprints(urls: Sequence[str]) -> np.ndarray:
    """uint8 ``[n, 16]``: the first 16 bytes of the sha256 of each sample's image member (its bytes as
    stored, whatever its key, captions and labels), in shard order; samples without an image are
    left out. Equal rows are byte-for-byte the same image file, however the shards were named,
    copied or streamed."""
    rows = [np.frombuffer(fingerprint(image), dtype=np.uint8) for image in shard_image_bytes(urls)]
    return np.stack(rows) if rows else np.zeros((0, 16), dtype=np.uint8)


def raw_samples(urls: Sequence[str], handler: Callable[[Exception], bool] = wds.reraise_exception) -> Iterator[dict]:
    """The samples of the shards ``urls`` undecoded (``__key__`` and member suffix -> bytes), in order; a
    shard that is not a readable tar raises DataError naming it (unless webdataset's ``handler`` skips it)."""
    for url in urls:
        try:
            yield from wds.tarfile_samples([{"url": url}], handler=handler)
        except (tarfile.TarError, EOFError) as err:
            # webdataset adds the stream and the URL to tarfile's message: its first argument says why
            why = err.args[0] if err.args and isinstance(err.args[0], str) else first_line(err)
            raise DataError(f"{url}: not a readable tar shard ({why})") from None


def image_member(sample: dict) -> bytes | None:
    """A raw webdataset sample's image member as stored (the first of ``IMAGE_KEYS`` it has), or None."""
    return next((sample[key] for key in IMAGE_KEYS if key in sample), None)


def fingerprint(image: bytes) -> bytes:
    """The 16 bytes that identify an encoded image in :func:`image_fingerprints`."""
    return hashlib.sha256(image).digest()[:16]


# --- images -----------------------------------------------------------------------------------

def resize_center_crop(image: Image.Image, resolution: int, pad_small: bool = False) -> Image.Image:
    """Resize the short side to ``resolution`` (bicubic, antialiased) and centre-crop a square.

    With ``pad_small``, an image no larger than ``resolution`` on both sides is centred on a black
    canvas instead of upscaled (MNIST 28 -> 32, as the in-memory loader does).
    """
    w, h = image.size
    if pad_small and w <= resolution and h <= resolution:
        if (w, h) == (resolution, resolution):
            return image
        canvas = Image.new(image.mode, (resolution, resolution), 0)
        canvas.paste(image, ((resolution - w) // 2, (resolution - h) // 2))
        return canvas
    if min(w, h) != resolution:
        scale = resolution / min(w, h)
        w, h = max(resolution, round(w * scale)), max(resolution, round(h * scale))
        image = image.resize((w, h), Image.Resampling.BICUBIC)
    left, top = (w - resolution) // 2, (h - resolution) // 2
    if (w, h) != (resolution, resolution):
        image = image.crop((left, top, left + resolution, top + resolution))
    return image


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """``L`` or ``RGB`` PIL image -> float32 [C, H, W] in [-1, 1]."""
    array = np.asarray(image, dtype=np.uint8)
    array = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
    # in numpy: a strided uint8 -> float copy in torch is far slower on a busy CPU
    out = np.ascontiguousarray(array, dtype=np.float32)
    out /= 127.5
    out -= 1.0
    return torch.from_numpy(out)


def decode_image(data: bytes, resolution: int, channels: int = 3, pad_small: bool = False,
                 fast_jpeg: bool = True) -> torch.Tensor:
    """Encoded image bytes -> float32 [channels, resolution, resolution] in [-1, 1].

    ``fast_jpeg`` lets libjpeg decode a JPEG directly at a reduced scale (1/2, 1/4, 1/8) that is
    still at least ``resolution`` on the short side; the bicubic resize then finishes the job.
    """
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    mode = "L" if channels == 1 else "RGB"
    image = Image.open(io.BytesIO(data))
    if fast_jpeg and image.format == "JPEG":
        w, h = image.size
        scale = resolution / min(w, h)
        image.draft(mode, (max(1, int(w * scale)), max(1, int(h * scale))))
    if image.mode != mode:
        if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
            rgba = image.convert("RGBA")  # same rule as the shard writer: over white
            image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
        image = image.convert(mode)
    return image_to_tensor(resize_center_crop(image, resolution, pad_small))


def pick_caption(captions: list[str], seed: int, epoch: int, key: str) -> str:
    """One caption, chosen by (seed, epoch, key): the same in every worker layout."""
    if not captions:
        return ""
    if len(captions) == 1:
        return captions[0]
    return random.Random(f"{seed}:{epoch}:{key}").choice(captions)


def decode_sample(sample: dict, resolution: int, channels: int = 3, pad_small: bool = False,
                  fast_jpeg: bool = True) -> dict:
    """A raw webdataset sample (bytes per extension) -> dict(image, captions, label, key)."""
    image_key = next((k for k in IMAGE_KEYS if k in sample), None)
    if image_key is None:
        raise DataError(f"{_where(sample)}: no image (expected one of .{', .'.join(IMAGE_KEYS)})")
    try:
        image = decode_image(sample[image_key], resolution, channels, pad_small, fast_jpeg)
    except Exception as exc:  # PIL raises several types; its messages can quote pixel values: the type only
        raise DataError(f"{_where(sample)}: cannot decode .{image_key} ({type(exc).__name__})") from None
    return {"image": image, "captions": sample_captions(sample), "label": sample_label(sample),
            "key": sample["__key__"]}


# --- the stream -------------------------------------------------------------------------------

def buffered_shuffle(items: Iterable[T], bufsize: int, rng: random.Random) -> Iterator[T]:
    """Shuffle a stream through a buffer of ``bufsize`` items (uniform when the stream fits)."""
    buffer: list[T] = []
    for item in items:
        if len(buffer) < bufsize:
            buffer.append(item)
            continue
        k = rng.randrange(bufsize)
        yield buffer[k]
        buffer[k] = item
    rng.shuffle(buffer)
    yield from buffer


def collate(samples: list[dict], seed: int, epoch: int) -> dict:
    return {
        "image": torch.stack([s["image"] for s in samples]),
        "caption": [pick_caption(s["captions"], seed, epoch, s["key"]) for s in samples],
        "captions": [s["captions"] for s in samples],
        "label": torch.tensor([s["label"] for s in samples], dtype=torch.long),
        "key": [s["key"] for s in samples],
    }


class ShardImageDataset(IterableDataset):
    """An iterable of batches over shards; see the module docstring and :func:`make_dataset`."""

    def __init__(self, urls: str | Sequence[str], resolution: int, batch_size: int, *,
                 shuffle_buffer: int = 1000, shardshuffle: int | bool = 100, seed: int = 0,
                 rank: Optional[int] = None, world_size: Optional[int] = None, channels: int = 3,
                 pad_small: bool = False, fast_jpeg: bool = True, partial: bool = True,
                 handler: Callable[[Exception], bool] = wds.reraise_exception):
        super().__init__()
        if shardshuffle is True:
            raise ValueError("shardshuffle: pass a buffer size (a number) or False, not True")
        if resolution < 1 or batch_size < 1 or shuffle_buffer < 0:
            raise ValueError(f"need resolution >= 1, batch_size >= 1, shuffle_buffer >= 0; got "
                             f"{resolution}, {batch_size}, {shuffle_buffer}")
        if (rank is None) != (world_size is None):
            raise ValueError("rank and world_size: give both or neither")
        if world_size is not None and not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        self.urls = expand_urls(urls)
        self.resolution, self.batch_size, self.channels = resolution, batch_size, channels
        self.shuffle_buffer, self.shardshuffle, self.seed = shuffle_buffer, int(shardshuffle or 0), seed
        self.rank, self.world_size = rank, world_size
        self.pad_small, self.fast_jpeg, self.partial, self.handler = pad_small, fast_jpeg, partial, handler
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle for another pass (call before iterating; workers receive a fresh copy)."""
        self.epoch = epoch

    def _position(self) -> tuple[int, int, int, int]:
        rank, world_size, worker, num_workers = wds.utils.pytorch_worker_info()
        if self.world_size is not None:
            rank, world_size = self.rank, self.world_size
        return rank, world_size, worker, num_workers

    def shards_for_this_process(self) -> list[str]:
        """The shards this (rank, worker) reads this epoch, in reading order."""
        shards: Iterable[str] = self.urls
        if self.shardshuffle:  # the same order on every rank, so the split stays disjoint
            shards = buffered_shuffle(shards, self.shardshuffle, random.Random(f"{self.seed}:{self.epoch}:shards"))
        if self.world_size is not None:
            shards = list(shards)[self.rank::self.world_size]
        else:
            shards = wds.split_by_node(shards)
        return list(wds.split_by_worker(shards))

    def samples(self) -> Iterator[dict]:
        """Decoded samples (not batched) of this (rank, worker)."""
        rank, world_size, worker, _ = self._position()
        if world_size > len(self.urls):  # a rank without data would stall the others at their first all-reduce
            raise DataError(f"{len(self.urls)} shard(s) cannot feed {world_size} ranks (each needs at least one); "
                            "write smaller shards: dpldm prepare --samples-per-shard")
        raw = raw_samples(self.shards_for_this_process(), self.handler)
        if self.shuffle_buffer > 1:
            rng = random.Random(f"{self.seed}:{self.epoch}:{rank}:{worker}")
            raw = buffered_shuffle(raw, self.shuffle_buffer, rng)
        for sample in raw:
            try:
                yield decode_sample(sample, self.resolution, self.channels, self.pad_small, self.fast_jpeg)
            except Exception as exc:
                if not self.handler(exc):
                    return

    def __iter__(self) -> Iterator[dict]:
        batch: list[dict] = []
        for sample in self.samples():
            batch.append(sample)
            if len(batch) == self.batch_size:
                yield collate(batch, self.seed, self.epoch)
                batch = []
        if batch and self.partial:
            yield collate(batch, self.seed, self.epoch)


def make_dataset(urls: str | Sequence[str], resolution: int, batch_size: int, *,
                 shuffle_buffer: int = 1000, shardshuffle: int | bool = 100, seed: int = 0,
                 rank: Optional[int] = None, world_size: Optional[int] = None, **kwargs: Any) -> ShardImageDataset:
    """Batches from shards: see :class:`ShardImageDataset` for ``channels``, ``pad_small``,
    ``fast_jpeg``, ``partial`` (keep the last short batch) and ``handler`` (webdataset error handler).
    ``shuffle_buffer=0`` and ``shardshuffle=False`` read in storage order."""
    return ShardImageDataset(urls, resolution, batch_size, shuffle_buffer=shuffle_buffer,
                             shardshuffle=shardshuffle, seed=seed, rank=rank, world_size=world_size, **kwargs)


def make_loader(urls: str | Sequence[str], resolution: int, batch_size: int, num_workers: int = 0,
                **kwargs: Any) -> DataLoader:
    """A DataLoader over :func:`make_dataset` (batching happens in the workers).

    Call ``loader.dataset.set_epoch(e)`` before each pass to reshuffle.
    """
    dataset = make_dataset(urls, resolution, batch_size, **kwargs)
    return DataLoader(dataset, batch_size=None, num_workers=num_workers,
                      persistent_workers=False, pin_memory=torch.cuda.is_available())
