"""Stage ``pretrain-ae``: train the KL autoencoder on public images (no private data)."""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from trainer.config import Config, ConfigError
from trainer.runtime import Runtime, adamw
from trainer.stages.common import (build_autoencoder, public_batches, require_model, save_grid, seed_everything,
                                   stage_dir, start_public_stage)
from trainer.stages.loop import Trainer
from trainer.stages.spend import refuse_private_as_public
from trainer.tracking import start_run


def reconstruction_loss(x: torch.Tensor, rec: torch.Tensor) -> torch.Tensor:
    """Per example: L1 + L2 over pixels -> [B]."""
    d = (rec - x).flatten(1)
    return d.abs().mean(1) + d.pow(2).mean(1)


def run(cfg: Config) -> Path:
    """Train (or resume) the autoencoder; returns the run folder with ``autoencoder.safetensors``."""
    require_model(cfg, cfg.autoencoder.ddconfig, "autoencoder.ddconfig")
    run_dir = stage_dir(cfg, "pretrain-ae")
    tc = cfg.autoencoder.train
    refuse_private_as_public(cfg.data.public, run_dir.parent)  # before anything is written
    _refuse_training_under_an_ldm(run_dir, tc.steps)
    rt, batch_size = start_public_stage(cfg, run_dir, tc.batch_size, "autoencoder.train.batch_size",
                                        ("seed", "data.public", "autoencoder"))
    with rt:
        return _train(cfg, rt, run_dir, batch_size)


def _refuse_training_under_an_ldm(run_dir: Path, steps: int) -> None:
    """Refuse (ConfigError) to train the autoencoder in ``run_dir`` further (``steps`` past those it has
    taken) when an LDM of the experiment was pretrained on its latents as they are: that LDM, and every
    fine-tune on it, would decode with other weights than it learned on."""
    import json

    from trainer.io import load_state
    from trainer.stages.common import STATE_FILE, file_sha256, resolve_recorded
    weights, state = run_dir / "autoencoder.safetensors", load_state(run_dir / STATE_FILE)
    if not weights.is_file() or state is None or int(state.get("step", 0)) >= steps:
        return
    current = file_sha256(weights)
    for meta in sorted(run_dir.parent.glob("*/ldm.json")):
        try:
            record = json.loads(meta.read_text())
            on_it = resolve_recorded(record["autoencoder"], meta.parent).resolve() == run_dir.resolve()
        except (OSError, ValueError, KeyError, TypeError):
            continue  # not a record of this autoencoder (the LDM's own stages refuse a broken one)
        if on_it and record.get("autoencoder_sha256") == current:
            raise ConfigError(f"autoencoder.train.steps: {steps} would train the autoencoder in {run_dir} further "
                              f"(it took {int(state['step'])}), but the LDM in {meta.parent} was pretrained on its "
                              "latents: it and its fine-tunes would no longer decode. Train another autoencoder "
                              "under another experiment=NAME")


def _train(cfg: Config, rt: Runtime, run_dir: Path, batch_size: int) -> Path:
    from trainer.models.autoencoder import kl_divergence
    tc = cfg.autoencoder.train
    gen = seed_everything(cfg.seed)
    model = build_autoencoder(cfg).to(rt.device)
    rt.broadcast_parameters(model)
    gen.manual_seed(rt.data_seed(cfg.seed))
    opt = adamw(model.parameters(), tc.lr, tc.weight_decay)
    trainer = Trainer(run_dir, {"autoencoder": model}, opt, tc, gen, desc="pretrain-ae", runtime=rt)
    batches = public_batches(cfg, batch_size, gen, rt.rank, rt.world_size)
    params = list(model.parameters())

    def step(_: int) -> dict[str, float]:
        x = next(batches)[0].to(rt.device)
        with rt.autocast():
            rec, mean, std = model(x)
            rec_loss = reconstruction_loss(x, rec.float()).mean()
            kl = kl_divergence(mean.float(), std.float()).mean()
            loss = rec_loss + tc.kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        rt.average_gradients(params)
        opt.step()
        return {"loss": loss.item(), "rec_loss": rec_loss.item(), "kl": kl.item()}

    tags = {"stage": "pretrain-ae", "precision": rt.placement.precision}
    with start_run(cfg.experiment, "pretrain-ae", cfg.to_dict(), tags, run_id=trainer.mlflow_run_id) as mlrun:
        trainer.fit(step, mlrun)
        rt.barrier()
        if not rt.is_main:
            return run_dir
        trainer.load_best()
        x = next(batches)[0][:16].to(rt.device)
        with torch.no_grad():
            rec, _, _ = model(x, sample=False)
        grid = save_grid(torch.cat([x, rec]), run_dir / "reconstructions.png", nrow=16)
        mlrun.log_result(run_dir, grid)
    print(f"autoencoder: {run_dir / 'autoencoder.safetensors'}")
    return run_dir


def register(sub: argparse._SubParsersAction) -> None:
    from trainer.cli import add_config_args
    p = sub.add_parser("pretrain-ae", help="train the autoencoder on public images",
                       description="Train the KL autoencoder of the config on its public data (resumes if interrupted).")
    add_config_args(p)
    p.set_defaults(func=lambda args: run(args.config_obj) and 0)
