"""Parameter selection policies: which tensors DP fine-tuning trains, counted independently."""
import pytest
import torch

from trainer.config import load_config
from trainer.models import AttentionBlock, SpatialTransformer
from trainer.selection import select_trainable
from trainer.stages.common import build_ldm


def tiny_ldm(attention_blocks: bool = False):
    unet = ["ldm.unet.model_channels=32", "ldm.unet.channel_mult=[1,2]", "ldm.unet.attention_resolutions=[1,2]"]
    if attention_blocks:
        unet += ["ldm.unet.use_spatial_transformer=false", "ldm.unet.context_dim=null", "ldm.conditioner.type=none"]
    return build_ldm(load_config("demo", unet))


def count(modules):
    return sum(p.numel() for m in modules for p in m.parameters())


def test_attention_policy_trains_every_spatial_transformer_and_the_embedder():
    ldm = tiny_ldm()
    sel = select_trainable(ldm, "attention")
    blocks = [m for m in ldm.unet.modules() if isinstance(m, SpatialTransformer)]
    assert len(blocks) == 7  # input: 1 per level (2), middle (1), output: num_res_blocks + 1 per level (4)
    assert sel.trainable_count == count(blocks) + count([ldm.cond_stage_model])
    assert sel.total_count == sum(p.numel() for p in ldm.parameters())
    assert all(n.startswith("cond_stage_model.") or ".transformer_blocks." in n or ".proj_" in n or ".norm." in n
               for n in sel.trainable)
    frozen = [n for n, p in ldm.named_parameters() if not p.requires_grad]
    assert any(n.startswith("unet.input_blocks.0.") for n in frozen) and "unet.time_embed.0.weight" in frozen


def test_attention_from_k_counts_from_one_in_unet_order():
    ldm = tiny_ldm()
    names = [n for n, m in ldm.unet.named_modules() if isinstance(m, SpatialTransformer)]
    sel = select_trainable(ldm, "attention", attention_from=3)
    trained_blocks = {n for n in names if any(t.startswith(f"unet.{n}.") for t in sel.trainable)}
    assert trained_blocks == set(names[2:])
    with pytest.raises(ValueError, match="attention_from"):
        select_trainable(ldm, "attention", attention_from=len(names) + 1)


def test_embedder_only_and_full():
    ldm = tiny_ldm()
    sel = select_trainable(ldm, "embedder_only")
    assert sel.trainable == ["cond_stage_model.embedding.weight"]
    sel = select_trainable(ldm, "full")
    assert sel.trainable_count == sel.total_count


def test_attention_blocks_for_unconditional_models():
    ldm = tiny_ldm(attention_blocks=True)
    with pytest.raises(ValueError, match="no SpatialTransformer"):
        select_trainable(ldm, "attention")
    sel = select_trainable(ldm, "attention_blocks")
    blocks = [m for m in ldm.unet.modules() if isinstance(m, AttentionBlock)]
    assert blocks and sel.trainable_count == count(blocks)


def test_policy_changes_gradients_only_where_selected():
    ldm = tiny_ldm()
    select_trainable(ldm, "attention", attention_from=2)
    z = torch.randn(2, 4, 8, 8)
    ldm.loss(z, torch.tensor([1, 2]), torch.Generator().manual_seed(0)).sum().backward()
    for name, p in ldm.named_parameters():
        assert (p.grad is not None) == p.requires_grad, name
