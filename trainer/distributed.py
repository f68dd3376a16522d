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

import copy
import json
import math
import os
import shutil
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

from trainer.config import REPO_CONFIGS, Config, ConfigError, FinetuneConfig
from trainer.io import load_safetensors, load_state, save_safetensors, save_state, write_json
from trainer.runtime import Placement

if TYPE_CHECKING:
    from trainer.privacy import DPGradientEngine, PoissonBatchSampler, PrivacyLedger

DEEPSPEED_CONFIGS = REPO_CONFIGS / "deepspeed"
DEFAULT_DEEPSPEED_CONFIG: dict = {"zero_optimization": {"stage": 0}}
CHECKPOINTS = "checkpoints"
WEIGHTS_FILE = "finetuned.safetensors"   # the fine-tuned parameters, read by `dpldm sample`
STATE_FILE = "finetune-state.pt"         # resume state of a one-process run
LATEST = "latest.json"
AUTOCAST_DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "torch.bfloat16": torch.bfloat16}


# --- the DeepSpeed JSON -------------------------------------------------------------------------

def resolve_deepspeed_config(name_or_path: str) -> Path:
    """A path, or the name of a config shipped in configs/deepspeed/ (``zero3`` -> zero3.json)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
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
    if _enabled(raw, "bf16"):
        refuse("bf16.enabled", "bf16 weights would put the frozen modules in bf16 next to the fp32 modules the DP "
               "engine trains", 'for bf16 compute keep fp32 weights: "torch_autocast": {"enabled": true, '
               '"dtype": "bfloat16"}')
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


# --- ZeRO-3 for the frozen weights ----------------------------------------------------------------

def frozen_subtrees(module: nn.Module) -> list[nn.Module]:
    """The largest submodules of ``module`` whose parameters are all frozen (and that have some).

    A module with trainable parameters of its own stays whole with everything under it: the DP
    engine may recompute its forward (the torch.func rule), which must not gather weights.
    """
    params = list(module.parameters())
    if params and not any(p.requires_grad for p in params):
        return [module]
    if any(p.requires_grad for p in module.parameters(recurse=False)):
        return []
    parts: list[nn.Module] = []
    for child in module.children():
        parts.extend(frozen_subtrees(child))
    return parts


class _FrozenRoot(nn.Module):
    """The module DeepSpeed manages: the frozen parts, and a forward that runs any function.

    Running model code as ``root(fn)`` makes each call one forward of DeepSpeed's root, which is
    where ZeRO-3 starts its bookkeeping of the modules it gathers.
    """

    def __init__(self, parts: list[nn.Module]):
        super().__init__()
        self.parts = nn.ModuleList(parts)

    def forward(self, fn: Callable[[], None]) -> None:
        fn()


class FrozenPartition:
    """ZeRO-3 partitioning of the frozen weights of ``module``; with ``ds_config=None``, nothing.

    ``partition(fn, *args)`` runs ``fn`` (code that calls the module): each frozen module's
    weights are gathered for its forward (and backward) and released after. Every rank must
    make the same calls in the same order. Trainable parameters stay ordinary tensors.
    """

    def __init__(self, module: nn.Module, ds_config: Optional[dict]):
        self.module = module
        self.frozen = [p for p in module.parameters() if not p.requires_grad]
        self.root: Optional[nn.Module] = None
        parts = frozen_subtrees(module) if ds_config is not None else []
        if parts:
            import deepspeed
            engine, *_ = deepspeed.initialize(model=_FrozenRoot(parts), config=copy.deepcopy(ds_config))
            self.root = engine.module  # called directly: DeepSpeed's engine forward expects engine.backward

    def __call__(self, fn: Callable, *args, **kwargs):
        if self.root is None:
            return fn(*args, **kwargs)
        result = []  # handed back outside the root's output, which DeepSpeed expects to hold tensors only
        self.root(lambda: result.append(fn(*args, **kwargs)))
        return result[0]

    def frozen_numel(self) -> int:
        """Elements of all frozen weights (whole model)."""
        return sum(getattr(p, "ds_numel", p.numel()) for p in self.frozen)

    def resident_frozen_numel(self) -> int:
        """Elements of frozen weights this rank holds now: its partitions plus any gathered copies."""
        return sum(p.data.numel() + (p.ds_tensor.numel() if hasattr(p, "ds_tensor") else 0) for p in self.frozen)


# --- the optimizer of the trainable parameters -------------------------------------------------

class ShardedAdamW:
    """AdamW on this rank's shard of the flattened trainable parameters.

    The parameters are concatenated (model order, float32, zero-padded to a multiple of the
    world size) and rank r owns elements ``[r S, (r + 1) S)``. ``step()`` reduce-scatters the
    ``.grad`` of every rank (each rank receives the sum over ranks on its shard), steps AdamW
    on a float32 master copy of the shard (in CPU memory when ``offload``), and all-gathers
    the shards back into the parameters. AdamW is elementwise, so this equals AdamW on the
    whole parameters with the summed gradient.
    """

    def __init__(self, params: list[nn.Parameter], lr: float, weight_decay: float, rank: int, world_size: int,
                 offload: bool = False):
        if not params:
            raise ValueError("ShardedAdamW needs at least one parameter")
        self.params = list(params)
        self.rank, self.world_size = rank, world_size
        self.device = self.params[0].device
        self.numel = sum(p.numel() for p in self.params)
        self.shard_size = math.ceil(self.numel / world_size)
        self._start = rank * self.shard_size
        master_device = torch.device("cpu") if offload else self.device
        self.master = nn.Parameter(torch.zeros(self.shard_size, dtype=torch.float32, device=master_device))
        self._refresh_master()
        self.optimizer = torch.optim.AdamW([self.master], lr=lr, weight_decay=weight_decay)

    def _flatten(self, tensors: list[Tensor]) -> Tensor:
        flat = torch.zeros(self.shard_size * self.world_size, dtype=torch.float32, device=self.device)
        offset = 0
        for t in tensors:
            flat[offset: offset + t.numel()] = t.detach().reshape(-1).to(flat.device, torch.float32)
            offset += t.numel()
        return flat

    def _refresh_master(self) -> None:
        """Copy this rank's shard of the current parameter values into the master copy."""
        shard = self._flatten(list(self.params))[self._start: self._start + self.shard_size]
        with torch.no_grad():
            self.master.copy_(shard.to(self.master.device))

    def step(self) -> None:
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        shard_grad = torch.empty(self.shard_size, dtype=torch.float32, device=self.device)
        dist.reduce_scatter_tensor(shard_grad, self._flatten(grads), op=dist.ReduceOp.SUM)
        self.master.grad = shard_grad.to(self.master.device)
        self.optimizer.step()
        self.master.grad = None
        full = torch.empty(self.shard_size * self.world_size, dtype=torch.float32, device=self.device)
        dist.all_gather_into_tensor(full, self.master.detach().to(self.device))
        offset = 0
        with torch.no_grad():
            for p in self.params:
                p.copy_(full[offset: offset + p.numel()].view_as(p))
                offset += p.numel()
        self.zero_grad()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None

    def state_dict(self) -> dict:
        """This rank's shard of the optimizer state, with the layout needed to re-shard it."""
        return {"optimizer": self.optimizer.state_dict(), "numel": self.numel, "shard_size": self.shard_size,
                "rank": self.rank, "world_size": self.world_size}

    def load_shards(self, shards: list[dict]) -> None:
        """Load the optimizer state saved by every rank of a run on any world size.

        ``shards[r]`` is the ``state_dict()`` of old rank r. Call after the parameters hold the
        checkpoint's values (the master copy is taken from them).
        """
        if [s["rank"] for s in shards] != list(range(len(shards))) or shards[0]["world_size"] != len(shards):
            raise ValueError("optimizer shards: expected one state per rank of the saved run, in rank order")
        if shards[0]["numel"] != self.numel:
            raise ValueError(f"optimizer shards hold {shards[0]['numel']} elements, the trainable parameters "
                             f"{self.numel}: the checkpoint belongs to another selection of parameters")
        self._refresh_master()
        states = [s["optimizer"]["state"].get(0) for s in shards]
        if all(state is None for state in states):  # saved before the first step
            return
        state: dict[str, Any] = {}
        for key, value in states[0].items():
            if isinstance(value, Tensor) and value.dim() == 1 and value.numel() == shards[0]["shard_size"]:
                whole = torch.cat([s[key].float() for s in states])[: self.numel]
                padded = torch.zeros(self.shard_size * self.world_size, dtype=torch.float32)
                padded[: self.numel] = whole
                state[key] = padded[self._start: self._start + self.shard_size].to(self.master.device)
            else:  # the step count, the same on every rank
                state[key] = value
        self.optimizer.load_state_dict({"state": {0: state}, "param_groups": shards[0]["optimizer"]["param_groups"]})


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

    def weights_metadata(self, step: int) -> dict[str, Any]:
        """Metadata of a weights file: the step and the ledger that accounts for it."""
        return {"step": step, "ledger": json.dumps(self.ledger.state_dict()), **self.metadata}


@dataclass
class Checkpoint:
    """Where :meth:`resume` left the run: the step, the MLflow run and the ledger count saved with it."""
    step: int = 0
    mlflow_run_id: Optional[str] = None
    steps_charged: int = 0               # the ledger's count when the checkpoint was written


def load_trainable(path: Path, trainable: dict[str, nn.Parameter]) -> None:
    """Copy the weights saved in ``path`` into the trained parameters (same names, all of them)."""
    weights = load_safetensors(path).state_dict
    if set(weights) != set(trainable):
        raise ValueError(f"{path}: the saved parameters differ from this run's trained ones "
                         "(did finetune.policy or finetune.attention_from change?)")
    with torch.no_grad():
        for name, p in trainable.items():
            p.copy_(weights[name])


def launch(cfg: Config) -> Optional["DistributedRun"]:
    """The distributed runtime when launched on several processes or with a DeepSpeed config, else None."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    name = cfg.finetune.deepspeed_config
    if world_size == 1 and name is None:
        return None
    placement = Placement.from_config(cfg)  # device "auto"/"cuda": this rank's GPU (LOCAL_RANK)
    if name is None:
        settings = check_deepspeed_config(DEFAULT_DEEPSPEED_CONFIG, cfg.finetune, "default: ZeRO stage 0")
    else:
        settings = load_deepspeed_config(name, cfg.finetune)
    return DistributedRun(settings, placement)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class DistributedRun:
    """One rank of a data-parallel DP fine-tuning run (see the module docstring).

    The methods mirror the single-process runtime of ``trainer.stages.finetune``; the stage
    calls them in the same order on every rank.
    """

    def __init__(self, settings: DeepSpeedSettings, placement: Optional[Placement] = None):
        import deepspeed

        launched = any(k in os.environ for k in ("RANK", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE"))
        if not launched:  # a plain process with a DeepSpeed config: a world of one
            os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1",
                               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())})
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.placement = placement or Placement(torch.device("cpu"))
        self.device = self.placement.device
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", self.local_rank)
        deepspeed.init_distributed(dist_backend="nccl" if self.device.type == "cuda" else "gloo")
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.is_main = self.rank == 0
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.settings = settings
        self.ldm_partition: Optional[FrozenPartition] = None  # set by place()
        self.ae_partition: Optional[FrozenPartition] = None
        self._padding_rows: Optional[Tensor] = None  # set by encode()

    def autocast(self):
        """The forward's precision context (``precision: bf16``: autocast)."""
        return self.placement.autocast()

    # ------------------------------------------------------------------ collectives
    def barrier(self) -> None:
        dist.barrier()

    def sum_over_ranks(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.tolist()

    def any_rank(self, flag: bool) -> bool:
        """True when ``flag`` is set on some rank (e.g. a stop request: every rank stops at the same step)."""
        return bool(self.max_over_ranks(int(flag)))

    def max_over_ranks(self, value: int) -> int:
        t = torch.tensor([value], dtype=torch.int64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())

    def close(self) -> None:
        """Leave the process group (no barrier: after an error the other ranks may never arrive)."""
        if dist.is_initialized():
            dist.destroy_process_group()

    # ------------------------------------------------------------------ models and data
    def place(self, ldm: nn.Module, autoencoder: nn.Module) -> None:
        """Move both models to this rank's device; with ZeRO-3, partition their frozen weights."""
        ldm.to(self.device)
        autoencoder.to(self.device)
        zero3 = self.settings.config if self.settings.zero_stage == 3 else None
        self.ldm_partition = FrozenPartition(ldm, zero3)
        self.ae_partition = FrozenPartition(autoencoder, zero3)

    def layout(self) -> dict:
        """World size, ZeRO stage and the frozen elements each rank holds (a collective)."""
        partitions = self._partitions()
        held = [float(sum(part.resident_frozen_numel() for part in partitions))]
        per_rank = [torch.zeros(1, dtype=torch.float64, device=self.device) for _ in range(self.world_size)]
        dist.all_gather(per_rank, torch.tensor(held, dtype=torch.float64, device=self.device))
        return {"world_size": self.world_size, "zero_stage": self.settings.zero_stage,
                "frozen_parameters": sum(part.frozen_numel() for part in partitions),
                "frozen_parameters_held_per_rank": [int(t.item()) for t in per_rank]}

    def _partitions(self) -> tuple[FrozenPartition, FrozenPartition]:
        if self.ldm_partition is None or self.ae_partition is None:
            raise RuntimeError("DistributedRun.place(ldm, autoencoder) must run first")
        return self.ldm_partition, self.ae_partition

    def _model(self, fn: Callable, *args, **kwargs):
        """Run LDM code on this rank (through ZeRO-3, and bf16 autocast when configured)."""
        dtype = self.settings.autocast_dtype
        with torch.autocast(self.device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            return self._partitions()[0](fn, *args, **kwargs)

    @torch.no_grad()
    def encode(self, autoencoder: nn.Module, images: Tensor, labels: Tensor,
               batch_size: int = 256) -> tuple[Tensor, Tensor, Tensor]:
        """Posterior (mean, std) and labels of this rank's slice, on its device (rows as in :meth:`hold`).

        Every rank encodes the same number of batches (the partitioned encoder's gathers are collective).
        """
        local = images[self.rank::self.world_size]
        if len(local) == 0:
            raise ValueError(f"data.private: {len(images)} examples cannot be split over {self.world_size} ranks")
        batches = math.ceil(math.ceil(len(images) / self.world_size) / batch_size)
        means, stds = [], []
        for k in range(batches):
            x = local[k * batch_size: (k + 1) * batch_size]
            real = len(x) > 0
            if not real:  # keeps this rank in step with the others' collectives; discarded
                x = torch.zeros_like(images[:1])
            m, s = self._partitions()[1](autoencoder.encode, x.to(self.device))
            if real:
                means.append(m)
                stds.append(s)
        return self._with_padding(torch.cat(means), torch.cat(stds), labels[self.rank::self.world_size])

    def hold(self, mean: Tensor, std: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Keep this rank's rows of an already encoded private set (a latent cache).

        Row k holds private example ``rank + k * world_size``; one more row, a zero latent with
        label 0, is the public padding example.
        """
        if len(mean) < self.world_size:
            raise ValueError(f"data.private: {len(mean)} examples cannot be split over {self.world_size} ranks")
        sl = slice(self.rank, None, self.world_size)
        return self._with_padding(mean[sl].to(self.device), std[sl].to(self.device), labels[sl])

    def _with_padding(self, mean: Tensor, std: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        mean = torch.cat([mean, torch.zeros_like(mean[:1])])
        std = torch.cat([std, torch.zeros_like(std[:1])])
        local_labels = torch.cat([labels, labels[:1] * 0]).to(self.device)
        self._padding_rows = torch.tensor([len(mean) - 1], device=self.device)
        return mean, std, local_labels

    def make_optimizer(self, params: list[nn.Parameter], lr: float, weight_decay: float) -> ShardedAdamW:
        return ShardedAdamW(params, lr, weight_decay, self.rank, self.world_size,
                            offload=self.settings.offload_optimizer)

    # ------------------------------------------------------------------ one logical step
    def train_step(self, engine: "DPGradientEngine", optimizer: ShardedAdamW, micro_batches: list[Tensor],
                   example_losses: Callable[[Tensor], Tensor]) -> dict[str, float]:
        """Clip, noise (rank 0), sum over ranks and step; returns metrics summed over ranks.

        ``micro_batches`` are global indices of this rank's Poisson batch;
        ``example_losses(rows)`` gives the per-example losses of local rows (see :meth:`encode`).
        The metrics are non-private diagnostics (loss, realised batch size, clip fraction).
        """
        if self._padding_rows is None:
            raise RuntimeError("DistributedRun.encode must run before train_step (it builds the local rows)")
        real = [idx for idx in micro_batches if idx.numel() > 0]
        rounds = self.max_over_ranks(len(real))
        loss_sum, count = 0.0, 0
        for k in range(rounds):
            if k < len(real):
                rows = (real[k] // self.world_size).to(self.device)
                losses = self._model(example_losses, rows)
                engine.accumulate(losses)
                loss_sum += float(losses.detach().sum())
                count += len(rows)
            else:  # the public padding example: forward and backward run, its gradient is exactly 0
                engine.accumulate(self._model(example_losses, self._padding_rows) * 0.0)
        stats = engine.finalize(add_noise=self.rank == 0)
        optimizer.step()
        clipped = stats["nonprivate_clip_fraction"] * stats["nonprivate_batch_size"]  # padding is never clipped
        loss_sum, count, clipped = self.sum_over_ranks([loss_sum, float(count), clipped])
        return {"loss": loss_sum / max(1.0, count), "batch_size": count,
                "clip_fraction": clipped / count if count else 0.0}

    def check_engine(self, engine: "DPGradientEngine", probe_losses: Callable[[Tensor], Tensor], size: int) -> None:
        """The engine's self-check on ``size`` public stand-in examples, on every rank (raises EngineSelfCheckError)."""
        engine.check(lambda rows: self._model(probe_losses, rows), size)

    def sample_grid(self, make_grid: Callable[[Path], Path], path: Path) -> Path:
        """Run ``make_grid(path)`` on every rank (ZeRO-3 gathers collectively); rank 0 keeps the image."""
        if self.is_main:
            return self._model(make_grid, path)
        with tempfile.TemporaryDirectory() as tmp:
            self._model(make_grid, Path(tmp) / path.name)
        return path

    # ------------------------------------------------------------------ checkpoints
    def _rank_file(self, folder: Path, rank: int, world_size: int) -> Path:
        return folder / f"rank-{rank:05d}-of-{world_size:05d}.pt"

    def save_checkpoint(self, run_dir: Path, step: int, mlflow_run_id: Optional[str], state: TrainState) -> None:
        """Every rank writes its shard; rank 0 the weights, then ``latest.json``; older steps are removed."""
        root = run_dir / CHECKPOINTS
        folder = root / f"step-{step:06d}"
        folder.mkdir(parents=True, exist_ok=True)
        save_state({"step": step, "rank": self.rank, "world_size": self.world_size,
                    "optimizer": state.optimizer.state_dict()},
                   self._rank_file(folder, self.rank, self.world_size))
        self.barrier()
        if self.is_main:
            metadata = state.weights_metadata(step)
            weights = {k: p.detach() for k, p in state.trainable.items()}
            save_safetensors(weights, folder / "trainable.safetensors", metadata)
            write_json({"step": step, "world_size": self.world_size, "folder": folder.name,
                        "mlflow_run_id": mlflow_run_id, "ledger": state.ledger.state_dict()}, root / LATEST)
            for old in root.glob("step-*"):
                if old != folder:
                    shutil.rmtree(old, ignore_errors=True)
            save_safetensors(weights, run_dir / WEIGHTS_FILE, metadata)  # the stage's output, read by `dpldm sample`
        self.barrier()

    def resume(self, run_dir: Path, state: TrainState) -> Checkpoint:
        """Restore the last checkpoint (any world size); an empty :class:`Checkpoint` if there is none."""
        if (run_dir / STATE_FILE).is_file():
            raise ConfigError(f"{run_dir}: this run was checkpointed by a single process ({STATE_FILE}); "
                              "resume it as a single process")
        latest = run_dir / CHECKPOINTS / LATEST
        if not latest.is_file():
            return Checkpoint()
        info = json.loads(latest.read_text())
        folder, saved_world = run_dir / CHECKPOINTS / info["folder"], int(info["world_size"])
        step = int(info["step"])
        load_trainable(folder / "trainable.safetensors", state.trainable)
        shards = []
        for r in range(saved_world):
            shard = load_state(self._rank_file(folder, r, saved_world))
            if shard is None:
                raise FileNotFoundError(f"{folder}: the checkpoint lacks the file of rank {r} of {saved_world}")
            shards.append(shard)
        state.optimizer.load_shards([s["optimizer"] for s in shards])
        state.sampler.steps_done = step  # fresh OS-entropy samplers and generators from the saved step
        return Checkpoint(step, info.get("mlflow_run_id"), int(info.get("ledger", {}).get("steps_taken", step)))
