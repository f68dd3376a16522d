"""The LDM model stack: UNet, KL autoencoder, conditioning embedders, checkpoint I/O.

Parameter names and shapes follow the CompVis `ldm` code, so official checkpoints load with
`load_ldm_checkpoint(..., strict=True)`.
"""
from .attention import AttentionBlock, BasicTransformerBlock, CrossAttention, SpatialTransformer, dot_product_attention
from .autoencoder import AutoencoderKL, kl_divergence
from .checkpoint import (
    CheckpointError,
    LoadReport,
    load_ldm_checkpoint,
    load_safetensors,
    read_state_dict,
    save_safetensors,
)
from .conditioners import ClassEmbedder, Conditioner, TextEmbedder, Unconditional, new_class_embedder
from .lora import LoRALinear, add_lora
from .unet import UNetModel

__all__ = [
    "AttentionBlock",
    "AutoencoderKL",
    "BasicTransformerBlock",
    "CheckpointError",
    "ClassEmbedder",
    "Conditioner",
    "CrossAttention",
    "LoRALinear",
    "LoadReport",
    "SpatialTransformer",
    "TextEmbedder",
    "add_lora",
    "UNetModel",
    "Unconditional",
    "dot_product_attention",
    "kl_divergence",
    "load_ldm_checkpoint",
    "new_class_embedder",
    "load_safetensors",
    "read_state_dict",
    "save_safetensors",
]
