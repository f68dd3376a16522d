"""``dpldm prepare``: sources -> shards, bad input, atomic writing and resume."""
from __future__ import annotations

import argparse
import io
import json
import re
import sys
import tarfile
import types
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from trainer.data import shards as shards_mod
from trainer.data.reader import count_distinct_samples, expand_urls, make_dataset
from trainer.data.shards import PrepareError, WriteOptions, complete_shards, convert_mode, write_shards
from trainer.data.sources import SourceError, imagefolder_source, read_idx
from trainer.stages import prepare


def run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="dpldm")
    prepare.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def smooth_image(seed: int, size=(16, 16), mode="RGB") -> Image.Image:
    """A smooth colour image (JPEG-friendly), different per seed."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w] / max(w, h)
    channels = [np.clip(128 + 100 * np.sin(2 * xx * rng.uniform(1, 3) + 3 * yy * rng.uniform(1, 3) + k), 0, 255)
                for k in range(3)]
    image = Image.fromarray(np.stack(channels, -1).astype(np.uint8))
    return image.convert(mode)


def read_all(out: Path, resolution: int = 16, channels: int = 3) -> dict[str, dict]:
    """key -> decoded sample (storage order, no shuffling)."""
    ds = make_dataset(str(out), resolution, 4, shuffle_buffer=0, shardshuffle=False, rank=0, world_size=1,
                      channels=channels, fast_jpeg=False)
    result = {}
    for batch in ds:
        for i, key in enumerate(batch["key"]):
            result[key] = {"image": batch["image"][i], "captions": batch["captions"][i],
                           "label": int(batch["label"][i])}
    return result


def to_unit(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.float32).transpose(2, 0, 1) / 127.5 - 1.0


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """cat/a.png, cat/b.png (+ b.txt, 2 captions), dog/c.png (captions.jsonl), dog/d.png (no caption)."""
    root = tmp_path / "images"
    for i, rel in enumerate(["cat/a.png", "cat/b.png", "dog/c.png", "dog/d.png"]):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        smooth_image(i).save(root / rel)
    (root / "cat/b.txt").write_text("a cat\n\n  a small cat  \n")
    (root / "captions.jsonl").write_text(json.dumps({"file": "dog/c.png", "caption": ["a dog", "one dog"]}) + "\n")
    return root


# --- round trips -----------------------------------------------------------------------------

def test_imagefolder_round_trip_png_is_exact(folder: Path, tmp_path: Path):
    out = tmp_path / "shards"
    assert run_cli(["prepare", "imagefolder", str(folder), str(out), "--samples-per-shard", "3",
                    "--no-progress"]) == 0
    assert [p.name for p in complete_shards(out)] == ["shard-000000.tar", "shard-000001.tar"]
    meta = json.loads((out / "meta.json").read_text())
    assert meta["count"] == 4 and meta["label_names"] == ["cat", "dog"] and meta["skipped_count"] == 0
    assert meta["captions"]["with_captions"] == 2 and meta["command"].startswith("dpldm prepare imagefolder")
    assert not (out / "progress.json").exists()
    samples = read_all(out)
    assert list(samples) == ["00000000", "00000001", "00000002", "00000003"]
    expected = [("cat/a.png", [], 0), ("cat/b.png", ["a cat", "a small cat"], 0),
                ("dog/c.png", ["a dog", "one dog"], 1), ("dog/d.png", [], 1)]
    for (rel, captions, label), s in zip(expected, samples.values()):
        assert s["captions"] == captions and s["label"] == label
        np.testing.assert_array_equal(s["image"].numpy(), to_unit(Image.open(folder / rel)))


def test_imagefolder_classes_come_from_the_folders_not_from_the_images(tmp_path: Path, capsys):
    """Removing the one image of a class keeps the class: its name and every other label are
    the folder layout's, not the private images' (neighbouring sets differ in one example)."""
    root = tmp_path / "images"
    for i, rel in enumerate(["alice/a.png", "bob/b.png", "carol/c.png"]):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        smooth_image(i).save(root / rel)
    (root / ".thumbs").mkdir()  # hidden: neither a class nor images
    smooth_image(3).save(root / ".thumbs" / "t.png")
    elsewhere = tmp_path / "dave"  # a class folder given as a link
    elsewhere.mkdir()
    smooth_image(4).save(elsewhere / "d.png")
    (root / "dave").symlink_to(elsewhere, target_is_directory=True)
    with_alice = imagefolder_source(root)
    assert with_alice.count == 4
    (root / "alice" / "a.png").unlink()
    without = imagefolder_source(root)
    assert with_alice.label_names == without.label_names == ["alice", "bob", "carol", "dave"]
    labels = [item.read_label() for item in without.items()]
    assert without.count == 3 and labels == [1, 2, 3]
    assert "the folder(s) alice hold no images; every sub-folder is a class" in capsys.readouterr().err


def test_imagefolder_round_trip_jpeg_within_codec_tolerance(folder: Path, tmp_path: Path):
    out = tmp_path / "shards"
    meta = write_shards(imagefolder_source(folder), out,
                        WriteOptions(image_format="jpg", jpeg_quality=95), progress_bar=False)
    assert meta["count"] == 4 and meta["jpeg_quality"] == 95
    with tarfile.open(complete_shards(out)[0]) as tar:
        assert sorted(tar.getnames())[:3] == ["00000000.cls", "00000000.jpg", "00000001.cls"]
    for rel, s in zip(["cat/a.png", "cat/b.png", "dog/c.png", "dog/d.png"], read_all(out).values()):
        diff = np.abs(s["image"].numpy() - to_unit(Image.open(folder / rel)))
        assert diff.mean() < 0.03 and diff.max() < 0.3


def test_caption_csv_by_file_name_and_template(tmp_path: Path):
    root = tmp_path / "flat"
    root.mkdir()
    for i in range(3):
        smooth_image(i).save(root / f"img{i}.png")
    (root / "captions.csv").write_text("file,caption\nimg0.png,first\nimg0.png,\"second, with comma\"\nimg2.png,x\n")
    out = tmp_path / "out"
    meta = write_shards(imagefolder_source(root), out, progress_bar=False)
    assert meta["label_names"] is None
    samples = list(read_all(out).values())
    assert [s["captions"] for s in samples] == [["first", "second, with comma"], [], ["x"]]
    assert [s["label"] for s in samples] == [-1, -1, -1]


def test_caption_template_uses_label_names(folder: Path, tmp_path: Path):
    out = tmp_path / "out"
    write_shards(imagefolder_source(folder), out, WriteOptions(caption_template="a photo of a {label}"),
                 progress_bar=False)
    captions = [s["captions"] for s in read_all(out).values()]
    assert captions == [["a photo of a cat"], ["a cat", "a small cat"], ["a dog", "one dog"], ["a photo of a dog"]]


# --- bad input -------------------------------------------------------------------------------

def _png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


BAD_CASES = {
    "corrupt": (lambda p: p.write_bytes(b"not an image at all"), {}, "unreadable image"),
    "truncated": (lambda p: p.write_bytes(_png_bytes(smooth_image(9, (64, 64)))[:300]), {}, "unreadable image"),
    "bad caption file": (lambda p: (smooth_image(9).save(p), p.with_suffix(".txt").write_bytes(b"\xff\xfe\xfa")),
                         {}, "unreadable caption file"),
    "missing caption": (lambda p: smooth_image(9).save(p), {"require_captions": True}, "no caption"),
    "too small": (lambda p: smooth_image(9, (8, 12)).save(p), {"min_size": 10}, "smaller than --min-size 10"),
    "float mode": (lambda p: Image.fromarray(np.ones((16, 16), np.float32)).save(p.with_suffix(".tif")), {},
                   "unsupported image mode F"),
}


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_item_errors_naming_file_or_is_skipped_and_counted(tmp_path: Path, case: str):
    make_bad, options, reason = BAD_CASES[case]
    root = tmp_path / "in"
    root.mkdir()
    for i in range(3):
        smooth_image(i, (16, 16)).save(root / f"good{i}.png")
        (root / f"good{i}.txt").write_text(f"caption {i}")
    make_bad(root / "bad.png")
    bad_file = next(p for p in root.iterdir() if p.stem == "bad" and p.suffix != ".txt")
    reported = bad_file.with_suffix(".txt") if case == "bad caption file" else bad_file

    with pytest.raises(PrepareError, match=reason) as err:
        write_shards(imagefolder_source(root), tmp_path / "stop", WriteOptions(**options), progress_bar=False)
    assert str(reported) in str(err.value)

    meta = write_shards(imagefolder_source(root), tmp_path / "skip", WriteOptions(on_error="skip", **options),
                        progress_bar=False)
    assert meta["count"] == 3 and meta["skipped_count"] == 1
    assert meta["skipped"][0]["source"] == str(reported) and reason in meta["skipped"][0]["reason"]
    assert len(read_all(tmp_path / "skip")) == 3


def test_cli_reports_bad_item_and_returns_nonzero(tmp_path: Path, capsys):
    root = tmp_path / "in"
    root.mkdir()
    (root / "x.png").write_bytes(b"garbage")
    assert run_cli(["prepare", "imagefolder", str(root), str(tmp_path / "o"), "--no-progress"]) == 1
    assert str(root / "x.png") in capsys.readouterr().err


def test_mode_conversions_are_documented_ones(tmp_path: Path):
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))  # fully transparent red -> white
    out, how = convert_mode(rgba)
    assert out.mode == "RGB" and how == "RGBA->RGB" and out.getpixel((0, 0)) == (255, 255, 255)
    half = Image.new("RGBA", (4, 4), (0, 0, 0, 128))  # half-transparent black over white -> mid gray
    assert abs(convert_mode(half)[0].getpixel((0, 0))[0] - 127) <= 1
    palette = Image.new("RGB", (4, 4), (10, 200, 30)).convert("P", palette=Image.Palette.ADAPTIVE)
    assert convert_mode(palette)[0].getpixel((0, 0)) == (10, 200, 30)
    wide = Image.fromarray(np.full((4, 4), 65535, np.uint16))  # 16-bit gray
    converted, how = convert_mode(wide)
    assert converted.mode == "L" and converted.getpixel((0, 0)) == 255 and how.endswith("->L")
    assert convert_mode(Image.fromarray(np.full((4, 4), 257 * 100, np.uint16)))[0].getpixel((0, 0)) == 100
    assert convert_mode(Image.new("LA", (4, 4), (0, 0)))[0].getpixel((0, 0)) == 255  # transparent -> white
    gray = Image.new("L", (4, 4), 77)
    assert convert_mode(gray) == (gray, None)
    assert convert_mode(gray, "rgb")[0].getpixel((0, 0)) == (77, 77, 77)
    assert convert_mode(Image.new("RGB", (4, 4), (77, 77, 77)), "gray")[0].mode == "L"
    assert convert_mode(Image.new("1", (4, 4), 1))[0].mode == "L"
    assert convert_mode(Image.new("CMYK", (4, 4)))[0].mode == "RGB"


def test_unexpected_modes_are_converted_and_counted(tmp_path: Path):
    root = tmp_path / "in"
    root.mkdir()
    Image.new("RGBA", (8, 8), (0, 0, 255, 255)).save(root / "a.png")
    Image.fromarray(np.full((8, 8), 1000, np.uint16)).save(root / "b.png")
    Image.new("L", (8, 8), 5).save(root / "c.png")
    meta = write_shards(imagefolder_source(root), tmp_path / "out", progress_bar=False)
    assert meta["conversions"] == {"RGBA->RGB": 1, "I;16->L": 1}
    members = {}
    with tarfile.open(complete_shards(tmp_path / "out")[0]) as tar:
        for m in tar.getmembers():
            members[m.name] = Image.open(io.BytesIO(tar.extractfile(m).read())).mode
    assert members == {"00000000.png": "RGB", "00000001.png": "L", "00000002.png": "L"}


# --- atomic writing and resume ---------------------------------------------------------------

def _numbered_folder(root: Path, n: int) -> Path:
    root.mkdir()
    for i in range(n):
        smooth_image(i, (12, 12)).save(root / f"{i:03d}.png")
    return root


def _tar_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in complete_shards(out)}


def test_error_keeps_complete_shards_and_resume_matches_a_clean_run(tmp_path: Path):
    root = _numbered_folder(tmp_path / "in", 9)
    (root / "005.png").write_bytes(b"broken")
    out = tmp_path / "out"
    opts = WriteOptions(samples_per_shard=2)
    with pytest.raises(PrepareError, match="005.png"):
        write_shards(imagefolder_source(root), out, opts, progress_bar=False)
    assert [p.name for p in complete_shards(out)] == ["shard-000000.tar", "shard-000001.tar"]
    assert not (out / "meta.json").exists() and not list(out.glob("*.tmp"))
    assert json.loads((out / "progress.json").read_text())["consumed"] == 4

    with pytest.raises(PrepareError, match="--resume"):  # never silently overwrite or mix
        write_shards(imagefolder_source(root), out, opts, progress_bar=False)
    with pytest.raises(PrepareError, match="different source or options"):
        write_shards(imagefolder_source(root), out, WriteOptions(samples_per_shard=3), resume=True,
                     progress_bar=False)

    smooth_image(5, (12, 12)).save(root / "005.png")  # fix the input, then resume
    meta = write_shards(imagefolder_source(root), out, opts, resume=True, progress_bar=False)
    assert meta["count"] == 9 and meta["num_shards"] == 5
    clean = tmp_path / "clean"
    write_shards(imagefolder_source(root), clean, opts, progress_bar=False)
    assert _tar_bytes(out) == _tar_bytes(clean)
    # each preparation has its own random id, kept across a resume (the same preparation, finished)
    first = json.loads((clean / "meta.json").read_text())["preparation"]
    assert re.fullmatch(r"[0-9a-f]{16}", meta["preparation"]) and meta["preparation"] != first
    # resuming a finished job does nothing; --overwrite starts again, a new preparation
    assert write_shards(imagefolder_source(root), out, opts, resume=True, progress_bar=False)["count"] == 9
    again = write_shards(imagefolder_source(root), out, opts, overwrite=True, progress_bar=False)
    assert again["count"] == 9 and again["preparation"] != meta["preparation"]


def test_an_image_twice_is_written_once_and_listed_as_skipped_also_across_a_resume(tmp_path: Path):
    """A file copied inside the folder (under another name) would be one example twice in a private
    set: the copy is dropped whatever --on-error, listed with the sample it repeats, and a resumed run
    remembers the images of its complete shards; the shards pass the fine-tuning's count."""
    root = _numbered_folder(tmp_path / "in", 7)
    (root / "004.png").write_bytes((root / "000.png").read_bytes())
    (root / "006.png").write_bytes((root / "005.png").read_bytes())  # one shard with its copy
    (root / "003.png").write_bytes(b"broken")
    out = tmp_path / "out"
    with pytest.raises(PrepareError, match="003.png"):
        write_shards(imagefolder_source(root), out, WriteOptions(samples_per_shard=2), progress_bar=False)
    smooth_image(3, (12, 12)).save(root / "003.png")
    meta = write_shards(imagefolder_source(root), out, WriteOptions(samples_per_shard=2), resume=True,
                        progress_bar=False)
    assert meta["count"] == 5 and sorted(read_all(out)) == ["00000000", "00000001", "00000002", "00000003",
                                                            "00000005"]
    assert [(Path(s["source"]).name, s["reason"]) for s in meta["skipped"]] == [
        ("004.png", "the same image as sample 00000000 (each image is written once)"),
        ("006.png", "the same image as sample 00000005 (each image is written once)")]
    assert meta["skipped_count"] == 2
    assert count_distinct_samples(expand_urls(str(out)))[0] == 5


def test_interrupted_shard_write_leaves_no_partial_shard_and_resume_completes(tmp_path: Path, monkeypatch):
    root = _numbered_folder(tmp_path / "in", 7)
    out = tmp_path / "out"
    opts = WriteOptions(samples_per_shard=3, on_error="skip")
    real_write = wds.TarWriter.write
    calls = {"n": 0}

    def dying_write(self, obj):
        calls["n"] += 1
        if calls["n"] == 5:  # in the middle of the second shard
            raise KeyboardInterrupt
        return real_write(self, obj)

    monkeypatch.setattr(wds.TarWriter, "write", dying_write)
    with pytest.raises(KeyboardInterrupt):
        write_shards(imagefolder_source(root), out, opts, progress_bar=False)
    monkeypatch.setattr(wds.TarWriter, "write", real_write)
    assert [p.name for p in complete_shards(out)] == ["shard-000000.tar"]
    assert not list(out.glob("*.tmp"))
    with tarfile.open(out / "shard-000000.tar") as tar:
        assert len(tar.getnames()) == 3  # only .png: no captions, no labels

    # a hard kill can leave a .tmp; a shard renamed after the last progress write is not trusted either
    (out / "shard-000001.tar.tmp").write_bytes(b"half a shard")
    (out / "shard-000001.tar").write_bytes(b"stale")
    meta = write_shards(imagefolder_source(root), out, opts, resume=True, progress_bar=False)
    assert meta["count"] == 7 and not list(out.glob("*.tmp"))
    clean = tmp_path / "clean"
    write_shards(imagefolder_source(root), clean, opts, progress_bar=False)
    assert _tar_bytes(out) == _tar_bytes(clean)


def test_resume_skips_consumed_items_without_reading_them(tmp_path: Path, monkeypatch):
    root = _numbered_folder(tmp_path / "in", 6)
    out = tmp_path / "out"
    opts = WriteOptions(samples_per_shard=2, limit=4)
    write_shards(imagefolder_source(root), out, opts, progress_bar=False)
    # a finished run; now pretend it stopped after the first shard
    progress = json.loads((out / "meta.json").read_text())
    keep = {k: progress[k] for k in ("fingerprint", "consumed", "shards", "skipped", "with_captions",
                                     "label_counts", "conversions", "short_side")}
    keep.update(consumed=2, shards=progress["shards"][:1], label_counts={}, short_side=[12, 12])
    (out / "progress.json").write_text(json.dumps(keep))
    (out / "meta.json").unlink()
    (root / "000.png").write_bytes(b"would fail if read again")
    meta = write_shards(imagefolder_source(root), out, opts, resume=True, progress_bar=False)
    assert meta["count"] == 4 and [s["name"] for s in meta["shards"]] == ["shard-000000.tar", "shard-000001.tar"]


# --- other sources ---------------------------------------------------------------------------

def _celeba_tree(root: Path, n: int, missing_caption: int | None = None) -> Path:
    (root / "CelebA-HQ-img").mkdir(parents=True)
    (root / "celeba-caption").mkdir()
    for i in range(n):
        smooth_image(i, (20, 20)).save(root / "CelebA-HQ-img" / f"{i}.jpg", quality=95)
        if i != missing_caption:
            (root / "celeba-caption" / f"{i}.txt").write_text(f"face {i} smiles\nface {i} has hair\n")
    return root


def test_mm_celeba_hq_importer(tmp_path: Path):
    root = _celeba_tree(tmp_path / "mm", 12)
    (root / "CelebAMask-HQ-attribute-anno.txt").write_text(
        "12\nSmiling Male\n" + "".join(f"{i}.jpg 1 {1 if i % 3 == 0 else -1}\n" for i in range(12)))
    out = tmp_path / "out"
    assert run_cli(["prepare", "mm-celeba-hq", str(root), str(out), "--attribute", "Male", "--format", "jpg",
                    "--samples-per-shard", "5", "--no-progress"]) == 0
    meta = json.loads((out / "meta.json").read_text())
    assert meta["count"] == 12 and meta["num_shards"] == 3 and meta["label_names"] == ["not Male", "Male"]
    samples = list(read_all(out, resolution=20).values())
    # numeric order: 0, 1, 2, ..., 10, 11 (not 0, 1, 10, 11, 2, ...)
    assert [s["captions"][0] for s in samples] == [f"face {i} smiles" for i in range(12)]
    assert [s["label"] for s in samples] == [1 if i % 3 == 0 else 0 for i in range(12)]
    assert all(len(s["captions"]) == 2 for s in samples)


def test_mm_celeba_hq_requires_captions_by_default(tmp_path: Path):
    root = _celeba_tree(tmp_path / "mm", 4, missing_caption=2)
    assert run_cli(["prepare", "mm-celeba-hq", str(root), str(tmp_path / "a"), "--no-progress"]) == 1
    assert run_cli(["prepare", "mm-celeba-hq", str(root), str(tmp_path / "b"), "--on-error", "skip",
                    "--no-progress"]) == 0
    meta = json.loads((tmp_path / "b" / "meta.json").read_text())
    assert meta["count"] == 3 and meta["skipped"][0]["source"].endswith("2.jpg")
    assert run_cli(["prepare", "mm-celeba-hq", str(root), str(tmp_path / "c"), "--no-require-captions",
                    "--no-progress"]) == 0


class _FakeVisionDataset:
    """Same interface as torchvision's datasets: (PIL image, target) items, ``classes``."""
    images: np.ndarray
    targets: list

    def __init__(self, root, train=True, download=False, split=None):
        self.args = dict(root=root, train=train, download=download, split=split)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return Image.fromarray(self.images[i]), self.targets[i]


def _fake_torchvision(monkeypatch) -> types.ModuleType:
    rng = np.random.default_rng(0)

    class EMNIST(_FakeVisionDataset):
        images = rng.integers(0, 256, (5, 28, 28), dtype=np.uint8)
        targets = [1, 26, 3, 4, 5]  # 1-based letters
        classes = ["N/A"] + [chr(ord("a") + i) for i in range(26)]

    class MNIST(_FakeVisionDataset):
        images = rng.integers(0, 256, (3, 28, 28), dtype=np.uint8)
        targets = [7, 0, 9]
        classes = [f"{d} - {w}" for d, w in enumerate("zero one two three four five six seven eight nine".split())]

    datasets = types.ModuleType("torchvision.datasets")
    datasets.EMNIST, datasets.MNIST = EMNIST, MNIST
    package = types.ModuleType("torchvision")
    package.datasets = datasets
    monkeypatch.setitem(sys.modules, "torchvision", package)
    monkeypatch.setitem(sys.modules, "torchvision.datasets", datasets)
    return datasets


def test_torchvision_emnist_letters_are_transposed_and_zero_based(tmp_path: Path, monkeypatch):
    datasets = _fake_torchvision(monkeypatch)
    out = tmp_path / "out"
    assert run_cli(["prepare", "torchvision", "emnist-letters", str(out), "--root", str(tmp_path / "dl"),
                    "--no-progress"]) == 0
    meta = json.loads((out / "meta.json").read_text())
    assert meta["label_names"] == [chr(ord("a") + i) for i in range(26)]
    samples = list(read_all(out, resolution=28, channels=1).values())
    assert [s["label"] for s in samples] == [0, 25, 2, 3, 4]
    for s, raw in zip(samples, datasets.EMNIST.images):
        np.testing.assert_array_equal(s["image"][0].numpy(), raw.T.astype(np.float32) / 127.5 - 1.0)

    out2 = tmp_path / "mnist"
    assert run_cli(["prepare", "torchvision", "mnist", str(out2), "--no-download", "--no-progress"]) == 0
    meta = json.loads((out2 / "meta.json").read_text())
    assert meta["label_names"] == [str(d) for d in range(10)] and meta["label_counts"] == {"0": 1, "7": 1, "9": 1}


def test_torchvision_and_hf_missing_package_errors_are_clear(tmp_path: Path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torchvision", None)
    monkeypatch.setitem(sys.modules, "torchvision.datasets", None)
    monkeypatch.setitem(sys.modules, "datasets", None)
    assert run_cli(["prepare", "torchvision", "cifar10", str(tmp_path / "a"), "--no-progress"]) == 1
    assert "pip install torchvision" in capsys.readouterr().err
    assert run_cli(["prepare", "hf", "some/set", str(tmp_path / "b"), "--no-progress"]) == 1
    assert "pip install datasets" in capsys.readouterr().err


def test_hf_source_through_a_fake_datasets_module(tmp_path: Path, monkeypatch):
    rows = [{"image": smooth_image(i), "label": i % 2, "text": f"caption {i}"} for i in range(3)]
    rows.append({"image": {"bytes": _png_bytes(smooth_image(3)), "path": None}, "label": 1,
                 "text": ["two", "captions"]})

    class FakeDataset(list):
        column_names = ["image", "label", "text"]
        features = {"label": types.SimpleNamespace(names=["even", "odd"])}

    calls = []

    def load_dataset(name, config=None, split=None, cache_dir=None):
        calls.append((name, config, split))
        return FakeDataset(rows)

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    out = tmp_path / "out"
    assert run_cli(["prepare", "hf", "org/faces", str(out), "--split", "test", "--no-progress"]) == 0
    assert calls == [("org/faces", None, "test")]
    meta = json.loads((out / "meta.json").read_text())
    assert meta["label_names"] == ["even", "odd"] and meta["source"]["columns"]["caption"] == "text"
    samples = list(read_all(out).values())
    assert [s["captions"] for s in samples] == [["caption 0"], ["caption 1"], ["caption 2"], ["two", "captions"]]
    assert [s["label"] for s in samples] == [0, 1, 0, 1]
    np.testing.assert_array_equal(samples[3]["image"].numpy(), to_unit(smooth_image(3)))


def test_offline_sources_fashion_mnist_mnist_letters(tmp_path: Path):
    assert run_cli(["prepare", "fashion-mnist", str(tmp_path / "f"), "--split", "test", "--limit", "20",
                    "--no-progress"]) == 0
    meta = json.loads((tmp_path / "f" / "meta.json").read_text())
    assert meta["count"] == 20 and meta["label_names"][9] == "Ankle boot"
    assert meta["resolution"]["short_side_range"] == [28, 28]
    raw = read_idx(Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz"))[:20]
    samples = list(read_all(tmp_path / "f", resolution=28, channels=1).values())
    np.testing.assert_array_equal(samples[7]["image"][0].numpy(), raw[7].astype(np.float32) / 127.5 - 1.0)

    assert run_cli(["prepare", "mnist", str(tmp_path / "m"), "--split", "val", "--limit", "12",
                    "--samples-per-shard", "5", "--no-progress"]) == 0
    assert json.loads((tmp_path / "m" / "meta.json").read_text())["num_shards"] == 3
    assert run_cli(["prepare", "letters", str(tmp_path / "l"), "--count", "30", "--caption-template",
                    "the letter {label}", "--no-progress"]) == 0
    letters = list(read_all(tmp_path / "l", resolution=28, channels=1).values())
    assert len(letters) == 30 and letters[0]["captions"] == [f"the letter {chr(ord('a') + letters[0]['label'])}"]
    # in matplotlib's fonts, bent: recorded in meta.json, refused before writing when the font set is unknown
    assert run_cli(["prepare", "letters", str(tmp_path / "lf"), "--count", "8", "--fonts", "matplotlib",
                    "--elastic", "20", "--no-progress"]) == 0
    meta = json.loads((tmp_path / "lf" / "meta.json").read_text())
    assert meta["source"]["fonts"] == "matplotlib" and meta["source"]["elastic"] == 20
    assert "--fonts matplotlib --elastic 20" in meta["command"]
    for flag, value in (("--fonts", "wingdings"), ("--elastic", "-1")):
        with pytest.raises(SystemExit) as stop:  # a usage error
            run_cli(["prepare", "letters", str(tmp_path / "lx"), flag, value])
        assert stop.value.code == 2 and not (tmp_path / "lx").exists()


def test_read_idx_rejects_truncated_file(tmp_path: Path):
    path = tmp_path / "x-idx3-ubyte"
    path.write_bytes(bytes([0, 0, 8, 3]) + (5).to_bytes(4, "big") + (2).to_bytes(4, "big") * 2 + bytes(7))
    with pytest.raises(SourceError, match="truncated"):
        read_idx(path)


def test_options_are_validated(tmp_path: Path):
    with pytest.raises(ValueError, match="samples_per_shard"):
        WriteOptions(samples_per_shard=0).validate()
    with pytest.raises(ValueError, match="image_format"):
        WriteOptions(image_format="gif").validate()
    with pytest.raises(SourceError, match="not a directory"):
        imagefolder_source(tmp_path / "nope")
    assert shards_mod.shard_name(12) == "shard-000012.tar"
