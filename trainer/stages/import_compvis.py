"""Stage ``import-compvis``: a public CompVis latent-diffusion checkpoint -> a run folder to fine-tune.

``dpldm import-compvis CONFIG.yaml MODEL.ckpt OUT`` reads an official latent-diffusion config
(``model.target: ldm.models.diffusion.ddpm.LatentDiffusion``) and its checkpoint (a ``.ckpt``
holding ``state_dict``, or safetensors; keys ``model.diffusion_model.*``,
``first_stage_model.*``, ``cond_stage_model.*``) and writes OUT as a run folder that
``finetune`` (``finetune.base=OUT``), ``sample`` and ``evaluate`` accept:
``config.yaml``, ``ldm.json``, ``unet.safetensors``, ``cond_stage_model.safetensors`` and
``autoencoder/``. Checkpoints are read with ``torch.load(weights_only=True)``; missing, unknown
or mis-shaped keys are an error that lists them, and nothing is written.

Supported: KL autoencoders (``ldm.models.autoencoder.AutoencoderKL``), class-conditional
(``ClassEmbedder``, cross-attention) and unconditional models, epsilon prediction on the
linear schedule. A class embedder's last row is used as the null class of classifier-free
guidance, as in the cin256-v2 model (class 1000 of 1001); guidance is off by default.
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from trainer.config import Config, ConfigError, config_from_dict, dump_config, parse_yaml
from trainer.errors import RunError, UsageError
from trainer.models.checkpoint import EMA_PREFIX, load_ldm_checkpoint, read_state_dict
from trainer.io import save_safetensors, write_json
from trainer.stages.common import build_autoencoder, build_ldm, file_sha256

LATENT_DIFFUSION = "ldm.models.diffusion.ddpm.LatentDiffusion"
AUTOENCODER_KL = "ldm.models.autoencoder.AutoencoderKL"
CLASS_EMBEDDER = "ldm.modules.encoders.modules.ClassEmbedder"
UNCONDITIONAL = "__is_unconditional__"
AUTOENCODER_DIR = "autoencoder"


def _section(params: dict, key: str, where: str) -> dict:
    value = params.get(key) if isinstance(params, dict) else None
    if not isinstance(value, dict):
        raise ConfigError(f"{where}.{key}: missing or not a mapping")
    return value


def config_from_compvis(raw: dict, source: str, experiment: str) -> Config:
    """:func:`_config_from_compvis`, a value of the wrong type (a list for a mapping, a word for a number)
    refused as ConfigError naming ``source``."""
    try:
        return _config_from_compvis(raw, source, experiment)
    except (TypeError, ValueError, AttributeError) as err:
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(f"{source}: not a latent-diffusion config dpldm can read: a value of the wrong type "
                          f"({type(err).__name__}: {err})") from None


def _config_from_compvis(raw: dict, source: str, experiment: str) -> Config:
    """An official latent-diffusion config (parsed YAML) -> a dpldm :class:`Config` for the same model.

    Raises ConfigError naming the CompVis key when the model is not one dpldm can run.
    """
    model = raw.get("model") if isinstance(raw, dict) else None
    if not isinstance(model, dict):
        raise ConfigError(f"{source}: no 'model' section: not a latent-diffusion config")
    if model.get("target") != LATENT_DIFFUSION:
        raise ConfigError(f"{source}: model.target: {model.get('target')!r} is not supported (only {LATENT_DIFFUSION})")
    p = model.get("params") or {}
    where = "model.params"
    for key, want in (("parameterization", "eps"), ("beta_schedule", "linear")):
        if p.get(key, want) != want:
            raise ConfigError(f"{source}: {where}.{key}: {p[key]!r} is not supported (only {want!r})")
    unet_cfg = _section(p, "unet_config", f"{source}: {where}")
    first = _section(p, "first_stage_config", f"{source}: {where}")
    if first.get("target") != AUTOENCODER_KL:
        raise ConfigError(f"{source}: {where}.first_stage_config.target: {first.get('target')!r} is not supported "
                          f"(only the KL autoencoder {AUTOENCODER_KL})")
    first_params = first.get("params") or {}
    cond = p.get("cond_stage_config")
    key = p.get("conditioning_key")
    if cond == UNCONDITIONAL or cond is None:
        conditioner: dict[str, Any] = {"type": "none"}
    elif isinstance(cond, dict) and cond.get("target") == CLASS_EMBEDDER:
        if key != "crossattn":
            raise ConfigError(f"{source}: {where}.conditioning_key: {key!r} with a ClassEmbedder is not supported "
                              "(only 'crossattn')")
        rows = int((cond.get("params") or {}).get("n_classes", 1000))
        embed = int((cond.get("params") or {}).get("embed_dim", unet_cfg.get("params", {}).get("context_dim", 0)))
        conditioner = {"type": "class", "n_classes": rows - 1, "embed_dim": embed,
                       "label_names": [str(i) for i in range(rows - 1)]}
    else:
        target = cond.get("target") if isinstance(cond, dict) else cond
        raise ConfigError(f"{source}: {where}.cond_stage_config.target: {target!r} is not supported (class-"
                          f"conditional {CLASS_EMBEDDER} or {UNCONDITIONAL}; CompVis text encoders are not)")
    ours = {
        "experiment": experiment,
        "autoencoder": {"embed_dim": first_params.get("embed_dim"),
                        "ddconfig": dict(first_params.get("ddconfig") or {})},
        "ldm": {"unet": dict(unet_cfg.get("params") or {}), "conditioner": conditioner,
                "schedule": {"timesteps": int(p.get("timesteps", 1000)),
                             "linear_start": float(p.get("linear_start", 0.0015)),
                             "linear_end": float(p.get("linear_end", 0.0195))},
                "scale_factor": float(p.get("scale_factor", 1.0))},
        "sample": {"guidance_scale": 1.0},
    }
    return config_from_dict(ours, source=source)


def import_compvis(config_path: str | Path, checkpoint: str | Path, out: str | Path, use_ema: bool | None = None) -> Path:
    """Convert a CompVis config + checkpoint into the run folder ``out`` (see the module docstring).

    ``use_ema``: take the UNet's EMA weights (``model_ema.*``); default: when the config uses EMA
    (CompVis' default) and the checkpoint has them. Nothing is written unless every key matches.
    """
    config_path, checkpoint, out = Path(config_path), Path(checkpoint), Path(out)
    if out.exists() and any(out.iterdir()):
        raise RunError(f"{out}: exists and is not empty; choose a new folder")
    if not config_path.is_file():
        raise RunError(f"{config_path}: no such config file")
    try:
        text = config_path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError) as err:
        raise ConfigError(f"{config_path}: not a readable YAML text file ({type(err).__name__})") from None
    raw = parse_yaml(text, str(config_path))
    cfg = config_from_compvis(raw, str(config_path), experiment=out.name)
    state = read_state_dict(checkpoint)
    has_ema = any(k.startswith(EMA_PREFIX) for k in state)
    if use_ema is None:
        use_ema = bool(raw["model"].get("params", {}).get("use_ema", True)) and has_ema
    elif use_ema and not has_ema:
        raise UsageError(f"--ema: {checkpoint} holds no EMA weights (model_ema.*)")

    ldm = build_ldm(cfg, cfg.ldm.scale_factor)
    autoencoder = build_autoencoder(cfg)
    report = load_ldm_checkpoint(checkpoint, unet=ldm.unet, autoencoder=autoencoder,
                                 cond_stage=ldm.cond_stage_model, strict=True, use_ema=use_ema, state=state)
    if "betas" in state:  # the schedule the model was trained with must be the config's
        ours = ldm.schedule.betas.to(torch.float32)
        theirs = state["betas"].to(torch.float32)
        if theirs.shape != ours.shape or not torch.allclose(theirs, ours, rtol=1e-4, atol=1e-7):
            raise ConfigError(f"{config_path}: model.params timesteps/linear_start/linear_end do not give the "
                              f"noise schedule stored in {checkpoint} (betas)")

    res = int(raw["model"]["params"].get("image_size") or cfg.ldm.unet.get("image_size"))
    channels = int(raw["model"]["params"].get("channels") or cfg.ldm.unet.get("in_channels"))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        (tmp / AUTOENCODER_DIR).mkdir()
        save_safetensors(autoencoder.state_dict(), tmp / AUTOENCODER_DIR / "autoencoder.safetensors")
        dump_config(cfg, tmp / AUTOENCODER_DIR / "config.yaml")
        save_safetensors(ldm.unet.state_dict(), tmp / "unet.safetensors", {"use_ema": use_ema})
        save_safetensors(ldm.cond_stage_model.state_dict(), tmp / "cond_stage_model.safetensors")
        dump_config(cfg, tmp / "config.yaml")
        write_json({"scale_factor": cfg.ldm.scale_factor, "latent_shape": [channels, res, res],
                    "label_names": cfg.ldm.conditioner.label_names or [],
                    "autoencoder": AUTOENCODER_DIR,
                    "autoencoder_sha256": file_sha256(tmp / AUTOENCODER_DIR / "autoencoder.safetensors"),
                    "imported_from": {"config": str(config_path.resolve()), "checkpoint": str(checkpoint.resolve()),
                                      "checkpoint_sha256": file_sha256(checkpoint), "use_ema": use_ema,
                                      "report": str(report)}},
                   tmp / "ldm.json")
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def run(args: argparse.Namespace) -> int:
    out = import_compvis(args.config_yaml, args.checkpoint, args.out, args.ema)
    meta = json.loads((out / "ldm.json").read_text())
    print(meta["imported_from"]["report"])
    print(f"imported into {out} (latents {meta['latent_shape']}, scale factor {meta['scale_factor']:g}, "
          f"{'EMA' if meta['imported_from']['use_ema'] else 'raw'} UNet weights). Fine-tune it with "
          f"`dpldm finetune --config CFG finetune.base={out}`; sample with `dpldm sample --checkpoint {out} ...`")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    from trainer.cli import plain
    p = sub.add_parser("import-compvis", help="turn a public CompVis LDM checkpoint into a run folder",
                       description=plain(__doc__), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config_yaml", metavar="CONFIG.yaml", help="the checkpoint's latent-diffusion config")
    p.add_argument("checkpoint", metavar="MODEL.ckpt", help="the checkpoint (.ckpt with state_dict, or .safetensors)")
    p.add_argument("out", metavar="OUT_DIR", help="new folder for the imported run")
    p.add_argument("--ema", action=argparse.BooleanOptionalAction, default=None,
                   help="use the UNet's EMA weights (default: when the config uses EMA and the checkpoint has them)")
    p.set_defaults(func=run)
