"""Experiment configuration: one YAML file per experiment, validated once, into typed objects.

Every section is a dataclass; the loader checks unknown keys, missing required keys and types,
and raises :class:`ConfigError` naming the file and the dotted key. Model sections keep the
CompVis latent-diffusion hyper-parameter names (``unet`` holds ``openaimodel.UNetModel``
arguments, ``autoencoder.ddconfig`` the KL autoencoder's), so existing configs carry over.

Overrides from the command line are ``dotted.key=value`` strings; values are parsed as YAML.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

import yaml

REPO_CONFIGS = Path(__file__).resolve().parent.parent / "configs"
# The finetune keys a `sweep` entry may set for its own budget (an explicit override of the key wins).
SWEEP_KEYS = ("steps", "expected_batch_size", "lr")

# `--quick` (demo, audit): the embedded default on tiny data and few steps; its numbers mean nothing
QUICK_DEMO = [
    "experiment=demo-quick",
    "data.public.num_examples=1040",
    "data.private.num_examples=2000",
    "autoencoder.train.steps=20", "autoencoder.train.batch_size=16", "autoencoder.train.checkpoint_every=10",
    "ldm.train.steps=30", "ldm.train.batch_size=32", "ldm.train.checkpoint_every=10",
    "finetune.steps=4", "finetune.expected_batch_size=64", "finetune.physical_batch_size=32",
    "finetune.log_every=1", "finetune.checkpoint_every=2",
    "sample.ddim_steps=10", "sample.num_per_class=2",
    "eval.num_per_class=10", "eval.num_real=200", "eval.epochs=2", "eval.metrics=[accuracy]",
]
# Above this, (epsilon, delta)-DP bounds the odds of any inference by e^100: no guarantee worth stating.
MAX_EPSILON = 100.0


class ConfigError(ValueError):
    """A bad configuration value; the message names the file and the key."""


# --- sections ---------------------------------------------------------------------------------

@dataclass
class DataSource:
    """Where images come from: an offline set (letters, mnist, fashion-mnist) or shards."""
    source: str = "letters"           # letters | mnist | shards
    split: str = "train"               # for mnist: train (50k) | val (10k) | trainval (60k) | test (10k)
    num_examples: Optional[int] = None  # None = the whole split (letters: required)
    resolution: int = 32
    path: Optional[str] = None         # shard pattern for source=shards (local, {000..009}, pipe:)
    num_workers: int = 2               # DataLoader workers streaming the shards
    seed: int = 0                      # for rendered letters
    fonts: str = "default"             # rendered letters: default (PIL's) | matplotlib (its text faces) | a font folder
    elastic: float = 0.0               # rendered letters: elastic distortion strength, pixels at 28x28 (0: none)


@dataclass
class DataConfig:
    public: DataSource = field(default_factory=DataSource)
    private: Optional[DataSource] = None
    test: Optional[DataSource] = None


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 64
    lr: float = 1e-4
    weight_decay: float = 0.0
    ema_decay: Optional[float] = None   # EMA of weights (pretraining); None = off
    kl_weight: float = 1e-6             # autoencoder only
    cond_drop_prob: float = 0.1         # LDM only: conditioning dropout for classifier-free guidance
    log_every: int = 50
    checkpoint_every: int = 500


@dataclass
class AutoencoderConfig:
    embed_dim: int = 4
    ddconfig: dict = field(default_factory=dict)
    train: TrainConfig = field(default_factory=TrainConfig)


@dataclass
class ConditionerConfig:
    type: str = "class"                 # class | text | none
    n_classes: Optional[int] = None     # class
    embed_dim: Optional[int] = None     # class: context width (= unet.context_dim)
    max_length: int = 77                # text
    freeze_encoder: bool = False        # text: keep the pretrained encoder frozen in public pretraining too
    label_names: Optional[list] = None  # class: printable names, index = label


@dataclass
class ScheduleConfig:
    timesteps: int = 1000
    linear_start: float = 0.0015
    linear_end: float = 0.0195


@dataclass
class LDMConfig:
    unet: dict = field(default_factory=dict)
    conditioner: ConditionerConfig = field(default_factory=ConditionerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    scale_factor: Optional[float] = None  # latent scaling; None = 1/std of the public latents
    train: TrainConfig = field(default_factory=TrainConfig)


@dataclass
class FinetuneConfig:
    """DP fine-tuning (the private stage). Exactly one of epsilon / noise_multiplier is set."""
    name: Optional[str] = None           # runs of one base side by side: folder finetune-<name>
    base: Optional[str] = None           # the pretrained LDM folder (pretrain-ldm, import-compvis); default: ldm/
    policy: str = "attention"            # attention | attention_blocks | embedder_only | full | lora
    attention_from: int = 1              # attention policy: SpatialTransformers from index k on (1-based)
    context_grad: str = "all"            # all | trainable: the conditioning learns through the trainable blocks only
    text_encoder_layers: int = 0         # text conditioner: also train its top k layers (0 = encoder frozen)
    lora_rank: int = 4                   # lora policy: rank r of the adapters on the attention projections
    lora_alpha: Optional[float] = None   # lora policy: the update is scaled by alpha / r (None: alpha = r)
    new_class_embedder: Optional[int] = None  # number of private classes; replaces the public embedder
    new_class_from: Optional[list] = None  # base class names the new classes start from (public prior), or random
    epsilon: Optional[float] = 10.0
    delta: float = 1e-5
    # the most epsilon the private set may spend over every DP run of the experiment on it, this one included
    # (all their steps composed at finetune.delta; trainer.stages.spend); None: no cap, the total is still reported
    total_epsilon: Optional[float] = None
    noise_multiplier: Optional[float] = None
    max_grad_norm: float = 1.0
    expected_batch_size: int = 256       # q = expected_batch_size / N
    steps: int = 100
    physical_batch_size: int = 64
    noise_multiplicity: int = 1          # K (timestep, noise) draws averaged per example before clipping
    cond_drop_prob: Optional[float] = None  # conditions dropped for classifier-free guidance (None: the base's)
    precision: Optional[str] = None      # the DP steps' precision: fp32 | bf16 | auto (None: the top-level precision)
    t_range: Optional[list] = None       # [lo, hi): the DP steps draw timesteps from lo..hi-1 only (None: all)
    lr: float = 1e-4
    lr_schedule: str = "constant"        # constant | cosine (from lr at the first step towards 0 at the last)
    weight_decay: float = 0.0
    ema_decay: Optional[float] = None    # EMA of the trained weights, sampled instead of the last step; None = off
    engine_mode: str = "auto"            # auto | fast | reference
    secure_noise: bool = False           # CSPRNG, floating-point-attack-resistant Gaussian (slower)
    # also log the DP steps' non-DP diagnostics of the private batches (loss, drawn batch size, clip fraction,
    # examples left out) to the MLflow run under nonprivate/: not DP, and the run is where the model is shared
    log_nonprivate: bool = False
    log_every: int = 10
    checkpoint_every: int = 50
    deepspeed_config: Optional[str] = None  # DeepSpeed JSON (a path, or a name in configs/deepspeed/): several processes


@dataclass
class SampleConfig:
    sampler: str = "ddim"                # ddim | dpmpp_2m (DPM-Solver++(2M): deterministic, fewer steps)
    ddim_steps: int = 50                 # the sampler's steps (CompVis' name, for either sampler)
    eta: float = 0.0                     # ddim only: the share of fresh noise in each step (dpmpp_2m: 0)
    guidance_scale: float = 2.0          # grids and `dpldm sample` (the evaluation may take its own)
    num_per_class: int = 8
    prompts: Optional[list] = None       # text models: the (public) prompts of the grids
    batch_size: int = 64                 # images denoised together (sampling is launch-bound on a GPU: raise it)


@dataclass
class EvalConfig:
    """Scoring the released samples against the real test split (never the private train split)."""
    num_per_class: int = 100           # labelled samples generated per class
    metrics: list = field(default_factory=lambda: ["accuracy"])  # fid | accuracy | pr
    num_real: Optional[int] = None     # real test images used (None = the whole split)
    classifier: str = "cnn"            # cnn | cnn_bn | mlp | logreg
    epochs: int = 10
    # guidance of the samples the evaluation generates (the downstream classifier's training set);
    # None = sample.guidance_scale. Diverse samples (low guidance) train a better classifier than the
    # prototypical ones (high guidance) that make a legible grid.
    guidance_scale: Optional[float] = None
    # DDIM steps of the evaluation's samples; None = sample.ddim_steps. A classifier trained on samples of 10
    # steps scored as one trained on 25 (docs/utility-demo.md), in 60% of the sampling time.
    ddim_steps: Optional[int] = None
    # the share of fresh noise in each DDIM step of the evaluation's samples; None = sample.eta
    eta: Optional[float] = None
    sampler: Optional[str] = None      # ddim | dpmpp_2m; None = sample.sampler


# the sampler's keys: ``sample.KEY`` (grids, `dpldm sample`), ``eval.KEY`` (the evaluation's; None = ``sample.KEY``)
SAMPLER_KEYS = ("sampler", "guidance_scale", "ddim_steps", "eta")
SAMPLERS = ("ddim", "dpmpp_2m")  # the values of sample.sampler / eval.sampler


@dataclass
class Config:
    experiment: str = "dpldm"
    seed: int = 0
    output_dir: str = "runs"
    data: DataConfig = field(default_factory=DataConfig)
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    ldm: LDMConfig = field(default_factory=LDMConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    device: str = "auto"                # auto (CUDA when visible, else CPU) | cpu | cuda | cuda:N
    precision: str = "fp32"             # fp32 | bf16 (autocast; DP norms, clipping and noise stay float32) | auto
    # the other budgets `dpldm demo` fine-tunes over the same base: [{epsilon: E, steps: S (optional)}, ...]
    sweep: list = field(default_factory=list)
    source_file: Optional[str] = None  # set by the loader

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def eval_sampler(self) -> dict:
        """The sampler of the evaluation's samples, ``{sampler, guidance_scale, ddim_steps, eta}``: each ``eval`` key,
        else the ``sample`` key of the same name (keyword arguments of ``trainer.runs.generate``)."""
        return {key: getattr(self.sample, key) if getattr(self.eval, key) is None else getattr(self.eval, key)
                for key in SAMPLER_KEYS}


def max_sampler_steps(sampler: str, timesteps: int) -> int:
    """The most steps ``sampler`` can take over a schedule of ``timesteps`` (DPM-Solver steps between them)."""
    return timesteps - (sampler == "dpmpp_2m")


# --- CompVis key names accepted in the free-form model sections -----------------------------

DDCONFIG_KEYS = {"double_z", "z_channels", "resolution", "in_channels", "out_ch", "ch", "ch_mult",
                 "num_res_blocks", "attn_resolutions", "dropout", "attn_type"}
UNET_KEYS = {"image_size", "in_channels", "model_channels", "out_channels", "num_res_blocks",
             "attention_resolutions", "dropout", "channel_mult", "conv_resample", "dims", "num_classes",
             "use_checkpoint", "use_fp16", "num_heads", "num_head_channels", "num_heads_upsample",
             "use_scale_shift_norm", "resblock_updown", "use_new_attention_order",
             "use_spatial_transformer", "transformer_depth", "context_dim", "n_embed", "legacy"}
CHOICES = {
    "data.public.source": {"letters", "mnist", "shards"},
    "data.private.source": {"letters", "mnist", "shards"},
    "data.test.source": {"letters", "mnist", "shards"},
    "ldm.conditioner.type": {"class", "text", "none"},
    "finetune.policy": {"attention", "attention_blocks", "embedder_only", "full", "lora"},
    "finetune.engine_mode": {"auto", "fast", "reference"},
    "finetune.context_grad": {"all", "trainable"},
    "finetune.lr_schedule": {"constant", "cosine"},
    "eval.classifier": {"cnn", "cnn_bn", "mlp", "logreg"},
    "sample.sampler": set(SAMPLERS),
    "eval.sampler": set(SAMPLERS),
    "precision": {"fp32", "bf16", "auto"},
    "finetune.precision": {"fp32", "bf16", "auto"},
}


NORM_GROUPS = 32  # GroupNorm(32, channels) in every UNet and autoencoder block


def _check_models_build(cfg: Config) -> None:
    """Build the UNet and the autoencoder on the meta device (no memory, no weights), so that an
    architecture the model code refuses is reported here, naming its section, before a stage has
    written or computed anything."""
    for key, section in (("ldm.unet", cfg.ldm.unet), ("autoencoder.ddconfig", cfg.autoencoder.ddconfig)):
        if section:  # a config without that model leaves it empty (its stages refuse it)
            section_json = json.dumps(section, sort_keys=True, default=repr)
            error = _model_build_error(key, section_json, cfg.autoencoder.embed_dim)
            if error:
                raise ConfigError(f"{key}: the model cannot be built from it: {error}")


@functools.lru_cache(maxsize=64)  # ~0.1-0.3 s per build; a run loads the same config several times
def _model_build_error(key: str, section_json: str, embed_dim: int) -> str | None:
    import torch

    from trainer.models import AutoencoderKL, UNetModel

    section = json.loads(section_json)
    try:
        with torch.device("meta"):
            if key == "ldm.unet":
                UNetModel(**section)
            else:
                AutoencoderKL(ddconfig=section, embed_dim=embed_dim)
    except (ValueError, TypeError, AssertionError, ZeroDivisionError, RuntimeError) as err:
        return str(err)
    return None


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1} (a config's dotted keys); lists stay values."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict) and v:
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out


# --- loading ----------------------------------------------------------------------------------

def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], where)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping (section), got {type(value).__name__}")
        return _build(tp, value, where)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            # YAML 1.1 reads "1e-5" as a string; accept numeric strings
            try:
                return float(value) if isinstance(value, str) else _fail(where, tp, value)
            except ValueError:
                _fail(where, tp, value)
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            _fail(where, tp, value)
        return value
    if tp in (str, bool, list, dict):
        if not isinstance(value, tp):
            _fail(where, tp, value)
        return value
    raise TypeError(f"unsupported config type {tp} at {where}")


def _fail(where: str, tp: Any, value: Any):
    raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")


def _build(cls: type, raw: dict, prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        key = f"{prefix}.{unknown[0]}" if prefix else unknown[0]
        raise ConfigError(f"{key}: unknown key (allowed here: {', '.join(sorted(names))})")
    kwargs = {}
    for name, value in raw.items():
        key = f"{prefix}.{name}" if prefix else name
        kwargs[name] = _coerce(value, hints[name], key)
    return cls(**kwargs)


def _numbers(obj: Any, prefix: str = "") -> Iterator[tuple[str, float]]:
    """(key, value) of every float in the config, its dict sections (``ldm.unet``) and lists included."""
    if dataclasses.is_dataclass(obj):
        obj = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        for name, value in obj.items():
            yield from _numbers(value, f"{prefix}.{name}" if prefix else str(name))
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            yield from _numbers(value, f"{prefix}[{i}]")
    elif isinstance(obj, float):
        yield prefix, obj


def _validate(cfg: Config) -> None:
    def check(cond: bool, key: str, msg: str) -> None:
        if not cond:
            raise ConfigError(f"{key}: {msg}")

    for key, value in _numbers(cfg):  # NaN or inf is never a setting: it trains NaN weights or fails deep inside
        check(math.isfinite(value), key, f"must be a finite number, got {value}")
    # Folder names under output_dir: a path here would put a run where the experiment's privacy accounting
    # (its runs are the folders one level below output_dir/experiment) and its lock never look.
    for key, folder in (("experiment", cfg.experiment), ("finetune.name", cfg.finetune.name)):
        if folder is not None:
            check(folder not in ("", ".", "..") and not any(c in folder for c in "/\\\0"), key,
                  f"must be one folder name (no '/', '\\', '.' or '..'), got {folder!r}")
    for key, allowed in CHOICES.items():
        obj: Any = cfg
        for part in key.split("."):
            obj = getattr(obj, part) if obj is not None else None
        if obj is not None:
            check(obj in allowed, key, f"must be one of {sorted(allowed)}, got {obj!r}")
    for key, section, allowed in (("ldm.unet", cfg.ldm.unet, UNET_KEYS),
                                  ("autoencoder.ddconfig", cfg.autoencoder.ddconfig, DDCONFIG_KEYS)):
        for k in section:
            check(k in allowed, f"{key}.{k}", "unknown key (CompVis hyper-parameter names are accepted)")
    check(cfg.device in ("auto", "cpu", "cuda") or (cfg.device.startswith("cuda:") and cfg.device[5:].isdigit()),
          "device", f"must be auto, cpu, cuda or cuda:N, got {cfg.device!r}")
    for key in ("public", "private", "test"):
        src = getattr(cfg.data, key)
        if src is not None and src.source == "letters":
            check(src.elastic >= 0, f"data.{key}.elastic", f"must be >= 0, got {src.elastic}")
            try:
                from trainer.data.letters import font_files
                font_files(src.fonts)
            except ValueError as err:
                raise ConfigError(f"data.{key}.fonts: {err}") from None
        if src is not None and src.source == "mnist":
            from trainer.data.mnist import SPLIT_NAMES
            check(src.split in SPLIT_NAMES, f"data.{key}.split",
                  f"must be one of {', '.join(SPLIT_NAMES)} for mnist, got {src.split!r}")
    if cfg.data.private is not None:
        from trainer.data.provenance import shared_examples
        shared = shared_examples(cfg.data.public, cfg.data.private)
        check(not shared, "data.private", f"shares examples with data.public ({'; '.join(shared)}), on which the "
              "autoencoder and the LDM are pretrained without DP: the private set must be disjoint from it")
        shared = shared_examples(cfg.data.test, cfg.data.private)
        check(not shared, "data.test", f"shares examples with data.private ({'; '.join(shared)}): the evaluation's "
              "scores would not be DP (and would test on training data); test on a held-out set")
    for key, decay in (("autoencoder.train.ema_decay", cfg.autoencoder.train.ema_decay),
                       ("ldm.train.ema_decay", cfg.ldm.train.ema_decay), ("finetune.ema_decay", cfg.finetune.ema_decay)):
        check(decay is None or 0 < decay < 1, key, f"must be in (0, 1) or null (off), got {decay}")
    for key, lr in (("autoencoder.train.lr", cfg.autoencoder.train.lr), ("ldm.train.lr", cfg.ldm.train.lr),
                    ("finetune.lr", cfg.finetune.lr)):
        check(0 < lr < float("inf"), key, f"must be a finite number > 0, got {lr}")
    for key, train in (("autoencoder.train", cfg.autoencoder.train), ("ldm.train", cfg.ldm.train)):
        for name in ("steps", "batch_size", "log_every", "checkpoint_every"):
            value = getattr(train, name)
            check(value > 0, f"{key}.{name}", f"must be > 0, got {value}")
        check(train.weight_decay >= 0, f"{key}.weight_decay", f"must be >= 0, got {train.weight_decay}")
    check(cfg.finetune.weight_decay >= 0, "finetune.weight_decay", f"must be >= 0, got {cfg.finetune.weight_decay}")
    check(cfg.autoencoder.train.kl_weight >= 0, "autoencoder.train.kl_weight",
          f"must be >= 0, got {cfg.autoencoder.train.kl_weight}")
    check(0 <= cfg.ldm.train.cond_drop_prob <= 1, "ldm.train.cond_drop_prob",
          f"must be in [0, 1], got {cfg.ldm.train.cond_drop_prob}")
    check(cfg.ldm.scale_factor is None or cfg.ldm.scale_factor > 0, "ldm.scale_factor",
          f"must be > 0 or null (1/std of the public latents), got {cfg.ldm.scale_factor}")
    sched = cfg.ldm.schedule
    check(sched.timesteps > 0, "ldm.schedule.timesteps", f"must be > 0, got {sched.timesteps}")
    check(0 < sched.linear_start <= sched.linear_end < 1, "ldm.schedule.linear_start",
          f"needs 0 < linear_start <= linear_end < 1 (the noise schedule's betas), got {sched.linear_start} and "
          f"{sched.linear_end}")
    for key in ("public", "private", "test"):
        src = getattr(cfg.data, key)
        if src is not None:
            check(src.resolution > 0, f"data.{key}.resolution", f"must be > 0, got {src.resolution}")
            check(src.num_examples is None or src.num_examples > 0, f"data.{key}.num_examples",
                  f"must be > 0 or null (the whole split), got {src.num_examples}")
            check(src.num_workers >= 0, f"data.{key}.num_workers", f"must be >= 0, got {src.num_workers}")
    for key, section, names in (("ldm.unet", cfg.ldm.unet, ("image_size", "in_channels", "out_channels",
                                                            "model_channels", "context_dim", "transformer_depth")),
                                ("autoencoder.ddconfig", cfg.autoencoder.ddconfig,
                                 ("ch", "z_channels", "resolution", "in_channels", "out_ch", "num_res_blocks"))):
        for name in names:  # sizes a model is built from: a 0 fails deep inside it, or trains nothing
            value = section.get(name)
            check(value is None or (isinstance(value, int) and not isinstance(value, bool) and value > 0),
                  f"{key}.{name}", f"must be an integer > 0, got {value!r}")
    for name in ("num_heads", "num_head_channels"):  # CompVis: -1 = set by the other one
        value = cfg.ldm.unet.get(name)
        check(value is None or (isinstance(value, int) and not isinstance(value, bool) and (value > 0 or value == -1)),
              f"ldm.unet.{name}", f"must be an integer > 0, or -1 (set by the other of num_heads, num_head_channels), "
              f"got {value!r}")
    check(cfg.autoencoder.embed_dim > 0, "autoencoder.embed_dim", f"must be > 0, got {cfg.autoencoder.embed_dim}")
    for key, section, width, mult in (("ldm.unet", cfg.ldm.unet, "model_channels", "channel_mult"),
                                      ("autoencoder.ddconfig", cfg.autoencoder.ddconfig, "ch", "ch_mult")):
        base, mults = section.get(width), section.get(mult)
        check(mults is None or (isinstance(mults, (list, tuple)) and len(mults) > 0
                                and all(isinstance(m, int) and not isinstance(m, bool) and m > 0 for m in mults)),
              f"{key}.{mult}", f"must be a non-empty list of integers > 0 (one per resolution), got {mults!r}")
        if isinstance(base, int) and isinstance(mults, (list, tuple)):
            widths = [base * m for m in mults]
            check(all(isinstance(w, int) and w % NORM_GROUPS == 0 for w in widths), f"{key}.{width}",
                  f"{width} x {mult} = {widths}: every width must be a multiple of {NORM_GROUPS} (each block "
                  f"normalises its channels in {NORM_GROUPS} groups, as CompVis)")
    ft = cfg.finetune
    for name in ("log_every", "checkpoint_every"):
        check(getattr(ft, name) > 0, f"finetune.{name}", f"must be > 0, got {getattr(ft, name)}")
    check(0 < ft.max_grad_norm < float("inf"), "finetune.max_grad_norm",
          f"must be a finite number > 0 (the clipping bound), got {ft.max_grad_norm}")
    check(0 < ft.delta < 1, "finetune.delta", f"must be in (0, 1), got {ft.delta}")
    check(ft.physical_batch_size > 0, "finetune.physical_batch_size", f"must be > 0, got {ft.physical_batch_size}")
    check(ft.expected_batch_size > 0, "finetune.expected_batch_size", f"must be > 0, got {ft.expected_batch_size}")
    check(ft.steps > 0, "finetune.steps", f"must be > 0, got {ft.steps}")
    check(ft.noise_multiplicity >= 1, "finetune.noise_multiplicity", f"must be >= 1, got {ft.noise_multiplicity}")
    check(ft.cond_drop_prob is None or 0 <= ft.cond_drop_prob <= 1, "finetune.cond_drop_prob",
          f"must be in [0, 1] or null (the base's ldm.train.cond_drop_prob), got {ft.cond_drop_prob}")
    if ft.t_range is not None:
        T = cfg.ldm.schedule.timesteps
        check(isinstance(ft.t_range, list) and len(ft.t_range) == 2
              and all(isinstance(v, int) and not isinstance(v, bool) for v in ft.t_range)
              and 0 <= ft.t_range[0] < ft.t_range[1] <= T, "finetune.t_range",
              f"must be [lo, hi) with integers 0 <= lo < hi <= ldm.schedule.timesteps ({T}) or null, got {ft.t_range!r}")
    if ft.new_class_from is not None:
        check(bool(ft.new_class_embedder) and len(ft.new_class_from) == ft.new_class_embedder,
              "finetune.new_class_from", f"needs one base class per new class (finetune.new_class_embedder: "
              f"{ft.new_class_embedder}), got {len(ft.new_class_from)}")
    check(ft.attention_from >= 1, "finetune.attention_from", f"counts from 1, got {ft.attention_from}")
    check(ft.context_grad == "all" or ft.policy in ("attention", "lora"), "finetune.context_grad",
          f"trainable needs finetune.policy attention or lora (trainable SpatialTransformers for the conditioning "
          f"to learn through), got policy {ft.policy!r}")
    check(ft.lora_rank >= 1, "finetune.lora_rank", f"must be >= 1, got {ft.lora_rank}")
    check(ft.lora_alpha is None or ft.lora_alpha > 0, "finetune.lora_alpha",
          f"must be > 0 or null (alpha = lora_rank), got {ft.lora_alpha}")
    check(ft.text_encoder_layers >= 0, "finetune.text_encoder_layers", f"must be >= 0, got {ft.text_encoder_layers}")
    check((ft.epsilon is None) != (ft.noise_multiplier is None), "finetune.epsilon",
          "set exactly one of finetune.epsilon (sigma is calibrated) and finetune.noise_multiplier")
    def check_epsilon(eps: Any, key: str) -> None:
        check(isinstance(eps, (int, float)) and not isinstance(eps, bool) and 0 < eps <= MAX_EPSILON, key,
              f"must be in (0, {MAX_EPSILON:g}] (a finite budget that means something), got {eps!r}")

    if ft.epsilon is not None:
        check_epsilon(ft.epsilon, "finetune.epsilon")
    if ft.total_epsilon is not None:
        check_epsilon(ft.total_epsilon, "finetune.total_epsilon")
    if ft.noise_multiplier is not None:
        check(0 < ft.noise_multiplier < float("inf"), "finetune.noise_multiplier",
              f"must be a finite number > 0, got {ft.noise_multiplier}")
    if ft.deepspeed_config is not None:  # its contents are checked when fine-tuning starts (trainer.distributed.deepspeed_config)
        check(ft.deepspeed_config.strip() != "", "finetune.deepspeed_config",
              "must name a DeepSpeed JSON file (a path, or a name in configs/deepspeed/ such as zero3)")
    for i, entry in enumerate(cfg.sweep):
        check(isinstance(entry, dict) and "epsilon" in entry and set(entry) <= {"epsilon", *SWEEP_KEYS}, f"sweep[{i}]",
              f"must be a mapping with epsilon and optionally {', '.join(SWEEP_KEYS)}, got {entry!r}")
        check_epsilon(entry["epsilon"], f"sweep[{i}].epsilon")
        for key in ("steps", "expected_batch_size"):
            value = entry.get(key, 1)
            check(isinstance(value, int) and not isinstance(value, bool) and value > 0, f"sweep[{i}].{key}",
                  f"must be an integer > 0, got {value!r}")
        lr = entry.get("lr", 1.0)
        check(isinstance(lr, (int, float)) and not isinstance(lr, bool) and 0 < lr < float("inf"), f"sweep[{i}].lr",
              f"must be a finite number > 0, got {lr!r}")
    for key in ("in_channels", "out_channels"):  # the LDM denoises the autoencoder's latents
        channels = cfg.ldm.unet.get(key)
        check(channels is None or channels == cfg.autoencoder.embed_dim, f"ldm.unet.{key}",
              f"must equal autoencoder.embed_dim (the latent channels, {cfg.autoencoder.embed_dim}), got {channels}")
    cond = cfg.ldm.conditioner
    if cond.type == "class":
        check(cond.n_classes is not None and cond.n_classes > 0, "ldm.conditioner.n_classes",
              "a class conditioner needs n_classes > 0")
        check(cond.label_names is None or len(cond.label_names) == cond.n_classes, "ldm.conditioner.label_names",
              f"needs one name per class (n_classes: {cond.n_classes}), got {len(cond.label_names or [])}")
    for name in ("ddim_steps", "num_per_class", "batch_size"):
        check(getattr(cfg.sample, name) > 0, f"sample.{name}", "must be > 0")
    for section, chosen in (("sample", vars(cfg.sample)), ("eval", cfg.eval_sampler())):
        most = max_sampler_steps(chosen["sampler"], sched.timesteps)
        check(chosen["ddim_steps"] <= most, f"{section}.ddim_steps",
              f"must be at most {most} with {section}.sampler {chosen['sampler']} (ldm.schedule.timesteps: "
              f"{sched.timesteps}), got {chosen['ddim_steps']}")
    check(cfg.eval.epochs > 0, "eval.epochs", f"must be > 0, got {cfg.eval.epochs}")
    check(cfg.eval.num_real is None or cfg.eval.num_real > 0, "eval.num_real",
          f"must be > 0 or null (the whole test split), got {cfg.eval.num_real}")
    check(cfg.eval.num_per_class >= 0, "eval.num_per_class", f"must be >= 0, got {cfg.eval.num_per_class}")
    check(cfg.eval.ddim_steps is None or cfg.eval.ddim_steps > 0, "eval.ddim_steps",
          f"must be > 0 or null (sample.ddim_steps), got {cfg.eval.ddim_steps}")
    # above 1 the DDIM update's deterministic share sqrt(1 - abar_prev - sigma^2) turns imaginary
    for key, eta in (("sample.eta", cfg.sample.eta), ("eval.eta", cfg.eval.eta)):
        check(eta is None or 0 <= eta <= 1, key, f"must be in [0, 1] (0: DDIM, 1: DDPM-like), got {eta}")
    for section, chosen in (("sample", vars(cfg.sample)), ("eval", cfg.eval_sampler())):
        check(chosen["sampler"] != "dpmpp_2m" or chosen["eta"] == 0, f"{section}.eta",
              f"must be 0 with the deterministic sampler dpmpp_2m ({section}.sampler), got {chosen['eta']}")
    for key, scale in (("sample.guidance_scale", cfg.sample.guidance_scale),
                       ("eval.guidance_scale", cfg.eval.guidance_scale)):
        check(scale is None or scale >= 0, key, f"must be >= 0 (1: no guidance), got {scale}")
    bad = sorted(set(cfg.eval.metrics) - {"fid", "accuracy", "pr"})
    check(not bad, "eval.metrics", f"unknown metrics {bad}; choose from fid, accuracy, pr")
    _check_models_build(cfg)  # last: the checks above name a key more precisely


def parse_yaml(text: str, where: str) -> Any:
    """``text`` parsed as YAML; a syntax error is a one-line ConfigError naming ``where`` and the position."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{where}: not valid YAML{at}: {problem}") from None


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply ``a.b.c=value`` overrides (value parsed as YAML) to a raw config mapping."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value (e.g. finetune.epsilon=5)")
        key, text = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"override {item!r}: expected key=value with a dotted key (e.g. finetune.epsilon=5)")
        node = raw
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {key}: {part} is not a section")
        node[parts[-1]] = parse_yaml(text, f"override {key}")
    return raw


def resolve_config_path(name_or_path: str) -> Path:
    """A path, or the name of a config shipped in configs/ (``demo`` -> configs/demo.yaml)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = REPO_CONFIGS / f"{name_or_path}.yaml"
    if shipped.is_file():  # before a folder of that name here (e.g. runs written to ./demo)
        return shipped
    if path.is_dir():
        raise ConfigError(f"{name_or_path}: a folder, not a config file")
    if len(path.parts) > 1 or path.suffix in (".yaml", ".yml"):  # a path, not a shipped config's name
        raise ConfigError(f"{name_or_path}: config file not found")
    shipped_names = ", ".join(sorted(p.stem for p in REPO_CONFIGS.glob("*.yaml")))
    raise ConfigError(f"{name_or_path}: config file not found, nor a shipped config ({shipped_names})")


def load_config(name_or_path: str, overrides: list[str] | None = None) -> Config:
    path = resolve_config_path(name_or_path)
    try:
        text = path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError) as err:
        raise ConfigError(f"{path}: not a readable YAML text file ({type(err).__name__}: {err})") from None
    raw = parse_yaml(text, str(path))
    if raw is None:
        raise ConfigError(f"{path}: empty: give a config (e.g. a copy of configs/demo.yaml)")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    try:
        return config_from_dict(apply_overrides(raw, overrides or []), source=str(path))
    except ConfigError as err:
        raise ConfigError(_named_by_override(str(err), str(path), overrides or [])) from None


def _named_by_override(message: str, source: str, overrides: list[str]) -> str:
    """``message`` (``SOURCE: KEY: ...``) said of the command-line override that set KEY (or a section
    above it), the last one, rather than of the file ``source``."""
    inner = message.removeprefix(f"{source}: ")
    key = inner.split(":", 1)[0]
    for item in reversed(overrides):
        given = item.split("=", 1)[0].strip()
        if key == given or key.startswith(given + "."):
            return f"override {item!r} (over {source}): {inner}"
    return message


def config_from_dict(raw: dict, source: str = "<dict>") -> Config:
    raw = dict(raw)
    raw.pop("source_file", None)
    try:
        cfg = _build(Config, raw, "")
        _validate(cfg)
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None
    cfg.source_file = source
    return cfg


def dump_config(cfg: Config, out: str | Path | typing.TextIO) -> None:
    """The resolved config as YAML, to a file path or an open text stream."""
    text = yaml.safe_dump(cfg.to_dict(), sort_keys=False)
    if isinstance(out, (str, Path)):
        Path(out).write_text(text)
    else:
        out.write(text)
