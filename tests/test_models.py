"""The model stack against the CompVis reference (PyPI `stable-diffusion-sdkit==2.1.5`, module `ldm`).

Key/shape parity is checked on the `meta` device for published LDM configurations; functional
parity on tiny configurations by copying the reference weights into our modules.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from ldm.modules.diffusionmodules import model as ref_ae
from ldm.modules.diffusionmodules.openaimodel import UNetModel as RefUNetModel
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution
from trainer.models import (
    AttentionBlock,
    AutoencoderKL,
    ClassEmbedder,
    Conditioner,
    CrossAttention,
    SpatialTransformer,
    TextEmbedder,
    UNetModel,
    Unconditional,
    kl_divergence,
    new_class_embedder,
)

# unet_config.params of CompVis latent-diffusion configs/latent-diffusion/cin256-v2.yaml
CIN256_V2 = dict(
    image_size=64, in_channels=3, out_channels=3, model_channels=192, attention_resolutions=[8, 4, 2],
    num_res_blocks=2, channel_mult=[1, 2, 3, 5], num_heads=1, use_spatial_transformer=True,
    transformer_depth=1, context_dim=512,
)
# configs/latent-diffusion/txt2img-1p4B-eval.yaml
TXT2IMG_1P4B_EVAL = dict(
    image_size=32, in_channels=4, out_channels=4, model_channels=320, attention_resolutions=[4, 2, 1],
    num_res_blocks=2, channel_mult=[1, 2, 4, 4], num_heads=8, use_spatial_transformer=True,
    transformer_depth=1, context_dim=1280, use_checkpoint=True, legacy=False,
)
# configs/latent-diffusion/celebahq-ldm-vq-4.yaml (unconditional, AttentionBlocks)
CELEBAHQ_LDM_VQ_4 = dict(
    image_size=64, in_channels=3, out_channels=3, model_channels=224, attention_resolutions=[8, 4, 2],
    num_res_blocks=2, channel_mult=[1, 2, 3, 4], num_head_channels=32,
)
# first_stage_config of configs/autoencoder/autoencoder_kl_32x32x4.yaml
AUTOENCODER_KL_32X32X4 = dict(
    embed_dim=4,
    ddconfig=dict(double_z=True, z_channels=4, resolution=256, in_channels=3, out_ch=3, ch=128,
                  ch_mult=[1, 2, 4, 4], num_res_blocks=2, attn_resolutions=[], dropout=0.0),
)
TINY_DDCONFIG = dict(double_z=True, z_channels=4, resolution=16, in_channels=3, out_ch=3, ch=32,
                     ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[8], dropout=0.0)


class RefAutoencoderKL(nn.Module):
    """The CompVis AutoencoderKL's modules, without its Lightning and loss machinery."""

    def __init__(self, ddconfig: dict, embed_dim: int):
        super().__init__()
        self.encoder = ref_ae.Encoder(**ddconfig)
        self.decoder = ref_ae.Decoder(**ddconfig)
        self.quant_conv = nn.Conv2d(2 * ddconfig["z_channels"], 2 * embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, ddconfig["z_channels"], 1)


def shapes(module: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def randomise_(module: nn.Module, seed: int = 0) -> nn.Module:
    """Give the zero-initialised parameters (output convs, biases) random values."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if not p.any():
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    return module


def copy_into(ours: nn.Module, ref: nn.Module) -> nn.Module:
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ours.eval()


@pytest.mark.parametrize("params", [CIN256_V2, TXT2IMG_1P4B_EVAL, CELEBAHQ_LDM_VQ_4],
                         ids=["cin256-v2", "txt2img-1p4B-eval", "celebahq-ldm-vq-4"])
def test_unet_state_dict_keys_and_shapes_match_compvis(params):
    with torch.device("meta"):
        ref, ours = RefUNetModel(**params), UNetModel(**params)
    assert list(shapes(ours).items()) == list(shapes(ref).items())


def test_autoencoder_state_dict_keys_and_shapes_match_compvis():
    with torch.device("meta"):
        ref, ours = RefAutoencoderKL(**AUTOENCODER_KL_32X32X4), AutoencoderKL(**AUTOENCODER_KL_32X32X4)
    assert list(shapes(ours).items()) == list(shapes(ref).items())


TINY_UNET = dict(image_size=8, in_channels=4, out_channels=4, model_channels=32, num_res_blocks=1,
                 attention_resolutions=[2], channel_mult=[1, 2], dropout=0.0)
TINY_VARIANTS = {
    "spatial-transformer": dict(num_heads=2, use_spatial_transformer=True, context_dim=16),
    "spatial-transformer-classes": dict(num_head_channels=16, use_spatial_transformer=True, context_dim=16,
                                        num_classes=5, legacy=False, attention_resolutions=[1, 2]),
    "attention-legacy": dict(num_heads=2, num_heads_upsample=4, use_scale_shift_norm=True),
    "attention-new-order": dict(num_head_channels=16, use_new_attention_order=True, resblock_updown=True),
    "attention-non-legacy": dict(num_heads=4, legacy=False, use_new_attention_order=True, num_classes=3),
}


@pytest.mark.parametrize("variant", list(TINY_VARIANTS))
def test_unet_forward_matches_compvis(variant):
    params = {**TINY_UNET, **TINY_VARIANTS[variant]}
    torch.manual_seed(0)
    ref = randomise_(RefUNetModel(**params)).eval()
    ours = copy_into(UNetModel(**params), ref)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 4, 8, 8, generator=gen)
    t = torch.tensor([0, 17, 999])
    kwargs = {}
    if params.get("context_dim"):
        kwargs["context"] = torch.randn(3, 5, 16, generator=gen)
    if params.get("num_classes"):
        kwargs["y"] = torch.tensor([0, 2, 1])
    with torch.no_grad():
        expected = ref(x, t, **kwargs)
        got = ours(x, t, **kwargs)
    assert expected.abs().mean() > 1e-2  # the randomised output convs make the comparison meaningful
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_unet_examples_are_independent_and_projections_are_hookable():
    """The DP engine's needs: no cross-example ops; attention projections see [B, T, d] inputs."""
    params = {**TINY_UNET, **TINY_VARIANTS["spatial-transformer"]}
    torch.manual_seed(0)
    unet = randomise_(UNetModel(**params)).eval()
    seen: dict[str, tuple[int, ...]] = {}

    def record(name: str):
        def hook(module, inputs, output) -> None:
            seen.setdefault(name, tuple(inputs[0].shape))
        return hook

    for name, module in unet.named_modules():
        if isinstance(module, CrossAttention):
            for proj in ("to_q", "to_k", "to_v"):
                lin = getattr(module, proj)
                assert type(lin) is nn.Linear
                lin.register_forward_hook(record(f"{name}.{proj}"))
            assert type(module.to_out[0]) is nn.Linear
        if isinstance(module, SpatialTransformer):
            assert type(module.proj_in) is nn.Conv2d and module.proj_in.kernel_size == (1, 1)
            assert type(module.proj_out) is nn.Conv2d and module.proj_out.kernel_size == (1, 1)
        assert not isinstance(module, nn.modules.batchnorm._BatchNorm)
    x, t, ctx = torch.randn(3, 4, 8, 8), torch.tensor([3, 500, 900]), torch.randn(3, 5, 16)
    with torch.no_grad():
        batched = unet(x, t, context=ctx)
        single = torch.cat([unet(x[i:i + 1], t[i:i + 1], context=ctx[i:i + 1]) for i in range(3)])
    torch.testing.assert_close(batched, single, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # Poisson sampling can draw an empty batch
        assert unet(x[:0], t[:0], context=ctx[:0]).shape == (0, 4, 8, 8)
    assert seen and all(len(s) == 3 and s[0] == 3 for s in seen.values())
    assert any(s[1] == 5 for n, s in seen.items() if n.endswith("attn2.to_k"))  # keys from the context


def test_attention_block_projections_are_kernel1_conv1d():
    block = AttentionBlock(64, num_head_channels=32)
    assert block.num_heads == 2
    assert type(block.qkv) is nn.Conv1d and block.qkv.kernel_size == (1,)
    assert type(block.proj_out) is nn.Conv1d and block.proj_out.kernel_size == (1,)
    with pytest.raises(ValueError, match="num_head_channels"):
        AttentionBlock(64, num_head_channels=24)


def test_unet_runs_with_a_first_channel_mult_above_one():
    """The output convs take the last output block's width (CompVis' take model_channels and fail here)."""
    unet = UNetModel(**{**TINY_UNET, "channel_mult": [2, 2]}, num_heads=2).eval()
    with torch.no_grad():
        out = unet(torch.randn(2, 4, 8, 8), torch.tensor([3, 500]))
    assert out.shape == (2, 4, 8, 8)
    assert unet.out[2].in_channels == 64


def test_unet_rejects_inconsistent_arguments():
    with pytest.raises(ValueError, match="context_dim"):
        UNetModel(**TINY_UNET, num_heads=2, use_spatial_transformer=True)
    with pytest.raises(ValueError, match="num_heads or num_head_channels"):
        UNetModel(**TINY_UNET)
    unet = UNetModel(**TINY_UNET, num_heads=2)
    with pytest.raises(ValueError, match="num_classes"):
        unet(torch.randn(1, 4, 8, 8), torch.tensor([1]), y=torch.tensor([0]))


def test_autoencoder_matches_compvis():
    torch.manual_seed(0)
    ref = randomise_(RefAutoencoderKL(TINY_DDCONFIG, embed_dim=3)).eval()
    ours = copy_into(AutoencoderKL(TINY_DDCONFIG, embed_dim=3), ref)
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        posterior = DiagonalGaussianDistribution(ref.quant_conv(ref.encoder(x)))
        mean, std = ours.encode(x)
        torch.testing.assert_close(mean, posterior.mean, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(std, posterior.std, rtol=1e-5, atol=1e-5)
        assert mean.shape == (2, 3, 8, 8)
        z = posterior.sample()
        torch.testing.assert_close(ours.decode(z), ref.decoder(ref.post_quant_conv(z)), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(kl_divergence(mean, std), posterior.kl(), rtol=1e-5, atol=1e-4)
        rec, _, _ = ours(x, sample=False)
        torch.testing.assert_close(rec, ours.decode(mean))
        assert rec.shape == x.shape


def test_autoencoder_ddconfig_errors_name_the_key():
    with pytest.raises(ValueError, match="attn_type 'linear'"):
        AutoencoderKL({**TINY_DDCONFIG, "attn_type": "linear"}, embed_dim=4)
    AutoencoderKL({**TINY_DDCONFIG, "attn_type": "vanilla"}, embed_dim=4)  # CompVis' default, spelled out
    with pytest.raises(ValueError, match="z_channels"):
        AutoencoderKL({k: v for k, v in TINY_DDCONFIG.items() if k != "z_channels"}, embed_dim=4)
    with pytest.raises(ValueError, match="double_z"):
        AutoencoderKL({**TINY_DDCONFIG, "double_z": False}, embed_dim=4)


def test_class_embedder_shapes_and_null_class():
    emb = ClassEmbedder(embed_dim=8, n_classes=10)
    assert isinstance(emb, Conditioner) and emb.key == "class_label"
    assert emb.embedding.weight.shape == (11, 8)
    out = emb(torch.tensor([0, 9, 3]))
    assert out.shape == (3, 1, 8)
    null = emb.null_condition(4)
    assert null.shape == (4, 1, 8)
    torch.testing.assert_close(null[:, 0], emb.embedding.weight[10].expand(4, 8))
    with pytest.raises(ValueError, match=r"\[0, 10\]"):
        emb(torch.tensor([11]))
    with pytest.raises(TypeError):
        emb(torch.tensor([1.0]))


def test_new_class_embedder_starts_from_named_base_rows_or_random():
    torch.manual_seed(0)
    base = ClassEmbedder(embed_dim=8, n_classes=26)
    old = base.embedding.weight.detach().clone()
    new = new_class_embedder(base, 3, from_rows=[14, 11, 25])
    assert new.n_classes == 3 and new.null_class == 3 and new.embedding.weight.shape == (4, 8)
    torch.testing.assert_close(new.embedding.weight.detach(), old[[14, 11, 25, 26]])
    assert new.embedding.weight.requires_grad and base.embedding.weight.detach().equal(old)  # base untouched
    torch.manual_seed(1)
    rand = new_class_embedder(base, 10)
    torch.manual_seed(1)
    torch.testing.assert_close(rand.embedding.weight.detach(), nn.Embedding(11, 8).weight.detach())
    for bad in ([1, 2], [1, 2, 26]):  # one row per new class, of the base's classes (not its null row)
        with pytest.raises(ValueError, match="from_rows must give 3 rows"):
            new_class_embedder(base, 3, from_rows=bad)


def test_unconditional_gives_no_context():
    cond = Unconditional()
    assert isinstance(cond, Conditioner)
    assert cond(["anything"]) is None and cond.null_condition(3) is None


@pytest.fixture(scope="module")
def text_embedder():
    return TextEmbedder(max_length=16).eval()


def test_text_embedder_loads_offline_and_embeds(text_embedder, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert text_embedder.key == "caption" and text_embedder.context_dim == 384
    with torch.no_grad():
        out = text_embedder(["a smiling woman with glasses", "a man"])
        alone = text_embedder(["a man"])
        null = text_embedder.null_condition(2)
    assert out.shape == (2, 16, 384) and null.shape == (2, 16, 384)
    torch.testing.assert_close(out[1:], alone, rtol=1e-5, atol=1e-5)  # no influence across the batch
    assert not torch.allclose(out[0], out[1])
    torch.testing.assert_close(null[0], null[1])
    with pytest.raises(TypeError, match="list of prompt strings"):
        text_embedder("a single string")


def test_text_embedder_projection_and_frozen_backbone(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    emb = TextEmbedder(max_length=8, context_dim=32, freeze_backbone=True)
    emb.train()
    assert not emb.backbone.training
    trainable = [n for n, p in emb.named_parameters() if p.requires_grad]
    assert trainable == ["proj.weight", "proj.bias"]
    assert emb(["hello"]).shape == (1, 8, 32)


def test_spatial_transformer_passes_the_dp_engines_bf16_self_check():
    """Under bf16 autocast a transformer block keeps its residual stream and LayerNorms in float32: a bf16
    LayerNorm sums its weight's gradient over 256 x 16 tokens in bf16, which put autograd's batch gradient
    2-21% away from the engine's float32 per-example sums and failed the self-check on the demo's UNet."""
    from trainer.privacy import DPGradientEngine
    from trainer.privacy.engine import SELF_CHECK_RTOL_BF16
    gen = torch.Generator().manual_seed(0)
    block = SpatialTransformer(128, n_heads=4, d_head=32, context_dim=64)  # a demo UNet's 4x4 level
    with torch.no_grad():
        block.proj_out.weight.copy_(torch.randn(block.proj_out.weight.shape, generator=gen) * 0.02)
    x, context = torch.randn(256, 128, 4, 4, generator=gen), torch.randn(256, 1, 64, generator=gen)

    def clipped_sum(precision: str) -> torch.Tensor:
        engine = DPGradientEngine(block, max_grad_norm=1e-3, noise_multiplier=0.0, expected_batch_size=1.0,
                                  self_check_rtol=SELF_CHECK_RTOL_BF16)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            losses = block(x, context).float().pow(2).mean((1, 2, 3))
        engine.accumulate(losses)  # the self-check runs on this first micro-batch
        engine.finalize()
        engine.detach()
        grads = torch.cat([p.grad.flatten() for p in block.parameters()])
        block.zero_grad(set_to_none=True)
        return grads

    fp32, bf16 = clipped_sum("fp32"), clipped_sum("bf16")
    assert torch.nn.functional.cosine_similarity(fp32, bf16, dim=0) > 0.999
