"""Stage ``finetune``: DP-SGD fine-tuning of the selected parameters on private data.

Private data enters here only. The frozen autoencoder encodes the private set once (posterior
mean and std kept in memory; each step draws a fresh posterior sample); Poisson sampling picks
each example with probability q at every step; the DP engine clips every example's gradient
over all trainable parameters and adds Gaussian noise once per logical step; the ledger
records every step before it is taken and refuses any step past the budget.

What is logged from private data (loss, clip fraction) is a non-private diagnostic, aggregated
over the batch and labelled ``nonprivate/``; per-example values never leave the process.
"""
from __future__ import annotations

import argparse
import json
import secrets
import time
from pathlib import Path

import torch
from tqdm import tqdm

from trainer.config import Config, ConfigError
from trainer.selection import select_trainable
from trainer.stages.common import (load_image_source, load_state, load_weights, save_grid, save_run_config,
                                   save_state, save_weights, stage_dir, write_json)
from trainer.tracking import start_run

STATE_FILE = "finetune-state.pt"
LEDGER_FILE = "ledger.json"


def plan_privacy(cfg: Config, num_private: int) -> tuple[float, float]:
    """Validate the plan against the data size -> (sample rate q, noise multiplier sigma)."""
    from trainer.privacy import calibrate_noise
    ft = cfg.finetune
    if ft.delta >= 1.0 / num_private:
        raise ConfigError(f"finetune.delta: {ft.delta} must be < 1/N = {1.0 / num_private:.3g} "
                          f"(N = {num_private} private examples)")
    q = ft.expected_batch_size / num_private
    if q > 1:
        raise ConfigError(f"finetune.expected_batch_size: {ft.expected_batch_size} exceeds N = {num_private} (q > 1)")
    sigma = ft.noise_multiplier or calibrate_noise(ft.epsilon, ft.delta, q, ft.steps)
    return q, sigma


def _entropy_generator() -> torch.Generator:
    return torch.Generator().manual_seed(secrets.randbits(63))


def run(cfg: Config) -> Path:
    """DP fine-tune the pretrained LDM of ``cfg`` on ``data.private``; returns the run folder."""
    from trainer.models import ClassEmbedder
    from trainer.privacy import DPGradientEngine, PoissonBatchSampler, PrivacyLedger, epsilon
    from trainer.stages.pretrain_ldm import encode_images
    from trainer.stages.sample import class_grid, load_pipeline

    ft = cfg.finetune
    if cfg.data.private is None:
        raise ConfigError("data.private: the fine-tuning stage needs a private data source")
    run_dir = stage_dir(cfg, "finetune")
    save_run_config(cfg, run_dir)
    base_dir = stage_dir(cfg, "pretrain-ldm")
    ldm, autoencoder, meta, _ = load_pipeline(base_dir)
    private = load_image_source(cfg.data.private, "data.private")
    n = len(private.images)
    q, sigma = plan_privacy(cfg, n)
    names = private.names
    if ft.new_class_embedder:
        if ft.new_class_embedder != len(names):
            raise ConfigError(f"finetune.new_class_embedder: {ft.new_class_embedder} classes, "
                              f"but the private set has {len(names)}")
        dim = ldm.cond_stage_model.embedding.embedding_dim
        torch.manual_seed(cfg.seed)  # public initialisation of the fresh embedder
        ldm.cond_stage_model = ClassEmbedder(embed_dim=dim, n_classes=ft.new_class_embedder)
    selection = select_trainable(ldm, ft.policy, ft.attention_from)
    print(selection.summary())
    trainable = {name: p for name, p in ldm.named_parameters() if p.requires_grad}

    mean, std = encode_images(autoencoder, private.images, desc="encode private set")
    labels = private.labels
    scale = ldm.scale_factor

    planned_eps = epsilon(sigma, q, ft.steps, ft.delta)
    ledger = PrivacyLedger(sigma, q, ft.delta, epsilon_budget=ft.epsilon or planned_eps, planned_steps=ft.steps)
    sampler = PoissonBatchSampler(n, q, ft.steps, ft.physical_batch_size, generator=_entropy_generator())
    loss_gen = _entropy_generator()  # timesteps, diffusion noise, posterior samples
    optimizer = torch.optim.AdamW(list(trainable.values()), lr=ft.lr, weight_decay=ft.weight_decay)
    step, mlflow_run_id = 0, None

    state = load_state(run_dir / STATE_FILE)
    if state is not None:  # resume: weights, optimizer and sampler from the checkpoint ...
        ldm.load_state_dict(load_weights(run_dir / "finetuned.safetensors"), strict=False)
        optimizer.load_state_dict(state["optimizer"])
        sampler.load_state_dict(state["sampler"])
        step, mlflow_run_id = int(state["step"]), state.get("mlflow_run_id")
    ledger_path = run_dir / LEDGER_FILE
    if ledger_path.is_file():  # ... the ledger from its journal, which counts every step ever started
        ledger.load_state_dict(json.loads(ledger_path.read_text()))

    engine = DPGradientEngine(ldm, max_grad_norm=ft.max_grad_norm, noise_multiplier=sigma,
                              expected_batch_size=q * n, mode=ft.engine_mode)
    ft_meta = {"base": str(base_dir.resolve()), "n_classes": ft.new_class_embedder, "label_names": names,
               "trainable": selection.trainable, "policy": ft.policy}
    write_json(ft_meta, run_dir / "finetune.json")

    def checkpoint(mlrun_id: str | None) -> None:
        save_weights({k: p.detach() for k, p in trainable.items()}, run_dir / "finetuned.safetensors",
                     {"step": step, "base": ft_meta["base"]})
        save_state({"optimizer": optimizer.state_dict(), "sampler": sampler.state_dict(), "step": step,
                    "mlflow_run_id": mlrun_id}, run_dir / STATE_FILE)

    t0 = time.time()
    tags = {"stage": "finetune", "privacy": "dp-sgd"}
    with start_run(cfg.experiment, "finetune", cfg.to_dict(), tags, run_id=mlflow_run_id) as mlrun:
        mlrun.log_params({"privacy": {"sigma": sigma, "q": q, "N": n, "planned_epsilon": planned_eps},
                          "params": {"trainable": selection.trainable_count, "total": selection.total_count}})
        ldm.train()
        bar = tqdm(total=ft.steps, initial=step, desc="finetune (DP)", dynamic_ncols=True)
        batches = iter(sampler)
        while step < ft.steps:
            try:
                ledger.record_step()  # raises before a step past the plan or the budget
            except Exception as err:  # noqa: BLE001 - the ledger says why
                print(f"stopping at step {step}: {err}")
                break
            write_json(ledger.state_dict(), ledger_path)
            micro_batches = next(batches)
            loss_sum, count = 0.0, 0
            for idx in micro_batches:
                z0 = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=loss_gen)) * scale
                conds = ldm.drop_conditions(labels[idx], cfg.ldm.train.cond_drop_prob, loss_gen)
                losses = ldm.loss(z0, conds, loss_gen, multiplicity=ft.noise_multiplicity)
                engine.accumulate(losses)
                loss_sum += float(losses.detach().sum())
                count += len(idx)
            stats = engine.finalize()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            bar.update(1)
            spent = ledger.spent_epsilon()
            bar.set_postfix(eps=f"{spent:.2f}", batch=count)
            if step % ft.log_every == 0 or step == ft.steps:
                mlrun.log_metrics({"privacy.epsilon_spent": spent,
                                   "nonprivate/loss": loss_sum / max(1, count),
                                   "nonprivate/batch_size": count,
                                   "nonprivate/clip_fraction": stats["nonprivate_clip_fraction"]},
                                  step=step)
            if step % ft.checkpoint_every == 0 or step == ft.steps:
                checkpoint(mlrun.run_id)
        bar.close()
        checkpoint(mlrun.run_id)
        engine.detach()
        ldm.eval()

        report = {**ledger.report(), "max_grad_norm": ft.max_grad_norm, "N": n,
                  "expected_batch_size": ft.expected_batch_size, "noise_multiplicity": ft.noise_multiplicity,
                  "policy": ft.policy, "trainable_parameters": selection.trainable_count,
                  "total_parameters": selection.total_count, "trainable_names": selection.trainable,
                  "neighbouring": "add/remove one example", "data": f"{cfg.data.private.source}:{cfg.data.private.split}"}
        write_json(report, run_dir / "privacy-report.json")
        grid = class_grid(ldm, autoencoder, tuple(mean.shape[1:]), cfg, names, run_dir / "samples.png",
                          torch.Generator().manual_seed(cfg.seed))
        mlrun.log_metrics({"privacy.epsilon": report["epsilon"], "privacy.delta": ft.delta,
                           "privacy.steps": ledger.steps_taken, "params.trainable": selection.trainable_count,
                           "wall_time_s": time.time() - t0})
        for path in (grid, run_dir / "privacy-report.json", run_dir / "config.yaml"):
            mlrun.log_artifact(path)
        mlrun.set_tags({"checkpoint": str(run_dir.resolve())})
    print(f"DP fine-tuning: epsilon = {report['epsilon']:.3f}, delta = {ft.delta:g} after {ledger.steps_taken} steps "
          f"(sigma = {sigma:.4f}, q = {q:.5f}); samples: {grid}; report: {run_dir / 'privacy-report.json'}")
    return run_dir


def register(sub: argparse._SubParsersAction) -> None:
    from trainer.cli import add_config_args
    p = sub.add_parser("finetune", help="DP-SGD fine-tuning on the private data",
                       description="Fine-tune the selected parameters (finetune.policy) of the pretrained LDM on "
                                   "data.private with DP-SGD. Sigma is calibrated to finetune.epsilon (or set "
                                   "finetune.noise_multiplier to get the epsilon reported). Resumes if interrupted.")
    add_config_args(p)
    p.set_defaults(func=lambda args: run(args.config_obj) and 0)
