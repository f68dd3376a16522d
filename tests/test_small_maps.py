"""The fast paths for the UNet's smallest maps against their plain-torch references:
`SmallMapConv2d` against `F.conv2d`, the short-sequence attention against
`scaled_dot_product_attention`."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from trainer.models.attention import SMALL_ATTENTION_SCORES, dot_product_attention
from trainer.models.small_maps import SmallMapConv2d, dense_conv_matrix, plain_paths
from trainer.models.unet import UNetModel, conv_nd
from trainer.privacy.layer_rules import ConvRule, make_rule


def _conv(c_in: int = 6, c_out: int = 5, bias: bool = True, **kwargs) -> SmallMapConv2d:
    torch.manual_seed(0)
    return SmallMapConv2d(c_in, c_out, kwargs.pop("kernel_size", 3), padding=kwargs.pop("padding", 1),
                          bias=bias, **kwargs)


@pytest.mark.parametrize("shape", [(3, 6, 2, 2), (3, 6, 1, 2), (3, 6, 2, 1), (3, 6, 1, 1), (6, 2, 2)])
@pytest.mark.parametrize("bias", [True, False])
def test_dense_path_equals_conv2d(shape, bias):
    conv = _conv(bias=bias)
    x = torch.randn(shape)
    with torch.no_grad():
        expected = F.conv2d(x, conv.weight, conv.bias, padding=1)
        dense = conv(x)
    torch.testing.assert_close(dense, expected, rtol=1e-5, atol=1e-6)
    assert dense.shape == expected.shape


def test_dense_matrix_is_the_convolution():
    """Column by column: the matrix maps each one-hot input map to the convolution's output."""
    weight = torch.randn(4, 3, 3, 3, dtype=torch.float64)
    m = dense_conv_matrix(weight, 2, 2)
    basis = torch.eye(3 * 4, dtype=torch.float64).reshape(12, 3, 2, 2)
    torch.testing.assert_close(m, F.conv2d(basis, weight, padding=1).reshape(12, 16), rtol=0, atol=0)


def test_dense_path_is_taken_without_gradient_and_not_with_one(monkeypatch):
    conv = _conv()
    x = torch.randn(4, 6, 2, 2)
    calls = []
    real = F.conv2d
    monkeypatch.setattr(F, "conv2d", lambda *a, **k: calls.append(1) or real(*a, **k))
    with torch.no_grad():
        conv(x)
    assert not calls  # the matrix product, not F.conv2d
    out = conv(x)  # the weight requires grad: the standard convolution, with its backward
    assert calls
    out.sum().backward()
    assert conv.weight.grad is not None
    conv.weight.requires_grad_(False)  # a frozen layer takes the dense path under autograd too ...
    calls.clear()
    x.requires_grad_(True)
    y = conv(x)
    assert not calls
    y.sum().backward()  # ... and passes the input's gradient through
    torch.testing.assert_close(x.grad, torch.autograd.grad(real(x, conv.weight, conv.bias, padding=1).sum(), x)[0],
                               rtol=1e-5, atol=1e-6)


def test_other_maps_and_settings_are_plain_conv2d():
    for conv, x in [(_conv(), torch.randn(2, 6, 3, 3)),  # 9 pixels: the padded convolution is cheaper
                    (_conv(), torch.randn(2, 6, 4, 4)),
                    (_conv(stride=2), torch.randn(2, 6, 2, 2)),
                    (_conv(kernel_size=1, padding=0), torch.randn(2, 6, 2, 2)),
                    (_conv(padding_mode="reflect"), torch.randn(2, 6, 2, 2))]:
        with torch.no_grad():
            assert torch.equal(conv(x), _as_plain(conv)(x))


def _as_plain(conv: SmallMapConv2d) -> nn.Conv2d:
    plain = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
                      padding=conv.padding, bias=conv.bias is not None, padding_mode=conv.padding_mode)
    plain.load_state_dict(conv.state_dict())
    return plain


def test_cached_matrix_follows_every_weight_change():
    conv = _conv()
    x = torch.randn(2, 6, 2, 2)
    with torch.no_grad():
        conv(x)
        conv.weight.data.mul_(-2.0)  # through .data: no version bump for the parameter
        torch.testing.assert_close(conv(x), F.conv2d(x, conv.weight, conv.bias, padding=1), rtol=1e-5, atol=1e-6)
        conv.load_state_dict({"weight": torch.randn_like(conv.weight), "bias": conv.bias.clone()})
        torch.testing.assert_close(conv(x), F.conv2d(x, conv.weight, conv.bias, padding=1), rtol=1e-5, atol=1e-6)
        conv.double()
        xd = x.double()
        torch.testing.assert_close(conv(xd), F.conv2d(xd, conv.weight, conv.bias, padding=1))


def test_a_matrix_cached_under_inference_mode_serves_autograd_afterwards():
    conv = _conv().requires_grad_(False)
    with torch.inference_mode():
        conv(torch.randn(2, 6, 2, 2))
    x = torch.randn(2, 6, 2, 2, requires_grad=True)
    conv(x).sum().backward()  # the input's gradient through a frozen layer
    assert x.grad is not None


def test_unet_uses_it_with_unchanged_keys_and_the_engines_conv_rule():
    conv = conv_nd(2, 4, 8, 3, padding=1)
    assert isinstance(conv, SmallMapConv2d) and type(conv).forward is nn.Conv2d.forward
    assert set(conv.state_dict()) == {"weight", "bias"}
    rule = make_rule("conv", conv, dict(conv.named_parameters()), "torch")
    assert isinstance(rule, ConvRule)
    torch.manual_seed(0)
    unet = UNetModel(image_size=4, in_channels=4, model_channels=32, out_channels=4, num_res_blocks=1,
                     attention_resolutions=[1, 2], channel_mult=[1, 2], num_head_channels=32,
                     use_spatial_transformer=True, context_dim=16, legacy=False)
    for p in unet.parameters():  # zero-initialised outputs would hide a difference
        p.data.normal_(0, 0.05)
    x, t, ctx = torch.randn(3, 4, 4, 4), torch.tensor([1, 500, 999]), torch.randn(3, 1, 16)
    with torch.no_grad():
        fast = unet(x, t, context=ctx)
    slow = unet(x, t, context=ctx)  # every weight takes a gradient: the plain paths
    torch.testing.assert_close(fast, slow.detach(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("tq,tk", [(4, 4), (16, 16), (16, 1), (1, 7)])
def test_short_attention_equals_sdpa(tq, tk):
    assert tq * tk <= SMALL_ATTENTION_SCORES
    q, k, v = torch.randn(3, 2, tq, 8), torch.randn(3, 2, tk, 8), torch.randn(3, 2, tk, 8)
    with torch.no_grad():
        torch.testing.assert_close(dot_product_attention(q, k, v), F.scaled_dot_product_attention(q, k, v),
                                   rtol=1e-5, atol=1e-6)


def test_attention_under_autograd_or_long_is_sdpa(monkeypatch):
    calls = []
    real = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a: calls.append(1) or real(*a))
    q = torch.randn(2, 2, 4, 8, requires_grad=True)
    with torch.no_grad():
        dot_product_attention(q, q, q)
    assert not calls
    dot_product_attention(q, q, q).sum().backward()
    assert len(calls) == 1 and q.grad is not None
    long = torch.randn(1, 1, 17, 8)
    with torch.no_grad():
        dot_product_attention(long, long, long)
    assert len(calls) == 2


def test_short_bf16_attention_under_autograd_is_two_products_with_sdpa_gradients(monkeypatch):
    """bf16 (autocast's dtype): SDPA's CPU backward is the slow one there, so short sequences take the
    products with autograd too; values and gradients agree with SDPA's to bf16 rounding."""
    calls = []
    real = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a: calls.append(1) or real(*a))
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, 2, 16, 32, generator=gen, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    out = dot_product_attention(q, k, v)
    assert not calls and out.dtype == torch.bfloat16
    grads = torch.autograd.grad(out.float().pow(2).sum(), (q, k, v))
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref = real(q32, k32, v32)
    ref_grads = torch.autograd.grad(ref.pow(2).sum(), (q32, k32, v32))
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)
    for g, r in zip(grads, ref_grads):
        assert (g.float() - r).norm() / r.norm() < 2e-2


def test_plain_paths_turns_both_off_inside_the_block_only(monkeypatch):
    calls = []
    real_conv, real_sdpa = F.conv2d, F.scaled_dot_product_attention
    monkeypatch.setattr(F, "conv2d", lambda *a, **k: calls.append("conv") or real_conv(*a, **k))
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a: calls.append("sdpa") or real_sdpa(*a))
    conv, x, q = _conv(), torch.randn(2, 6, 2, 2), torch.randn(2, 2, 4, 8)
    with torch.no_grad():
        with pytest.raises(RuntimeError), plain_paths():
            conv(x), dot_product_attention(q, q, q)
            assert calls == ["conv", "sdpa"]
            raise RuntimeError("leaves the block")
        conv(x), dot_product_attention(q, q, q)
    assert calls == ["conv", "sdpa"]
