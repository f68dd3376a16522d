"""DP fine-tuning on several processes: ``torchrun`` or the ``deepspeed`` launcher, one node or many.

``dpldm finetune`` takes this path when it is launched with ``WORLD_SIZE > 1`` or when the
experiment names a DeepSpeed JSON file (``finetune.deepspeed_config``). One logical DP-SGD step:

1. Each rank Poisson-samples its own disjoint slice of the private set (indices r, r + W, ...)
   with the global rate q: the union over ranks is Poisson sampling of the whole set. Each rank
   encodes and keeps only the latents of its slice.
2. Every rank runs the same number of micro-batches: ZeRO-3 gathers frozen weights with
   collectives, so a rank with fewer examples pads with one public dummy example (a zero
   latent) whose loss is multiplied by 0; its clipped gradient adds exactly 0.
3. The DP engine clips every example on its rank. Rank 0 alone adds N(0, sigma^2 C^2) to its
   local clipped sum (``finalize(add_noise=rank == 0)``); every rank divides by the global
   expected batch size q N. Summing over ranks then puts the noise exactly once on every
   coordinate. The other ranks' noise generators exist (OS entropy, never a shared seed) but
   draw nothing.
4. The sum over ranks is a reduce-scatter: each rank steps AdamW on its shard of the flattened
   trainable parameters (optimizer state partitioned across ranks), and an all-gather copies
   the updated shards back into the trainable parameters, which every rank holds whole.

With ZeRO stage 3, DeepSpeed also partitions the frozen weights (the UNet and conditioner
modules that are not trained, and the autoencoder) and gathers each module's weights for its
forward and backward. The trainable modules are left out of DeepSpeed's reach, so the DP
engine sees ordinary parameters. DeepSpeed never reduces, clips, scales or steps gradients
here: a config asking it to (gradient clipping, fp16 loss scaling, its own optimizer,
gradient accumulation) is refused by :func:`check_deepspeed_config`.

Checkpoints (``<run>/checkpoints/step-NNNNNN/``): the trained weights (rank 0, with the ledger in
their metadata), and one file per rank with its optimizer shard and the step count; no sampler
or generator state is ever written (it would let a reader replay batch membership and noise).
``latest.json`` (with the ledger) is written last. A resume, on any world size, re-shards the
optimizer state exactly and starts fresh OS-entropy samplers and generators at the saved step;
the privacy ledger is the run's ``ledger.json`` journal, checked against the checkpoint's copy.
(DeepSpeed's own ZeRO checkpoints
would store the frozen weights, which never change, and reload only on the same world size.)
"""
from __future__ import annotations

from trainer.distributed.checkpoint import (CHECKPOINTS, EMA_FILE, LATEST, STATE_FILE, WEIGHTS_FILE, Checkpoint,
                                            TrainState, load_trainable)
from trainer.distributed.deepspeed_config import (DEEPSPEED_CONFIGS, DEFAULT_DEEPSPEED_CONFIG, DeepSpeedSettings,
                                                  check_deepspeed_config, load_deepspeed_config,
                                                  resolve_deepspeed_config)
from trainer.distributed.partition import FrozenPartition, frozen_subtrees
from trainer.distributed.run import DistributedRun, _free_port, foreign_launch, launch
from trainer.distributed.single import SingleProcess
from trainer.distributed.sharded_adamw import ShardedAdamW

__all__ = ["CHECKPOINTS", "DEEPSPEED_CONFIGS", "DEFAULT_DEEPSPEED_CONFIG", "EMA_FILE", "LATEST", "STATE_FILE", "WEIGHTS_FILE",
           "Checkpoint", "DeepSpeedSettings", "DistributedRun", "FrozenPartition", "ShardedAdamW", "SingleProcess", "TrainState",
           "_free_port", "check_deepspeed_config", "frozen_subtrees", "launch", "load_deepspeed_config",
           "foreign_launch", "load_trainable", "resolve_deepspeed_config"]
