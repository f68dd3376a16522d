"""One DP fine-tuning step: the project's DP engine against the non-private step and Opacus.

On ONE UNet (the ``--config``'s, demo by default), ONE trainable set (the config's
``finetune.policy``) and ONE fixed batch of latents, labels, timesteps and diffusion noise,
measures in this process:

1. ``non-private``: ``loss.mean().backward()`` + AdamW step;
2. ``forward only``: the losses under ``torch.no_grad()``, no backward and no step: the floor that
   every method pays, so the table shows how much of a step the backward and the DP work add;
3. ``engine fast``: ``DPGradientEngine`` mode=fast (book-keeping) + AdamW step;
   ``forward only, plain maps`` and ``engine fast, plain maps``: the same inside
   ``trainer.models.small_maps.plain_paths()`` (no dense convolution on maps below 3x3, no
   short-sequence attention: ``F.conv2d`` and ``scaled_dot_product_attention`` throughout), what
   those CPU paths save;
4. ``engine reference``: ``DPGradientEngine`` mode=reference (batched autograd) + AdamW step;
5. ``opacus hooks``: ``GradSampleModule`` (per-example gradients instantiated by layer hooks)
   + ``DPOptimizer`` over AdamW, the engine DP-LDM used;
6. ``opacus ghost``: ``GradSampleModuleFastGradientClipping`` + ``DPOptimizerFastGradientClipping``
   with the per-example losses wrapped in ``DPTensorFastGradientClipping`` (two backwards).

Every DP row clips each example's gradient over all trainable parameters to C, adds
N(0, sigma^2 C^2) per coordinate and divides by the batch size. Reported per row: median step
time over ``--repeats`` steps after a warm-up step, peak memory added by a step, both as
ratios to the non-private step, and a gradient check: each DP method takes one step with noise
off from the same weights, and its gradient is compared with reference mode's. Below the table:
the time of the engine's noise draw (``finalize`` of a step with noise on and off), the most that
fusing the noise into a kernel's epilogue could save of the engine's step.

The data are random (no private data is involved): this measures cost, not utility.

Usage: ``python bench/bench_dp_step.py [--config demo] [--batch 32] [--repeats 5] [--device cpu]
[--threads 1] [--out docs/bench-dp-step.md] [KEY=VALUE ...]`` (overrides as for the ``dpldm`` command).
"""
from __future__ import annotations

import argparse
import copy
import ctypes
import dataclasses
import gc
import os
import platform
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from trainer.config import Config, load_config  # noqa: E402
from trainer.models.small_maps import plain_paths  # noqa: E402
from trainer.pipeline import LatentDiffusion  # noqa: E402
from trainer.privacy import DPGradientEngine  # noqa: E402
from trainer.runtime import adamw  # noqa: E402
from trainer.selection import select_trainable  # noqa: E402
from trainer.stages.common import build_ldm  # noqa: E402

# Reference mode's cost grows with the square of the batch: at 32 the default CPU run stays
# within ~3 minutes on a busy 2-core machine.
DEFAULT_BATCH = 32
Step = Callable[[], None]


# --------------------------------------------------------------------------- the workload
class FixedDrawLoss(nn.Module):
    """The LDM's per-example diffusion loss with the same (timestep, noise) draws on every call.

    forward(z0 [B, C, H, W], labels [B]) -> [B]. Every method calls this module, so all of them
    differentiate exactly the same function of the trainable parameters.
    """

    def __init__(self, ldm: LatentDiffusion, draw_seed: int):
        super().__init__()
        self.ldm = ldm
        self.draw_seed = draw_seed

    def forward(self, z0: Tensor, labels: Tensor) -> Tensor:
        return self.ldm.loss(z0, labels, torch.Generator().manual_seed(self.draw_seed))


@dataclass
class Workload:
    """What every method shares: the model (copied per method), the batch and the DP settings."""

    model: FixedDrawLoss
    z0: Tensor
    labels: Tensor
    lr: float
    weight_decay: float
    max_grad_norm: float = 1.0
    noise_multiplier: float = 1.0

    @property
    def batch_size(self) -> int:
        return self.z0.shape[0]

    def fresh_model(self) -> FixedDrawLoss:
        """A copy of the model with the original weights (each method steps its own copy)."""
        return copy.deepcopy(self.model)

    def optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        params = [p for p in model.parameters() if p.requires_grad]
        return adamw(params, self.lr, self.weight_decay)


def build_workload(cfg: Config, batch_size: int, device: torch.device, seed: int = 0) -> tuple[Workload, str]:
    """The config's LDM with its fine-tuning selection and a random batch -> (workload, description)."""
    if cfg.ldm.conditioner.type != "class":
        raise ValueError(f"ldm.conditioner.type: the benchmark needs a class conditioner, got "
                         f"{cfg.ldm.conditioner.type!r}")
    if batch_size < 2:
        raise ValueError(f"--batch must be >= 2, got {batch_size}")
    torch.manual_seed(seed)
    n_classes = cfg.finetune.new_class_embedder or cfg.ldm.conditioner.n_classes
    ldm = build_ldm(cfg, n_classes=n_classes)
    # A fresh UNet starts with zeroed output convolutions (every gradient would be zero):
    # small random values stand in for pretrained weights.
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in ldm.parameters():
            if p.dim() > 1 and not p.any():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    selection = select_trainable(ldm, cfg.finetune.policy, cfg.finetune.attention_from,
                                 context_grad=cfg.finetune.context_grad)
    ldm.to(device).train()
    unet = cfg.ldm.unet
    shape = (unet["in_channels"], unet["image_size"], unet["image_size"])
    z0 = torch.randn(batch_size, *shape, generator=gen).to(device)
    labels = torch.randint(0, n_classes, (batch_size,), generator=gen).to(device)
    workload = Workload(FixedDrawLoss(ldm, draw_seed=seed + 1), z0, labels,
                        lr=cfg.finetune.lr, weight_decay=cfg.finetune.weight_decay)
    what = (f"{selection.summary()}; batch {batch_size} latents {'x'.join(map(str, shape))} with "
            f"{n_classes}-class labels, one (timestep, noise) draw per example")
    return workload, what


# --------------------------------------------------------------------------- the methods
@dataclass
class Stepper:
    """One method bound to its own model copy.

    ``step()``: zero the grads, forward, backward, clip and noise (DP rows), AdamW step; the
    gradient used stays in ``.grad``. ``optimizer.zero_grad(set_to_none=True)`` frees what a
    step leaves behind (grads, Opacus' per-example gradients). ``set_noise(sigma)`` changes
    the noise multiplier of the next steps.
    """

    step: Step
    optimizer: torch.optim.Optimizer
    set_noise: Callable[[float], None] = lambda sigma: None


def nonprivate_step(w: Workload, model: FixedDrawLoss, noise_multiplier: float) -> Stepper:
    optimizer = w.optimizer(model)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        model(w.z0, w.labels).mean().backward()
        optimizer.step()

    return Stepper(step, optimizer)


def forward_only_step(w: Workload, model: FixedDrawLoss, noise_multiplier: float) -> Stepper:
    optimizer = w.optimizer(model)  # never stepped: timed_step clears its (absent) grads

    def step() -> None:
        with torch.no_grad():
            model(w.z0, w.labels)

    return Stepper(step, optimizer)


def engine_step(mode: str) -> Callable[[Workload, FixedDrawLoss, float], Stepper]:
    def make(w: Workload, model: FixedDrawLoss, noise_multiplier: float) -> Stepper:
        optimizer = w.optimizer(model)
        engine = DPGradientEngine(model, max_grad_norm=w.max_grad_norm, noise_multiplier=noise_multiplier,
                                  expected_batch_size=w.batch_size, mode=mode,
                                  generator=torch.Generator(device=w.z0.device).manual_seed(7))

        def step() -> None:
            optimizer.zero_grad(set_to_none=True)
            engine.accumulate(model(w.z0, w.labels))
            engine.finalize()
            optimizer.step()

        return Stepper(step, optimizer, lambda sigma: setattr(engine, "noise_multiplier", float(sigma)))

    return make


def opacus_hooks_step(w: Workload, model: FixedDrawLoss, noise_multiplier: float) -> Stepper:
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    wrapped = GradSampleModule(model, batch_first=True, loss_reduction="mean", strict=True)
    optimizer = DPOptimizer(w.optimizer(model), noise_multiplier=noise_multiplier, max_grad_norm=w.max_grad_norm,
                            expected_batch_size=w.batch_size, loss_reduction="mean",
                            generator=torch.Generator(device=w.z0.device).manual_seed(7))

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        # "mean": the hooks rescale by the batch size, so per-example gradients are those of l_i
        wrapped(w.z0, w.labels).mean().backward()
        optimizer.step()

    return Stepper(step, optimizer, lambda sigma: setattr(optimizer, "noise_multiplier", float(sigma)))


def opacus_ghost_step(w: Workload, model: FixedDrawLoss, noise_multiplier: float) -> Stepper:
    from opacus.grad_sample import GradSampleModuleFastGradientClipping
    from opacus.optimizers import DPOptimizerFastGradientClipping
    from opacus.utils.fast_gradient_clipping_utils import DPTensorFastGradientClipping

    wrapped = GradSampleModuleFastGradientClipping(model, batch_first=True, loss_reduction="mean",
                                                   max_grad_norm=w.max_grad_norm, use_ghost_clipping=True)
    optimizer = DPOptimizerFastGradientClipping(
        w.optimizer(model), noise_multiplier=noise_multiplier, max_grad_norm=w.max_grad_norm,
        expected_batch_size=w.batch_size, loss_reduction="mean",
        generator=torch.Generator(device=w.z0.device).manual_seed(7))

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        # backward(): norms by the hooks, then a second backward of sum_i c_i l_i
        DPTensorFastGradientClipping(wrapped, optimizer, wrapped(w.z0, w.labels), "mean").backward()
        optimizer.step()

    return Stepper(step, optimizer, lambda sigma: setattr(optimizer, "noise_multiplier", float(sigma)))


def with_plain_maps(make: Callable[[Workload, FixedDrawLoss, float], Stepper]):
    """``make``'s method with the model's small-map paths off (plain convolutions and attention)."""
    def make_plain(w: Workload, model: FixedDrawLoss, noise_multiplier: float) -> Stepper:
        stepper = make(w, model, noise_multiplier)

        def step() -> None:
            with plain_paths():
                stepper.step()

        return dataclasses.replace(stepper, step=step)

    return make_plain


@dataclass
class Method:
    name: str
    make: Callable[[Workload, FixedDrawLoss, float], Stepper]
    third_party: bool = False  # its failures are reported as "unsupported" instead of raised
    gradient: bool = True      # False: the method computes no gradient (nothing to check)


METHODS = [
    Method("non-private", nonprivate_step),
    Method("forward only", forward_only_step, gradient=False),
    Method("forward only, plain maps", with_plain_maps(forward_only_step), gradient=False),
    Method("engine fast", engine_step("fast")),
    Method("engine fast, plain maps", with_plain_maps(engine_step("fast"))),
    Method("engine reference", engine_step("reference")),
    Method("opacus hooks", opacus_hooks_step, third_party=True),
    Method("opacus ghost", opacus_ghost_step, third_party=True),
]
NONPRIVATE, REFERENCE = "non-private", "engine reference"
WITHOUT_GRADIENT = {m.name for m in METHODS if not m.gradient}


# --------------------------------------------------------------------------- measuring
def _proc_status_kib(key: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {key} line")


class StepMemory:
    """Peak memory a step adds to what is allocated before it, in bytes (None if unmeasurable).

    CUDA: ``torch.cuda.max_memory_allocated`` growth. CPU (Linux): growth of the process's
    peak resident set (VmHWM), whose peak is reset through ``/proc/self/clear_refs`` before
    the step; freed heap is handed back to the OS first (``malloc_trim``) so that a step is
    not credited with memory an earlier one left cached.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.base = 0
        self.cpu_ok = device.type != "cuda" and os.access("/proc/self/clear_refs", os.W_OK)
        try:
            self._malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim
        except OSError:
            self._malloc_trim = None

    def start(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        elif self.cpu_ok:
            if self._malloc_trim is not None:
                self._malloc_trim(0)
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")  # reset the peak resident set size to the current one
            self.base = _proc_status_kib("VmRSS") * 1024

    def stop(self) -> int | None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) - self.base
        if self.cpu_ok:
            return _proc_status_kib("VmHWM") * 1024 - self.base
        return None


@dataclass
class Result:
    name: str
    times: list[float] = field(default_factory=list)
    memory: list[int] = field(default_factory=list)
    grad_diff: float | None = None
    error: str | None = None

    @property
    def median_s(self) -> float:
        return statistics.median(self.times)

    @property
    def peak_bytes(self) -> int | None:
        return max(self.memory) if self.memory else None


def trainable_grads(model: nn.Module) -> Tensor:
    """All trainable gradients, flattened and concatenated (float32)."""
    return torch.cat([p.grad.detach().float().reshape(-1) for p in model.parameters() if p.requires_grad])


def _short_error(err: Exception) -> str:
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return f"{type(err).__name__}: {text[:160]}"


def clip_norm_at_median(w: Workload) -> tuple[float, Tensor]:
    """C = median per-example gradient norm, so the check sees clipped and unclipped examples."""
    model = w.fresh_model()
    engine = DPGradientEngine(model, max_grad_norm=1.0, noise_multiplier=0.0, expected_batch_size=w.batch_size)
    engine.accumulate(model(w.z0, w.labels))
    engine.detach()
    norms = engine.last_per_sample_norms.cpu()
    return float(norms.median()), norms


def check_and_warm_up(w: Workload, method: Method) -> tuple[Stepper, Tensor | None]:
    """The method on fresh weights takes one step with noise off -> (stepper, noise-free gradient,
    None for a method without one).

    That step also warms the method up; the stepper is then switched to ``w.noise_multiplier``.
    """
    model = w.fresh_model()
    stepper = method.make(w, model, 0.0)
    stepper.step()
    grad = trainable_grads(model) if method.gradient else None
    stepper.set_noise(w.noise_multiplier)
    return stepper, grad


def timed_step(stepper: Stepper, memory: StepMemory, device: torch.device) -> tuple[float, int | None]:
    """One step -> (seconds, peak bytes added or None)."""
    stepper.optimizer.zero_grad(set_to_none=True)  # what the last step left is not this step's memory
    memory.start()
    t0 = time.perf_counter()
    stepper.step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    return seconds, memory.stop()


def run_benchmark(w: Workload, repeats: int, methods: list[Method] = METHODS) -> list[Result]:
    """Gradient check + warm-up for every method, then ``repeats`` rounds of timed steps.

    In each round every method takes one step (noise on): interleaving spreads the load of a
    shared machine over all methods alike. Each method steps its own copy of the weights.
    """
    device = w.z0.device
    memory = StepMemory(device)
    results = {m.name: Result(m.name) for m in methods}
    steppers: dict[str, Stepper] = {}
    grads: dict[str, Tensor | None] = {}

    def give_up(method: Method, err: Exception) -> None:
        if not method.third_party:
            raise err
        result = results[method.name]
        result.error, result.times, result.memory = f"unsupported: {_short_error(err)}", [], []
        steppers.pop(method.name, None)
        print(f"   {method.name}: {result.error}", flush=True)

    for method in methods:
        print(f"-- {method.name}: gradient check (noise off) and warm-up", flush=True)
        try:
            steppers[method.name], grads[method.name] = check_and_warm_up(w, method)
        except Exception as err:  # noqa: BLE001 - a third-party engine may not support a layer
            give_up(method, err)
    for r in range(repeats):
        print(f"-- timed round {r + 1}/{repeats}", flush=True)
        for method in methods:
            if method.name not in steppers:
                continue
            try:
                seconds, peak = timed_step(steppers[method.name], memory, device)
            except Exception as err:  # noqa: BLE001
                give_up(method, err)
                continue
            results[method.name].times.append(seconds)
            if peak is not None:
                results[method.name].memory.append(peak)

    ref = grads.get(REFERENCE)
    if ref is not None and float(ref.abs().max()) > 0:
        for name, g in grads.items():
            if name != NONPRIVATE and g is not None and results[name].error is None:
                results[name].grad_diff = float((g - ref).abs().max() / ref.abs().max())
    return list(results.values())


@dataclass
class NoiseCost:
    """Median seconds of ``engine.finalize()`` with noise on / off, over the trainable coordinates."""
    coordinates: int
    with_noise_s: float
    without_noise_s: float

    @property
    def noise_s(self) -> float:
        return max(self.with_noise_s - self.without_noise_s, 0.0)


def measure_noise(w: Workload, repeats: int) -> NoiseCost:
    """Time the noise of one logical step: ``finalize`` draws N(0, sigma^2 C^2) per trainable
    coordinate, divides and writes ``.grad``; without noise it only divides and writes."""
    model = w.fresh_model()
    engine = DPGradientEngine(model, max_grad_norm=w.max_grad_norm, noise_multiplier=w.noise_multiplier,
                              expected_batch_size=w.batch_size)
    device = w.z0.device
    engine.accumulate(model(w.z0, w.labels))
    engine.finalize()  # warm-up: the self-check and the first allocations

    def median_finalize(add_noise: bool) -> float:
        times = []
        for _ in range(max(repeats, 3)):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            engine.finalize(add_noise=add_noise)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    cost = NoiseCost(sum(p.numel() for _, p in engine.params), median_finalize(True), median_finalize(False))
    engine.detach()
    return cost


# --------------------------------------------------------------------------- reporting
def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def format_table(results: list[Result]) -> list[str]:
    base = next(r for r in results if r.name == NONPRIVATE)
    lines = ["| method | median step (s) | time vs non-private | peak step memory (MiB) | memory vs non-private "
             "| clipped-gradient max rel. diff vs reference |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in results:
        if r.error:
            lines.append(f"| {r.name} | {r.error} | | | | |")
            continue
        mem = r.peak_bytes
        mem_text = f"{mem / 2**20:.1f}" if mem is not None else "n/a"
        mem_ratio = f"{mem / base.peak_bytes:.2f}x" if mem is not None and base.peak_bytes else "n/a"
        diff = ("(unclipped, not compared)" if r.name == NONPRIVATE else
                "(no gradient)" if r.name in WITHOUT_GRADIENT else
                f"{r.grad_diff:.1e}" if r.grad_diff is not None else "n/a")
        lines.append(f"| {r.name} | {r.median_s:.3f} | {r.median_s / base.median_s:.2f}x | {mem_text} | "
                     f"{mem_ratio} | {diff} |")
    return lines


def noise_lines(noise: NoiseCost, results: list[Result]) -> list[str]:
    fast = next(r for r in results if r.name == "engine fast")
    share = noise.noise_s / fast.median_s if fast.times else float("nan")
    return [f"Noise: `engine.finalize()` over the {noise.coordinates:,} trainable coordinates takes "
            f"{noise.with_noise_s * 1e3:.2f} ms with noise and {noise.without_noise_s * 1e3:.2f} ms without "
            f"(median): drawing and adding the noise costs {noise.noise_s * 1e3:.2f} ms, {share:.1%} of the "
            "engine fast step, the most that fusing the noise into a kernel could save."]


def report(results: list[Result], w: Workload, what: str, args: argparse.Namespace, norms: Tensor,
           noise: NoiseCost) -> str:
    """The markdown written to ``--out``: how it was measured, then the table."""
    import opacus
    device = w.z0.device
    where = (f"{device_name(device)} ({os.cpu_count()} CPU cores visible, {torch.get_num_threads()} torch "
             f"thread(s))" if device.type == "cpu" else device_name(device))
    memory_how = ("growth of `torch.cuda.max_memory_allocated` during the step" if device.type == "cuda" else
                  "growth of the process's peak resident set (VmHWM, reset before the step) over its "
                  "resident set at the start of the step")
    clipped = int((norms > w.max_grad_norm).sum())
    command = " ".join(["python bench/bench_dp_step.py", f"--config {args.config}", f"--batch {w.batch_size}",
                        f"--repeats {args.repeats}", f"--device {device.type}",
                        *([f"--threads {args.threads}"] if device.type == "cpu" else []), *args.overrides])
    default_note = " (the default batch: the reference row grows with the square of the batch)" \
        if w.batch_size == DEFAULT_BATCH else ""
    lines = [
        "# DP fine-tuning step benchmark",
        "",
        f"Measured by `{command}` in one process on {where}, torch {torch.__version__}, "
        f"opacus {opacus.__version__}.",
        "",
        f"- Model: config `{args.config}` UNet + class embedder; {what}{default_note}. Zero-initialised "
        "weights are redrawn at random (std 0.02) so that every trainable parameter gets a gradient.",
        f"- Every DP row clips each example's gradient over all trainable parameters to C = "
        f"{w.max_grad_norm:.4g} (the median per-example norm of the batch), adds Gaussian noise with "
        f"sigma = {w.noise_multiplier:g} and divides by the batch size; every row ends with an AdamW step "
        "but the `forward only` rows (the losses under `torch.no_grad()`: no backward, no step). The `plain maps` "
        "rows run inside `trainer.models.small_maps.plain_paths()`: `F.conv2d` and `scaled_dot_product_attention` "
        "where the other rows take the CPU's paths for maps below 3x3 and short sequences.",
        f"- Time: median over {args.repeats} step{'s' if args.repeats > 1 else ''} per method, taken in interleaved rounds (each round: one "
        "step of every method) after a warm-up step each (the gradient-check step). Memory: peak added by a step, "
        f"{memory_how}; the largest over the timed steps.",
        "- Gradient check: from the same weights, each DP method takes one step with noise off; the column "
        "is max |g - g_ref| / max |g_ref| over all trainable coordinates, g_ref = engine reference "
        f"({clipped} of {w.batch_size} examples clipped).",
        "",
        *format_table(results),
        "",
        *noise_lines(noise, results),
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[Result]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="demo", help="config name (configs/NAME.yaml) or path")
    parser.add_argument("--batch", type=int, default=DEFAULT_BATCH, help="examples per step")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per method (after one warm-up)")
    parser.add_argument("--noise-multiplier", type=float, default=1.0, help="sigma of the timed DP steps")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (1 keeps timings stable on a shared machine)")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "docs" / "bench-dp-step.md"))
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="config overrides, e.g. ldm.unet.model_channels=32")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    if args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    # Opacus' full backward hooks warn on every step when a layer's inputs need no grad (frozen layers below)
    warnings.filterwarnings("ignore", message="Full backward hook is firing")

    cfg = load_config(args.config, args.overrides)
    w, what = build_workload(cfg, args.batch, device)
    w.max_grad_norm, norms = clip_norm_at_median(w)
    w.noise_multiplier = args.noise_multiplier
    results = run_benchmark(w, args.repeats)
    noise = measure_noise(w, args.repeats)
    text = report(results, w, what, args, norms, noise)
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return results


if __name__ == "__main__":
    main()
