"""Smoke test of bench/bench_pretrain.py: two gloo processes, both rows timed, the same update."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench" / "bench_pretrain.py"
TINY = ["ldm.unet.model_channels=32", "ldm.unet.context_dim=16", "ldm.conditioner.embed_dim=16"]


def test_runtime_and_ddp_rows_take_the_same_step(tmp_path: Path):
    out_file = tmp_path / "bench.md"
    proc = subprocess.run([sys.executable, str(BENCH), "--world", "2", "--batch", "8", "--repeats", "1",
                           "--device", "cpu", "--out", str(out_file), *TINY],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = out_file.read_text()
    check = re.search(r"weights differ by at most ([\d.e+-]+) between rows \(the step moved them by up to "
                      r"([\d.e+-]+)\)", text)
    assert check, text
    diff, moved = float(check.group(1)), float(check.group(2))
    assert moved > 1e-6 and diff <= 1e-6 * max(1.0, moved)  # the step changed the weights, identically in both rows
    rows = [line for line in text.splitlines() if line.startswith(("| runtime", "| DDP"))]
    assert len(rows) == 2
    assert re.search(r"\| DDP \| [\d.]+ \| [\d.]+ \| 1\.00x \|", text)
    assert "--world 2 --batch 8" in text and "ldm.unet.model_channels=32" in text
