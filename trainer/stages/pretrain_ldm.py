"""Stage ``pretrain-ldm``: train the UNet and the conditioner on public latents (no private data)."""
from __future__ import annotations

import argparse
import itertools
from pathlib import Path
from typing import Iterator

import torch

from trainer.config import Config, ConfigError
from trainer.errors import RunError
from trainer.io import write_json
from trainer.pipeline import encode_images
from trainer.runs import class_grid, read_run_json
from trainer.runtime import Runtime, adamw
from trainer.stages.common import (STATE_FILE, build_ldm, conditions, earlier_stage, file_sha256, load_autoencoder,
                                   load_image_source, public_batches, public_label_names, recorded_path,
                                   require_model, seed_everything, stage_dir, start_public_stage, to_device)
from trainer.stages.loop import Trainer
from trainer.stages.spend import refuse_private_as_public
from trainer.tracking import start_run


def latent_batches(cfg: Config, autoencoder, batch_size: int, gen: torch.Generator) -> Iterator[tuple]:
    """Endless ``(z [B, c, h, w], conditions)``: fresh posterior samples of public images (unscaled),
    on the autoencoder's device (draws from the CPU generator ``gen``, so every device sees the same).

    An in-memory public set is encoded once (mean, std kept); a shard stream is encoded per batch.
    """
    device = next(autoencoder.parameters()).device
    if cfg.data.public.source != "shards":
        data = load_image_source(cfg.data.public, "data.public", autoencoder.ddconfig["in_channels"])
        mean, std = encode_images(autoencoder, data.images, desc="encode public set")
        cond_type = cfg.ldm.conditioner.type
        while True:
            idx = torch.randint(0, len(mean), (batch_size,), generator=gen)
            yield mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen).to(device), \
                to_device(conditions(cond_type, data.labels[idx], None), device)
    for images, conds in public_batches(cfg, batch_size, gen):
        with torch.no_grad():
            mean, std = autoencoder.encode(images.to(device))
        yield mean + std * torch.randn(mean.shape, generator=gen).to(device), to_device(conds, device)


def run(cfg: Config) -> Path:
    """Train (or resume) the LDM; returns the run folder (``unet``/``cond_stage_model`` weights, ``ldm.json``)."""
    require_model(cfg, cfg.ldm.unet, "ldm.unet")
    if cfg.ldm.conditioner.type == "text" and cfg.data.public.source != "shards":
        raise ConfigError(f"ldm.conditioner.type: text needs captions, and data.public.source "
                          f"{cfg.data.public.source!r} holds none: use shards with .txt captions")
    run_dir = stage_dir(cfg, "pretrain-ldm")
    refuse_private_as_public(cfg.data.public, run_dir.parent)  # before anything is written
    ae_dir = earlier_stage(cfg, "pretrain-ae")
    _refuse_another_autoencoder(run_dir, ae_dir)
    rt, batch_size = start_public_stage(cfg, run_dir, cfg.ldm.train.batch_size, "ldm.train.batch_size",
                                        ("seed", "data.public", "autoencoder.embed_dim", "autoencoder.ddconfig", "ldm"))
    with rt:
        return _train(cfg, rt, run_dir, ae_dir, batch_size)


def _refuse_another_autoencoder(run_dir: Path, ae_dir: Path) -> None:
    """Refuse to resume an LDM that has trained on the latents of other autoencoder weights than those
    in ``ae_dir`` now (the autoencoder trained further since, or retrained): its UNet learned another
    latent space."""
    meta = run_dir / "ldm.json"
    if not (run_dir / STATE_FILE).is_file() or not meta.is_file():
        return
    recorded = read_run_json(meta, ("autoencoder_sha256",))["autoencoder_sha256"]
    if recorded != file_sha256(ae_dir / "autoencoder.safetensors"):
        raise RunError(f"{run_dir}: has trained on the latents of other autoencoder weights (sha256 "
                       f"{recorded[:12]}...) than {ae_dir} holds now: its UNet learned another latent space; pretrain "
                       "the LDM in another experiment, or restore that autoencoder")


def _train(cfg: Config, rt: Runtime, run_dir: Path, ae_dir: Path, batch_size: int) -> Path:
    tc = cfg.ldm.train
    gen = seed_everything(cfg.seed)
    autoencoder, ae_hash = load_autoencoder(ae_dir)
    autoencoder.to(rt.device)
    data_gen = torch.Generator().manual_seed(rt.data_seed(cfg.seed))
    batches = latent_batches(cfg, autoencoder, batch_size, gen if rt.world_size == 1 else data_gen)
    # latent scale: 1 / std of the public latents (as LDM's scale_factor), from the first batches (rank 0's)
    first = list(itertools.islice(batches, 8))
    scale = cfg.ldm.scale_factor or rt.broadcast(float(1.0 / torch.cat([z for z, _ in first]).std()))
    batches = itertools.chain(first, batches)
    names = public_label_names(cfg)
    ldm = build_ldm(cfg, scale).to(rt.device)
    rt.broadcast_parameters(ldm)
    if rt.is_main:
        write_json({"scale_factor": scale, "latent_shape": list(first[0][0].shape[1:]), "label_names": names,
                    "autoencoder": recorded_path(ae_dir, run_dir), "autoencoder_sha256": ae_hash},
                   run_dir / "ldm.json")
    params = [p for p in ldm.parameters() if p.requires_grad]
    opt = adamw(params, tc.lr, tc.weight_decay)
    if rt.world_size > 1:
        gen = data_gen
    trainer = Trainer(run_dir, {"unet": ldm.unet, "cond_stage_model": ldm.cond_stage_model}, opt, tc, gen,
                      desc="pretrain-ldm", runtime=rt)

    def step(_: int) -> dict[str, float]:
        z, conds = next(batches)
        with rt.autocast():
            loss = ldm.loss(z * scale, conds, gen, cond_drop_prob=tc.cond_drop_prob).float().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        rt.average_gradients(params)
        opt.step()
        return {"loss": loss.item()}

    tags = {"stage": "pretrain-ldm", "precision": rt.placement.precision}
    with start_run(cfg.experiment, "pretrain-ldm", cfg.to_dict(), tags, run_id=trainer.mlflow_run_id) as mlrun:
        trainer.fit(step, mlrun)
        rt.barrier()
        if not rt.is_main:
            return run_dir
        trainer.load_best()
        grid = class_grid(ldm, autoencoder, tuple(first[0][0].shape[1:]), cfg, names, run_dir / "samples.png", gen)
        mlrun.log_result(run_dir, grid, run_dir / "ldm.json")
    print(f"LDM: {run_dir}  (sample grid: {run_dir / 'samples.png'})")
    return run_dir


def register(sub: argparse._SubParsersAction) -> None:
    from trainer.cli import add_config_args
    p = sub.add_parser("pretrain-ldm", help="train the latent diffusion model on public images",
                       description="Train the UNet + conditioner of the config on latents of its public data, "
                                   "using the autoencoder from pretrain-ae (resumes if interrupted).")
    add_config_args(p)
    p.set_defaults(func=lambda args: run(args.config_obj) and 0)
