"""Which examples a data source holds, as far as its settings and its shards' ``meta.json`` tell.

Enough to refuse a private set that shares examples with public data a model saw without DP
(the autoencoder's and the LDM's pretraining): those examples would be in a released model with
no guarantee at all. Two sources share examples when their tokens meet:

- ``("mnist", part)`` for each part of MNIST they hold (the offline set's train / val / test; its
  60,000 training digits are train + val, as torchvision's MNIST ``train``);
- ``("shard", path)`` for each shard file (its real path; ``pipe:`` and remote URLs as written),
  or ``("pattern", text)`` for a pattern that names no file yet;
- ``("source", description)`` for shards ``dpldm prepare`` wrote from a described source (an image
  folder, a torchvision or hub dataset): the same description means the same examples. These
  tokens (and the MNIST ones read from a ``meta.json``) come from a folder, and two sources
  whose shards lie in the same folder are compared by their shard files only (disjoint shard
  ranges of one prepared set are disjoint sets).

Rendered letters hold nothing private. A source these rules cannot see into (shards without
``meta.json`` copied elsewhere) is not caught by them; the public pretraining stages also record a
fingerprint of every public shard image (``PUBLIC_IMAGES``), so that private shards holding the
same image files are caught however they were copied or named. The check refuses the overlaps it
can prove.
"""
from __future__ import annotations

import dataclasses
import json
import os
import unicodedata
from pathlib import Path
from typing import Any, Iterable, Sequence

from trainer.data.mnist import COMBINED

MNIST_TRAINING_DIGITS = ("train", "val")  # the offline set's parts of MNIST's 60,000 training digits
PUBLIC_IMAGES = "public-images.npy"  # in a public stage's run folder: fingerprints of its shard images


def _mnist_parts(split: str) -> tuple[str, ...]:
    return COMBINED.get(split, (split,))


Token = tuple[str, str, str]  # (kind, what, the folder whose meta.json said so, or "")


def _described(meta: dict) -> set[tuple[str, str]]:
    """(kind, what) for the source a shard folder's ``meta.json`` describes."""
    source = meta.get("source")
    if not isinstance(source, dict):
        return set()
    kind = source.get("type")
    if kind == "mnist":
        return {("mnist", part) for part in _mnist_parts(str(source.get("split")))}
    if kind == "torchvision" and source.get("name") == "mnist":
        return {("mnist", part) for part in (MNIST_TRAINING_DIGITS if source.get("split") == "train" else ("test",))}
    if kind == "letters":
        return set()
    return {("source", json.dumps(source, sort_keys=True))}


def holdings(src: Any) -> set[Token]:
    """The tokens of a ``DataSource`` (``trainer.config``); see the module docstring."""
    from trainer.data.reader import expand_urls
    if src is None:
        return set()
    if src.source == "mnist":
        return {("mnist", part, "") for part in _mnist_parts(src.split)}
    if src.source != "shards" or not src.path:
        return set()
    try:
        urls = expand_urls(src.path)
    except (ValueError, OSError):
        return {("pattern", str(src.path), "")}
    tokens = {("shard", url if url.startswith("pipe:") or "://" in url else os.path.realpath(url), "")
              for url in urls}
    for folder in _local_folders(urls):
        meta = Path(folder) / "meta.json"
        if meta.is_file():
            try:
                tokens |= {(kind, what, folder) for kind, what in _described(json.loads(meta.read_text()))}
            except ValueError:
                pass
    return tokens


def preparations(src: Any) -> dict[str, str]:
    """{folder: id} for the folders of ``DataSource`` ``src``'s local shards whose ``meta.json`` holds a
    preparation id (``dpldm prepare`` draws a new one each time it writes a folder from scratch): random,
    so public; a run records them, so that a folder prepared again since is known to hold other images
    behind the same shard names. Empty for a source without such shards, or shards that cannot be listed."""
    from trainer.data.reader import expand_urls
    pattern = _shard_pattern(src)
    try:
        urls = expand_urls(pattern) if pattern is not None else []
    except (ValueError, OSError):
        return {}
    out = {}
    for folder in sorted(_local_folders(urls)):
        try:
            preparation = json.loads((Path(folder) / "meta.json").read_text()).get("preparation")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(preparation, str):
            out[folder] = preparation
    return out


def _local_folders(urls: list[str]) -> set[str]:
    """The real paths of the folders holding the local shards among ``urls`` (not ``pipe:`` or remote)."""
    return {os.path.realpath(Path(url).parent) for url in urls if not url.startswith("pipe:") and "://" not in url}


def _shard_pattern(src: Any) -> str | None:
    """The shard pattern of ``DataSource`` ``src`` (None: it holds no shards)."""
    return src.path if src is not None and src.source == "shards" and src.path else None


def record_public_images(public: Any, run_dir: Path) -> None:
    """Write ``run_dir/PUBLIC_IMAGES``: the fingerprints of the public shards' images (public data, so
    the file is too); a source without shards records none (a stale file is removed)."""
    import numpy as np

    from trainer.data.reader import expand_urls, image_fingerprints
    path, pattern = Path(run_dir) / PUBLIC_IMAGES, _shard_pattern(public)
    if pattern is None:
        path.unlink(missing_ok=True)
        return
    fingerprints = image_fingerprints(expand_urls(pattern))  # read before anything is written
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npy")
    np.save(tmp, fingerprints)
    os.replace(tmp, path)


def public_images(run_dir: Path) -> set[bytes]:
    """The image fingerprints the public stage in ``run_dir`` recorded (empty: none recorded)."""
    import numpy as np
    path = Path(run_dir) / PUBLIC_IMAGES
    return {row.tobytes() for row in np.load(path)} if path.is_file() else set()


def shard_images(src: Any) -> set[bytes]:
    """The image fingerprints of ``DataSource`` ``src``'s shards (empty for a source without shards)."""
    from trainer.data.reader import expand_urls, image_fingerprints
    pattern = _shard_pattern(src)
    return set() if pattern is None else {row.tobytes() for row in image_fingerprints(expand_urls(pattern))}


def unreadable(src: Any) -> str | None:
    """Why the shards of ``DataSource`` ``src`` cannot be listed from here (None: they can, or it holds
    no shards): a check against a source that names no file proves nothing."""
    from trainer.data.reader import expand_urls
    pattern = _shard_pattern(src)
    try:
        if pattern is not None:
            expand_urls(pattern)
    except (ValueError, OSError) as err:
        return str(err)
    return None


def _closed_kind(src: Any) -> str | None:
    """"mnist" when ``src`` holds MNIST digits only (the offline set, or shards whose folders'
    ``meta.json`` say MNIST), "folder:PATH" when its shards all lie in one folder that ``dpldm prepare``
    wrote (its ``meta.json``: each example in one shard file), else None (a folder of shards from
    anywhere may hold one image in several files)."""
    from trainer.data.reader import expand_urls
    if src.source == "mnist":
        return "mnist"
    if src.source != "shards" or not src.path:
        return None
    try:
        urls = expand_urls(src.path)
    except (ValueError, OSError):
        return None
    if any(url.startswith("pipe:") or "://" in url for url in urls):
        return None
    folders = {os.path.realpath(Path(url).parent) for url in urls}
    kinds = set()
    for folder in folders:
        meta = Path(folder) / "meta.json"
        if not meta.is_file():
            return None
        try:
            described = _described(json.loads(meta.read_text()))
        except ValueError:
            return None
        kinds.add("mnist" if described and all(kind == "mnist" for kind, _ in described) else f"folder:{folder}")
    return kinds.pop() if len(kinds) == 1 else None


def provably_disjoint(a: Any, b: Any) -> bool:
    """Whether ``DataSource`` ``a`` and ``b`` cannot share an example: both hold MNIST digits only, in
    parts (or shard files of one prepared folder) that do not meet, or both are shards of one
    folder ``dpldm prepare`` wrote with no shard file in common, and no image file in common either
    (a shard copied under another name). Anything else (sets prepared from differently described
    sources may still hold the same images) is not provably disjoint: False."""
    kind = _closed_kind(a)
    return kind is not None and kind == _closed_kind(b) and not shared_examples(a, b) \
        and not shard_images(a) & shard_images(b)


def absolute_source(src: Any) -> Any:
    """``src`` (a ``DataSource``) with its local shard paths made absolute, so that a run's recorded
    config names the same files from any working folder (``pipe:`` and URLs as written)."""
    if src is None or not src.path:
        return src

    def absolute(part: str) -> str:
        local = not part.startswith("pipe:") and "://" not in part
        return os.path.abspath(os.path.expanduser(part)) if local else part
    return dataclasses.replace(src, path="::".join(absolute(part) for part in str(src.path).split("::")))


def shared_examples(a: Any, b: Any) -> list[str]:
    """What ``DataSource`` ``a`` and ``b`` both hold, in words (empty: nothing this module can prove)."""
    theirs: dict[tuple[str, str], set[str]] = {}
    for kind, what, folder in holdings(b):
        theirs.setdefault((kind, what), set()).add(folder)
    shared = {(kind, what) for kind, what, folder in holdings(a)
              if theirs.get((kind, what), set()) - ({folder} if folder else set())}
    words = []
    for kind, what in sorted(shared):
        if kind == "mnist":
            words.append(f"MNIST's {what} split")
        elif kind == "source":
            words.append(f"shards prepared from the same source {what}")
        else:
            words.append(f"the {kind} {what}")
    return words


def _digit_pixels(encoded: bytes) -> bytes | None:
    """The 28x28 grey pixels of an encoded image that can be an MNIST digit (28x28, or 32x32 with the
    2-pixel black border MNIST gets at resolution 32); None for any other image."""
    import io

    import numpy as np
    from PIL import Image
    try:
        with Image.open(io.BytesIO(encoded)) as image:
            if image.size not in ((28, 28), (32, 32)):  # decided from the header: no decoding of other images
                return None
            pixels = np.asarray(image.convert("L"))
    except (OSError, ValueError, Image.DecompressionBombError):
        return None
    if pixels.shape == (32, 32) and not pixels[:2].any() and not pixels[-2:].any() \
            and not pixels[:, :2].any() and not pixels[:, -2:].any():
        pixels = pixels[2:30, 2:30]
    return np.ascontiguousarray(pixels).tobytes() if pixels.shape == (28, 28) else None


def images_shared_examples(images: Iterable[bytes], private: Any, what: str,
                           private_images: frozenset[bytes] | None = None) -> list[str]:
    """What the encoded images ``images`` (``what`` they are, in words) share with ``DataSource``
    ``private``, in words (empty: nothing provable): an image byte for byte a private shard's image, or,
    for a private set holding MNIST digits, an image whose pixels are one of those digits (MNIST
    exported as image files, or prepared into shards again). ``private_images``: the private shards'
    fingerprints when the caller holds them (else they are read; an empty set compares no bytes)."""
    import numpy as np

    from trainer.data.reader import fingerprint
    theirs = shard_images(private) if private_images is None else private_images
    parts = sorted({part for kind, part, _ in holdings(private) if kind == "mnist"})
    digits: set[bytes] | None = None
    same_bytes = same_digit = False
    for image in images:
        same_bytes = same_bytes or fingerprint(image) in theirs
        if parts and not same_digit:
            if digits is None:  # loaded once there is an image to compare
                from trainer.data.mnist import load_mnist
                digits = {row.tobytes() for part in parts for row in np.ascontiguousarray(load_mnist(part)[0])}
            same_digit = _digit_pixels(image) in digits
        if (same_bytes or not theirs) and (same_digit or not parts):
            break
    words = []
    if same_bytes:
        words.append(f"{what} byte for byte the same as the private shards' images")
    if same_digit:
        words.append(f"{what} whose pixels are digits of MNIST's {' + '.join(parts)} split")
    return words


def shards_shared_examples(src: Any, private: Any, private_images: frozenset[bytes] | None = None) -> list[str]:
    """What the images in the shards of ``DataSource`` ``src`` share with ``private`` (a copy of the
    private shards under another name or folder, or its digits prepared again): see
    :func:`images_shared_examples`. Empty when ``src`` names no readable shards."""
    from trainer.data.reader import expand_urls, shard_image_bytes
    pattern = _shard_pattern(src)
    if pattern is None or unreadable(src) is not None:
        return []
    return images_shared_examples(shard_image_bytes(expand_urls(pattern)), private, "shard images", private_images)


def images_in_common(a: Any, b: Any, b_images: frozenset[bytes] | None = None) -> list[str]:
    """What ``DataSource`` ``a`` and ``b`` share by their images' content, in words (empty: nothing
    provable): a shard image of either byte for byte one of the other's shard images, or one whose
    pixels are a digit of the MNIST split the other holds (:func:`shards_shared_examples`, both ways).
    Catches copies that no path or ``meta.json`` names. Shards that cannot be read count as shared
    (nothing could be compared), in words that say why. ``b_images``: ``b``'s shard image fingerprints
    when the caller holds them (an empty set: compare no bytes, the caller has)."""
    from trainer.errors import first_line

    def mnist(src: Any) -> bool:
        return any(kind == "mnist" for kind, _, _ in holdings(src))
    a_shards, b_shards = _shard_pattern(a) is not None, _shard_pattern(b) is not None
    forward = a_shards and (b_shards or mnist(b))  # a's shard images against b's images or digits
    backward = b_shards and mnist(a)  # b's shard images against a's digits (bytes were compared already)
    if not (forward or backward):  # e.g. rendered letters: nothing to compare, nothing to read
        return []
    missing = unreadable(a) or unreadable(b)  # shards that are not there
    if missing:
        return [f"images that cannot be compared ({missing.splitlines()[0]})"]
    try:
        words = shards_shared_examples(a, b, b_images) if forward else []
        return words or (shards_shared_examples(b, a) if backward else [])
    except (ValueError, OSError) as err:  # DataError too: a shard that is not a tar (named, never its content)
        return [f"images that cannot be compared ({first_line(err)})"]


def folder_shared_examples(folder: Path, private: Any) -> list[str]:
    """What the image files under ``folder`` (a plain folder of images, as an evaluation reads one)
    share with ``DataSource`` ``private``, in words (empty: nothing provable).

    Shared: the folder is, holds or lies in the image folder the private shards were prepared from
    (their ``meta.json``), or its files share images with the private set (:func:`images_shared_examples`).
    """
    from trainer.data.reader import image_files
    folder = Path(os.path.realpath(folder))
    words = []
    for kind, what, _ in holdings(private):
        if kind != "source":
            continue
        described = json.loads(what)
        root = described.get("root") if described.get("type") == "imagefolder" else None
        if root and (folder == Path(root) or Path(root) in folder.parents or folder in Path(root).parents):
            words.append(f"the image folder {root} the private shards were prepared from")
    files = (path.read_bytes() for path in image_files(folder))
    return words + images_shared_examples(files, private, "image files")


def private_prompts(prompts: Sequence[str], captions: Iterable[str], template: str | None,
                    names: Sequence[str], reader: Any = None) -> list[int]:
    """The indices of ``prompts`` that are captions of a private set (``captions``): private data, not
    the public inputs prompts must be. A caption that is exactly what ``dpldm prepare``'s ``template``
    made from a class name in ``names`` is public (the template and the names are), so prompts built the
    same way pass.

    A prompt is a caption when the text encoder ``reader`` (a ``TextEmbedder``) reads both alike: the
    same word pieces up to where it cuts a prompt, or the same once punctuation is left out (a comma or
    a full stop does not make a caption public); capitals do not count (the tokenizer lower-cases).
    Without ``reader``: the same words, or the same case-folded words without punctuation."""
    def words(text: str) -> str:
        return " ".join(str(text).split())

    def keys(text: str) -> tuple[tuple, tuple]:  # (as read, without punctuation)
        if reader is None:
            return (tuple(words(text).split()),
                    tuple("".join(c for c in str(text).casefold() if not _punctuation(c)).split()))
        pieces = reader.word_pieces(str(text))
        kept = [p for p in pieces if not all(map(_punctuation, p.removeprefix("##")))]
        return tuple(pieces[:reader.max_word_pieces]), tuple(kept[:reader.max_word_pieces])
    try:
        made = {words(template.format(label=name)) for name in names} if template else set()
    except (KeyError, IndexError, ValueError):  # not a template prepare wrote: no caption is exempt
        made = set()
    private = [keys(caption) for caption in captions if words(caption) not in made]
    as_read, loose = {k[0] for k in private}, {k[1] for k in private}
    hits = []
    for i, prompt in enumerate(prompts):
        read, without_punctuation = keys(prompt)
        if read in as_read or without_punctuation in loose:
            hits.append(i)
    return hits


def _punctuation(char: str) -> bool:
    return unicodedata.category(char).startswith("P")
