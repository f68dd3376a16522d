"""Run folders of a trained pipeline: loading one, sampling from it, exporting it whole.

A ``pretrain-ldm`` or ``import-compvis`` folder holds ``ldm.json``, ``unet.safetensors``,
``cond_stage_model.safetensors`` and ``config.yaml``, and names its autoencoder folder; a
``finetune`` folder holds only the trained parameters and ``finetune.json`` naming its base.
Folders record the folders they depend on relative to themselves (absolute paths of older runs
are read too), so an experiment folder can be copied or moved as a whole.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Optional, Sequence

import torch
from tqdm import tqdm

from trainer.config import Config, load_config
from trainer.distributed.checkpoint import EMA_FILE, WEIGHTS_FILE
from trainer.errors import RunError, first_line
from trainer.pipeline import LatentDiffusion
from trainer.io import load_safetensors, write_json
from trainer.stages.common import build_ldm, load_autoencoder, recorded_path, resolve_recorded, save_grid


def load_pipeline(run_dir: str | Path, device: torch.device | str = "cpu"
                  ) -> tuple[LatentDiffusion, torch.nn.Module, dict, Config]:
    """A ``pretrain-ldm``, ``import-compvis`` or ``finetune`` run folder -> (ldm, autoencoder, meta, config),
    in eval mode on ``device``.

    A fine-tuned folder holds only the trained parameters (``finetuned.safetensors``, or their EMA
    ``finetuned-ema.safetensors`` when the run kept one) and
    ``finetune.json`` naming its frozen base; they are laid over the base weights. Folders record
    the folders they depend on relative to themselves, so an experiment can be copied or moved.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunError(f"{run_dir}: no such run folder")
    ft_meta_path = run_dir / "finetune.json"
    ft_meta = read_run_json(ft_meta_path, ("base", "trainable")) if ft_meta_path.is_file() else None
    base_dir = resolve_recorded(ft_meta["base"], run_dir) if ft_meta else run_dir
    meta_path = base_dir / "ldm.json"
    if ft_meta and not meta_path.is_file():
        raise RunError(f"{ft_meta_path}: its base LDM {base_dir} (recorded as {ft_meta['base']!r}) has no ldm.json; "
                       "copy the base folder along with the fine-tuned one")
    if not meta_path.is_file():
        raise RunError(f"{run_dir}: not an LDM run folder (no ldm.json or finetune.json): give the folder of "
                       "pretrain-ldm, import-compvis or finetune")
    meta = read_run_json(meta_path, ("scale_factor", "latent_shape", "autoencoder"))
    cfg = load_config(str(run_dir / "config.yaml"))
    n_classes = ft_meta.get("n_classes") if ft_meta else None  # a fresh embedder replaced the public one
    ldm = build_ldm(cfg, meta["scale_factor"], n_classes=n_classes)
    try:
        ldm.unet.load_state_dict(load_safetensors(base_dir / "unet.safetensors").state_dict)
        if not n_classes:
            ldm.cond_stage_model.load_state_dict(load_safetensors(base_dir / "cond_stage_model.safetensors").state_dict)
    except RunError:
        raise
    except RuntimeError as err:  # missing, unexpected or mis-shaped tensors
        raise RunError(f"{base_dir}: its weights do not fit the model its config.yaml describes "
                       f"({first_line(err)}); restore the folder's files together") from None
    if ft_meta:
        if ft_meta.get("lora"):  # the adapters the run trained, on the frozen base projections
            from trainer.selection import add_adapters
            add_adapters(ldm, ft_meta["lora"])
        weights = run_dir / (EMA_FILE if (run_dir / EMA_FILE).is_file() else WEIGHTS_FILE)  # the EMA when kept
        tuned = load_safetensors(weights).state_dict
        names = dict(ldm.named_parameters())
        unknown = sorted(set(tuned) - set(names))
        if unknown or set(tuned) != set(ft_meta["trainable"]):
            raise RunError(f"{run_dir}: {weights.name} does not match finetune.json "
                           f"(unknown parameters: {unknown[:5]})")
        ldm.load_state_dict(tuned, strict=False)
        meta = {**meta, "label_names": ft_meta.get("label_names") or meta.get("label_names"), "finetune": ft_meta}
    ae_dir = resolve_recorded(meta["autoencoder"], base_dir)
    autoencoder, ae_hash = load_autoencoder(ae_dir)
    if meta.get("autoencoder_sha256") not in (None, ae_hash):
        raise RunError(f"{ae_dir}: its autoencoder.safetensors is not the one {base_dir} was trained on (its sha256 "
                       "differs from ldm.json's autoencoder_sha256: trained further or replaced since); the LDM's "
                       "latents decode only with that one: restore it, or pretrain the LDM again on this one")
    ldm.eval().requires_grad_(False).to(device)
    autoencoder.to(device)
    return ldm, autoencoder, meta, cfg


def read_run_json(path: Path, required: Sequence[str] = ()) -> dict:
    """A run folder's JSON record (``ldm.json``, ``finetune.json``) holding the ``required`` keys, or RunError
    naming the file."""
    try:
        record = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise RunError(f"{path}: unreadable ({err}); restore it") from None
    missing = [key for key in required if not isinstance(record, dict) or key not in record]
    if missing:
        raise RunError(f"{path}: lacks {', '.join(missing)}; restore it")
    return record


def override_sampler(settings: dict, **overrides) -> dict:
    """``settings`` ({sampler, guidance_scale, ddim_steps, eta}) with the ``overrides`` that are not None.
    Switching to the deterministic dpmpp_2m without an eta sets eta 0; dpmpp_2m with an eta above 0
    raises ValueError naming the eta."""
    out = {**settings, **{k: v for k, v in overrides.items() if v is not None}}
    if overrides.get("sampler") == "dpmpp_2m" and overrides.get("eta") is None:
        out["eta"] = 0.0
    if out["sampler"] == "dpmpp_2m" and out["eta"] != 0:
        raise ValueError(f"eta: must be 0 with the deterministic sampler dpmpp_2m, got {out['eta']}")
    return out


@torch.no_grad()
def generate(ldm: LatentDiffusion, autoencoder, conds: Sequence, latent_shape: tuple[int, ...], cfg: Config,
             generator: torch.Generator, batch_size: Optional[int] = None, progress: bool = True,
             guidance_scale: Optional[float] = None, ddim_steps: Optional[int] = None,
             eta: Optional[float] = None, sampler: Optional[str] = None) -> torch.Tensor:
    """Images in [-1, 1] for each condition (class label or prompt), ``sample.batch_size`` at a time,
    by ``sample.sampler`` guided by ``sample.guidance_scale`` in ``sample.ddim_steps`` steps with
    ``sample.eta``, unless ``sampler``, ``guidance_scale``, ``ddim_steps`` or ``eta`` is given
    (``**cfg.eval_sampler()``: the evaluation's)."""
    batch_size = batch_size or cfg.sample.batch_size
    scale = cfg.sample.guidance_scale if guidance_scale is None else guidance_scale
    steps = cfg.sample.ddim_steps if ddim_steps is None else ddim_steps
    eta = cfg.sample.eta if eta is None else eta
    sampler = cfg.sample.sampler if sampler is None else sampler
    out = []
    for i in tqdm(range(0, len(conds), batch_size), desc="sample", disable=not progress, leave=False):
        c = conds[i:i + batch_size]
        if isinstance(conds, torch.Tensor):
            c = c.clone().to(next(ldm.parameters()).device)
        z = ldm.sample_latents(c, latent_shape, steps=steps, eta=eta, guidance_scale=scale,
                               generator=generator, sampler=sampler)
        if z.device.type == "cpu":  # the decoder's convolutions run faster channels-last on a CPU (1.4-1.6x)
            z = z.contiguous(memory_format=torch.channels_last)
        out.append(autoencoder.decode(z).clamp(-1, 1).contiguous().cpu())
    return torch.cat(out)


def class_grid(ldm: LatentDiffusion, autoencoder, latent_shape, cfg: Config, names: list[str], path: Path,
               generator: torch.Generator, per_class: Optional[int] = None) -> Path:
    """One row per class (or per ``sample.prompts`` entry for text models), ``sample.num_per_class`` each -> PNG."""
    k = per_class or cfg.sample.num_per_class
    kind = cfg.ldm.conditioner.type
    if kind == "class":
        conds: Sequence = torch.arange(len(names)).repeat_interleave(k)
    elif kind == "text":
        conds = [p for p in (cfg.sample.prompts or [""]) for _ in range(k)]
    else:
        conds = [None] * (k * 4)
    return save_grid(generate(ldm, autoencoder, conds, latent_shape, cfg, generator), path, nrow=k)


def export_bundle(run_dir: str | Path, out: str | Path) -> Path:
    """Copy a run folder with everything it depends on into ``out``: ``out/run``, ``out/base``
    (for a fine-tuned run) and ``out/autoencoder``, with the links rewritten. Returns ``out/run``."""
    run_dir, out = Path(run_dir), Path(out)
    ft_path = run_dir / "finetune.json"
    ft_meta = json.loads(ft_path.read_text()) if ft_path.is_file() else None
    base_dir = resolve_recorded(ft_meta["base"], run_dir) if ft_meta else run_dir
    meta = json.loads((base_dir / "ldm.json").read_text())
    ae_dir = resolve_recorded(meta["autoencoder"], base_dir)
    kept = ("config.yaml", "ldm.json", "unet.safetensors", "cond_stage_model.safetensors",
            "autoencoder.safetensors", WEIGHTS_FILE, EMA_FILE, "finetune.json", "privacy-report.json")
    targets = {"autoencoder": ae_dir, "base": base_dir, "run": run_dir} if ft_meta else \
        {"autoencoder": ae_dir, "run": run_dir}
    for name, src in targets.items():
        (out / name).mkdir(parents=True, exist_ok=True)
        for file in kept:
            if (src / file).is_file():
                shutil.copy2(src / file, out / name / file)
    ldm_home = out / ("base" if ft_meta else "run")
    write_json({**meta, "autoencoder": recorded_path(out / "autoencoder", ldm_home)}, ldm_home / "ldm.json")
    if ft_meta:
        write_json({**ft_meta, "base": recorded_path(out / "base", out / "run")}, out / "run" / "finetune.json")
    return out / "run"
