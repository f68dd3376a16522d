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
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Union

import torch
from tqdm import tqdm

from trainer.config import Config, ConfigError
from trainer.distributed import TrainState, load_trainable
from trainer.selection import select_trainable
from trainer.stages.common import (conditions, load_image_source, load_state, save_run_config, save_state,
                                   save_weights, stage_dir, write_json)
from trainer.tracking import start_run

if TYPE_CHECKING:
    from trainer.distributed import DistributedRun

STATE_FILE = "finetune-state.pt"
WEIGHTS_FILE = "finetuned.safetensors"
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


def _describe(src) -> str:
    return f"shards:{src.path}" if src.source == "shards" else f"{src.source}:{src.split}"


def _pick(options: list[str], generator: torch.Generator) -> str:
    """One of an example's captions at random ("" if it has none)."""
    return options[int(torch.randint(len(options), (1,), generator=generator))] if options else ""


@dataclass
class EncodedPrivateSet:
    """A private set already encoded: posterior mean/std [N, c, h, w], labels [N], captions, class names."""
    mean: torch.Tensor
    std: torch.Tensor
    labels: torch.Tensor
    captions: list[list[str]]
    names: list[str]

    def __len__(self) -> int:
        return len(self.labels)


def private_latent_cache(cfg: Config, autoencoder, encoder_hash: str, run_dir: Path, rt) -> EncodedPrivateSet:
    """Encode the private shards once into ``run_dir/latents`` (rank 0; the others wait) and load it.

    Resumable, and refused if it was made by another encoder or from other shards.
    """
    from trainer.data.latent_cache import LatentCache, build_latent_cache
    from trainer.stages.encode import autoencoder_encode_fn
    src, out = cfg.data.private, run_dir / "latents"
    if not src.path:
        raise ConfigError("data.private.path: a shard pattern is needed for source=shards")
    if rt.is_main:
        build_latent_cache(autoencoder_encode_fn(autoencoder, "cpu"), src.path, out, encoder_hash, src.resolution,
                           batch_size=64, channels=int(cfg.autoencoder.ddconfig.get("in_channels", 3)),
                           pad_small=True)
    rt.barrier()
    cache = LatentCache(out, expected_encoder_hash=encoder_hash, in_memory=True)
    names = cache.label_names or [str(i) for i in range(int(cache.labels.max()) + 1)]
    return EncodedPrivateSet(torch.from_numpy(cache.mean).float(), torch.from_numpy(cache.std).float(),
                             cache.labels, cache.captions, names)


class SingleProcess:
    """The stage's runtime in one process: the whole private set, plain AdamW, noise in ``finalize``.

    :class:`trainer.distributed.DistributedRun` has the same methods for several processes.
    """

    rank, world_size, is_main = 0, 1, True

    def place(self, ldm, autoencoder) -> None:
        """Models stay where ``load_pipeline`` put them."""

    def layout(self) -> None:
        """No partitioning to describe."""

    def encode(self, autoencoder, images: torch.Tensor, labels: torch.Tensor):
        """Posterior (mean, std) and labels of every private example; row i is example i."""
        from trainer.stages.pretrain_ldm import encode_images
        mean, std = encode_images(autoencoder, images, desc="encode private set")
        return mean, std, labels

    def hold(self, mean: torch.Tensor, std: torch.Tensor, labels: torch.Tensor):
        """An already encoded private set (a latent cache): every row, row i is example i."""
        return mean, std, labels

    def make_optimizer(self, params: list, lr: float, weight_decay: float) -> torch.optim.Optimizer:
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)

    def train_step(self, engine, optimizer, micro_batches: list[torch.Tensor],
                   example_losses: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, float]:
        """One logical DP-SGD step: clip every example, noise once, step; non-private metrics."""
        loss_sum, count = 0.0, 0
        for idx in micro_batches:
            losses = example_losses(idx)
            engine.accumulate(losses)
            loss_sum += float(losses.detach().sum())
            count += len(idx)
        stats = engine.finalize()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return {"loss": loss_sum / max(1, count), "batch_size": count,
                "clip_fraction": stats["nonprivate_clip_fraction"]}

    def sample_grid(self, make_grid: Callable[[Path], Path], path: Path) -> Path:
        return make_grid(path)

    def save_checkpoint(self, run_dir: Path, step: int, mlflow_run_id: str | None, state: TrainState) -> None:
        save_weights({k: p.detach() for k, p in state.trainable.items()}, run_dir / WEIGHTS_FILE,
                     {"step": step, **state.metadata})
        save_state({"optimizer": state.optimizer.state_dict(), "sampler": state.sampler.state_dict(), "step": step,
                    "mlflow_run_id": mlflow_run_id}, run_dir / STATE_FILE)

    def resume(self, run_dir: Path, state: TrainState) -> tuple[int, str | None]:
        """Weights, optimizer and sampler from the last checkpoint -> (step, MLflow run id)."""
        from trainer.distributed import CHECKPOINTS
        if (run_dir / CHECKPOINTS).is_dir():
            raise ConfigError(f"{run_dir}: this run was checkpointed by a distributed run ({CHECKPOINTS}/); "
                              "resume it the same way (e.g. torchrun --nproc_per_node 1 ...)")
        saved = load_state(run_dir / STATE_FILE)
        if saved is None:
            return 0, None
        load_trainable(run_dir / WEIGHTS_FILE, state.trainable)
        state.optimizer.load_state_dict(saved["optimizer"])
        state.sampler.load_state_dict(saved["sampler"])
        return int(saved["step"]), saved.get("mlflow_run_id")

    def barrier(self) -> None:
        pass

    def close(self) -> None:
        pass


def run(cfg: Config) -> Path:
    """DP fine-tune the pretrained LDM of ``cfg`` on ``data.private``; returns the run folder.

    Launched on several processes (``torchrun``, ``deepspeed``) or with ``finetune.deepspeed_config``
    set, every rank runs this same function through :mod:`trainer.distributed`.
    """
    from trainer.distributed import launch
    runtime = launch(cfg) or SingleProcess()
    try:
        return _finetune(cfg, runtime)
    finally:
        runtime.close()


def _finetune(cfg: Config, rt: Union["SingleProcess", "DistributedRun"]) -> Path:
    from trainer.models import ClassEmbedder
    from trainer.privacy import DPGradientEngine, PoissonBatchSampler, PrivacyLedger, epsilon
    from trainer.stages.sample import class_grid, load_pipeline

    ft = cfg.finetune
    if cfg.data.private is None:
        raise ConfigError("data.private: the fine-tuning stage needs a private data source")
    run_dir = stage_dir(cfg, "finetune")
    if rt.is_main:
        save_run_config(cfg, run_dir)
    base_dir = stage_dir(cfg, "pretrain-ldm")
    ldm, autoencoder, meta, _ = load_pipeline(base_dir)
    if cfg.data.private.source == "shards":  # encoded once into a latent cache, before any partitioning
        cache = private_latent_cache(cfg, autoencoder, meta["autoencoder_sha256"], run_dir, rt)
        n, names, private = len(cache), cache.names, None
    else:
        private = load_image_source(cfg.data.private, "data.private")
        n, names, cache = len(private.images), private.names, None
    q, sigma = plan_privacy(cfg, n)
    if ft.new_class_embedder:
        if ft.new_class_embedder != len(names):
            raise ConfigError(f"finetune.new_class_embedder: {ft.new_class_embedder} classes, "
                              f"but the private set has {len(names)}")
        dim = ldm.cond_stage_model.embedding.embedding_dim
        torch.manual_seed(cfg.seed)  # public initialisation of the fresh embedder (the same on every rank)
        ldm.cond_stage_model = ClassEmbedder(embed_dim=dim, n_classes=ft.new_class_embedder)
    selection = select_trainable(ldm, ft.policy, ft.attention_from)
    if rt.is_main:
        print(selection.summary())
    trainable = {name: p for name, p in ldm.named_parameters() if p.requires_grad}
    rt.place(ldm, autoencoder)

    if cache is not None:  # rows held by this process
        mean, std, labels = rt.hold(cache.mean, cache.std, cache.labels)
        captions = cache.captions[rt.rank::rt.world_size] + [[""]]  # + the padding row of DistributedRun
    else:
        mean, std, labels = rt.encode(autoencoder, private.images, private.labels)
        captions = None
    scale = ldm.scale_factor

    planned_eps = epsilon(sigma, q, ft.steps, ft.delta)
    ledger = PrivacyLedger(sigma, q, ft.delta, epsilon_budget=ft.epsilon or planned_eps, planned_steps=ft.steps)
    sampler = PoissonBatchSampler(n, q, ft.steps, ft.physical_batch_size, generator=_entropy_generator(),
                                  rank=rt.rank, world_size=rt.world_size)
    loss_gen = _entropy_generator()  # timesteps, diffusion noise, posterior samples
    optimizer = rt.make_optimizer(list(trainable.values()), ft.lr, ft.weight_decay)
    # q * N is the global expected batch size, whatever the number of ranks
    engine = DPGradientEngine(ldm, max_grad_norm=ft.max_grad_norm, noise_multiplier=sigma,
                              expected_batch_size=q * n, mode=ft.engine_mode)
    state = TrainState(trainable, optimizer, sampler, {"loss": loss_gen, "noise": engine.generator},
                       {"base": str(base_dir.resolve())})

    step, mlflow_run_id = rt.resume(run_dir, state)  # weights, optimizer, sampler ...
    ledger_path = run_dir / LEDGER_FILE
    if ledger_path.is_file():  # ... the ledger from its journal, which counts every step ever started
        ledger.load_state_dict(json.loads(ledger_path.read_text()))
    rt.barrier()  # every rank has read the ledger before rank 0 journals the next step

    ft_meta = {"base": str(base_dir.resolve()), "n_classes": ft.new_class_embedder, "label_names": names,
               "trainable": selection.trainable, "policy": ft.policy}
    if rt.is_main:
        write_json(ft_meta, run_dir / "finetune.json")

    def example_losses(rows: torch.Tensor) -> torch.Tensor:
        """Per-example diffusion losses [b] of the latent rows ``rows`` (private data)."""
        z0 = (mean[rows] + std[rows] * torch.randn(mean[rows].shape, generator=loss_gen).to(mean.device)) * scale
        conds = conditions(cfg.ldm.conditioner.type, labels[rows],
                           None if captions is None else [_pick(captions[int(r)], loss_gen) for r in rows])
        conds = ldm.drop_conditions(conds, cfg.ldm.train.cond_drop_prob, loss_gen)
        return ldm.loss(z0, conds, loss_gen, multiplicity=ft.noise_multiplicity)

    t0 = time.time()
    tags = {"stage": "finetune", "privacy": "dp-sgd"}
    with start_run(cfg.experiment, "finetune", cfg.to_dict(), tags, run_id=mlflow_run_id) as mlrun:
        mlrun.log_params({"privacy": {"sigma": sigma, "q": q, "N": n, "planned_epsilon": planned_eps},
                          "params": {"trainable": selection.trainable_count, "total": selection.total_count}})
        layout = rt.layout()  # None in one process
        if layout is not None:  # tags, not params: a resumed run may have another world size
            mlrun.set_tags({f"distributed.{k}": str(layout[k]) for k in ("world_size", "zero_stage")})
            if rt.is_main:
                write_json(layout, run_dir / "distributed.json")

        def checkpoint(mlrun_id: str | None) -> None:
            rt.save_checkpoint(run_dir, step, mlrun_id, state)

        ldm.train()
        bar = tqdm(total=ft.steps, initial=step, desc="finetune (DP)", dynamic_ncols=True, disable=not rt.is_main)
        batches = iter(sampler)
        while step < ft.steps:
            try:
                ledger.record_step()  # raises before a step past the plan or the budget
            except Exception as err:  # noqa: BLE001 - the ledger says why
                if rt.is_main:
                    print(f"stopping at step {step}: {err}")
                break
            if rt.is_main:
                write_json(ledger.state_dict(), ledger_path)
            metrics = rt.train_step(engine, optimizer, next(batches), example_losses)
            step += 1
            bar.update(1)
            spent = ledger.spent_epsilon()
            bar.set_postfix(eps=f"{spent:.2f}", batch=int(metrics["batch_size"]))
            if step % ft.log_every == 0 or step == ft.steps:
                mlrun.log_metrics({"privacy.epsilon_spent": spent,
                                   "nonprivate/loss": metrics["loss"],
                                   "nonprivate/batch_size": metrics["batch_size"],
                                   "nonprivate/clip_fraction": metrics["clip_fraction"]},
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
                  "neighbouring": "add/remove one example", "data": _describe(cfg.data.private)}
        if rt.is_main:
            write_json(report, run_dir / "privacy-report.json")
        latent_shape = tuple(mean.shape[1:])
        grid = rt.sample_grid(lambda path: class_grid(ldm, autoencoder, latent_shape, cfg, names, path,
                                                      torch.Generator().manual_seed(cfg.seed)),
                              run_dir / "samples.png")
        mlrun.log_metrics({"privacy.epsilon": report["epsilon"], "privacy.delta": ft.delta,
                           "privacy.steps": ledger.steps_taken, "params.trainable": selection.trainable_count,
                           "wall_time_s": time.time() - t0})
        mlrun.log_result(run_dir, grid, run_dir / "privacy-report.json")
    if rt.is_main:
        print(f"DP fine-tuning: epsilon = {report['epsilon']:.3f}, delta = {ft.delta:g} after {ledger.steps_taken} "
              f"steps (sigma = {sigma:.4f}, q = {q:.5f}); samples: {grid}; report: {run_dir / 'privacy-report.json'}")
    return run_dir


def register(sub: argparse._SubParsersAction) -> None:
    from trainer.cli import add_config_args
    p = sub.add_parser("finetune", help="DP-SGD fine-tuning on the private data",
                       description="Fine-tune the selected parameters (finetune.policy) of the pretrained LDM on "
                                   "data.private with DP-SGD. Sigma is calibrated to finetune.epsilon (or set "
                                   "finetune.noise_multiplier to get the epsilon reported). Resumes if interrupted. "
                                   "Runs on several processes under torchrun or the deepspeed launcher (ZeRO stage "
                                   "from finetune.deepspeed_config).")
    add_config_args(p)
    p.set_defaults(func=lambda args: run(args.config_obj) and 0)
