"""The private latent cache: the frozen encoder's posterior (mean, std) per private example.

DP fine-tuning needs exact Poisson sampling over an indexable set, and no step should pay for
the encoder again, so the private shards are encoded once into memory-mappable files::

    OUT/manifest.json   count, latent shape, dtype, encoder checkpoint hash, source shards and
                        their hash, resolution, "complete" flag (written last)
    OUT/mean.npy        [N, C, h, w] float16 or float32 posterior means
    OUT/std.npy         [N, C, h, w] posterior standard deviations
    OUT/labels.npy      [N] int64 (-1: no label)
    OUT/captions.json   [N] lists of captions (private data, like the images)
    OUT/keys.json       [N] sample keys, to trace an example back to its shard

While building, each source shard is encoded into ``OUT/parts/part-NNNNNN`` (written to a
``.tmp`` folder, then renamed), so an interrupted build resumes shard by shard; once every part
exists they are concatenated in shard order and the manifest is marked complete. A cache that is
not complete, or that came from another encoder or other shards, is refused by
:class:`LatentCache` with a message naming both hashes.

Everything stored here is derived from private data: it stays with the private data.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from tqdm import tqdm

from trainer.data.reader import count_distinct_samples, expand_urls, make_dataset
from trainer.errors import DataError, first_line
from trainer.io import write_json

FORMAT = "dpldm-latent-cache"
VERSION = 2  # 1 identified the shards by their names and sizes, 2 by their contents
MANIFEST = "manifest.json"
PARTS = "parts"
DTYPES = ("float16", "float32")
EncodeFn = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class CacheMismatchError(ValueError):
    """The cache on disk was made from another encoder, other shards, or other settings."""


class IncompleteCacheError(ValueError):
    """The cache's build was interrupted; build it again to complete it."""


# --- files ------------------------------------------------------------------------------------

def _save_npy(array: np.ndarray, path: Path) -> None:
    with open(path, "wb") as fh:
        np.save(fh, array)
        fh.flush()
        os.fsync(fh.fileno())


def _shard_meta(urls: Sequence[str]) -> dict:
    """The meta.json that ``dpldm prepare`` wrote beside the first shard ({} if none)."""
    meta = Path(urls[0]).parent / "meta.json"
    if urls[0].startswith("pipe:") or not meta.is_file():
        return {}
    try:
        found = json.loads(meta.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise DataError(f"{meta}: not a readable JSON record ({first_line(err)})") from None
    if not isinstance(found, dict):
        raise DataError(f"{meta}: not the JSON object dpldm prepare writes")
    return found


def shard_label_names(urls: Sequence[str]) -> Optional[list]:
    """Label names from the meta.json that ``dpldm prepare`` wrote beside the shards, if any."""
    return _shard_meta(urls).get("label_names")


def shard_caption_template(urls: Sequence[str]) -> Optional[str]:
    """The ``--caption-template`` ``dpldm prepare`` captioned labelled items without a caption with, if any."""
    captions = _shard_meta(urls).get("captions")
    return captions.get("template") if isinstance(captions, dict) else None


def read_manifest(out_dir: str | Path) -> Optional[dict]:
    path = Path(out_dir) / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else None


# --- building ---------------------------------------------------------------------------------

def _check_same(manifest: dict, wanted: dict, out_dir: Path) -> None:
    if manifest.get("format") != FORMAT:
        raise CacheMismatchError(f"{out_dir / MANIFEST} is not a latent cache manifest")
    if manifest.get("version", 1) != VERSION:
        raise CacheMismatchError(f"{out_dir}: a latent cache of another version ({manifest.get('version', 1)}; "
                                 f"this one writes {VERSION}: shards identified by their contents); delete it or use "
                                 "another output folder")
    if manifest["encoder_hash"] != wanted["encoder_hash"]:
        raise CacheMismatchError(
            f"{out_dir} holds latents of encoder {manifest['encoder_hash']}, not of the requested encoder "
            f"{wanted['encoder_hash']}; use another output folder (or delete this one)")
    if manifest["source_hash"] != wanted["source_hash"]:
        raise CacheMismatchError(
            f"{out_dir} was built from shards with hash {manifest['source_hash']}, not the requested shards "
            f"(hash {wanted['source_hash']}); use another output folder (or delete this one)")
    for key in ("dtype", "resolution", "channels", "pad_small"):
        if manifest[key] != wanted[key]:
            raise CacheMismatchError(f"{out_dir}: built with {key}={manifest[key]!r}, requested {wanted[key]!r}")


def _encode_shard(encode_fn: EncodeFn, url: str, part_dir: Path, settings: dict, batch_size: int) -> int:
    """Encode one shard in storage order into ``part_dir`` (atomic: a folder of this process, then
    rename; two processes encoding the same shard both finish, the first rename wins)."""
    tmp = part_dir.with_name(f"{part_dir.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    dataset = make_dataset(url, settings["resolution"], batch_size, shuffle_buffer=0, shardshuffle=False,
                           rank=0, world_size=1, channels=settings["channels"], pad_small=settings["pad_small"])
    means, stds, labels, captions, keys = [], [], [], [], []
    for batch in dataset:
        with torch.no_grad():
            mean, std = encode_fn(batch["image"])
        n = batch["image"].shape[0]
        if mean.shape != std.shape or mean.shape[0] != n:
            raise ValueError(f"encode_fn returned mean {tuple(mean.shape)} and std {tuple(std.shape)} "
                             f"for a batch of {n} images; expected two [{n}, C, h, w] tensors")
        means.append(mean.detach().float().cpu().numpy().astype(settings["dtype"]))
        stds.append(std.detach().float().cpu().numpy().astype(settings["dtype"]))
        labels.append(batch["label"].numpy())
        captions.extend(batch["captions"])
        keys.extend(batch["key"])
    count = len(keys)
    empty = np.zeros((0,), dtype=settings["dtype"])
    _save_npy(np.concatenate(means) if means else empty, tmp / "mean.npy")
    _save_npy(np.concatenate(stds) if stds else empty, tmp / "std.npy")
    _save_npy(np.concatenate(labels).astype(np.int64) if labels else np.zeros((0,), np.int64), tmp / "labels.npy")
    write_json(captions, tmp / "captions.json")
    write_json(keys, tmp / "keys.json")
    try:
        os.replace(tmp, part_dir)
    except OSError:
        if not part_dir.is_dir():
            raise
        shutil.rmtree(tmp, ignore_errors=True)  # another process encoded this shard meanwhile: the same rows
    return count


def _finalize(out: Path, manifest: dict) -> dict:
    """Concatenate the parts (shard order) into the final files; mark the manifest complete."""
    n_parts = len(manifest["source_shards"])
    parts = [out / PARTS / f"part-{i:06d}" for i in range(n_parts)]
    means = [np.load(p / "mean.npy", mmap_mode="r") for p in parts]
    shapes = {m.shape[1:] for m in means if m.shape[0] > 0}
    if not shapes:
        raise ValueError(f"{out}: the shards {manifest['source_shards'][:3]}... hold no samples")
    if len(shapes) > 1:
        raise ValueError(f"{out}: parts have different latent shapes {sorted(shapes)}")
    shape = shapes.pop()
    counts = [m.shape[0] for m in means]
    total = sum(counts)
    suffix = f".{os.getpid()}.tmp.npy"  # unique: two ranks may finalize at the same time
    written = []
    try:
        for name in ("mean", "std"):
            tmp = out / f"{name}{suffix}"
            written.append(tmp)
            target = np.lib.format.open_memmap(tmp, mode="w+", dtype=manifest["dtype"], shape=(total, *shape))
            row = 0
            for p, n in zip(parts, counts):
                if n:
                    target[row:row + n] = np.load(p / f"{name}.npy", mmap_mode="r")
                    row += n
            target.flush()
            del target
        labels = np.concatenate([np.load(p / "labels.npy") for p in parts]).astype(np.int64)
        tmp = out / f"labels{suffix}"
        written.append(tmp)
        _save_npy(labels, tmp)
        captions = [c for p in parts for c in json.loads((p / "captions.json").read_text())]
        keys = [k for p in parts for k in json.loads((p / "keys.json").read_text())]
        for name in ("mean", "std", "labels"):
            os.replace(out / f"{name}{suffix}", out / f"{name}.npy")
    finally:
        for tmp in written:
            tmp.unlink(missing_ok=True)
    write_json(captions, out / "captions.json")
    write_json(keys, out / "keys.json")
    manifest = {**manifest, "complete": True, "count": total, "latent_shape": list(shape),
                "shard_counts": counts, "completed": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    write_json(manifest, out / MANIFEST)
    shutil.rmtree(out / PARTS, ignore_errors=True)
    return manifest


def build_latent_cache(encode_fn: EncodeFn, urls: str | Sequence[str], out_dir: str | Path, encoder_hash: str,
                       resolution: int, batch_size: int, rank: int = 0, world_size: int = 1, *,
                       dtype: str = "float16", channels: int = 3, pad_small: bool = False,
                       progress_bar: bool = True, source_digest: Optional[str] = None) -> dict:
    """Encode the shards ``urls`` into a latent cache in ``out_dir``; return its manifest.

    ``encode_fn(images [B, channels, R, R] in [-1, 1]) -> (mean, std)``, each [B, C, h, w]: the frozen
    encoder's posterior. Rank ``rank`` of ``world_size`` encodes shards ``rank, rank + world_size, ...``.
    With ``torch.distributed`` initialised, rank 0 concatenates the parts after a barrier; otherwise
    whichever call finds every part present does, so ranks run as separate jobs also finish the cache
    (the returned manifest says ``complete: false`` until then). Parts already encoded are kept: an
    interrupted build resumes. Raises :class:`CacheMismatchError` if ``out_dir`` holds a cache of
    another encoder, other shards (by their contents: ``source_digest``, the digest of
    :func:`trainer.data.reader.count_distinct_samples` when the caller has it) or other settings.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
    out = Path(out_dir)
    shards = expand_urls(urls)
    wanted = {"format": FORMAT, "version": VERSION, "complete": False, "encoder_hash": encoder_hash,
              "source_hash": source_digest or count_distinct_samples(shards).digest, "source_shards": shards,
              "dtype": dtype, "resolution": resolution, "channels": channels, "pad_small": pad_small,
              "label_names": shard_label_names(shards), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    manifest = read_manifest(out)
    if manifest is not None:
        _check_same(manifest, wanted, out)
        if manifest["complete"]:
            return manifest
    else:
        out.mkdir(parents=True, exist_ok=True)
        manifest = wanted
        write_json(manifest, out / MANIFEST)

    mine = range(rank, len(shards), world_size)
    for i in tqdm(mine, desc=f"encode rank {rank}", unit="shard", disable=not progress_bar):
        part = out / PARTS / f"part-{i:06d}"
        if not part.is_dir():
            _encode_shard(encode_fn, shards[i], part, manifest, batch_size)

    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if distributed:
        torch.distributed.barrier()
        if rank == 0:
            manifest = _finalize(out, manifest)
        torch.distributed.barrier()
        return read_manifest(out)
    if all((out / PARTS / f"part-{i:06d}").is_dir() for i in range(len(shards))):
        try:
            return _finalize(out, manifest)
        except FileNotFoundError:
            done = read_manifest(out)
            if done and done["complete"]:  # another rank finished it meanwhile
                return done
            raise
    return manifest


# --- reading ----------------------------------------------------------------------------------

class LatentCache:
    """A complete latent cache, indexable by a tensor of example indices.

    ``cache[idx]`` for ``idx`` a LongTensor / list / array of indices (may be empty: Poisson
    batches can be) -> dict(``mean`` and ``std`` float32 [B, C, h, w], ``label`` LongTensor [B],
    ``caption`` list[str] (one random caption per example, "" if none), ``captions``).
    Arrays are memory-mapped unless ``in_memory``.
    """

    def __init__(self, out_dir: str | Path, expected_encoder_hash: Optional[str] = None,
                 expected_source_hash: Optional[str] = None, in_memory: bool = False, seed: int = 0):
        self.root = Path(out_dir)
        manifest = read_manifest(self.root)
        if manifest is None:
            raise FileNotFoundError(f"{self.root / MANIFEST} not found: build the cache with `dpldm encode`")
        if manifest.get("format") != FORMAT:
            raise CacheMismatchError(f"{self.root / MANIFEST} is not a latent cache manifest")
        if not manifest["complete"]:
            raise IncompleteCacheError(f"{self.root} is a partial latent cache (its build was interrupted); "
                                       "run `dpldm encode` again with the same arguments to complete it")
        if expected_encoder_hash is not None and manifest["encoder_hash"] != expected_encoder_hash:
            raise CacheMismatchError(f"{self.root} holds latents of encoder {manifest['encoder_hash']}, but the "
                                     f"model uses encoder {expected_encoder_hash}; re-encode the private shards")
        if expected_source_hash is not None and manifest["source_hash"] != expected_source_hash:
            raise CacheMismatchError(f"{self.root} was built from shards with hash {manifest['source_hash']}, "
                                     f"expected {expected_source_hash}")
        self.manifest = manifest
        mode = None if in_memory else "r"
        self.mean = np.load(self.root / "mean.npy", mmap_mode=mode)
        self.std = np.load(self.root / "std.npy", mmap_mode=mode)
        self.labels = torch.from_numpy(np.load(self.root / "labels.npy"))
        self.captions: list[list[str]] = json.loads((self.root / "captions.json").read_text())
        self.keys: list[str] = json.loads((self.root / "keys.json").read_text())
        n = manifest["count"]
        sizes = {"mean.npy": len(self.mean), "std.npy": len(self.std), "labels.npy": len(self.labels),
                 "captions.json": len(self.captions), "keys.json": len(self.keys)}
        bad = {k: v for k, v in sizes.items() if v != n}
        if bad:
            raise ValueError(f"{self.root}: manifest count is {n} but {bad}")
        self._rng = random.Random(seed)

    @property
    def encoder_hash(self) -> str:
        return self.manifest["encoder_hash"]

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return tuple(self.manifest["latent_shape"])

    @property
    def label_names(self) -> Optional[list[str]]:
        return self.manifest.get("label_names")

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, index) -> dict:
        idx = torch.as_tensor(index, dtype=torch.long).reshape(-1)
        n = len(self)
        if idx.numel() and (int(idx.min()) < -n or int(idx.max()) >= n):
            raise IndexError(f"latent cache index out of range 0..{n - 1}")
        idx = torch.where(idx < 0, idx + n, idx)
        rows = idx.numpy()
        captions = [self.captions[i] for i in rows]
        return {
            "mean": torch.from_numpy(np.asarray(self.mean[rows], dtype=np.float32)).reshape(-1, *self.latent_shape),
            "std": torch.from_numpy(np.asarray(self.std[rows], dtype=np.float32)).reshape(-1, *self.latent_shape),
            "label": self.labels[idx],
            "caption": [self._rng.choice(c) if c else "" for c in captions],
            "captions": captions,
            "index": idx,
        }

    @staticmethod
    def posterior_sample(batch: dict, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """A fresh draw ``mean + std * noise`` for a batch from ``cache[idx]``."""
        noise = torch.randn(batch["mean"].shape, generator=generator, dtype=batch["mean"].dtype)
        return batch["mean"] + batch["std"] * noise
