"""Image sets for evaluation: folders, webdataset shard sets and in-memory arrays.

Every image comes out as ``uint8 [H, W, C]`` with C = 1 (grayscale) or 3 (RGB). Sources:

- a folder, searched recursively for image files. Images directly in it are unlabelled; a folder
  per class (``root/<class>/*.png``) gives labels: the folder name itself when every class folder
  is an integer (``0``..``9``), else the class's index in the sorted folder names. When class
  folders exist, images directly in the root (e.g. the ``grid.png`` preview written by
  ``dpldm sample``) are not part of the set.
- shard sets: one ``.tar`` file, a glob (``shards/*.tar``) or a brace pattern
  (``train-{000..009}.tar``), expanded as for training (:func:`trainer.data.reader.expand_urls`),
  and indexed here for random access (training streams them instead). Samples are grouped
  webdataset-style by key (the member path up to the first dot of its file name); the image is the
  ``.png``/``.jpg``/... member and the label the integer text of the ``.cls`` member, when present.
- arrays (numpy or torch), see :func:`to_uint8_images`.

Images are decoded on demand, so a large set costs memory only when it is stacked.
"""
from __future__ import annotations

import io
import re
import tarfile
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
import torch
from PIL import Image

from trainer.data.reader import IMAGE_KEYS, expand_urls, image_files
from trainer.errors import first_line

_KEY_AND_SUFFIX = re.compile(r"^((?:.*/)?[^./]+)\.([^/]*)$")



class ImageSetError(ValueError):
    """An image set that cannot be used as asked (no images, unreadable, unlabelled, ...)."""

class ImageCollection:
    """A fixed-length sequence of images (uint8 [H, W, C]) with optional int64 labels.

    ``read(i)`` decodes image i; ``labels`` is ``int64 [n]`` or None; ``class_names[label]`` names a
    class when known. ``description`` says where the images come from (for messages).
    """

    def __init__(self, count: int, read: Callable[[int], np.ndarray], labels: Optional[np.ndarray] = None,
                 class_names: Optional[list[str]] = None, description: str = "images"):
        if labels is not None and len(labels) != count:
            raise ImageSetError(f"{description}: {len(labels)} labels for {count} images")
        self._count = count
        self._read = read
        self.labels = None if labels is None else np.asarray(labels, dtype=np.int64)
        self.class_names = class_names
        self.description = description

    def __len__(self) -> int:
        return self._count

    def __getitem__(self, i: int) -> np.ndarray:
        if not 0 <= i < self._count:
            raise IndexError(f"{self.description}: index {i} out of range for {self._count} images")
        return self._read(i)

    def __iter__(self) -> Iterator[np.ndarray]:
        for i in range(self._count):
            yield self._read(i)

    def subset(self, indices: Sequence[int]) -> "ImageCollection":
        """The images at ``indices`` (in that order), with their labels."""
        idx = np.asarray(indices, dtype=np.int64)
        return ImageCollection(len(idx), lambda i: self._read(int(idx[i])),
                               None if self.labels is None else self.labels[idx],
                               self.class_names, self.description)

    def with_labels(self, labels: Sequence[int], class_names: Optional[list[str]] = None) -> "ImageCollection":
        """The same images with ``labels`` (int [n]) instead of their own."""
        return ImageCollection(self._count, self._read, np.asarray(labels, dtype=np.int64).reshape(-1),
                               class_names or self.class_names, self.description)

    def sample(self, num: Optional[int], seed: int = 0) -> "ImageCollection":
        """A seeded random subset of ``num`` images, kept in source order (all of them if num is None
        or at least the size). Random, not the first ``num``: a folder per class is sorted by class."""
        if num is None or num >= self._count:
            return self
        if num <= 0:
            raise ImageSetError(f"number of images must be positive, got {num}")
        idx = np.sort(np.random.default_rng(seed).choice(self._count, size=num, replace=False))
        return self.subset(idx)

    def stack(self) -> np.ndarray:
        """All images as one uint8 array [n, H, W, C]; they must share height, width and channels."""
        if self._count == 0:
            raise ImageSetError(f"{self.description}: no images")
        first = self._read(0)
        out = np.empty((self._count, *first.shape), dtype=np.uint8)
        out[0] = first
        for i in range(1, self._count):
            img = self._read(i)
            if img.shape != first.shape:
                raise ImageSetError(f"{self.description}: image {i} has shape {img.shape}, image 0 has "
                                 f"{first.shape}; stacking needs one size")
            out[i] = img
        return out


def to_uint8_images(images: np.ndarray | torch.Tensor,
                    value_range: Optional[tuple[float, float]] = None) -> np.ndarray:
    """Convert a batch of images to uint8 [n, H, W, C] (C = 1 or 3).

    Layouts: numpy arrays are [n, H, W] or [n, H, W, C] (image convention); torch tensors are
    [n, H, W] or [n, C, H, W] (torch convention). uint8 input is taken as is; float input needs
    ``value_range`` = (low, high), mapped linearly to [0, 255], clipped and rounded (e.g.
    (-1, 1) for decoder outputs).
    """
    if isinstance(images, torch.Tensor):
        x = images.detach().cpu()
        if x.ndim == 4:
            x = x.permute(0, 2, 3, 1)
        x = x.numpy()
    else:
        x = np.asarray(images)
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4 or x.shape[-1] not in (1, 3):
        raise ImageSetError(f"images: expected [n, H, W], [n, H, W, C] (numpy) or [n, C, H, W] (torch) with "
                         f"C in (1, 3), got shape {tuple(np.shape(images))}")
    if x.dtype == np.uint8:
        return np.ascontiguousarray(x)
    if value_range is None:
        raise ImageSetError(f"images: dtype {x.dtype} is not uint8, so value_range=(low, high) is required")
    low, high = value_range
    if not high > low:
        raise ImageSetError(f"value_range: need low < high, got {value_range}")
    scaled = (x.astype(np.float32) - low) * (255.0 / (high - low))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def images_from_array(images: np.ndarray | torch.Tensor, labels: Optional[np.ndarray | torch.Tensor] = None,
                      class_names: Optional[list[str]] = None,
                      value_range: Optional[tuple[float, float]] = None,
                      description: str = "in-memory images") -> ImageCollection:
    """Wrap an array of images (see :func:`to_uint8_images`) and optional labels [n]."""
    x = to_uint8_images(images, value_range)
    y = None
    if labels is not None:
        y = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
        y = y.astype(np.int64).reshape(-1)
    return ImageCollection(len(x), lambda i: x[i], y, class_names, description)


def decode_image(data: bytes, name: str = "image") -> np.ndarray:
    """Encoded image bytes -> uint8 [H, W, 1] (images without colour) or [H, W, 3] (RGB; alpha dropped)."""
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except Exception as err:  # PIL raises several types, and its messages can quote pixel values: the type only
        raise ImageSetError(f"{name}: cannot decode image ({type(err).__name__})") from None
    if img.mode == "P":
        img = img.convert("RGBA")
    bands = img.getbands()
    if bands in (("1",), ("L",), ("L", "A"), ("I",), ("F",), ("I;16",)):
        arr = np.asarray(img.convert("L"), dtype=np.uint8)[..., None]
    else:
        arr = np.asarray(img.convert("RGB"), dtype=np.uint8)
    return np.ascontiguousarray(arr)


def _read_file_image(path: Path) -> np.ndarray:
    return decode_image(path.read_bytes(), str(path))


def _is_shard_pattern(source: str) -> bool:
    return source.endswith(".tar") or any(ch in source for ch in "{*?[")


def _open_folder(root: Path) -> ImageCollection:
    files = image_files(root)
    if not files:
        raise FileNotFoundError(f"{root}: no image files ({', '.join(IMAGE_KEYS)})")
    in_class_folder = [p for p in files if len(p.relative_to(root).parts) > 1]
    if not in_class_folder:
        return ImageCollection(len(files), lambda i: _read_file_image(files[i]), description=str(root))
    files = in_class_folder
    classes = [p.relative_to(root).parts[0] for p in files]
    folder_names = sorted(set(classes))
    if all(name.isdigit() for name in folder_names):
        labels = np.array([int(c) for c in classes], dtype=np.int64)
        class_names = [str(i) for i in range(int(labels.max()) + 1)]
    else:
        index = {name: i for i, name in enumerate(folder_names)}
        labels = np.array([index[c] for c in classes], dtype=np.int64)
        class_names = folder_names
    return ImageCollection(len(files), lambda i: _read_file_image(files[i]), labels, class_names, str(root))


def _read_member(shard: Path, offset: int, size: int) -> bytes:
    with open(shard, "rb") as fh:
        fh.seek(offset)
        return fh.read(size)


def _open_shards(pattern: str) -> ImageCollection:
    # (shard, data offset, size, key) of each sample's image; labels read while indexing (tiny members)
    entries: list[tuple[Path, int, int, str]] = []
    labels: list[Optional[int]] = []
    for shard in map(Path, expand_urls(pattern)):
        samples: dict[str, dict[str, tarfile.TarInfo]] = {}
        try:
            tar = tarfile.open(shard, "r")
        except (tarfile.TarError, OSError) as err:
            raise ImageSetError(f"{shard}: not a readable tar shard ({first_line(err)})") from None
        with tar:
            for member in tar:
                match = _KEY_AND_SUFFIX.match(member.name)
                if member.isfile() and match:
                    samples.setdefault(match.group(1), {})[match.group(2).lower()] = member
            for key, members in samples.items():
                image = next((members[ext] for ext in IMAGE_KEYS if ext in members), None)
                if image is None:
                    continue  # a sample without an image (e.g. a caption-only record) is not evaluated
                entries.append((shard, image.offset_data, image.size, key))
                cls = members.get("cls")
                if cls is None:
                    labels.append(None)
                else:
                    try:  # the label itself stays unsaid: the set may be private
                        labels.append(int(tar.extractfile(cls).read().decode("ascii").strip()))
                    except (UnicodeDecodeError, ValueError):
                        raise ImageSetError(f"{shard}: {key}.cls is not an integer label") from None
    if not entries:
        raise FileNotFoundError(f"shard set {pattern!r} holds no image ({', '.join(IMAGE_KEYS)})")
    has_label = [y is not None for y in labels]
    if any(has_label) and not all(has_label):
        raise ImageSetError(f"shard set {pattern!r}: some samples have a .cls label and some do not "
                         f"(e.g. {entries[has_label.index(False)][3]!r})")

    def read(i: int) -> np.ndarray:
        shard, offset, size, key = entries[i]
        return decode_image(_read_member(shard, offset, size), f"{shard}:{key}")

    y = np.array(labels, dtype=np.int64) if all(has_label) else None
    return ImageCollection(len(entries), read, y, None, pattern)


def open_images(source: str | Path, max_images: Optional[int] = None, seed: int = 0) -> ImageCollection:
    """Open a folder or a shard set (see the module docstring); ``max_images`` keeps a seeded subset."""
    path = Path(source)
    if path.is_dir():
        images = _open_folder(path)
    elif _is_shard_pattern(str(source)):
        images = _open_shards(str(source))
    else:
        raise FileNotFoundError(f"{source}: not a folder, a .tar shard or a shard pattern")
    return images.sample(max_images, seed)


def class_grid(images: ImageCollection, per_class: int = 8) -> np.ndarray:
    """A uint8 grid [rows*(H+2)+2, per_class*(W+2)+2, C]: one row per label present, its first
    ``per_class`` images left to right (black 2-pixel gutters). Needs labels and one image size."""
    if images.labels is None:
        raise ImageSetError(f"{images.description}: a per-class grid needs labels")
    classes = np.unique(images.labels)
    first = images[0]
    h, w, c = first.shape
    grid = np.zeros((len(classes) * (h + 2) + 2, per_class * (w + 2) + 2, c), dtype=np.uint8)
    for row, cls in enumerate(classes):
        for col, i in enumerate(np.flatnonzero(images.labels == cls)[:per_class]):
            img = images[int(i)]
            if img.shape != first.shape:
                raise ImageSetError(f"{images.description}: image {i} has shape {img.shape}, not {first.shape}")
            top, left = 2 + row * (h + 2), 2 + col * (w + 2)
            grid[top:top + h, left:left + w] = img
    return grid
