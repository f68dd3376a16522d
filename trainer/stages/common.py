"""What the stages share: run folders, data sources, model building, checkpoints, grids."""
from __future__ import annotations

import dataclasses
import hashlib
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from trainer.config import Config, ConfigError, DataSource, dump_config
from trainer.errors import RunError, UsageError, first_line
from trainer.io import load_safetensors
from trainer.runtime import Runtime

STAGE_DIRS = {"pretrain-ae": "ae", "pretrain-ldm": "ldm", "finetune": "finetune", "audit": "audit"}


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def stage_dir(cfg: Config, stage: str) -> Path:
    """``<output_dir>/<experiment>/<ae|ldm|finetune[-<finetune.name>]>``: fixed, so an interrupted stage resumes.

    Not created here: a stage creates its folder once its checks have passed.
    """
    name = STAGE_DIRS[stage]
    if stage in ("finetune", "audit") and cfg.finetune.name:
        name = f"{name}-{cfg.finetune.name}"
    return Path(cfg.output_dir) / cfg.experiment / name


PRIVACY_REPORT = "privacy-report.json"  # written by a fine-tune when it ends
NONPRIVATE = "NONPRIVATE.txt"  # beside images `dpldm sample` drew from private captions (a non-private diagnostic)
STAGE_RESULTS = {"pretrain-ae": "autoencoder.safetensors", "pretrain-ldm": "ldm.json"}


def refuse_file_as_folder(argument: str, path: str | Path | None) -> None:
    """Refuse (UsageError naming ``argument``, e.g. ``--out``) a folder argument that names a file."""
    if path and Path(path).exists() and not Path(path).is_dir():
        raise UsageError(f"{argument}: {path} is a file, not a folder")


def require_model(cfg: Config, section: dict, key: str) -> None:
    """Refuse (ConfigError) a config ``cfg`` whose model ``section`` (at ``key``: ``ldm.unet``,
    ``autoencoder.ddconfig``) is empty: a config for other stages may leave it out, the stage that builds
    the model cannot."""
    if not section:
        where = cfg.source_file or "the config"
        raise ConfigError(f"{where}: {key}: empty, and this stage builds its model from it (the CompVis "
                          "hyper-parameters: see configs/demo.yaml)")


def earlier_stage(cfg: Config, stage: str) -> Path:
    """The run folder of an earlier stage (``pretrain-ae``, ``pretrain-ldm``) this one builds on.

    Raises RunError naming the command to run first when that stage has not produced its result.
    """
    path = stage_dir(cfg, stage)
    if not (path / STAGE_RESULTS[stage]).is_file():
        config = cfg.source_file or "CONFIG"
        raise RunError(f"{path}: no {stage} result ({STAGE_RESULTS[stage]}): run `dpldm {stage} --config "
                       f"{config}` first (with the same overrides)")
    check_finished(path, stage, cfg.source_file or "CONFIG")
    return path


# the module whose weights carry the step a pretraining run reached, and its config section
_STAGE_PROGRESS = {"pretrain-ae": ("autoencoder.safetensors", "autoencoder"),
                   "pretrain-ldm": ("unet.safetensors", "ldm")}


def check_finished(path: Path, stage: str, config: str = "CONFIG") -> None:
    """Refuse a ``pretrain-ae`` / ``pretrain-ldm`` folder whose training stopped before its own
    ``config.yaml``'s ``train.steps`` (an interrupted run keeps its weights, so it looks complete).

    Folders without a step in their weights' metadata (``import-compvis``) are taken as they are.
    """
    from safetensors import SafetensorError, safe_open

    from trainer.config import load_config
    weights, section = _STAGE_PROGRESS[stage]
    if not (path / weights).is_file() or not (path / "config.yaml").is_file():
        return
    try:
        with safe_open(str(path / weights), framework="pt") as f:
            step = (f.metadata() or {}).get("step")
    except SafetensorError as err:
        raise RunError(f"{path / weights}: not a readable safetensors file ({first_line(err)}); restore it") from None
    if step is None:
        return
    steps = getattr(load_config(str(path / "config.yaml")), section).train.steps
    if int(step) < steps:
        raise RunError(f"{path}: {stage} stopped at step {step} of {steps}: run `dpldm {stage} --config {config}` "
                       "again (with the same overrides) to finish it; it resumes from its last checkpoint")


def check_model_finished(run_dir: str | Path) -> None:
    """Refuse to sample or score a model folder whose training was interrupted: a ``finetune``
    folder without its privacy report (written when the run ends), or a ``pretrain-ldm`` folder
    stopped before its ``train.steps``. Its weights are a checkpoint, not the run's result."""
    run_dir = Path(run_dir)
    if (run_dir / "finetune.json").is_file():
        if not (run_dir / PRIVACY_REPORT).is_file():
            raise RunError(f"{run_dir}: its DP fine-tuning was interrupted (no {PRIVACY_REPORT} yet): run the same "
                           "`dpldm finetune` command again to finish it; it resumes from its last checkpoint")
    else:
        check_finished(run_dir, "pretrain-ldm")


def recorded_path(target: Path, run_dir: Path) -> str:
    """How a run folder records another folder it depends on: relative to itself, so that an
    experiment folder can be copied or moved as a whole."""
    return os.path.relpath(Path(target).resolve(), Path(run_dir).resolve())


def resolve_recorded(recorded: str, run_dir: Path) -> Path:
    """The folder a run recorded with :func:`recorded_path` (absolute paths of older runs work too)."""
    path = Path(recorded)
    return path if path.is_absolute() else (Path(run_dir) / path).resolve()


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# --- data --------------------------------------------------------------------------------------

@dataclass
class ImageSet:
    """Images in [-1, 1], float32 [N, C, R, R]; labels int64 [N]; label names."""
    images: torch.Tensor
    labels: torch.Tensor
    names: list[str]


def _to_resolution(x: np.ndarray, resolution: int) -> torch.Tensor:
    """uint8 [N, H, W] -> float [-1, 1] [N, 1, R, R]: zero-pad when R exceeds H (MNIST 28 -> 32), else resize."""
    t = torch.from_numpy(x).float().div(127.5).sub(1.0).unsqueeze(1)
    h = t.shape[-1]
    if resolution == h:
        return t
    if resolution > h and (resolution - h) % 2 == 0:
        p = (resolution - h) // 2
        return F.pad(t, (p, p, p, p), value=-1.0)
    return F.interpolate(t, size=(resolution, resolution), mode="bilinear", antialias=True, align_corners=False)


def load_image_source(src: DataSource, key: str, channels: int) -> ImageSet:
    """Load an offline image source (rendered letters or MNIST: grey) into memory, as ``channels``
    channels (3: the grey repeated, as the shard reader converts a grey image for an RGB autoencoder)."""
    if src.source == "letters":
        from trainer.data.letters import render_letters
        if not src.num_examples:
            raise ConfigError(f"{key}.num_examples: rendered letters need a count")
        x, y, names = render_letters(src.num_examples, size=28, seed=src.seed, fonts=src.fonts,
                                     elastic_alpha=src.elastic)
    elif src.source == "mnist":
        from trainer.data.mnist import DIGIT_NAMES, load_mnist
        x, y = load_mnist(src.split)
        names = DIGIT_NAMES
        if src.num_examples:
            x, y = x[: src.num_examples], y[: src.num_examples]
    else:
        raise ConfigError(f"{key}.source: {src.source!r} is not an in-memory source; "
                         "use `dpldm encode` for shard sets")
    images = _to_resolution(x, src.resolution)
    return ImageSet(images.expand(-1, channels, -1, -1), torch.from_numpy(y).long(), list(names))


def conditions(cond_type: str, labels: torch.Tensor, captions: Optional[list[str]]):
    """The conditioner's input for a batch: class labels, captions, or None (unconditional)."""
    if cond_type == "class":
        return labels
    if cond_type == "text":
        if captions is None:
            raise ConfigError("ldm.conditioner.type=text needs captions: use shards with .txt captions")
        return captions
    return None


def to_device(conds, device: torch.device):
    """A batch's conditions on ``device``: label tensors move; captions (strings) and None stay."""
    return conds.to(device) if isinstance(conds, torch.Tensor) else conds


def public_batches(cfg: Config, batch_size: int, generator: torch.Generator, rank: int = 0, world_size: int = 1):
    """Endless ``(images [B, C, R, R] in [-1, 1], conditions)`` batches of ``data.public``.

    In-memory sources are sampled uniformly with ``generator`` (a different one per rank); shard
    sets are streamed with a shuffle buffer, epoch after epoch, each of ``world_size`` ranks
    reading its own shards (a resumed run starts a fresh pass over the shards).
    """
    src, cond_type = cfg.data.public, cfg.ldm.conditioner.type
    if src.source != "shards":
        data = load_image_source(src, "data.public", image_channels(cfg))
        while True:
            idx = torch.randint(0, len(data.images), (batch_size,), generator=generator)
            yield data.images[idx], conditions(cond_type, data.labels[idx], None)
    if not src.path:
        raise ConfigError("data.public.path: a shard pattern is needed for source=shards")
    from trainer.data.reader import make_loader
    loader = make_loader(src.path, src.resolution, batch_size, num_workers=src.num_workers,
                         seed=int(torch.randint(0, 2**31, (1,), generator=generator)), channels=image_channels(cfg),
                         partial=False, pad_small=True,
                         **({"rank": rank, "world_size": world_size} if world_size > 1 else {}))
    epoch = 0
    while True:
        loader.dataset.set_epoch(epoch)
        for batch in loader:
            yield batch["image"], conditions(cond_type, batch["label"], batch["caption"])
        epoch += 1


def public_label_names(cfg: Config) -> list[str]:
    """Printable class names of ``data.public`` (index = label)."""
    src = cfg.data.public
    if src.source == "letters":
        from trainer.data.letters import LETTER_NAMES
        return list(LETTER_NAMES)
    if src.source == "mnist":
        from trainer.data.mnist import DIGIT_NAMES
        return list(DIGIT_NAMES)
    from trainer.data.latent_cache import shard_label_names
    from trainer.data.reader import expand_urls
    names = list(shard_label_names(expand_urls(src.path)) or []) if src.path else []
    return names or [str(i) for i in range(cfg.ldm.conditioner.n_classes or 0)]


# --- models ------------------------------------------------------------------------------------

def build_autoencoder(cfg: Config):
    from trainer.models import AutoencoderKL
    return AutoencoderKL(ddconfig=dict(cfg.autoencoder.ddconfig), embed_dim=cfg.autoencoder.embed_dim)


def image_channels(cfg: Config) -> int:
    """Channels of the images the autoencoder takes (``autoencoder.ddconfig.in_channels``, CompVis' default 3)."""
    return int(cfg.autoencoder.ddconfig.get("in_channels", 3))


def build_unet(cfg: Config):
    from trainer.models import UNetModel
    return UNetModel(**cfg.ldm.unet)


def build_ldm(cfg: Config, scale_factor: float = 1.0, n_classes: Optional[int] = None):
    """The LatentDiffusion of ``cfg.ldm`` (UNet, conditioner, schedule); ``n_classes`` overrides the class count."""
    from trainer.diffusion import NoiseSchedule
    from trainer.pipeline import LatentDiffusion
    s = cfg.ldm.schedule
    return LatentDiffusion(build_unet(cfg), build_conditioner(cfg, n_classes),
                           NoiseSchedule(s.timesteps, s.linear_start, s.linear_end), scale_factor)


def build_conditioner(cfg: Config, n_classes: Optional[int] = None):
    """The conditioning embedder of ``ldm.conditioner`` (``n_classes`` overrides the class count)."""
    from trainer.models import ClassEmbedder, TextEmbedder, Unconditional
    c = cfg.ldm.conditioner
    if c.type == "class":
        dim = c.embed_dim or cfg.ldm.unet.get("context_dim")
        if not dim:
            raise ConfigError("ldm.conditioner.embed_dim: set it (or ldm.unet.context_dim) for a class conditioner")
        return ClassEmbedder(embed_dim=dim, n_classes=n_classes or c.n_classes)
    if c.type == "text":
        return TextEmbedder(max_length=c.max_length, context_dim=cfg.ldm.unet.get("context_dim"),
                            freeze_backbone=c.freeze_encoder)
    return Unconditional()


# --- checkpoints -------------------------------------------------------------------------------

STATE_FILE = "train-state.pt"  # a public stage's optimizer, step and generator states (trainer.stages.loop)
# what a public stage that has trained may change when it resumes (the last parts of its keys): how long it trains
# (not less than it has), how it logs and checkpoints, how many workers read its data (and, outside its sections,
# the device and the precision); its public shards may move (the same images)
RESUMABLE = ("train.steps", "train.log_every", "train.checkpoint_every", "num_workers")


def start_public_stage(cfg: Config, run_dir: Path, batch_size: int, key: str,
                       sections: tuple[str, ...]) -> tuple[Runtime, int]:
    """The runtime of a public pretraining stage (several processes under torchrun / deepspeed) and
    this rank's share of the global ``batch_size`` (config key ``key``); rank 0 writes the run's
    ``config.yaml`` and the fingerprints of its public shard images. A run that has trained resumes
    only under the same ``sections`` (see :func:`refuse_changed_settings`). The caller closes the
    runtime (``with rt:``)."""
    from trainer.data.provenance import record_public_images, unreadable
    problem = unreadable(cfg.data.public)
    if problem:
        raise ConfigError(f"data.public.path: {problem}")
    refuse_changed_settings(cfg, run_dir, sections)
    rt = Runtime.start(cfg)
    try:
        per_rank = rt.per_rank(batch_size, key)
        problem = None
        if rt.is_main:
            try:  # what a later private set is checked against; every public shard read once before training
                record_public_images(cfg.data.public, run_dir)
                save_run_config(cfg, run_dir)
            except ValueError as err:  # a file there that is not a tar shard
                problem = f"data.public.path: {first_line(err)}"
        if rt.any_rank(problem is not None):  # every rank stops, not only the one that read the shards
            raise ConfigError(problem or "data.public.path: unreadable on rank 0 (its message says why)")
        rt.barrier()
    except BaseException:
        rt.close()
        raise
    rt.announce(key.split(".")[0], batch_size)
    return rt, per_rank


def refuse_changed_settings(cfg: Config, run_dir: Path, sections: tuple[str, ...]) -> None:
    """Refuse (ConfigError naming the first key) to resume the public stage in ``run_dir`` once it has
    trained (its ``train-state.pt``) under other values of ``sections`` (config keys and the keys below
    them) than ``cfg``'s: its weights and its recorded ``config.yaml`` would disagree, and so would every
    stage built on it. The ``RESUMABLE`` keys may change."""
    from trainer.config import flatten, load_config
    from trainer.io import load_state
    recorded = run_dir / "config.yaml"
    state = load_state(run_dir / STATE_FILE)
    if state is None:
        return
    try:
        theirs = flatten(load_config(str(recorded)).to_dict())
    except (ConfigError, OSError) as err:
        raise ConfigError(f"{recorded}: cannot be read ({err}), so the settings {run_dir} trained with are unknown: "
                          "restore it, or train in another experiment=NAME") from None
    ours = flatten(as_recorded(cfg).to_dict())
    for key in sorted(set(theirs) | set(ours)):
        if not any(key == s or key.startswith(s + ".") for s in sections) or theirs.get(key) == ours.get(key):
            continue
        if key.endswith(".train.steps") and ours[key] < state["step"]:
            raise ConfigError(f"{key}: {run_dir} has trained {state['step']} steps already, more than {ours[key]}")
        if any(key.endswith("." + name) for name in RESUMABLE) or (key == "data.public.path" and
                                                                   _same_public_images(cfg.data.public, run_dir)):
            continue
        raise ConfigError(f"{key}: {run_dir} has trained with {theirs.get(key)!r}, not {ours.get(key)!r}; resume it "
                          "with its settings (only its length, logging, checkpoints, data workers, device and "
                          "precision may change), or train in another experiment=NAME or output_dir")


def _same_public_images(public: DataSource, run_dir: Path) -> bool:
    """Whether the shards of ``public`` hold exactly the images the stage in ``run_dir`` recorded
    (``public-images.npy``): the same shards moved to another folder."""
    from trainer.data.provenance import public_images, shard_images, unreadable
    recorded = public_images(run_dir)
    return bool(recorded) and unreadable(public) is None and shard_images(public) == recorded


def as_recorded(cfg: Config) -> Config:
    """``cfg`` as a run folder records it: the local shard paths of its data sources made absolute, so the
    record names the files the run read from any working folder (a later fine-tune checks its private set
    against a base's recorded public data)."""
    from trainer.data.provenance import absolute_source
    return dataclasses.replace(cfg, data=dataclasses.replace(
        cfg.data, **{key: absolute_source(getattr(cfg.data, key)) for key in ("public", "private", "test")}))


def save_run_config(cfg: Config, run_dir: Path) -> Path:
    """Write ``cfg`` :func:`as_recorded` to ``run_dir/config.yaml`` (creating the folder)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "config.yaml"
    dump_config(as_recorded(cfg), path)
    return path


def load_autoencoder(run_dir: str | Path):
    """The frozen autoencoder of a ``pretrain-ae`` run folder -> (model in eval mode, sha256 of its weights)."""
    from trainer.config import load_config
    run_dir = Path(run_dir)
    cfg = load_config(str(run_dir / "config.yaml"))
    model = build_autoencoder(cfg)
    weights = run_dir / "autoencoder.safetensors"
    try:
        model.load_state_dict(load_safetensors(weights).state_dict)
    except RunError:
        raise
    except RuntimeError as err:  # missing, unexpected or mis-shaped tensors
        raise RunError(f"{weights}: does not fit the autoencoder {run_dir / 'config.yaml'} describes "
                       f"({first_line(err)}); restore the folder's files together") from None
    model.eval().requires_grad_(False)
    return model, file_sha256(weights)


# --- images ------------------------------------------------------------------------------------

def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Images in [-1, 1] [N, C, H, W] -> uint8 [N, H, W, C] (what PNG files and the evaluators take)."""
    return ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()


def save_grid(images: torch.Tensor, path: Path, nrow: int, scale: int = 2) -> Path:
    """Images in [-1, 1] [N, C, H, W] -> a PNG grid with ``nrow`` images per row."""
    x = torch.from_numpy(to_uint8(images)).permute(0, 3, 1, 2)
    n, c, h, w = x.shape
    rows = (n + nrow - 1) // nrow
    grid = torch.zeros(c, rows * (h + 2) + 2, nrow * (w + 2) + 2, dtype=torch.uint8)
    for i in range(n):
        r, col = divmod(i, nrow)
        grid[:, 2 + r * (h + 2): 2 + r * (h + 2) + h, 2 + col * (w + 2): 2 + col * (w + 2) + w] = x[i]
    arr = grid.permute(1, 2, 0).numpy()
    img = Image.fromarray(arr[..., 0] if c == 1 else arr)
    img = img.resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path
