"""Which parameters DP fine-tuning trains (the DP-LDM policies); everything else is frozen.

- ``attention``: every SpatialTransformer of the UNet, or those from the k-th on (counting from 1
  in UNet order: input blocks, middle block, output blocks), plus the conditioning embedder.
- ``attention_blocks``: the AttentionBlock modules (unconditional models have no SpatialTransformer).
- ``embedder_only``: the conditioning embedder alone.
- ``full``: the whole UNet and the embedder (the baseline DP-LDM improves on).
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

POLICIES = ("attention", "attention_blocks", "embedder_only", "full")


@dataclass
class Selection:
    policy: str
    trainable: list[str]      # parameter names, in model order
    trainable_count: int
    total_count: int

    def summary(self) -> str:
        share = 100.0 * self.trainable_count / max(1, self.total_count)
        return (f"policy {self.policy}: {self.trainable_count:,} trainable of {self.total_count:,} parameters "
                f"({share:.1f}%) in {len(self.trainable)} tensors")


def _blocks_of(unet: nn.Module, cls: type) -> list[tuple[str, nn.Module]]:
    return [(name, m) for name, m in unet.named_modules() if isinstance(m, cls)]


def select_trainable(ldm: nn.Module, policy: str, attention_from: int = 1) -> Selection:
    """Set ``requires_grad`` on ``ldm`` (with ``.unet`` and ``.cond_stage_model``) per ``policy``."""
    from trainer.models import AttentionBlock, SpatialTransformer
    if policy not in POLICIES:
        raise ValueError(f"finetune.policy must be one of {POLICIES}, got {policy!r}")
    ldm.requires_grad_(False)
    unet, embedder = ldm.unet, ldm.cond_stage_model
    chosen: list[nn.Module] = []
    if policy == "attention":
        blocks = _blocks_of(unet, SpatialTransformer)
        if not blocks:
            raise ValueError("finetune.policy=attention: the UNet has no SpatialTransformer "
                             "(use attention_blocks for models with AttentionBlocks)")
        if not 1 <= attention_from <= len(blocks):
            raise ValueError(f"finetune.attention_from must be in 1..{len(blocks)} (the UNet has "
                             f"{len(blocks)} SpatialTransformers), got {attention_from}")
        chosen = [m for _, m in blocks[attention_from - 1:]] + [embedder]
    elif policy == "attention_blocks":
        blocks = _blocks_of(unet, AttentionBlock)
        if not blocks:
            raise ValueError("finetune.policy=attention_blocks: the UNet has no AttentionBlock")
        chosen = [m for _, m in blocks]
    elif policy == "embedder_only":
        chosen = [embedder]
    else:
        chosen = [unet, embedder]
    for m in chosen:
        m.requires_grad_(True)
    names = [n for n, p in ldm.named_parameters() if p.requires_grad]
    if not names:
        raise ValueError(f"finetune.policy={policy}: nothing to train (is the conditioner parameter-free?)")
    return Selection(policy, names, sum(p.numel() for p in ldm.parameters() if p.requires_grad),
                     sum(p.numel() for p in ldm.parameters()))
