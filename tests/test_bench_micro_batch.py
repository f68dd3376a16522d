"""bench/bench_micro_batch.py on a tiny UNet: every size is timed in every round, per example."""
from __future__ import annotations

import pytest

from conftest import load_bench

pytestmark = pytest.mark.usefixtures("torch_threads_restored")

TINY = ["ldm.unet.model_channels=32", "ldm.unet.channel_mult=[1,1]", "ldm.unet.context_dim=16",
        "ldm.unet.num_head_channels=16", "ldm.conditioner.embed_dim=16"]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_each_size_is_timed_per_example_in_interleaved_rounds(tmp_path, capsys, precision):
    bench = load_bench("bench_micro_batch")
    out = tmp_path / "micro.md"
    times = bench.main(["--sizes", "4,8", "--rounds", "3", "--threads", "1", "--precision", precision,
                        "--private-examples", "100", "--out", str(out), *TINY])
    assert list(times) == [4, 8] and all(len(v) == 3 and min(v) > 0 for v in times.values())
    text = out.read_text()
    assert f"({precision}, 1 threads" in text and "| 8 |" in text and text.strip() in capsys.readouterr().out


def test_bad_sizes_are_one_line_errors(capsys):
    bench = load_bench("bench_micro_batch")
    with pytest.raises(SystemExit):
        bench.main(["--sizes", "256,x"])
    assert "--sizes: comma-separated whole numbers" in capsys.readouterr().err
