"""Stage ``sample``: DDIM or DPM-Solver++(2M) samples from a pretrained or DP fine-tuned checkpoint.

Class labels and prompts given here are public inputs. Released images are post-processing of
the model, so a DP fine-tuned checkpoint's samples carry its (epsilon, delta). A prompt that is a
caption of the run's private set (compared where its shards can be read) is private data: sampling
with it is refused, or with ``--nonprivate-diagnostic`` written and labelled as a non-private
diagnostic (``OUT/NONPRIVATE.txt``).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

import torch

from trainer.config import SAMPLER_KEYS, SAMPLERS, max_sampler_steps
from trainer.errors import UsageError
from trainer.runs import generate, load_pipeline, override_sampler
from trainer.runtime import resolve_device
from trainer.stages.common import (NONPRIVATE, check_model_finished, refuse_file_as_folder, save_grid, seed_everything,
                                   to_uint8)
from trainer.stages.private_set import caption_prompts


def run(args: argparse.Namespace) -> int:
    refuse_file_as_folder("--out", args.out)
    if Path(args.out).is_dir() and any(Path(args.out).iterdir()):
        raise UsageError(f"--out: {args.out} is not empty: these images would mix with what it holds (an "
                         "evaluation of the folder would score both); give a new or empty folder")
    if args.classes is not None and not args.classes.strip():
        raise UsageError("--classes: empty; give class indices (e.g. 0,3), or leave the flag out for every class")
    if args.classes:
        try:
            classes = [int(c) for c in args.classes.split(",")]
        except ValueError:
            raise UsageError(f"--classes: {args.classes!r} is not a comma-separated list of class indices") from None
    check_model_finished(args.checkpoint)
    ldm, autoencoder, meta, cfg = load_pipeline(args.checkpoint, resolve_device(args.device, "--device"))
    try:
        settings = override_sampler({k: getattr(cfg.sample, k) for k in SAMPLER_KEYS}, sampler=args.sampler,
                                    guidance_scale=args.guidance_scale, ddim_steps=args.ddim_steps, eta=args.eta)
    except ValueError as err:
        raise UsageError(f"--{err}") from None
    most = max_sampler_steps(settings["sampler"], cfg.ldm.schedule.timesteps)
    if settings["ddim_steps"] > most:
        raise UsageError(f"--ddim-steps: at most {most} with {settings['sampler']} over the model's "
                         f"{cfg.ldm.schedule.timesteps} timesteps, got {settings['ddim_steps']}")
    gen = seed_everything(args.seed)
    names = meta.get("label_names") or []
    if cfg.ldm.conditioner.type == "text" and not args.prompts:
        raise UsageError("--prompts: this model is text-conditioned: give one or more prompts")
    if args.prompts:
        if cfg.ldm.conditioner.type != "text":
            raise UsageError(f"--prompts: needs a text-conditioned model (this one is "
                             f"{cfg.ldm.conditioner.type}); use --classes")
        private = caption_prompts(Path(args.checkpoint), cfg, args.prompts, names, ldm.cond_stage_model)
        if private and not args.nonprivate_diagnostic:
            raise UsageError(f"--prompts: entry {private[0]} is the caption of an example of this run's private set: "
                             "images sampled from private captions are a non-private diagnostic, not a DP release; "
                             "write your own prompts, or pass --nonprivate-diagnostic to write them labelled so")
        conds: Sequence = [p for p in args.prompts for _ in range(args.num)]
    elif cfg.ldm.conditioner.type == "class":
        classes = classes if args.classes else list(range(len(names)))
        bad = [c for c in classes if not 0 <= c < len(names)]
        if bad:
            raise UsageError(f"--classes: {bad} out of range 0..{len(names) - 1}")
        conds = torch.tensor(classes).repeat_interleave(args.num)
    else:
        conds = [None] * args.num
    images = generate(ldm, autoencoder, conds, tuple(meta["latent_shape"]), cfg, gen, **settings)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.prompts and private:  # before the first image: an interrupted write is labelled too
        (out / NONPRIVATE).write_text(f"Non-private diagnostic: prompts {private} (from 0) are captions of the private "
                                      f"set of {args.checkpoint}; these images are not a DP release.\n")
    from PIL import Image
    arr = to_uint8(images)
    for i, img in enumerate(arr):
        cond = conds[i]
        label = names[int(cond)] if isinstance(conds, torch.Tensor) and names else "sample"
        folder = out / (label if isinstance(conds, torch.Tensor) else "all")
        folder.mkdir(exist_ok=True)
        Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(folder / f"{i:06d}.png")
    save_grid(images, out / "grid.png", nrow=args.num)
    print(f"{len(arr)} images in {out} (grid: {out / 'grid.png'})")
    if args.prompts and private:
        print(f"dpldm sample: note: a non-private diagnostic (prompts {private} are private captions): "
              f"{out / NONPRIVATE}", file=sys.stderr)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    from trainer.cli import non_negative_float, positive_int, unit_float
    p = sub.add_parser("sample", help="sample images from a checkpoint",
                       description="Samples (DDIM or DPM-Solver++(2M), classifier-free guidance) from a pretrain-ldm "
                                   "or finetune run folder. Images go to OUT/<class name>/ and OUT/grid.png.")
    p.add_argument("--checkpoint", required=True, help="run folder of pretrain-ldm, import-compvis or finetune")
    p.add_argument("--classes", help="comma-separated class indices (default: all classes)")
    p.add_argument("--prompts", nargs="+", help="text prompts (text-conditioned models): public inputs, not captions "
                                                "of the private set")
    p.add_argument("--nonprivate-diagnostic", action="store_true",
                   help="allow --prompts that are captions of the run's private set; the images are then a "
                        "non-private diagnostic, labelled by OUT/NONPRIVATE.txt")
    p.add_argument("--num", type=positive_int, default=8, help="images per class or prompt (default 8)")
    p.add_argument("--out", required=True, help="output folder (new or empty)")
    p.add_argument("--seed", type=int, default=0, help="seed of the starting noise and of eta's fresh noise (default 0)")
    p.add_argument("--sampler", choices=SAMPLERS,
                   help="override sample.sampler: ddim, or dpmpp_2m (DPM-Solver++(2M): deterministic, eta 0, "
                        "close to the ODE's solution in fewer steps)")
    p.add_argument("--ddim-steps", type=positive_int, help="override sample.ddim_steps (the steps of either sampler)")
    p.add_argument("--guidance-scale", type=non_negative_float,
                   help="override sample.guidance_scale (1: the conditional model alone, 0: unconditional)")
    p.add_argument("--eta", type=unit_float, help="override sample.eta: the share of fresh noise in each DDIM step "
                                             "(0: deterministic DDIM, 1: DDPM-like; dpmpp_2m: 0 only)")
    p.add_argument("--device", default="auto", help="auto (CUDA when visible), cpu, cuda or cuda:N (default: auto)")
    p.set_defaults(func=run)
