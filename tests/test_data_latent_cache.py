"""The private latent cache: contents, indexing, refusal of a mismatched encoder, resume, ranks, CLI."""
from __future__ import annotations

import argparse
import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from trainer.data.latent_cache import (CacheMismatchError, IncompleteCacheError, LatentCache, build_latent_cache,
                                       read_manifest)
from trainer.data.reader import make_dataset
from trainer.data.shards import write_shard
from trainer.stages import encode as encode_stage


class FixedConvEncoder:
    """A deterministic stand-in for the frozen encoder: 4x4 stride-4 convs -> (mean, std) [B, 2, R/4, R/4]."""

    def __init__(self, fail_on_call: int | None = None):
        gen = torch.Generator().manual_seed(0)
        self.w_mean = torch.randn(2, 3, 4, 4, generator=gen) / 8
        self.w_std = torch.randn(2, 3, 4, 4, generator=gen) / 8
        self.calls = 0
        self.images = 0
        self.fail_on_call = fail_on_call

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.calls += 1
        if self.calls == self.fail_on_call:
            raise RuntimeError("simulated crash")
        self.images += len(x)
        mean = torch.nn.functional.conv2d(x, self.w_mean, stride=4)
        std = torch.nn.functional.conv2d(x, self.w_std, stride=4).sigmoid() + 0.05
        return mean, std


def write_private_set(folder: Path, n_shards: int = 3, per_shard: int = 5) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for s in range(n_shards):
        samples = []
        for j in range(per_shard):
            i = s * per_shard + j
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(buf, format="PNG")
            sample = {"__key__": f"{i:08d}", "png": buf.getvalue(), "cls": str(i % 3).encode()}
            if i % 4:
                sample["txt"] = f"first {i}\nsecond {i}".encode()
            samples.append(sample)
        write_shard(folder / f"shard-{s:06d}.tar", samples)
    (folder / "meta.json").write_text(json.dumps({"label_names": ["x", "y", "z"]}))
    return folder


def reference(shards: Path, encoder: FixedConvEncoder) -> dict:
    batches = list(make_dataset(str(shards), 16, 100, shuffle_buffer=0, shardshuffle=False))
    images = torch.cat([b["image"] for b in batches])
    mean, std = encoder(images)
    return {"mean": mean, "std": std, "label": torch.cat([b["label"] for b in batches]),
            "captions": [c for b in batches for c in b["captions"]]}


def test_cache_holds_posterior_labels_captions_and_indexes_like_poisson_batches(tmp_path: Path):
    shards = write_private_set(tmp_path / "shards")
    enc = FixedConvEncoder()
    manifest = build_latent_cache(enc, str(shards), tmp_path / "cache", "hash-a", 16, 4, dtype="float32",
                                  progress_bar=False)
    assert manifest["complete"] and manifest["count"] == 15 and manifest["latent_shape"] == [2, 4, 4]
    assert manifest["shard_counts"] == [5, 5, 5] and manifest["label_names"] == ["x", "y", "z"]
    assert not (tmp_path / "cache" / "parts").exists()
    cache = LatentCache(tmp_path / "cache", expected_encoder_hash="hash-a")
    ref = reference(shards, FixedConvEncoder())
    assert len(cache) == 15 and cache.latent_shape == (2, 4, 4)
    idx = torch.tensor([14, 0, 7, 7])
    batch = cache[idx]
    torch.testing.assert_close(batch["mean"], ref["mean"][idx])
    torch.testing.assert_close(batch["std"], ref["std"][idx])
    assert torch.equal(batch["label"], ref["label"][idx])
    assert batch["captions"] == [ref["captions"][i] for i in idx.tolist()]
    assert batch["caption"][0] in ("first 14", "second 14") and batch["caption"][1] == ""
    empty = cache[torch.tensor([], dtype=torch.long)]  # an empty Poisson batch is legal
    assert empty["mean"].shape == (0, 2, 4, 4) and empty["label"].shape == (0,) and empty["caption"] == []
    with pytest.raises(IndexError):
        cache[torch.tensor([15])]
    z = LatentCache.posterior_sample(batch, torch.Generator().manual_seed(0))
    assert z.shape == (4, 2, 4, 4) and not torch.equal(z, batch["mean"])


def test_float16_storage_is_within_half_precision(tmp_path: Path):
    shards = write_private_set(tmp_path / "shards", 1, 6)
    build_latent_cache(FixedConvEncoder(), str(shards), tmp_path / "c16", "h", 16, 4, progress_bar=False)
    cache = LatentCache(tmp_path / "c16", in_memory=True)
    assert cache.mean.dtype == np.float16 and cache.manifest["dtype"] == "float16"
    ref = reference(shards, FixedConvEncoder())
    torch.testing.assert_close(cache[torch.arange(6)]["mean"], ref["mean"], atol=2e-3, rtol=2e-3)


def test_mismatched_encoder_or_source_is_refused_naming_both_hashes(tmp_path: Path):
    shards = write_private_set(tmp_path / "shards", 2, 3)
    build_latent_cache(FixedConvEncoder(), str(shards), tmp_path / "cache", "aaa111", 16, 4, progress_bar=False)
    with pytest.raises(CacheMismatchError, match="aaa111.*bbb222"):
        LatentCache(tmp_path / "cache", expected_encoder_hash="bbb222")
    with pytest.raises(CacheMismatchError, match="aaa111.*bbb222"):
        build_latent_cache(FixedConvEncoder(), str(shards), tmp_path / "cache", "bbb222", 16, 4, progress_bar=False)
    other = write_private_set(tmp_path / "other", 1, 4)
    with pytest.raises(CacheMismatchError, match="shards with hash"):
        build_latent_cache(FixedConvEncoder(), str(other), tmp_path / "cache", "aaa111", 16, 4, progress_bar=False)
    with pytest.raises(CacheMismatchError, match="dtype"):
        build_latent_cache(FixedConvEncoder(), str(shards), tmp_path / "cache", "aaa111", 16, 4,
                           dtype="float32", progress_bar=False)


def test_shards_rewritten_with_the_same_names_and_sizes_are_another_source(tmp_path: Path):
    """The cache knows its shards by their contents: images replaced in place (same file names, same
    sizes) are refused, not resumed or returned as the old latents; a cache of version 1 is refused."""
    shards = write_private_set(tmp_path / "shards", 2, 3)
    build_latent_cache(FixedConvEncoder(), str(shards), tmp_path / "cache", "h", 16, 4, progress_bar=False)
    for tar in sorted(shards.glob("*.tar")):  # flip one byte of each image's pixels' encoding: same size
        data = bytearray(tar.read_bytes())
        at = data.index(b"IDAT") + 8
        data[at] ^= 0xFF
        tar.write_bytes(bytes(data))
    with pytest.raises(CacheMismatchError, match="shards with hash"):
        build_latent_cache(FixedConvEncoder(), str(shards), tmp_path / "cache", "h", 16, 4, progress_bar=False)
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    (tmp_path / "cache" / "manifest.json").write_text(json.dumps({**manifest, "version": 1}))
    with pytest.raises(CacheMismatchError, match="another version"):
        build_latent_cache(FixedConvEncoder(), str(shards), tmp_path / "cache", "h", 16, 4, progress_bar=False)


def test_two_processes_encoding_one_shard_both_finish(tmp_path: Path, monkeypatch):
    """Fine-tunes of one experiment share a cache: a shard another process renamed into place first is kept."""
    from trainer.data import latent_cache
    shards = write_private_set(tmp_path / "shards", 1, 4)
    real_replace = os.replace

    def other_process_first(src, dst):
        if Path(src).name.startswith("part-"):  # the other process's copy lands first
            shutil.copytree(src, dst)
        return real_replace(src, dst)

    monkeypatch.setattr(latent_cache.os, "replace", other_process_first)
    build_latent_cache(FixedConvEncoder(), str(shards), tmp_path / "cache", "h", 16, 4, progress_bar=False)
    assert len(LatentCache(tmp_path / "cache").labels) == 4


def test_interrupted_build_is_refused_then_completed_on_the_next_build(tmp_path: Path):
    shards = write_private_set(tmp_path / "shards", 3, 5)
    crashing = FixedConvEncoder(fail_on_call=4)  # batch size 3: shard 0 is calls 1-2, shard 1 is 3-4
    with pytest.raises(RuntimeError, match="simulated crash"):
        build_latent_cache(crashing, str(shards), tmp_path / "cache", "h", 16, 3, progress_bar=False)
    assert read_manifest(tmp_path / "cache")["complete"] is False
    assert [p.name for p in sorted((tmp_path / "cache" / "parts").iterdir())] == ["part-000000",
                                                                                 f"part-000001.{os.getpid()}.tmp"]
    with pytest.raises(IncompleteCacheError, match="partial"):
        LatentCache(tmp_path / "cache")

    resumed = FixedConvEncoder()
    build_latent_cache(resumed, str(shards), tmp_path / "cache", "h", 16, 3, progress_bar=False)
    assert resumed.images == 10  # shards 1 and 2 only: shard 0 was kept
    clean = tmp_path / "clean"
    build_latent_cache(FixedConvEncoder(), str(shards), clean, "h", 16, 3, progress_bar=False)
    for name in ("mean.npy", "std.npy", "labels.npy", "captions.json", "keys.json"):
        assert (tmp_path / "cache" / name).read_bytes() == (clean / name).read_bytes(), name


def test_ranks_encode_disjoint_shards_and_the_last_one_completes_the_cache(tmp_path: Path):
    shards = write_private_set(tmp_path / "shards", 3, 4)
    encoders = [FixedConvEncoder(), FixedConvEncoder()]
    first = build_latent_cache(encoders[0], str(shards), tmp_path / "cache", "h", 16, 4, rank=0, world_size=2,
                               progress_bar=False)
    assert first["complete"] is False and encoders[0].images == 8  # shards 0 and 2
    last = build_latent_cache(encoders[1], str(shards), tmp_path / "cache", "h", 16, 4, rank=1, world_size=2,
                              progress_bar=False)
    assert last["complete"] and encoders[1].images == 4
    single = tmp_path / "single"
    build_latent_cache(FixedConvEncoder(), str(shards), single, "h", 16, 4, progress_bar=False)
    a, b = LatentCache(tmp_path / "cache"), LatentCache(single)
    assert a.keys == b.keys and np.array_equal(a.mean, b.mean) and np.array_equal(a.std, b.std)


def test_encode_command_with_a_small_autoencoder(tmp_path: Path):
    from trainer.config import dump_config, load_config
    from trainer.io import save_safetensors
    from trainer.stages.common import build_autoencoder, file_sha256
    cfg = load_config("demo")
    cfg.autoencoder.embed_dim = 2
    cfg.autoencoder.ddconfig = dict(double_z=True, z_channels=2, resolution=16, in_channels=3, out_ch=3, ch=32,
                                    ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[], dropout=0.0)
    cfg.ldm.unet.update(in_channels=2, out_channels=2)  # the LDM section must agree with the latent channels
    run_dir = tmp_path / "ae"
    run_dir.mkdir()
    dump_config(cfg, run_dir / "config.yaml")
    torch.manual_seed(0)
    model = build_autoencoder(cfg).eval()
    save_safetensors(model.state_dict(), run_dir / "autoencoder.safetensors")
    shards = write_private_set(tmp_path / "shards", 2, 3)

    parser = argparse.ArgumentParser()
    encode_stage.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["encode", "--autoencoder", str(run_dir), str(shards), str(tmp_path / "cache"),
                              "--batch-size", "4", "--dtype", "float32", "--device", "cpu", "--no-progress"])
    assert args.func(args) == 0
    cache = LatentCache(tmp_path / "cache", expected_encoder_hash=file_sha256(run_dir / "autoencoder.safetensors"))
    assert len(cache) == 6 and cache.latent_shape == (2, 8, 8)
    images = torch.cat([b["image"] for b in make_dataset(str(shards), 16, 6, shuffle_buffer=0, shardshuffle=False)])
    with torch.no_grad():
        mean, std = model.encode(images)
    torch.testing.assert_close(cache[torch.arange(6)]["mean"], mean, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(cache[torch.arange(6)]["std"], std, atol=1e-5, rtol=1e-4)
