"""3x3 convolutions over feature maps with fewer pixels than the kernel has taps (2x2, 2x1, 1x1).

A small latent (the demo's 4x4x4) puts the UNet's lowest level at 2x2, where a padded 3x3
convolution spends 5 of every 9 multiplications on the zero padding and oneDNN's kernels run far
from their peak. The same linear map, written as one dense matrix from the input map's
coordinates to the output map's ([c_in*h*w, c_out*h*w], built once from the kernel taps), is a
single matrix product: 16 instead of 36 multiply-adds per channel pair on a 2x2 map, about 3x
faster on a CPU. The result equals `F.conv2d`'s up to float rounding.

`SmallMapConv2d` is an `nn.Conv2d` (same parameters and keys, same `forward`) that takes this path
only where nothing differentiates its weight (frozen layers, sampling) and the tensors are on the
CPU (the path is measured there only); everywhere else it is `F.conv2d`. Its dense matrix is
cached and rebuilt whenever the weight's values differ from the cached copy, however they were
changed. `dot_product_attention` (attention.py) has the same kind of path for short sequences.
`plain_paths()` turns both off, for benchmarks to compare against.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

TAPS = 9  # a 3x3 kernel
_enabled = True


@contextmanager
def plain_paths() -> Iterator[None]:
    """Inside the block every layer takes its plain path (`F.conv2d`, `scaled_dot_product_attention`)."""
    global _enabled
    before, _enabled = _enabled, False
    try:
        yield
    finally:
        _enabled = before


def enabled(*tensors: Tensor) -> bool:
    """Whether a small-map path may run on ``tensors``: on the CPU, outside `plain_paths()`."""
    return _enabled and all(t.device.type == "cpu" for t in tensors)


def tap_index(h: int, w: int, device: torch.device) -> Tensor:
    """[h*w, h*w] index of the kernel tap (ky*3 + kx) that joins input pixel i to output pixel o of
    a 3x3, stride-1, padding-1 convolution on an h x w map; TAPS where no tap joins them."""
    y, x = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    y, x = y.reshape(-1), x.reshape(-1)
    ky = y[:, None] - y[None, :] + 1  # input row - output row + the kernel's centre
    kx = x[:, None] - x[None, :] + 1
    inside = (ky >= 0) & (ky < 3) & (kx >= 0) & (kx < 3)
    return torch.where(inside, ky * 3 + kx, TAPS).to(device)


def dense_conv_matrix(weight: Tensor, h: int, w: int) -> Tensor:
    """The 3x3, stride-1, padding-1 convolution by ``weight`` [c_out, c_in, 3, 3] on an h x w map as a
    matrix [c_in*h*w, c_out*h*w]: ``x.flatten(-3) @ M`` is the convolution's output, flattened."""
    c_out, c_in = weight.shape[:2]
    taps = F.pad(weight.reshape(c_out, c_in, TAPS), (0, 1))  # tap TAPS is the zero padding
    m = taps[:, :, tap_index(h, w, weight.device)]  # [c_out, c_in, h*w (in), h*w (out)]
    return m.permute(1, 2, 0, 3).reshape(c_in * h * w, c_out * h * w)


class SmallMapConv2d(nn.Conv2d):
    """``nn.Conv2d`` whose 3x3, stride-1, padding-1 convolution of a map smaller than 3x3 in area is
    a cached dense matrix product when the weight takes no gradient (see the module docstring).

    Only ``_conv_forward`` is overridden, so ``forward`` is ``nn.Conv2d.forward`` and the DP engine's
    per-example rule for convolutions applies: a weight it differentiates always goes through
    ``F.conv2d``.
    """

    def _dense_path(self, x: Tensor, weight: Tensor) -> bool:
        return (enabled(x, weight) and x.dim() in (3, 4) and x.shape[-2] * x.shape[-1] < TAPS
                and self.kernel_size == (3, 3) and self.stride == (1, 1) and self.padding == (1, 1)
                and self.dilation == (1, 1) and self.groups == 1 and self.padding_mode == "zeros"
                and not (torch.is_grad_enabled() and weight.requires_grad))

    def _matrix(self, weight: Tensor, h: int, w: int) -> Tensor:
        cached = getattr(self, "_dense_cache", None)
        if (cached is None or cached[0] != (h, w) or cached[1].dtype != weight.dtype
                or cached[1].device != weight.device or not torch.equal(cached[1], weight)
                # a matrix made under inference_mode cannot be saved for a backward outside it
                or (cached[2].is_inference() and not torch.is_inference_mode_enabled())):
            with torch.no_grad():
                cached = ((h, w), weight.detach().clone(), dense_conv_matrix(weight.detach(), h, w))
            self._dense_cache = cached
        return cached[2]

    def _conv_forward(self, input: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        if not self._dense_path(input, weight):
            return super()._conv_forward(input, weight, bias)
        h, w = input.shape[-2:]
        out = (input.flatten(-3) @ self._matrix(weight, h, w)).unflatten(-1, (self.out_channels, h, w))
        return out if bias is None else out + bias[:, None, None]
