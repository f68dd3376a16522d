"""bench/bench_precision.py on a tiny demo: both precisions are timed per stage and agree in direction."""
from __future__ import annotations

from pathlib import Path

import pytest

from conftest import load_bench

pytestmark = pytest.mark.usefixtures("torch_threads_restored")

TINY = ["ldm.unet.model_channels=32", "ldm.unet.channel_mult=[1,1]", "ldm.unet.context_dim=16",
        "ldm.unet.num_head_channels=16", "ldm.conditioner.embed_dim=16", "autoencoder.ddconfig.ch=32",
        "autoencoder.train.batch_size=4", "ldm.train.batch_size=8", "finetune.physical_batch_size=8",
        "sample.batch_size=8", "autoencoder.train.steps=5", "ldm.train.steps=7", "finetune.steps=3",
        "finetune.expected_batch_size=16", "eval.num_per_class=4", "eval.ddim_steps=2"]


def test_every_stage_is_timed_in_both_precisions_and_bf16_follows_fp32(tmp_path: Path, capsys):
    bench = load_bench("bench_precision")
    out = tmp_path / "precision.md"
    rows = bench.main(["--repeats", "2", "--threads", "1", "--private-examples", "1000", "--out", str(out),
                       "data.public.num_examples=2000", *TINY])
    assert [r.work.stage for r in rows] == ["pretrain-ae", "pretrain-ldm", "finetune (DP step)",
                                            "sample (UNet forward)", "encode (encoder)", "sample (decoder)"]
    for row in rows:
        assert all(len(row.times[p]) == 2 and min(row.times[p]) > 0 for p in ("fp32", "bf16"))
        assert row.cosine > 0.99, row.work.stage  # bf16 rounding, not another computation
    by_stage = {r.work.stage: r.work.demo_steps for r in rows}
    assert by_stage["pretrain-ae"] == 5 and by_stage["pretrain-ldm"] == 7
    assert by_stage["finetune (DP step)"] == pytest.approx(2 * 3 * 16 / 8)  # epsilon 10 and the sweep's epsilon 1
    assert by_stage["sample (UNet forward)"] == pytest.approx(2 * 4 * 10 / 8 * 2)  # guidance 1: one forward a step
    assert by_stage["encode (encoder)"] == pytest.approx(3000 / 256)
    assert by_stage["sample (decoder)"] == pytest.approx(2 * 4 * 10 / 8)
    text = out.read_text()
    assert "| these stages |" in text and text.strip() in capsys.readouterr().out
