"""The DeepSpeed JSON of a DP fine-tuning run: found, read and checked for anything that would break DP."""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from trainer.config import REPO_CONFIGS, ConfigError, FinetuneConfig

DEEPSPEED_CONFIGS = REPO_CONFIGS / "deepspeed"
DEFAULT_DEEPSPEED_CONFIG: dict = {"zero_optimization": {"stage": 0}}
AUTOCAST_DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "torch.bfloat16": torch.bfloat16}


# --- the DeepSpeed JSON -------------------------------------------------------------------------

def resolve_deepspeed_config(name_or_path: str) -> Path:
    """A path, or the name of a config shipped in configs/deepspeed/ (``zero3`` -> zero3.json)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    if path.is_absolute() or len(path.parts) > 1:  # a path that names no file
        raise ConfigError(f"finetune.deepspeed_config: {name_or_path}: file not found")
    shipped = DEEPSPEED_CONFIGS / (name_or_path if name_or_path.endswith(".json") else f"{name_or_path}.json")
    if shipped.is_file():
        return shipped
    raise ConfigError(f"finetune.deepspeed_config: {name_or_path}: file not found "
                      f"(nor {shipped.relative_to(REPO_CONFIGS.parent)})")


@dataclass
class DeepSpeedSettings:
    """A checked DeepSpeed config: what DeepSpeed gets, and what the trainer applies itself."""
    config: dict                           # for deepspeed.initialize (it only partitions frozen weights)
    zero_stage: int
    offload_optimizer: bool                # the optimizer shard and its state in CPU memory
    autocast_dtype: Optional[torch.dtype]  # bf16 compute with fp32 weights, or None


def load_deepspeed_config(name_or_path: str, ft: FinetuneConfig) -> DeepSpeedSettings:
    """Read and check the DeepSpeed JSON named by ``finetune.deepspeed_config``."""
    path = resolve_deepspeed_config(name_or_path)
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"finetune.deepspeed_config: {path}: not valid JSON: {err}") from None
    return check_deepspeed_config(raw, ft, str(path))


def _enabled(raw: dict, section: str) -> bool:
    value = raw.get(section)
    return isinstance(value, dict) and bool(value.get("enabled", False))


def check_deepspeed_config(raw: Any, ft: FinetuneConfig, source: str = "<dict>") -> DeepSpeedSettings:
    """Refuse the settings that would break the DP guarantee, explaining why and what to set.

    DeepSpeed must not touch gradients: its clipping would rescale the noisy sum by a
    data-dependent factor, fp16 loss scaling multiplies every per-example norm before the DP
    engine clips it, and its optimizer or gradient accumulation would step on other batches
    than the Poisson-sampled logical batch. Batch sizes, if given, must be the experiment's.
    """
    where = f"finetune.deepspeed_config ({source})"

    def refuse(key: str, why: str, fix: str) -> None:
        raise ConfigError(f"{where}: {key}: {why}; {fix}")

    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: the top level must be a JSON object")
    clipping = raw.get("gradient_clipping", 0)
    if clipping:
        refuse("gradient_clipping", f"{clipping} would rescale the noisy gradient sum by its norm, a data-dependent "
               f"factor outside the DP analysis (the DP engine already clips every example at "
               f"finetune.max_grad_norm = {ft.max_grad_norm})", "set it to 0 or remove it")
    for section in ("fp16", "amp"):
        if _enabled(raw, section):
            refuse(f"{section}.enabled", "fp16 mixed precision scales the loss, and so every per-example gradient "
                   "norm, by the loss scale before the DP engine clips it at finetune.max_grad_norm",
                   'use fp32, or bf16 compute with "torch_autocast": {"enabled": true, "dtype": "bfloat16"}')
    for section in ("bf16", "bfloat16"):  # "bfloat16": DeepSpeed's older name for the same section
        if _enabled(raw, section):
            refuse(f"{section}.enabled", "bf16 weights would put the frozen modules in bf16 next to the fp32 "
                   "modules the DP engine trains", 'for bf16 compute keep fp32 weights: "torch_autocast": '
                   '{"enabled": true, "dtype": "bfloat16"}')
    if _enabled(raw, "torch_autocast"):
        dtype = raw["torch_autocast"].get("dtype", "bfloat16")
        if dtype not in AUTOCAST_DTYPES:
            refuse("torch_autocast.dtype", f"{dtype!r}: float16 autocast needs loss scaling, which scales the "
                   "per-example gradient norms before clipping", 'use "bfloat16"')
    accumulation = raw.get("gradient_accumulation_steps", 1)
    if accumulation not in (1, "auto"):
        refuse("gradient_accumulation_steps", f"{accumulation}: DP-SGD steps exactly once per Poisson-sampled "
               "logical batch, whose number of micro-batches varies from step to step",
               "set it to 1 or remove it (the logical batch is finetune.expected_batch_size, its micro-batches "
               "finetune.physical_batch_size)")
    batch = raw.get("train_batch_size")
    if batch not in (None, "auto") and batch != ft.expected_batch_size:
        refuse("train_batch_size", f"{batch} is not the logical batch: each step draws a Poisson batch of "
               f"expected size finetune.expected_batch_size = {ft.expected_batch_size} over all ranks",
               f"remove it or set it to {ft.expected_batch_size}")
    micro = raw.get("train_micro_batch_size_per_gpu")
    if micro not in (None, "auto") and micro != ft.physical_batch_size:
        refuse("train_micro_batch_size_per_gpu", f"{micro} differs from finetune.physical_batch_size = "
               f"{ft.physical_batch_size}, the micro-batch size the DP engine uses",
               f"remove it or set it to {ft.physical_batch_size}")
    for section in ("optimizer", "scheduler"):
        if section in raw:
            refuse(section, "the trainable parameters are stepped by the DP trainer (AdamW with finetune.lr and "
                   "finetune.weight_decay), never by DeepSpeed", f"remove the {section} section")
    zero = raw.get("zero_optimization", {})
    if not isinstance(zero, dict):
        refuse("zero_optimization", "must be a JSON object", 'e.g. {"stage": 3}')
    stage = zero.get("stage", 0)
    if stage not in (0, 1, 2, 3):
        refuse("zero_optimization.stage", f"{stage!r} is not a ZeRO stage", "use 0, 1, 2 or 3")
    offload_optimizer = (zero.get("offload_optimizer") or {}).get("device", "none")
    if offload_optimizer not in ("none", "cpu"):
        refuse("zero_optimization.offload_optimizer.device", f"{offload_optimizer!r} is not supported: the DP "
               "trainer keeps the optimizer shard on the accelerator or in CPU memory", 'use "cpu" or "none"')
    offload_param = (zero.get("offload_param") or {}).get("device", "none")
    if offload_param != "none" and stage != 3:
        refuse("zero_optimization.offload_param", f"offloading weights needs ZeRO stage 3 (this config has "
               f"stage {stage})", "set zero_optimization.stage to 3 or remove offload_param")

    checked = copy.deepcopy(raw)
    for key in ("train_batch_size", "gradient_accumulation_steps", "torch_autocast"):
        checked.pop(key, None)  # applied by the trainer; DeepSpeed only partitions frozen weights
    checked["train_micro_batch_size_per_gpu"] = ft.physical_batch_size
    checked["gradient_clipping"] = 0.0
    autocast = AUTOCAST_DTYPES[raw["torch_autocast"].get("dtype", "bfloat16")] if _enabled(raw, "torch_autocast") else None
    return DeepSpeedSettings(checked, stage, offload_optimizer == "cpu", autocast)
