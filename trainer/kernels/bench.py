"""Benchmark of the DP kernels against their torch references and a non-private GEMM.

    python -m trainer.kernels.bench [--out FILE] [--reps N]

Shapes are those of the attention layers of Stable-Diffusion-sized UNets (d = 320..1280,
T = 77..4096 tokens, B = 1..64), a reduced grid on CPU. Every figure comes from this run:
the roofline is a large copy (bandwidth) and a large matmul (FLOP/s) measured first, in
the same dtype as the kernels (bfloat16 on CUDA, float32 on CPU).

Columns: time (median), achieved GB/s and TFLOP/s from the minimal bytes moved and the
useful FLOPs, "roofline %" = max(bytes / bandwidth, FLOPs / peak) / time, "vs GEMM" =
time / time of the non-private weight-gradient GEMM G^T A of the same shape, and (CUDA)
the peak memory allocated beyond the inputs. On CPU only the torch references run: Triton
needs a GPU (its CPU interpreter is a correctness tool, not a performance path).
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from trainer import kernels

# (B, T, d_in, d_out): self-attention projections at each UNet level, cross-attention K/V
# from a 768-d text context, the feed-forward GEGLU input, and a T = 1 embedder layer
GPU_LINEAR_SHAPES = [
    (1, 4096, 320, 320),
    (8, 4096, 320, 320),
    (8, 4096, 320, 2560),
    (32, 1024, 640, 640),
    (64, 256, 1280, 1280),
    (64, 77, 768, 1280),
    (64, 64, 1280, 1280),
    (64, 1, 1280, 1280),
]
CPU_LINEAR_SHAPES = [
    (2, 1024, 320, 320),
    (4, 256, 640, 640),
    (4, 77, 768, 640),
    (8, 64, 1280, 1280),
    (16, 1, 1280, 1280),
]


@dataclass
class Roofline:
    bandwidth: float  # bytes / s
    flops: float  # FLOP / s


@dataclass
class Row:
    op: str
    shape: str
    backend: str
    seconds: float
    bytes: float
    flops: float
    gemm_seconds: float | None
    extra_mib: float | None


def timed(fn: Callable[[], object], device: torch.device, reps: int, warmup: int = 2, best: bool = False) -> float:
    """Median (or, with ``best``, minimum) wall time of fn() in seconds; CUDA events on GPU."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            samples.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - t0)
    return min(samples) if best else statistics.median(samples)


def extra_memory_mib(fn: Callable[[], object], device: torch.device) -> float | None:
    """Peak CUDA memory fn() allocates beyond what is already allocated (None on CPU)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def measure_roofline(device: torch.device, dtype: torch.dtype, reps: int) -> Roofline:
    """Bandwidth of a large copy (read + write) and FLOP/s of a large square matmul, best of ``reps``."""
    n_bytes = 2**30 if device.type == "cuda" else 2**26
    src = torch.empty(n_bytes // 4, device=device, dtype=torch.float32).uniform_()
    dst = torch.empty_like(src)
    copy_s = timed(lambda: dst.copy_(src), device, reps, best=True)
    del src, dst
    n = 8192 if device.type == "cuda" else 2048
    x = torch.randn(n, n, device=device).to(dtype)
    y = torch.randn(n, n, device=device).to(dtype)
    mm_s = timed(lambda: x @ y, device, reps, best=True)
    return Roofline(bandwidth=2 * n_bytes / copy_s, flops=2 * n**3 / mm_s)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({torch.get_num_threads()} threads)"
    except OSError:
        pass
    return f"{platform.processor() or 'CPU'} ({torch.get_num_threads()} threads)"


def triton_version() -> str:
    try:
        import triton
    except ImportError:
        return ""
    return f", triton {triton.__version__}"


def linear_rows(shape, device, dtype, backends, reps) -> list[Row]:
    B, T, d_in, d_out = shape
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(B, T, d_in, device=device, generator=gen).to(dtype)
    g = torch.randn(B, T, d_out, device=device, generator=gen).to(dtype)
    c = torch.rand(B, device=device, generator=gen)
    es = a.element_size()
    io_bytes = B * T * (d_in + d_out) * es
    gemm_flops = 2 * B * T * d_in * d_out
    label = f"B={B} T={T} {d_in}->{d_out}"

    def gemm():
        return g.reshape(-1, d_out).t() @ a.reshape(-1, d_in)

    gemm_s = timed(gemm, device, reps)
    rows = [Row("non-private GEMM G^T A", label, "torch", gemm_s, io_bytes + d_in * d_out * es,
                gemm_flops, gemm_s, extra_memory_mib(gemm, device))]
    auto = "ghost" if kernels.reference.ghost_is_cheaper(T, d_in, d_out) else "instantiate"
    for backend in backends:
        for method, flops in (("ghost", B * T * T * (d_in + d_out)), ("instantiate", gemm_flops)):
            def norms(method=method):
                return kernels.per_sample_linear_sqnorms(a, g, method=method, bias=True, backend=backend)

            name = f"sqnorms {method}" + (" (auto)" if method == auto else "")
            rows.append(Row(name, label, backend, timed(norms, device, reps), io_bytes + 4 * B, flops,
                            gemm_s, extra_memory_mib(norms, device)))

        def clipped():
            return kernels.clipped_linear_grad(a, g, c, bias=True, backend=backend)

        rows.append(Row("clipped grad", label, backend, timed(clipped, device, reps),
                        io_bytes + 4 * d_out * (d_in + 1), gemm_flops, gemm_s, extra_memory_mib(clipped, device)))
    return rows


def markdown(rows: list[Row], roof: Roofline, device: torch.device, dtype: torch.dtype, backends) -> str:
    name = device_name(device)
    lines = [
        f"# Kernel benchmark: {name}",
        "",
        f"torch {torch.__version__}{triton_version()}; inputs {str(dtype).replace('torch.', '')}; "
        f"backends: {', '.join(backends)}"
        + ("" if "triton" in backends else " (CPU: torch reference path only; the Triton kernels need a GPU)"),
        f"Measured roofline: copy bandwidth {roof.bandwidth / 1e9:.1f} GB/s, "
        f"matmul {roof.flops / 1e12:.3f} TFLOP/s.",
        "",
        "| op | shape | backend | ms | GB/s | TFLOP/s | roofline % | vs GEMM | extra MiB |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        bound = max(r.bytes / roof.bandwidth, r.flops / roof.flops)
        vs_gemm = f"{r.seconds / r.gemm_seconds:.2f}x" if r.gemm_seconds else "-"
        mem = f"{r.extra_mib:.1f}" if r.extra_mib is not None else "-"
        lines.append(
            f"| {r.op} | {r.shape} | {r.backend} | {r.seconds * 1e3:.3f} | {r.bytes / r.seconds / 1e9:.1f} | "
            f"{r.flops / r.seconds / 1e12:.3f} | {100 * bound / r.seconds:.0f} | {vs_gemm} | {mem} |"
        )
    lines += [
        "",
        "GB/s and TFLOP/s count the minimal traffic (inputs read once, outputs written once) and the",
        "useful FLOPs (ghost: B T^2 (d_in + d_out), using the symmetry of the Gram matrices). Norms",
        "include the bias term.",
        "Small working sets that stay in cache can run above the DRAM roofline (> 100 %).",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="write the markdown table to this file")
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions per case")
    args = parser.parse_args(argv)

    on_gpu = torch.cuda.is_available()
    device = torch.device("cuda" if on_gpu else "cpu")
    dtype = torch.bfloat16 if on_gpu else torch.float32
    backends = ["triton", "torch"] if on_gpu else ["torch"]
    reps = args.reps or (20 if on_gpu else 5)

    roof = measure_roofline(device, dtype, reps)
    rows: list[Row] = []
    for shape in GPU_LINEAR_SHAPES if on_gpu else CPU_LINEAR_SHAPES:
        rows += linear_rows(shape, device, dtype, backends, reps)
        if args.out:  # rewritten after every case, so a run cut short still leaves its table
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(markdown(rows, roof, device, dtype, backends))
    print(markdown(rows, roof, device, dtype, backends))

if __name__ == "__main__":
    main()
