"""bench/bench_flops.py on a tiny UNet: the stage rows follow the config's sizes and the per-example counts."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import load_bench

pytestmark = pytest.mark.usefixtures("torch_threads_restored")

TINY = ["ldm.unet.model_channels=32", "ldm.unet.channel_mult=[1,1]", "ldm.unet.context_dim=16",
        "ldm.conditioner.embed_dim=16"]


def test_rows_are_the_config_sizes_times_the_per_example_counts(tmp_path: Path, capsys):
    bench = load_bench("bench_flops")
    out = tmp_path / "flops.md"
    overrides = TINY + ["finetune.steps=7", "finetune.expected_batch_size=300", "eval.num_per_class=5",
                        "eval.guidance_scale=1.0", "eval.ddim_steps=4", "sample.guidance_scale=3.0",
                        "sample.ddim_steps=6", "sample.num_per_class=2", "ldm.train.steps=11", "ldm.train.batch_size=16",
                        "autoencoder.train.steps=5"]
    rows = {stage: f for stage, _, f in bench.main(["--private-examples", "1234", "--threads", "1", "--out", str(out),
                                                      *overrides])}
    cfg = bench.load_config("demo", overrides)
    per = bench.count_per_example(cfg)
    assert 0 < per.unet_forward < per.dp_step < per.ldm_train  # the DP step differentiates only part of the UNet
    assert rows["pretrain-ae"] == pytest.approx(5 * 32 * per.ae_train)
    assert rows["pretrain-ldm"] == pytest.approx(11 * 16 * per.ldm_train)
    assert rows["encode"] == pytest.approx(1234 * per.encode)
    assert rows["finetune (eps 10)"] == pytest.approx(7 * 300 * per.dp_step)
    # the sweep entry (epsilon 1) takes the overrides too, as in `dpldm demo`
    assert rows["finetune (eps 1)"] == pytest.approx(7 * 300 * per.dp_step)
    assert rows["sample (eval, eps 10)"] == pytest.approx(50 * (4 * per.unet_forward + per.decode))  # guidance 1
    assert rows["sample (grid, eps 10)"] == pytest.approx(20 * (6 * 2 * per.unet_forward + per.decode))
    text = out.read_text()
    assert "| total |" in text and text.strip() in capsys.readouterr().out


def test_counts_are_linear_in_the_batch():
    """The bench counts at a small batch and scales: FLOPs per example must not depend on the batch."""
    bench = load_bench("bench_flops")
    cfg = bench.load_config("demo", TINY)
    torch.manual_seed(0)
    small = bench.count_per_example(cfg)
    bench.COUNT_BATCH = 16
    torch.manual_seed(0)
    large = bench.count_per_example(cfg)
    for key, value in vars(small).items():
        assert getattr(large, key) == pytest.approx(value, rel=1e-6), key


def test_a_text_conditioned_config_is_refused_with_the_key(capsys):
    bench = load_bench("bench_flops")
    with pytest.raises(SystemExit) as err:
        bench.main(["--config", "demo", "ldm.conditioner.type=text", "--private-examples", "10"])
    assert err.value.code == 2 and "ldm.conditioner.type" in capsys.readouterr().err
