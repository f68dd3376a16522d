"""Stage ``sample``: DDIM samples from a pretrained or DP fine-tuned checkpoint.

Class labels and prompts given here are public inputs. Released images are post-processing of
the model, so a DP fine-tuned checkpoint's samples carry its (epsilon, delta).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Optional, Sequence

import torch
from tqdm import tqdm

from trainer.config import Config, load_config
from trainer.pipeline import LatentDiffusion
from trainer.stages.common import build_ldm, load_autoencoder, load_weights, save_grid, seed_everything


def load_pipeline(run_dir: str | Path) -> tuple[LatentDiffusion, torch.nn.Module, dict, Config]:
    """A ``pretrain-ldm`` or ``finetune`` run folder -> (ldm, autoencoder, meta, config), in eval mode.

    A fine-tuned folder holds only the trained parameters (``finetuned.safetensors``) and
    ``finetune.json`` naming its frozen base; they are laid over the base weights.
    """
    run_dir = Path(run_dir)
    ft_meta_path = run_dir / "finetune.json"
    ft_meta = json.loads(ft_meta_path.read_text()) if ft_meta_path.is_file() else None
    base_dir = Path(ft_meta["base"]) if ft_meta else run_dir
    meta_path = base_dir / "ldm.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"{run_dir}: not an LDM run folder (no ldm.json / finetune.json)")
    meta = json.loads(meta_path.read_text())
    cfg = load_config(str(run_dir / "config.yaml"))
    n_classes = ft_meta.get("n_classes") if ft_meta else None  # a fresh embedder replaced the public one
    ldm = build_ldm(cfg, meta["scale_factor"], n_classes=n_classes)
    ldm.unet.load_state_dict(load_weights(base_dir / "unet.safetensors"))
    if not n_classes:
        ldm.cond_stage_model.load_state_dict(load_weights(base_dir / "cond_stage_model.safetensors"))
    if ft_meta:
        tuned = load_weights(run_dir / "finetuned.safetensors")
        names = dict(ldm.named_parameters())
        unknown = sorted(set(tuned) - set(names))
        if unknown or set(tuned) != set(ft_meta["trainable"]):
            raise ValueError(f"{run_dir}: finetuned.safetensors does not match finetune.json "
                             f"(unknown parameters: {unknown[:5]})")
        ldm.load_state_dict(tuned, strict=False)
        meta = {**meta, "label_names": ft_meta.get("label_names") or meta.get("label_names"), "finetune": ft_meta}
    autoencoder, _ = load_autoencoder(meta["autoencoder"])
    ldm.eval().requires_grad_(False)
    return ldm, autoencoder, meta, cfg


@torch.no_grad()
def generate(ldm: LatentDiffusion, autoencoder, conds: Sequence, latent_shape: tuple[int, ...], cfg: Config,
             generator: torch.Generator, batch_size: int = 64, progress: bool = True) -> torch.Tensor:
    """Images in [-1, 1] for each condition (class label or prompt), in batches."""
    out = []
    for i in tqdm(range(0, len(conds), batch_size), desc="sample", disable=not progress, leave=False):
        c = conds[i:i + batch_size]
        if isinstance(conds, torch.Tensor):
            c = c.clone()
        z = ldm.sample_latents(c, latent_shape, steps=cfg.sample.ddim_steps, eta=cfg.sample.eta,
                               guidance_scale=cfg.sample.guidance_scale, generator=generator)
        out.append(autoencoder.decode(z).clamp(-1, 1))
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


def run(args: argparse.Namespace) -> int:
    ldm, autoencoder, meta, cfg = load_pipeline(args.checkpoint)
    if args.ddim_steps:
        cfg.sample.ddim_steps = args.ddim_steps
    if args.guidance_scale is not None:
        cfg.sample.guidance_scale = args.guidance_scale
    gen = seed_everything(args.seed)
    names = meta.get("label_names") or []
    if cfg.ldm.conditioner.type == "text" and not args.prompts:
        raise SystemExit("dpldm sample: this model is text-conditioned: give --prompts")
    if args.prompts:
        if cfg.ldm.conditioner.type != "text":
            raise SystemExit(f"dpldm sample: --prompts needs a text-conditioned model (this one is "
                             f"{cfg.ldm.conditioner.type}); use --classes")
        conds: Sequence = [p for p in args.prompts for _ in range(args.num)]
    elif cfg.ldm.conditioner.type == "class":
        classes = [int(c) for c in args.classes.split(",")] if args.classes else list(range(len(names)))
        bad = [c for c in classes if not 0 <= c < len(names)]
        if bad:
            raise SystemExit(f"--classes: {bad} out of range 0..{len(names) - 1}")
        conds = torch.tensor(classes).repeat_interleave(args.num)
    else:
        conds = [None] * args.num
    images = generate(ldm, autoencoder, conds, tuple(meta["latent_shape"]), cfg, gen)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from PIL import Image
    arr = ((images + 1) * 127.5).round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()
    for i, img in enumerate(arr):
        cond = conds[i]
        label = names[int(cond)] if isinstance(conds, torch.Tensor) and names else "sample"
        folder = out / (label if isinstance(conds, torch.Tensor) else "all")
        folder.mkdir(exist_ok=True)
        Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(folder / f"{i:06d}.png")
    save_grid(images, out / "grid.png", nrow=args.num)
    print(f"{len(arr)} images in {out} (grid: {out / 'grid.png'})")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sample", help="sample images from a checkpoint",
                       description="DDIM samples (classifier-free guidance) from a pretrain-ldm or finetune run folder. "
                                   "Images go to OUT/<class name>/ and OUT/grid.png.")
    p.add_argument("--checkpoint", required=True, help="run folder of pretrain-ldm or finetune")
    p.add_argument("--classes", help="comma-separated class indices (default: all classes)")
    p.add_argument("--prompts", nargs="+", help="text prompts (text-conditioned models)")
    p.add_argument("--num", type=int, default=8, help="images per class or prompt (default 8)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ddim-steps", type=int, help="override sample.ddim_steps")
    p.add_argument("--guidance-scale", type=float, help="override sample.guidance_scale")
    p.set_defaults(func=run)
