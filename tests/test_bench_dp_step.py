"""Smoke test of bench/bench_dp_step.py on a tiny UNet: every row measured, gradients agree."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from conftest import load_bench

pytestmark = pytest.mark.usefixtures("torch_threads_restored")

ROWS = ("non-private", "forward only", "forward only, plain maps", "engine fast", "engine fast, plain maps",
        "engine reference", "opacus hooks", "opacus ghost")
TINY_UNET = [
    "ldm.unet.image_size=4",
    "ldm.unet.model_channels=32",
    "ldm.unet.channel_mult=[1,1]",
    "ldm.unet.context_dim=16",
    "ldm.conditioner.embed_dim=16",
]


def test_bench_writes_a_row_per_method_with_matching_gradients(tmp_path: Path):
    bench = load_bench("bench_dp_step")
    out = tmp_path / "bench.md"
    results = bench.main(["--batch", "4", "--repeats", "1", "--device", "cpu", "--out", str(out), *TINY_UNET])

    by_name = {r.name: r for r in results}
    assert tuple(by_name) == ROWS
    for r in results:
        assert r.error is None, f"{r.name}: {r.error}"
        assert len(r.times) == 1 and r.times[0] > 0
    # fast mode and both Opacus engines give the reference mode's clipped gradient (noise off)
    for name in ("engine fast", "engine fast, plain maps", "opacus hooks", "opacus ghost"):
        assert by_name[name].grad_diff is not None and by_name[name].grad_diff < 1e-3, name
    assert by_name["engine reference"].grad_diff == 0.0
    assert by_name["forward only"].grad_diff is None  # no gradient to compare
    assert by_name["forward only, plain maps"].grad_diff is None

    text = out.read_text()
    assert f"torch {torch.__version__}" in text
    assert "--batch 4" in text and "ldm.unet.model_channels=32" in text
    table = [line for line in text.splitlines() if line.startswith("|")]
    assert len(table) == 2 + len(ROWS)  # header, separator, one row per method
    rows = table[2:]
    for name, line in zip(ROWS, rows):
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[0] == name
        assert re.fullmatch(r"\d+\.\d{3}", cells[1]), line  # median step time
        assert re.fullmatch(r"\d+\.\d\dx", cells[2]), line  # ratio to non-private
    assert rows[0].split("|")[3].strip() == "1.00x"
    assert rows[1].split("|")[-2].strip() == rows[2].split("|")[-2].strip() == "(no gradient)"
    # the noise's share of the step: finalize timed with noise on and off, over every trainable coordinate
    noise = re.search(r"Noise: `engine.finalize\(\)` over the ([\d,]+) trainable coordinates takes ([\d.]+) ms "
                      r"with noise and ([\d.]+) ms without", text)
    assert noise, text
    trainable = int(re.search(r"([\d,]+) trainable of", text).group(1).replace(",", ""))
    assert int(noise.group(1).replace(",", "")) == trainable
    assert float(noise.group(2)) > 0 and float(noise.group(3)) > 0


def test_bench_rejects_a_config_without_class_labels():
    bench = load_bench("bench_dp_step")
    with pytest.raises(ValueError, match="ldm.conditioner.type"):
        bench.main(["--batch", "4", "--repeats", "1", "--device", "cpu", "--out", "/dev/null",
                    *TINY_UNET, "ldm.conditioner.type=none", "ldm.unet.use_spatial_transformer=false",
                    "ldm.unet.context_dim=null"])
