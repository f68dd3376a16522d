"""The streaming reader: resize/crop, batches, rank/worker splitting, determinism, URL forms."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from trainer.data.reader import (count_distinct_samples, decode_image, expand_urls, image_fingerprints, make_dataset,
                                 make_loader, resize_center_crop)
from trainer.data.shards import write_shard


def png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def write_set(folder: Path, n_shards: int, per_shard: int, size: int = 8) -> list[str]:
    """Shards of distinct uniform gray images (value = sample number); 3 captions each; labels."""
    folder.mkdir(parents=True, exist_ok=True)
    keys = []
    for s in range(n_shards):
        samples = []
        for j in range(per_shard):
            i = s * per_shard + j
            key = f"{i:08d}"
            keys.append(key)
            samples.append({"__key__": key, "png": png(np.full((size, size), i, np.uint8)),
                            "txt": f"a {i}\nb {i}\nc {i}".encode(), "cls": str(i % 5).encode()})
        write_shard(folder / f"shard-{s:06d}.tar", samples)
    return keys


def keys_of(batches) -> list[str]:
    return [k for b in batches for k in b["key"]]


# --- images ----------------------------------------------------------------------------------

def test_resize_short_side_and_center_crop_to_256():
    # 400 x 300: a uniform gray centre square between red side bands that the crop must remove
    array = np.zeros((300, 400, 3), np.uint8)
    array[:, :] = (255, 0, 0)
    array[:, 50:350] = (100, 100, 100)
    out = resize_center_crop(Image.fromarray(array), 256)
    assert out.size == (256, 256)
    body = np.asarray(out, dtype=np.int16)[:, 2:-2]
    assert np.abs(body - 100).max() <= 2  # only the centre square survives

    tall = Image.fromarray(np.tile(np.arange(600)[:, None] * 255 // 599, (1, 300)).astype(np.uint8))
    crop = np.asarray(resize_center_crop(tall, 256), dtype=np.float32)
    assert crop.shape == (256, 256)
    assert abs(crop.mean() - 127.5) < 1.5  # vertically centred: the mid rows of the ramp
    small = resize_center_crop(Image.new("RGB", (100, 80), (9, 9, 9)), 256)
    assert small.size == (256, 256)  # upscaled by default


def test_pad_small_centres_on_black():
    image = Image.new("L", (28, 28), 255)
    padded = np.asarray(resize_center_crop(image, 32, pad_small=True))
    assert padded.shape == (32, 32) and padded[2:30, 2:30].min() == 255
    assert padded[:2].max() == 0 and padded[:, :2].max() == 0


def test_decode_to_minus_one_one_chw_rgb_and_fast_jpeg_close_to_full_decode():
    gray = decode_image(png(np.array([[0, 255], [255, 0]], np.uint8)), 2)
    assert gray.shape == (3, 2, 2) and gray.dtype == torch.float32
    assert gray.min() == -1.0 and gray.max() == 1.0 and torch.equal(gray[0], gray[2])
    yy, xx = np.mgrid[0:384, 0:512]
    smooth = np.stack([(xx / 2) % 256, (yy / 2) % 256, (xx + yy) / 4 % 256], -1).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(smooth).save(buf, format="JPEG", quality=95)
    fast = decode_image(buf.getvalue(), 256, fast_jpeg=True)
    full = decode_image(buf.getvalue(), 256, fast_jpeg=False)
    assert fast.shape == full.shape == (3, 256, 256)
    assert (fast - full).abs().mean() < 0.02
    rgba = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    buf = io.BytesIO()
    rgba.save(buf, format="PNG")
    assert decode_image(buf.getvalue(), 4).min() == 1.0  # transparent -> white, as the writer does


# --- batches ---------------------------------------------------------------------------------

def test_batches_have_the_documented_fields(tmp_path: Path):
    write_set(tmp_path, 2, 3)
    write_shard(tmp_path / "shard-000002.tar", [{"__key__": "bare", "png": png(np.zeros((8, 8), np.uint8))}])
    batches = list(make_dataset(str(tmp_path), 8, 4, shuffle_buffer=0, shardshuffle=False))
    assert [len(b["key"]) for b in batches] == [4, 3]
    b = batches[0]
    assert b["image"].shape == (4, 3, 8, 8) and b["label"].dtype == torch.long
    assert b["caption"][0] in b["captions"][0] and len(b["captions"][0]) == 3
    assert torch.allclose(b["image"][1], torch.full((3, 8, 8), 1 / 127.5 - 1))
    last = batches[1]
    assert last["key"][-1] == "bare" and last["label"][-1] == -1 and last["caption"][-1] == ""
    full_only = list(make_dataset(str(tmp_path), 8, 4, shuffle_buffer=0, shardshuffle=False, partial=False))
    assert len(full_only) == 1
    gray = next(iter(make_dataset(str(tmp_path), 8, 2, shuffle_buffer=0, shardshuffle=False, channels=1)))
    assert gray["image"].shape == (2, 1, 8, 8)


def test_url_forms_brace_pipe_folder_and_list(tmp_path: Path):
    keys = write_set(tmp_path, 3, 2)
    brace = str(tmp_path / "shard-{000000..000002}.tar")
    assert expand_urls(brace) == expand_urls(str(tmp_path))
    pipe = [f"pipe:cat {p}" for p in expand_urls(brace)]
    for urls in (brace, pipe, "::".join(expand_urls(brace))):
        assert keys_of(make_dataset(urls, 8, 4, shuffle_buffer=0, shardshuffle=False)) == keys
    with pytest.raises(FileNotFoundError, match="nothing_here"):
        expand_urls(str(tmp_path / "nothing_here"))
    with pytest.raises(ValueError, match="no shard-"):
        (tmp_path / "empty").mkdir()
        expand_urls(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="shardshuffle"):
        make_dataset(brace, 8, 4, shardshuffle=True)


def test_count_distinct_samples_counts_what_the_reader_reads_and_refuses_a_shard_twice(tmp_path: Path):
    """N of a private set: the reader's sample count, without decoding; the same shard listed twice (by
    path, by a copy elsewhere, or streamed by a pipe command) would count its examples twice."""
    write_set(tmp_path / "set", 3, 4)
    urls = expand_urls(str(tmp_path / "set"))
    count, digest, images, captioned, captions, labels = count_distinct_samples(urls)
    assert count == len(keys_of(make_dataset(urls, 8, 5, shuffle_buffer=0))) == 12 == captioned
    assert captions == {f"{c} {i}" for c in "abc" for i in range(12)} and labels == set(range(5))
    assert images == {row.tobytes() for row in image_fingerprints(urls)} and len(images) == 12
    assert count_distinct_samples([f"pipe:cat {u}" for u in urls])[0] == 12
    other = tmp_path / "other"  # the same file names and sizes, other images: another digest
    other.mkdir()
    for shard, u in enumerate(urls):
        write_shard(other / Path(u).name, [{"__key__": f"{i:08d}", "png": png(np.full((8, 8), 255 - i, np.uint8)),
                                            "txt": f"a {i}\nb {i}\nc {i}".encode(), "cls": str(i % 5).encode()}
                                           for i in range(4 * shard, 4 * shard + 4)])
    assert count_distinct_samples(expand_urls(str(other)))[1] != digest
    copy = tmp_path / "elsewhere" / "shard-000009.tar"
    copy.parent.mkdir()
    copy.write_bytes(Path(urls[1]).read_bytes())
    for twice in (urls + urls[:1], urls + [str(copy)], [f"pipe:cat {u}" for u in urls + urls[2:]],
                  urls + [f"pipe:cat {urls[0]}"]):
        with pytest.raises(ValueError, match="the same samples as shard .*shard-00000[012].tar.*count twice"):
            count_distinct_samples(twice)


def test_count_distinct_samples_refuses_one_image_in_two_samples(tmp_path: Path):
    """An image file held by two samples counts one example twice in N (q = B / N too small, the
    example drawn twice): refused whether the copy sits in a reordered shard, a shard that adds one
    sample to another, or the same shard under another key, with or without its labels."""
    samples = [{"__key__": f"{i:08d}", "png": png(np.full((8, 8), 10 * i, np.uint8)), "cls": str(i).encode()}
               for i in range(5)]
    write_shard(tmp_path / "a.tar", samples)
    write_shard(tmp_path / "reordered.tar", samples[::-1])
    write_shard(tmp_path / "superset.tar", samples + [{"__key__": "extra", "png": png(np.ones((8, 8), np.uint8))}])
    write_shard(tmp_path / "inside.tar", samples + [{"__key__": "again", "png": samples[2]["png"]}])
    counted = count_distinct_samples([str(tmp_path / "a.tar")])
    assert (counted.count, counted.captioned) == (5, 0)
    for urls, again, at in (([tmp_path / "a.tar", tmp_path / "reordered.tar"], 0, 4),
                            ([tmp_path / "a.tar", tmp_path / "superset.tar"], 0, 0),
                            ([tmp_path / "inside.tar"], 5, 2)):
        with pytest.raises(ValueError, match=rf"its sample {again} .* same image as sample {at} of .*remove the copy"):
            count_distinct_samples([str(u) for u in urls])


def test_corrupt_sample_raises_with_url_and_key_or_is_skipped(tmp_path: Path):
    write_shard(tmp_path / "shard-000000.tar", [{"__key__": "good", "png": png(np.zeros((8, 8), np.uint8))},
                                                {"__key__": "bad", "png": b"garbage"}])
    with pytest.raises(ValueError, match=r"shard-000000.tar: sample bad"):
        list(make_dataset(str(tmp_path), 8, 2, shuffle_buffer=0, shardshuffle=False))
    skipped = make_dataset(str(tmp_path), 8, 2, shuffle_buffer=0, shardshuffle=False,
                           handler=wds.ignore_and_continue)
    assert keys_of(skipped) == ["good"]


# --- splitting and determinism ---------------------------------------------------------------

def test_ranks_split_shards_without_duplication_or_loss(tmp_path: Path, monkeypatch):
    keys = write_set(tmp_path, 7, 3)
    per_rank = [keys_of(make_dataset(str(tmp_path), 8, 4, seed=3, rank=r, world_size=3)) for r in range(3)]
    assert sorted(k for ks in per_rank for k in ks) == keys
    assert all(per_rank)
    # the same split through the environment (what torchrun sets) and wds.split_by_node
    monkeypatch.setenv("WORLD_SIZE", "3")
    from_env = []
    for r in range(3):
        monkeypatch.setenv("RANK", str(r))
        from_env.append(keys_of(make_dataset(str(tmp_path), 8, 4, seed=3)))
    assert from_env == per_rank
    with pytest.raises(ValueError, match="7 shard.*8 ranks"):
        list(make_dataset(str(tmp_path), 8, 4, rank=0, world_size=8))


@pytest.mark.parametrize("n_shards,num_workers", [(5, 2), (1, 2)])
def test_workers_split_without_duplication_or_loss(tmp_path: Path, n_shards: int, num_workers: int):
    keys = write_set(tmp_path, n_shards, 3)
    loader = make_loader(str(tmp_path), 8, 2, num_workers=num_workers, seed=1, shuffle_buffer=4)
    first = keys_of(loader)
    assert sorted(first) == keys
    assert keys_of(loader) == first  # deterministic for a seed, with several workers


def test_ranks_times_workers_cover_everything_once(tmp_path: Path):
    keys = write_set(tmp_path, 5, 2)
    seen = []
    for rank in range(2):
        seen += keys_of(make_loader(str(tmp_path), 8, 3, num_workers=2, rank=rank, world_size=2, seed=0))
    assert sorted(seen) == keys


def test_shuffle_is_deterministic_per_seed_and_epoch(tmp_path: Path):
    keys = write_set(tmp_path, 4, 5)
    ds = make_dataset(str(tmp_path), 8, 4, seed=7, shuffle_buffer=8, shardshuffle=10)
    a, b = list(ds), list(ds)
    assert keys_of(a) == keys_of(b) and [x["caption"] for x in a] == [x["caption"] for x in b]
    assert sorted(keys_of(a)) == keys and keys_of(a) != keys
    ds.set_epoch(1)
    assert keys_of(ds) != keys_of(a)
    other = make_dataset(str(tmp_path), 8, 4, seed=8, shuffle_buffer=8, shardshuffle=10)
    assert keys_of(other) != keys_of(a)


def test_one_random_caption_per_sample_varies_across_epochs(tmp_path: Path):
    write_set(tmp_path, 1, 1)
    ds = make_dataset(str(tmp_path), 8, 1, shuffle_buffer=0, shardshuffle=False, seed=0)
    picks = set()
    for epoch in range(30):
        ds.set_epoch(epoch)
        picks.add(next(iter(ds))["caption"][0])
    assert picks == {"a 0", "b 0", "c 0"}


def test_a_broken_sample_is_a_data_error_naming_the_shard_and_sample_not_its_content():
    """Exit 1 at the CLI (``DataError``), one line; the caption or label bytes are not echoed."""
    from trainer.data.reader import decode_sample
    from trainer.errors import DataError, user_message
    good = png(np.zeros((8, 8), np.uint8))
    for sample, words in (({"png": b"secret bytes"}, "cannot decode .png"),
                          ({"pgm": b"P2\n2 2\n255\n7310 0 0 0\n"}, "cannot decode .pgm (ValueError)"),  # PIL: "...: 7310"
                          ({"jpg": good, "txt": b"\xffsecret"}, ".txt captions are not UTF-8"),
                          ({"png": good, "cls": b"secret"}, ".cls is not an integer class label"),
                          ({"txt": b"secret"}, "no image")):
        with pytest.raises(DataError) as caught:
            decode_sample({"__key__": "k7", "__url__": "s.tar", **sample}, 8, channels=1)
        assert str(caught.value).startswith("s.tar: sample k7: ") and words in str(caught.value)
        assert "secret" not in str(caught.value) and "7310" not in str(caught.value)
    wrapped = DataError("Caught DataError in DataLoader worker process 0.\nOriginal Traceback (most recent call "
                        "last):\n  File \"x.py\", line 1\ntrainer.errors.DataError: s.tar: sample k7: no image")
    assert user_message(wrapped) == "s.tar: sample k7: no image"
    assert user_message(DataError("a: b")) == "a: b"
