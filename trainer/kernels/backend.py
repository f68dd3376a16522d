"""Choosing between the Triton kernels and the torch references, and checking inputs.

Triton is imported lazily, on the first call that runs a kernel: ``TRITON_INTERPRET=1``
(Triton's CPU interpreter, used by the tests) only takes effect if it is set before
Triton is first imported, so importing ``trainer.kernels`` must not import Triton.
"""
from __future__ import annotations

import importlib.util
import os

import torch
from torch import Tensor

BACKENDS = ("auto", "triton", "torch")
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
HALF_DTYPES = (torch.float16, torch.bfloat16)
MAX_GRID_Y = 65535  # CUDA's limit on the second grid axis, which indexes examples


def triton_interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter.

    Raises if ``TRITON_INTERPRET`` was changed after Triton was imported: the kernels
    would then be compiled in one mode and launched in the other.
    """
    import triton
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    imported_interpreting = isinstance(tl.randn, InterpretedFunction)
    if imported_interpreting != bool(triton.knobs.runtime.interpret):
        raise RuntimeError(
            f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')!r} now, but Triton was imported "
            f"{'with' if imported_interpreting else 'without'} the interpreter: set TRITON_INTERPRET "
            "before the first import of triton"
        )
    return imported_interpreting


def resolve_backend(backend: str, device: torch.device) -> str:
    """'triton' or 'torch' for tensors on ``device``.

    'auto' is Triton on CUDA and the torch reference elsewhere; 'triton' on CPU
    tensors needs the Triton interpreter (TRITON_INTERPRET=1 set before importing triton).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return "torch"
    if backend == "auto":
        if device.type == "cuda" and importlib.util.find_spec("triton") is not None:
            return "triton"
        return "torch"
    if importlib.util.find_spec("triton") is None:
        raise RuntimeError("backend='triton' but the triton package is not installed")
    if device.type == "cuda":
        return "triton"
    if device.type == "cpu" and triton_interpreting():
        return "triton"
    raise RuntimeError(
        f"backend='triton' needs CUDA tensors, or CPU tensors with TRITON_INTERPRET=1 set before "
        f"triton is imported; got tensors on {device}"
    )


def check_float_tensor(name: str, x: Tensor, dims: tuple[int, ...]) -> None:
    """Raise unless ``x`` is a float32/float16/bfloat16 tensor with one of the given ranks."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {x.dtype}")
    if x.dim() not in dims:
        raise ValueError(f"{name} must have {' or '.join(map(str, dims))} dims, got shape {tuple(x.shape)}")


def check_linear_inputs(activations: Tensor, grad_outputs: Tensor) -> None:
    """A [B, T, d_in] (or [B, d_in]) and G [B, T, d_out] (or [B, d_out]) on one device, same B and T."""
    check_float_tensor("activations", activations, (2, 3))
    check_float_tensor("grad_outputs", grad_outputs, (2, 3))
    if activations.dim() != grad_outputs.dim() or activations.shape[:-1] != grad_outputs.shape[:-1]:
        raise ValueError(
            f"activations {tuple(activations.shape)} and grad_outputs {tuple(grad_outputs.shape)} "
            "must agree on every dim but the last"
        )
    if activations.device != grad_outputs.device:
        raise ValueError(f"activations on {activations.device} but grad_outputs on {grad_outputs.device}")


def check_method(method: str) -> None:
    if method not in ("auto", "ghost", "instantiate"):
        raise ValueError(f"method must be 'ghost', 'instantiate' or 'auto', got {method!r}")


def check_clip_factors(clip_factors: Tensor, batch: int) -> None:
    if not isinstance(clip_factors, Tensor) or clip_factors.shape != (batch,):
        shape = tuple(clip_factors.shape) if isinstance(clip_factors, Tensor) else type(clip_factors).__name__
        raise ValueError(f"clip_factors must be a tensor of shape ({batch},), got {shape}")


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (1 elsewhere): used to size grids."""
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count
