"""Which parameters DP fine-tuning trains (the DP-LDM policies); everything else is frozen.

- ``attention``: every SpatialTransformer of the UNet, or those from the k-th on (counting from 1
  in UNet order: input blocks, middle block, output blocks), plus the conditioning embedder.
- ``attention_blocks``: the AttentionBlock modules (unconditional models have no SpatialTransformer).
- ``embedder_only``: the conditioning embedder alone.
- ``full``: the whole UNet and the embedder (the baseline DP-LDM improves on).
- ``lora``: low-rank adapters (rank ``lora_rank``) added to the q, k, v and output projections of
  the attention layers in the same SpatialTransformers as ``attention``, plus the embedder; the
  projections themselves stay frozen (as DP-LoRA does).

``context_grad`` says how the conditioning is trained: ``all`` (the loss's exact gradient, through
every SpatialTransformer the context enters) or ``trainable`` (a stop-gradient on the context where
it enters a SpatialTransformer with nothing to train: the embedder learns through the trainable
ones only, and when those are the output blocks' the backward never enters the frozen encoder).

"The embedder" is a class embedder whole; for a pretrained text encoder it is only its
projection into ``context_dim`` (none when the widths match), plus its top ``text_encoder_layers``
transformer layers on request: the encoder itself stays frozen (and in eval mode) by default.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

POLICIES = ("attention", "attention_blocks", "embedder_only", "full", "lora")
CONTEXT_GRADS = ("all", "trainable")


@dataclass
class Selection:
    policy: str
    trainable: list[str]      # parameter names, in model order
    trainable_count: int
    total_count: int
    lora: dict | None = None  # lora policy: {"rank", "alpha", "attention_from"}, to rebuild the adapters

    def summary(self) -> str:
        share = 100.0 * self.trainable_count / max(1, self.total_count)
        return (f"policy {self.policy}: {self.trainable_count:,} trainable of {self.total_count:,} parameters "
                f"({share:.1f}%) in {len(self.trainable)} tensors")


def _blocks_of(unet: nn.Module, cls: type) -> list[tuple[str, nn.Module]]:
    return [(name, m) for name, m in unet.named_modules() if isinstance(m, cls)]


def embedder_parts(embedder: nn.Module, text_encoder_layers: int = 0) -> list[nn.Module]:
    """The modules of the conditioning embedder that DP fine-tuning trains (see the module docstring)."""
    from trainer.models import TextEmbedder
    if not isinstance(embedder, TextEmbedder):
        if text_encoder_layers:
            raise ValueError("finetune.text_encoder_layers: only a text conditioner has encoder layers")
        return [embedder]
    layers = embedder.backbone.encoder.layer
    if not 0 <= text_encoder_layers <= len(layers):
        raise ValueError(f"finetune.text_encoder_layers must be in 0..{len(layers)}, got {text_encoder_layers}")
    embedder.freeze_backbone = text_encoder_layers == 0  # a frozen encoder runs in eval mode (no dropout)
    parts = [embedder.proj] if embedder.proj is not None else []
    return parts + list(layers[len(layers) - text_encoder_layers:])


def _transformers_from(unet: nn.Module, attention_from: int, policy: str) -> list[nn.Module]:
    from trainer.models import SpatialTransformer
    blocks = _blocks_of(unet, SpatialTransformer)
    if not blocks:
        raise ValueError(f"finetune.policy={policy}: the UNet has no SpatialTransformer "
                         "(use attention_blocks for models with AttentionBlocks)")
    if not 1 <= attention_from <= len(blocks):
        raise ValueError(f"finetune.attention_from must be in 1..{len(blocks)} (the UNet has "
                         f"{len(blocks)} SpatialTransformers), got {attention_from}")
    return [m for _, m in blocks[attention_from - 1:]]


def add_adapters(ldm: nn.Module, lora: dict) -> list[nn.Module]:
    """The lora policy's adapters on ``ldm`` (see :class:`Selection`): added, or found when present."""
    from trainer.models import add_lora
    return add_lora(_transformers_from(ldm.unet, lora["attention_from"], "lora"), lora["rank"], lora["alpha"])


def _detach_context(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    if "context" in kwargs:
        kwargs = {**kwargs, "context": None if kwargs["context"] is None else kwargs["context"].detach()}
    elif len(args) > 1 and args[1] is not None:
        args = (args[0], args[1].detach(), *args[2:])
    return args, kwargs


def _set_context_grad(unet: nn.Module, context_grad: str) -> None:
    """(Re)place the stop-gradient hooks: on the frozen SpatialTransformers if ``trainable``, on none if ``all``."""
    from trainer.models import SpatialTransformer
    for _, m in _blocks_of(unet, SpatialTransformer):
        handle = m.__dict__.pop("_context_hook", None)
        if handle is not None:
            handle.remove()
        if context_grad == "trainable" and not any(p.requires_grad for p in m.parameters()):
            m.__dict__["_context_hook"] = m.register_forward_pre_hook(_detach_context, with_kwargs=True)


def select_trainable(ldm: nn.Module, policy: str, attention_from: int = 1, text_encoder_layers: int = 0,
                     lora_rank: int = 4, lora_alpha: float | None = None, context_grad: str = "all") -> Selection:
    """Set ``requires_grad`` on ``ldm`` (with ``.unet`` and ``.cond_stage_model``) per ``policy``
    (``lora`` first adds the adapters to the model); ``context_grad="trainable"`` puts the
    stop-gradients of the module docstring on the model (forward hooks; a later call replaces them)."""
    from trainer.models import AttentionBlock
    if policy not in POLICIES:
        raise ValueError(f"finetune.policy must be one of {POLICIES}, got {policy!r}")
    if context_grad not in CONTEXT_GRADS:
        raise ValueError(f"finetune.context_grad must be one of {CONTEXT_GRADS}, got {context_grad!r}")
    if context_grad == "trainable" and policy not in ("attention", "lora"):
        raise ValueError(f"finetune.context_grad=trainable needs finetune.policy attention or lora (trainable "
                         f"SpatialTransformers for the conditioning to learn through), got {policy!r}")
    lora = {"rank": lora_rank, "alpha": lora_alpha, "attention_from": attention_from} if policy == "lora" else None
    if lora is not None:
        adapters = [(a.lora_down, a.lora_up) for a in add_adapters(ldm, lora)]
    ldm.requires_grad_(False)
    unet = ldm.unet
    embedder = embedder_parts(ldm.cond_stage_model, text_encoder_layers)
    ldm.train(ldm.training)  # applies the embedder's frozen-encoder mode
    chosen: list[nn.Module] = []
    if policy == "attention":
        chosen = _transformers_from(unet, attention_from, policy) + embedder
    elif policy == "lora":
        chosen = [m for pair in adapters for m in pair] + embedder
    elif policy == "attention_blocks":
        blocks = _blocks_of(unet, AttentionBlock)
        if not blocks:
            raise ValueError("finetune.policy=attention_blocks: the UNet has no AttentionBlock")
        chosen = [m for _, m in blocks]
    elif policy == "embedder_only":
        chosen = embedder
    else:
        chosen = [unet, *embedder]
    for m in chosen:
        m.requires_grad_(True)
    _set_context_grad(unet, context_grad)
    names = [n for n, p in ldm.named_parameters() if p.requires_grad]
    if not names:
        raise ValueError(f"finetune.policy={policy}: nothing to train (the conditioner has no trainable part: "
                         "a text encoder without projection trains only with finetune.text_encoder_layers > 0)")
    return Selection(policy, names, sum(p.numel() for p in ldm.parameters() if p.requires_grad),
                     sum(p.numel() for p in ldm.parameters()), lora)
