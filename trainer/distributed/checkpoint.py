"""What a DP fine-tuning checkpoint holds: weights, optimizer, sampler step and the privacy ledger."""
from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import torch
from torch import Tensor, nn

from trainer.config import ConfigError
from trainer.io import load_safetensors

if TYPE_CHECKING:
    from trainer.diffusion import EMA
    from trainer.privacy import PoissonBatchSampler, PrivacyLedger

CHECKPOINTS = "checkpoints"
WEIGHTS_FILE = "finetuned.safetensors"   # the fine-tuned parameters, read by `dpldm sample`
EMA_FILE = "finetuned-ema.safetensors"   # their EMA (finetune.ema_decay): read by `dpldm sample` instead
STATE_FILE = "finetune-state.pt"         # resume state of a one-process run
LATEST = "latest.json"


# --- the runtime used by the fine-tuning stage -----------------------------------------------------

@dataclass
class TrainState:
    """What a fine-tuning checkpoint holds: weights, optimizer moments, the step and the ledger.

    Optimizer moments are computed from the noisy gradients only (post-processing of DP
    outputs). Generator and sampler states are never saved: a resume reseeds from OS entropy.
    """
    trainable: dict[str, nn.Parameter]   # the DP-trained parameters, by model name
    optimizer: Any                       # torch AdamW (one process) or ShardedAdamW
    sampler: "PoissonBatchSampler"
    ledger: "PrivacyLedger"
    metadata: dict[str, Any]             # stored with the weights (e.g. the base LDM run)
    ema: Optional["EMA"] = None          # average of the trained weights over the steps (post-processing)

    def weights_metadata(self, step: int) -> dict[str, Any]:
        """Metadata of a weights file: the step and the ledger that accounts for it."""
        return {"step": step, "ledger": json.dumps(self.ledger.state_dict()), **self.metadata}


@dataclass
class Checkpoint:
    """Where :meth:`resume` left the run: the step, the MLflow run and the ledger count saved with it."""
    step: int = 0
    mlflow_run_id: Optional[str] = None
    steps_charged: int = 0               # the ledger's count when the checkpoint was written


def load_trainable(path: Path, trainable: Mapping[str, Tensor]) -> None:
    """Copy the weights saved in ``path`` into the trained parameters, or their EMA (same names, all of them)."""
    weights = load_safetensors(path).state_dict
    if set(weights) != set(trainable):
        raise ValueError(f"{path}: the saved parameters differ from this run's trained ones "
                         "(did finetune.policy or finetune.attention_from change?)")
    with torch.no_grad():
        for name, p in trainable.items():
            p.copy_(weights[name])


def load_ema(path: Path, state: TrainState) -> None:
    """Restore the EMA of a resumed run from ``path``; refuse a run whose EMA setting changed, so the
    result file (the EMA, when present) always belongs to the steps the run took."""
    if state.ema is None:
        if path.is_file():
            raise ConfigError(f"{path}: the run was started with finetune.ema_decay set; resume it with the same "
                              "setting, or start another run (finetune.name=...)")
        return
    if not path.is_file():
        raise ConfigError(f"{path}: missing, but finetune.ema_decay is set: the run was started without it (or "
                          "the file was lost); resume it with its own settings, or start another run (finetune.name=...)")
    load_trainable(path, state.ema.shadow)
