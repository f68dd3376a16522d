"""Stage ``finetune``: DP-SGD fine-tuning of the selected parameters on private data.

Private data enters here only (counted, checked and encoded by :mod:`trainer.stages.private_set`).
The frozen autoencoder encodes the private set once (posterior mean and std kept in memory; each
step draws a fresh posterior sample); Poisson sampling picks each example with probability q at
every step; the DP engine clips every example's gradient over all trainable parameters and adds
Gaussian noise once per logical step; the ledger records every step before it is taken and refuses
any step past the budget.

What the DP steps measure on private data (loss, clip fraction) is a non-private diagnostic,
aggregated over the batch, labelled ``nonprivate/`` and logged only with ``finetune.log_nonprivate``;
per-example values never leave the process.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, ContextManager, Union

import torch
from tqdm import tqdm

from trainer.config import MAX_EPSILON, Config, ConfigError, FinetuneConfig
from trainer.distributed import EMA_FILE, WEIGHTS_FILE, Checkpoint, SingleProcess, TrainState
from trainer.errors import RunError
from trainer.io import write_json
from trainer.runtime import Placement
from trainer.selection import select_trainable
from trainer.stages.common import (PRIVACY_REPORT, check_finished, conditions, earlier_stage, load_image_source,
                                   recorded_path, save_run_config, stage_dir)
from trainer.stages.journal import (check_journal_covers, load_journal, over_total, session_lock, spend_or_warn,
                                    write_journal)
from trainer.stages.private_set import (EncodedPrivateSet, PrivateShards, check_captions, check_labels,
                                        encode_private_shards, label_names, private_set_identity, private_shards,
                                        refuse_private_prompts, refuse_public_overlap)
from trainer.stages.spend import AUDIT_REPORT, DP_TRACES, LEDGER_FILE, ledger_field
from trainer.tracking import start_run

if TYPE_CHECKING:
    from trainer.distributed import DistributedRun
    from trainer.privacy import DPGradientEngine
    from trainer.selection import Selection
    from trainer.stages.common import ImageSet

PROBE_SIZE = 4  # public stand-in examples of the engine's self-check


N_IS_PUBLIC = ("the private-set size N is treated as public: it sets q = expected_batch_size / N, and the "
               "guarantee is for adding or removing one example from a set of that size")


def plan_privacy(cfg: Config, num_private: int) -> tuple[float, float]:
    """Validate the plan against the data size -> (sample rate q, noise multiplier sigma).

    Refuses a plan whose epsilon is not finite or above ``MAX_EPSILON``, or that cannot be calibrated.
    """
    from trainer.privacy import calibrate_noise, epsilon
    ft = cfg.finetune
    if ft.delta >= 1.0 / num_private:
        raise ConfigError(f"finetune.delta: {ft.delta} must be < 1/N = {1.0 / num_private:.3g} "
                          f"(N = {num_private} private examples)")
    q = ft.expected_batch_size / num_private
    if q > 1:
        raise ConfigError(f"finetune.expected_batch_size: {ft.expected_batch_size} exceeds N = {num_private} (q > 1)")
    if ft.noise_multiplier is None:
        try:
            return q, calibrate_noise(ft.epsilon, ft.delta, q, ft.steps)
        except ValueError as err:
            raise ConfigError(f"finetune.epsilon: {err}") from None
    try:
        eps = epsilon(ft.noise_multiplier, q, ft.steps, ft.delta)
    except ValueError as err:
        raise ConfigError(f"finetune.noise_multiplier: {err}") from None
    if eps > MAX_EPSILON:
        raise ConfigError(f"finetune.noise_multiplier: {ft.noise_multiplier} spends epsilon = {eps:.4g} over "
                          f"{ft.steps} steps (q = {q:.4g}), above {MAX_EPSILON:g}: no meaningful guarantee; "
                          "raise it or set finetune.epsilon")
    return q, ft.noise_multiplier


def noise_warning(sigma: float, expected_batch_size: float, steps: int, dim: int) -> tuple[float, str | None]:
    """``signal_to_noise_bound`` and, when the noise outweighs any possible signal, a warning saying so."""
    from trainer.privacy import signal_to_noise_bound
    ratio = signal_to_noise_bound(sigma, expected_batch_size, steps, dim)
    if ratio >= 1:
        return ratio, None
    return ratio, (f"warning: sigma = {sigma:.4g} is so large that the noise drowns the signal: even perfectly "
                   f"aligned gradients would sum to {ratio:.3f} of the noise norm over {steps} steps of {dim} "
                   "parameters (raise finetune.expected_batch_size or steps, train fewer parameters, or accept a "
                   "larger epsilon)")


def _describe(src) -> str:
    return f"shards:{src.path}" if src.source == "shards" else f"{src.source}:{src.split}"


def _pick(options: list[str], generator: torch.Generator) -> str:
    """One of an example's captions at random ("" if it has none). Always one draw, whatever the
    example: a step replayed with another row in its place keeps every other row's draws."""
    k = int(torch.randint(max(1, len(options)), (1,), generator=generator))
    return options[k] if options else ""


def run(cfg: Config, encodings: "EncodingMemo | None" = None) -> Path:
    """DP fine-tune the pretrained LDM of ``cfg`` on ``data.private``; returns the run folder.

    Launched on several processes (``torchrun``, ``deepspeed``) or with ``finetune.deepspeed_config``
    set, every rank runs this same function through :mod:`trainer.distributed`. Several fine-tunes
    in one process (the demo's epsilon sweep) pass one ``encodings`` memo to encode an in-memory
    private set once.
    """
    from trainer.distributed import launch
    runtime = launch(cfg) or SingleProcess(Placement.from_config(cfg, private=True))
    with runtime:
        return _finetune(cfg, runtime, encodings)


class EncodingMemo(dict):
    """Encoded private rows kept in memory between fine-tunes of one process, keyed by what
    determines them: the encoder's weights (sha256), the private source's settings, the rank and
    the device. The frozen encoder's posterior is a deterministic function of those, so a hit
    returns exactly the rows that encoding again would. Private data: never written anywhere."""

    @staticmethod
    def key(encoder_hash: str, cfg: Config, rt) -> tuple:
        return (encoder_hash, repr(cfg.data.private), rt.rank, rt.world_size, str(rt.device))


@dataclass
class PrivateRows:
    """The private rows this process holds (row i of a rank: see the runtime's ``hold``/``encode``)."""
    mean: torch.Tensor                   # posterior mean [n, c, h, w]
    std: torch.Tensor                    # posterior std [n, c, h, w]
    labels: torch.Tensor                 # [n]
    captions: list[list[str]] | None     # per row, for text models


@dataclass
class DPSession:
    """One DP fine-tuning run, built from the config with nothing written yet (see :func:`_prepare`).

    A refused or finished run never encodes the private set. Private shards are counted for the
    plan and, once the plan, the run's journal and the trainable set are accepted and the run is
    not finished, encoded into their latent cache before the models are placed (ZeRO-3 partitions
    the encoder); in-memory images are encoded by :meth:`load_private`, after the run's
    checkpoint has been checked too.
    """
    cfg: Config
    base_dir: Path
    ldm: torch.nn.Module
    autoencoder: torch.nn.Module
    selection: "Selection"
    n: int                               # private examples (treated as public, see N_IS_PUBLIC)
    names: list[str]
    names_source: str
    q: float
    sigma: float
    signal_to_noise: float
    engine: "DPGradientEngine"
    state: TrainState                    # trainable params, optimizer, sampler, ledger
    latent_shape: tuple[int, ...]
    loss_gen: torch.Generator            # timesteps, diffusion noise, posterior samples: never saved
    autocast: Callable[[], ContextManager]  # the forward's precision
    source: object                       # an EncodedPrivateSet (shards) or an ImageSet (in memory)
    encoder_hash: str                    # sha256 of the frozen autoencoder's weights
    public_check: str                    # what was checked of the private set against the base's public data
    private: PrivateRows | None = None

    def load_private(self, rt: Union["SingleProcess", "DistributedRun"], encodings: EncodingMemo | None = None) -> None:
        """Hold (latent cache) or encode (in-memory images; found in ``encodings`` when already
        encoded there) this process's private rows."""
        src = self.source
        if isinstance(src, PrivateShards):
            raise RunError("data.private: the private shards were not encoded (the journal says the run is finished, "
                           "its checkpoint does not); restore the run folder, or start another run")
        if isinstance(src, EncodedPrivateSet):
            mean, std, labels = rt.hold(src.mean, src.std, src.labels)
            captions = src.captions[rt.rank::rt.world_size] + [[""]]  # + the padding row of DistributedRun
        else:
            key = EncodingMemo.key(self.encoder_hash, self.cfg, rt)
            if encodings is not None and key in encodings:
                mean, std, labels = encodings[key]
                rt.mark_padding_row(len(mean))  # the memo holds what rt.encode returned, its padding row last
            else:
                mean, std, labels = rt.encode(self.autoencoder, src.images, src.labels)
                if encodings is not None:
                    encodings.clear()  # one private set at a time
                    encodings[key] = (mean, std, labels)
            captions = None
        if self.cfg.ldm.conditioner.type == "class" and len(labels) and int(labels.max()) >= len(self.names):
            raise RunError(f"data.private: a label is >= {len(self.names)}, the number of classes from "
                           f"{self.names_source}")
        self.private = PrivateRows(mean, std, labels, captions)

    def example_losses(self, rows: torch.Tensor) -> torch.Tensor:
        """Per-example diffusion losses [b] of the private rows ``rows``."""
        p, g, cfg = self.private, self.loss_gen, self.cfg
        z0 = (p.mean[rows] + p.std[rows] * torch.randn(p.mean[rows].shape, generator=g).to(p.mean.device))
        conds = conditions(cfg.ldm.conditioner.type, p.labels[rows],
                           None if p.captions is None else [_pick(p.captions[int(r)], g) for r in rows])
        conds = self.ldm.drop_conditions(conds, cond_drop_prob(cfg), g)
        with self.autocast():
            losses = self.ldm.loss(z0 * self.ldm.scale_factor, conds, g, multiplicity=cfg.finetune.noise_multiplicity,
                                   t_range=cfg.finetune.t_range)
        return losses.float()

    def probe_losses(self, rows: torch.Tensor) -> torch.Tensor:
        """Deterministic losses of rows of 4 public stand-in examples (random latents, timesteps and
        targets from the public seed; public labels or prompts): the engine's self-check runs on them.

        In float32 whatever the run's precision: the check tests the model's structure (examples kept
        apart, parameters used inside their modules) to float32 rounding. Under bf16 autocast autograd
        sums a bias's gradient over the batch and the map in bf16: where the terms cancel it lands far
        from the engine's float32 sums (60 % on a barely trained UNet), which would refuse a sound model.
        The first private micro-batch is still checked at the run's precision (``accumulate``)."""
        g = torch.Generator().manual_seed(self.cfg.seed)
        device = next(self.ldm.parameters()).device
        x = torch.randn((PROBE_SIZE, *self.latent_shape), generator=g)
        target = torch.randn(x.shape, generator=g)
        t = torch.randint(0, self.ldm.schedule.timesteps, (PROBE_SIZE,), generator=g)
        public = (torch.arange(PROBE_SIZE) % max(1, len(self.names)))[rows]
        cond_type = self.cfg.ldm.conditioner.type
        conds = conditions(cond_type, public.to(device),
                           [f"a picture of {int(k)}" for k in public] if cond_type == "text" else None)
        with torch.autocast(device.type, enabled=False):
            context = self.ldm.context(conds) if conds is not None else None
            out = self.ldm.eps(x[rows].to(device), t[rows].to(device), context)
        return (out - target[rows].to(out.device)).pow(2).flatten(1).mean(dim=1)

    def check_engine(self, rt: Union["SingleProcess", "DistributedRun"]) -> None:
        """The engine's self-check on the probe, at float32's tolerance whatever the run's precision (the
        probe is float32): a model the engine cannot handle is refused before anything is charged."""
        from trainer.privacy.engine import SELF_CHECK_RTOL
        rt.check_engine(self.engine, self.probe_losses, PROBE_SIZE, SELF_CHECK_RTOL)


def learning_rate(ft: FinetuneConfig, step: int) -> float:
    """The learning rate of step ``step`` (0-based) of ``ft.steps``: a function of the step alone, so a
    resumed run continues the schedule where it stopped."""
    if ft.lr_schedule == "cosine":
        return ft.lr * 0.5 * (1.0 + math.cos(math.pi * step / ft.steps))
    return ft.lr


def cond_drop_prob(cfg: Config) -> float:
    """The conditioning dropout of the DP steps: ``finetune.cond_drop_prob``, else the base's."""
    ft = cfg.finetune
    return cfg.ldm.train.cond_drop_prob if ft.cond_drop_prob is None else ft.cond_drop_prob


def set_learning_rate(optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def base_rows(names: list | None, meta: dict, base_dir: Path) -> list[int] | None:
    """Rows of the base's class embedder named by ``finetune.new_class_from`` (public class names)."""
    if names is None:
        return None
    public = [str(x) for x in meta.get("label_names") or []]
    unknown = [str(x) for x in names if str(x) not in public]
    if unknown:
        raise ConfigError(f"finetune.new_class_from: {', '.join(map(repr, unknown))} not among the classes of the "
                          f"base {base_dir} ({', '.join(public) or 'it records no class names'})")
    return [public.index(str(x)) for x in names]


def _prepare(cfg: Config, rt: Union["SingleProcess", "DistributedRun"], run_dir: Path | None = None,
             seed: int | None = None, resumes: bool = True,
             accept: Callable[["Selection"], None] | None = None, command: str = "finetune") -> DPSession:
    """Load the base and the plan; build engine, sampler, ledger and optimizer.

    Refuses (ConfigError, RunError) a bad plan, a missing base, a plan that differs from the
    journal of ``run_dir`` (``resumes``; else any journal there) or that would take the private
    set past ``finetune.total_epsilon``, before anything is charged or written; a private shard
    set is counted for the plan, and encoded into its latent cache only once all of that is
    accepted and the run is not finished. Without ``run_dir`` (a session that charges nothing on
    disk) there is no journal to check. In-memory private images are encoded later
    (:meth:`DPSession.load_private`). ``accept(selection)``: the caller's own check of the trainable
    parameters, before any of that (it raises to refuse).
    The sampler, the DP noise and the loss draws use generators seeded from OS entropy, or from
    ``seed`` when a test asks for it. Its notes and warnings (``dpldm <command>: ...``) are printed once
    everything is accepted: a refusal is one line.
    """
    from trainer.data.provenance import absolute_source
    from trainer.diffusion import EMA
    from trainer.models import ClassEmbedder, new_class_embedder
    from trainer.privacy import DPGradientEngine, PoissonBatchSampler, PrivacyLedger, entropy_generator, epsilon
    from trainer.privacy.engine import SELF_CHECK_RTOL, SELF_CHECK_RTOL_BF16
    from trainer.runs import load_pipeline

    ft = cfg.finetune
    if seed is not None and rt.world_size > 1:
        # every rank would draw its slice of the Poisson batch and its noise from the same stream:
        # inclusions correlated across ranks, noise repeated, the accounting void
        raise ValueError(f"seed: a fixed seed is for one process only, got {rt.world_size} processes")
    # the checks each rank makes alone: a rank that refuses takes the others with it (no collective in here)
    with rt.refusing_together():
        if cfg.data.private is None:
            raise ConfigError("data.private: the fine-tuning stage needs a private data source")
        cfg.data.private = absolute_source(cfg.data.private)  # the run's records name it from any folder
        base_dir = _base_dir(cfg)
        ldm, autoencoder, meta, base_cfg = load_pipeline(base_dir)
        source: Union[PrivateShards, EncodedPrivateSet, "ImageSet"]
        if cfg.data.private.source == "shards":  # counted now (read once), encoded below once the plan is accepted
            source = private_shards(cfg)
            n, declared = source.count, source.names
        else:
            source = load_image_source(cfg.data.private, "data.private", autoencoder.ddconfig["in_channels"])
            n, declared = len(source.images), source.names
        public_check = refuse_public_overlap(cfg, base_dir, base_cfg, meta,
                                             source.images if isinstance(source, PrivateShards) else None)
        said = [f"note: {public_check}"] if meta.get("imported_from") else []
        for key in ("ldm", "autoencoder"):  # the architecture is the base's
            if getattr(cfg, key) != getattr(base_cfg, key):
                said.append(f"note: the config's `{key}` section differs from the base's ({base_dir}/config.yaml); "
                            "the base's is used")
            setattr(cfg, key, getattr(base_cfg, key))
        caption_note = check_captions(cfg, source, base_dir)
        said += [caption_note] if caption_note else []
        names, names_source = label_names(cfg, declared)
        q, sigma = plan_privacy(cfg, n)
        if ft.new_class_embedder:
            if ft.new_class_embedder != len(names):
                raise ConfigError(f"finetune.new_class_embedder: {ft.new_class_embedder} classes, "
                                  f"but the private set declares {len(names)} ({names_source})")
            if not isinstance(ldm.cond_stage_model, ClassEmbedder):
                raise ConfigError(f"finetune.new_class_embedder: the base ({base_dir}) is conditioned by "
                                  f"{type(ldm.cond_stage_model).__name__}, not by class labels")
            with torch.random.fork_rng(devices=[]):  # the global generator is left as it was
                torch.manual_seed(cfg.seed)  # public initialisation of the fresh embedder (the same on every rank)
                ldm.cond_stage_model = new_class_embedder(ldm.cond_stage_model, ft.new_class_embedder,
                                                          base_rows(ft.new_class_from, meta, base_dir))
        if isinstance(ldm.cond_stage_model, ClassEmbedder):
            check_labels(source, min(ldm.cond_stage_model.n_classes, len(names)))
        if isinstance(source, PrivateShards):
            from trainer.data.latent_cache import shard_caption_template
            refuse_private_prompts(cfg.sample.prompts, source.captions, shard_caption_template(source.urls), names,
                                   ldm.cond_stage_model)
        try:
            selection = select_trainable(ldm, ft.policy, ft.attention_from, ft.text_encoder_layers, ft.lora_rank,
                                         ft.lora_alpha, ft.context_grad)
        except ValueError as err:  # the messages name the finetune.* key
            raise ConfigError(str(err)) from None
        if accept is not None:
            accept(selection)
        contents = int(source.digest[:13], 16) if isinstance(source, PrivateShards) else 0
    # each rank plans from its own config and count: one that differs would clip, noise or account otherwise
    # (52 bits of the shards' digest stand for their contents: the collective carries only the comparison's inputs)
    if not rt.same_on_every_rank([n, q, sigma, ft.max_grad_norm, ft.steps, ft.noise_multiplicity, ft.delta,
                                  contents]):
        raise RunError("the processes hold different privacy plans (N, q, sigma, clipping norm, steps, K, delta or "
                       "the private shards' contents): launch every rank with the same config and private set; "
                       "nothing was written")
    trainable = {name: p for name, p in ldm.named_parameters() if p.requires_grad}
    snr, warning = noise_warning(sigma, ft.expected_batch_size, ft.steps, selection.trainable_count)
    said += [warning] if warning else []
    ledger = PrivacyLedger(sigma, q, ft.delta, planned_steps=ft.steps,
                           epsilon_budget=ft.epsilon or epsilon(sigma, q, ft.steps, ft.delta),
                           private_set=private_set_identity(cfg.data.private, n))
    finished = False
    if run_dir is not None:
        if resumes:
            load_journal(run_dir, ledger)
            finished = ledger.steps_taken >= ft.steps and (run_dir / PRIVACY_REPORT).is_file()
        elif any((run_dir / name).exists() for name in (LEDGER_FILE, *DP_TRACES)):
            raise RunError(f"{run_dir}: an earlier run here charged the private set, and its record stays: give "
                           "another finetune.name=NAME")
        if ft.total_epsilon is not None and not finished:  # rank 0 decides: the runs' records may be changing
            problem = over_total(cfg, run_dir, ledger) if rt.is_main else None
            if rt.any_rank(problem is not None):
                raise ConfigError(problem or "finetune.total_epsilon: refused on rank 0 (its message says why)")
    if isinstance(source, PrivateShards) and not finished:  # before place: ZeRO-3 partitions the encoder
        source = encode_private_shards(cfg, autoencoder, meta["autoencoder_sha256"], source, rt)
    rt.place(ldm, autoencoder)

    def generator(k: int) -> torch.Generator:
        return entropy_generator() if seed is None else torch.Generator().manual_seed(seed + k)

    sampler = PoissonBatchSampler(n, q, ft.steps, ft.physical_batch_size, generator=generator(1),
                                  rank=rt.rank, world_size=rt.world_size)
    optimizer = rt.make_optimizer(list(trainable.values()), ft.lr, ft.weight_decay)
    # q * N is the global expected batch size, whatever the number of ranks
    engine = DPGradientEngine(ldm, max_grad_norm=ft.max_grad_norm, noise_multiplier=sigma,
                              expected_batch_size=q * n, mode=ft.engine_mode, secure_noise=ft.secure_noise,
                              generator=None if seed is None else generator(3),
                              self_check_rtol=(SELF_CHECK_RTOL_BF16 if rt.placement.precision == "bf16"
                                               else SELF_CHECK_RTOL))
    ema = EMA(trainable, ft.ema_decay) if ft.ema_decay else None  # post-processing of the noisy steps
    state = TrainState(trainable, optimizer, sampler, ledger, {"base": str(base_dir.resolve())}, ema)
    for line in said if rt.is_main else []:
        print(f"dpldm {command}: {line}", file=sys.stderr)
    return DPSession(cfg, base_dir, ldm, autoencoder, selection, n, names, names_source, q, sigma, snr, engine,
                     state, tuple(meta["latent_shape"]), generator(2), rt.autocast, source,
                     meta["autoencoder_sha256"], public_check)


def _base_dir(cfg: Config) -> Path:
    """The pretrained LDM to fine-tune: ``finetune.base``, else this experiment's ``pretrain-ldm`` folder."""
    if cfg.finetune.base:
        base = Path(cfg.finetune.base)
        if not (base / "ldm.json").is_file():
            raise ConfigError(f"finetune.base: {base} is not an LDM run folder (no ldm.json): give a folder "
                              "written by `dpldm pretrain-ldm` or `dpldm import-compvis`")
        check_finished(base, "pretrain-ldm")
        return base
    return earlier_stage(cfg, "pretrain-ldm")


def _finetune(cfg: Config, rt: Union["SingleProcess", "DistributedRun"], encodings: EncodingMemo | None) -> Path:
    ft = cfg.finetune
    run_dir = stage_dir(cfg, "finetune")
    session = _prepare(cfg, rt, run_dir)
    state = session.state
    ledger = state.ledger
    checkpoint = rt.resume(run_dir, state)  # weights and optimizer; the sampler continues at the step
    check_journal_covers(run_dir, ledger, checkpoint)  # the journal (loaded by _prepare) counts every step
    step = checkpoint.step
    if rt.is_main and (run_dir / "latents").is_dir():
        print(f"dpldm finetune: warning: {run_dir / 'latents'} holds private latents written into the run folder by "
              "an earlier version (the cache now lives in private/); delete it before sharing the folder",
              file=sys.stderr)
    if step >= ft.steps and (run_dir / PRIVACY_REPORT).is_file():
        if rt.is_main:
            report = json.loads((run_dir / PRIVACY_REPORT).read_text())
            print(f"{run_dir}: already finished ({step} of {ft.steps} steps, epsilon = {report['epsilon']:.3f}); "
                  f"nothing to do. Report: {run_dir / PRIVACY_REPORT}")
        return run_dir
    session.load_private(rt, encodings)  # private data from here on
    session.check_engine(rt)
    rt.barrier()  # every rank has read the ledger before rank 0 journals the next step
    with session_lock(cfg, run_dir, ledger, rt):  # one session charges this run at a time
        return _train(cfg, rt, run_dir, session, checkpoint)


def _train(cfg: Config, rt: Union["SingleProcess", "DistributedRun"], run_dir: Path, session: DPSession,
           checkpoint: Checkpoint) -> Path:
    """The DP steps of a session that holds the run (from ``checkpoint``), then the report and the grid."""
    from trainer.interrupt import StopRequest
    from trainer.runs import class_grid

    ft = cfg.finetune
    ldm, engine, state = session.ldm, session.engine, session.state
    ledger, step = state.ledger, checkpoint.step
    if rt.is_main:
        print(session.selection.summary())
        if step:
            print(f"resuming at step {step}: {ledger.steps_taken} steps already charged")
        save_run_config(cfg, run_dir)
        write_json({"base": recorded_path(session.base_dir, run_dir), "n_classes": ft.new_class_embedder,
                    "label_names": session.names, "trainable": session.selection.trainable, "policy": ft.policy,
                    "lora": session.selection.lora},
                   run_dir / "finetune.json")
    n, q, sigma = session.n, session.q, session.sigma

    t0 = time.time()
    tags = {"stage": "finetune", "privacy": "dp-sgd", "precision": rt.placement.precision,
            **({"nonprivate_diagnostics": "logged"} if ft.log_nonprivate else {})}
    # the MLflow run of the checkpoint, else the one the journal names (a session that stopped before its first
    # checkpoint): a second run for the same steps would count twice in the spend
    run_id = checkpoint.mlflow_run_id or ledger_field(run_dir, "mlflow_run_id")
    with start_run(cfg.experiment, run_dir.name, cfg.to_dict(), tags, run_id=run_id) as mlrun, \
            StopRequest() as stop:
        preparations = json.dumps((ledger.private_set or {}).get("preparations", {}), sort_keys=True)
        mlrun.log_params({"privacy": {"sigma": sigma, "q": q, "N": n, "planned_epsilon": ledger.planned_epsilon,
                                      "preparations": preparations},  # judged like a folder's if the folder goes
                          "params": {"trainable": session.selection.trainable_count,
                                     "total": session.selection.total_count}})
        layout = rt.layout()  # None in one process
        if layout is not None:  # tags, not params: a resumed run may have another world size
            mlrun.set_tags({f"distributed.{k}": str(layout[k]) for k in ("world_size", "zero_stage")})
            if rt.is_main:
                write_json(layout, run_dir / "distributed.json")

        def checkpoint_now(mlrun_id: str | None) -> None:
            rt.save_checkpoint(run_dir, step, mlrun_id, state)

        ldm.train()
        batches = iter(state.sampler)
        nonfinite = 0  # examples left out of their steps for a non-finite gradient (this session)
        with _warn_nonfinite_on_exit(lambda: nonfinite and rt.is_main), \
                tqdm(total=ft.steps, initial=step, desc="finetune (DP)", dynamic_ncols=True,
                     disable=not rt.is_main) as bar:  # closed on any exit, before a warning or an error is printed
            while step < ft.steps:
                try:
                    ledger.record_step()  # raises before a step past the plan or the budget
                except Exception as err:  # noqa: BLE001 - the ledger says why
                    if rt.is_main:
                        print(f"stopping at step {step}: {err}")
                    break
                if rt.is_main:
                    write_journal(run_dir, ledger, mlrun.run_id)
                set_learning_rate(state.optimizer, learning_rate(ft, step))
                metrics = rt.train_step(engine, state.optimizer, next(batches), session.example_losses,
                                        session.loss_gen)
                nonfinite += int(metrics["nonfinite"])
                if state.ema is not None:
                    state.ema.update(state.trainable)
                step += 1
                bar.update(1)
                if step % ft.log_every == 0 or step == ft.steps:
                    # the accountant takes ~0.1-0.3 s per call on a CPU: at log steps only, not every step
                    spent = ledger.spent_epsilon()
                    bar.set_postfix(eps=f"{spent:.2f}")
                    diagnostics = {"nonprivate/loss": metrics["loss"], "nonprivate/batch_size": metrics["batch_size"],
                                   "nonprivate/clip_fraction": metrics["clip_fraction"],
                                   "nonprivate/nonfinite_examples": nonfinite} if ft.log_nonprivate else {}
                    mlrun.log_metrics({"privacy.epsilon_spent": spent, **diagnostics}, step=step)
                stopping = rt.any_rank(stop.requested)
                if stopping or step % ft.checkpoint_every == 0 or step == ft.steps:
                    checkpoint_now(mlrun.run_id)
                if stopping:
                    raise KeyboardInterrupt
        checkpoint_now(mlrun.run_id)
        engine.detach()
        ldm.eval()
        if state.ema is not None:  # the result is the average (the last step's weights stay in WEIGHTS_FILE)
            state.ema.copy_to(state.trainable)

        report = {**ledger.report(), "max_grad_norm": ft.max_grad_norm, "N": n, "N_is_public": N_IS_PUBLIC,
                  "expected_batch_size": ft.expected_batch_size, "noise_multiplicity": ft.noise_multiplicity,
                  "secure_noise": ft.secure_noise, "signal_to_noise_bound": session.signal_to_noise,
                  "policy": ft.policy, "trainable_parameters": session.selection.trainable_count,
                  "total_parameters": session.selection.total_count, "trainable_names": session.selection.trainable,
                  "label_names": session.names, "label_names_from": session.names_source,
                  "neighbouring": "add/remove one example", "data": _describe(cfg.data.private),
                  "public_pretraining_data": session.public_check}
        spend = spend_or_warn(cfg, run_dir.name, ledger) if rt.is_main else None
        if spend is not None:  # alone, its own epsilon; else over the experiment's runs on these people too
            mlrun.log_metrics({"privacy.private_set_epsilon": spend.epsilon})
        if spend is not None and len(spend.charges) > 1:
            report["private_set_spend"] = spend.to_dict()
        if rt.is_main:
            write_json(report, run_dir / PRIVACY_REPORT)
        grid = rt.sample_grid(lambda path: class_grid(ldm, session.autoencoder, session.latent_shape, cfg,
                                                      session.names, path, torch.Generator().manual_seed(cfg.seed)),
                              run_dir / "samples.png")
        mlrun.log_metrics({"privacy.epsilon": report["epsilon"], "privacy.delta": ft.delta,
                           "privacy.steps": ledger.steps_taken, "params.trainable": session.selection.trainable_count,
                           "wall_time_s": time.time() - t0})
        mlrun.log_result(run_dir, grid, run_dir / PRIVACY_REPORT)
        mlrun.log_pipeline(run_dir, [WEIGHTS_FILE, *([EMA_FILE] if state.ema else []), "finetune.json", PRIVACY_REPORT])
    if rt.is_main:
        print(f"DP fine-tuning: epsilon = {report['epsilon']:.3f}, delta = {ft.delta:g} after {ledger.steps_taken} "
              f"steps (sigma = {sigma:.4f}, q = {q:.5f}); samples: {grid}; report: {run_dir / PRIVACY_REPORT}")
        if "private_set_spend" in report:
            print(f"Released with the others: {spend.line()}")
    return run_dir


@contextlib.contextmanager
def _warn_nonfinite_on_exit(happened: Callable[[], bool]):
    """Warn once the DP steps end (on any exit) if ``happened()``: examples were left out for a non-finite
    gradient. Not as it happens: the step it names, or the progress bar beside it, would tell which steps
    drew such an example (a fact about private examples that no noise covers)."""
    try:
        yield
    finally:
        if happened():
            print("dpldm finetune: warning (non-private diagnostic): in this session some examples' gradients were "
                  "not finite and were left out of their steps (the model may be diverging: lower finetune.lr); "
                  "finetune.log_nonprivate=true logs their count as nonprivate/nonfinite_examples", file=sys.stderr)


def run_audit(cfg: Config, canaries: int = 1000, confidence: float = 0.95, seed: int | None = None):
    """Train the fine-tuning plan of ``cfg`` with gradient-space canaries and bound epsilon from below.

    One process. Nothing of the model is kept: the run folder ``<experiment>/audit`` gets the
    resolved config, the ledger journal and ``audit-report.json``. The audit is itself a DP
    computation on ``data.private`` with the plan's (epsilon, delta); its journal keeps it in the
    experiment's record of what the private set has spent, so a second audit needs another name. Returns a ``trainer.privacy.audit.AuditResult``.
    """
    from trainer.distributed import foreign_launch
    from trainer.privacy import entropy_generator
    from trainer.privacy.audit import CANARY_NORM, GradientCanaries, audit, scores
    if cfg.finetune.deepspeed_config:
        raise ConfigError("finetune.deepspeed_config: dpldm audit runs in one process; unset it")
    several = foreign_launch() or (f"WORLD_SIZE={os.environ['WORLD_SIZE']}"
                                   if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None)
    if several:
        raise ConfigError(f"launched as one of several processes ({several}): dpldm audit runs in one process; "
                          "run it without a launcher")
    if not 0.5 <= confidence < 1:
        raise ConfigError(f"--confidence: must be in [0.5, 1), got {confidence}")
    ft, rt = cfg.finetune, SingleProcess(Placement.from_config(cfg, private=True))
    run_dir = stage_dir(cfg, "audit")

    def accept(selection: "Selection") -> None:  # before the private set is encoded
        if not 1 <= canaries <= selection.trainable_count:
            raise ConfigError(f"--canaries: must be in [1, {selection.trainable_count}] (one trainable coordinate "
                              f"each), got {canaries}")

    session = _prepare(cfg, rt, run_dir, seed=seed, resumes=False, accept=accept, command="audit")
    session.load_private(rt)
    engine, ledger, optimizer = session.engine, session.state.ledger, session.state.optimizer
    params = [p for _, p in engine.params]
    dim = sum(p.numel() for p in params)
    session.check_engine(rt)
    with session_lock(cfg, run_dir, ledger, rt):  # another audit here now is refused
        save_run_config(cfg, run_dir)
        marks = GradientCanaries(canaries, dim, CANARY_NORM * ft.max_grad_norm,
                                 entropy_generator() if seed is None else torch.Generator().manual_seed(seed))
        session.ldm.train()
        batches = iter(session.state.sampler)
        with tqdm(total=ft.steps, desc="audit (DP + canaries)", dynamic_ncols=True) as bar:  # closed on any exit
            for step in range(ft.steps):
                ledger.record_step()
                write_journal(run_dir, ledger)  # the record of the private set's use
                set_learning_rate(optimizer, learning_rate(ft, step))
                for idx in next(batches):
                    engine.accumulate(session.example_losses(idx))
                for rows in marks.sample(session.q).split(8):  # chunks: each canary gradient is dense [dim]
                    engine.accumulate_per_example_gradients(marks.gradients(rows))
                try:
                    nonfinite = bool(engine.nonfinite_examples())
                except RuntimeError:
                    nonfinite = True
                if nonfinite:
                    raise RunError("an example's gradient is not finite; the audit measures each step as it is and "
                                   "stops (fine-tuning leaves such examples out)")
                engine.finalize()
                marks.observe(torch.cat([p.grad.detach().flatten() for p in params]))
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                bar.update(1)
        engine.detach()
    result = audit(scores(torch.stack(marks.observed), session.sigma, session.q, ft.max_grad_norm,
                          session.q * session.n), marks.included, ft.delta, ledger.spent_epsilon(), confidence)
    spend = spend_or_warn(cfg, run_dir.name, ledger, "audit")
    write_json({"epsilon_lower_bound": result.lower_bound, "claimed_epsilon": result.claimed, "delta": ft.delta,
                "confidence": result.confidence, "canaries": result.canaries, "included": result.included,
                "guesses": result.guesses, "correct": result.correct, "ceiling": result.ceiling,
                "plans": [dict(zip(("in", "out", "correct", "bound"), row)) for row in result.plans],
                "steps": ledger.steps_taken, "noise_multiplier": session.sigma, "sample_rate": session.q,
                "canary_norm": CANARY_NORM * ft.max_grad_norm,
                "method": "one-run audit (Steinke, Nasr, Jagielski 2023), Dirac gradient canaries, white-box "
                          "scores of the released noisy gradients",
                **({"private_set_spend": spend.to_dict()} if spend and len(spend.charges) > 1 else {})},
               run_dir / AUDIT_REPORT)
    print(f"canaries: {result.canaries} ({result.included} included); best plan: {result.correct} of "
          f"{result.guesses} guesses right; ceiling with {result.canaries} canaries: {result.ceiling:.2f}; "
          f"report: {run_dir / AUDIT_REPORT}")
    if spend and len(spend.charges) > 1:
        print(f"The audit is a DP run on the private set too: {spend.line()}")
    print(result.line())
    return result


def register(sub: argparse._SubParsersAction) -> None:
    from trainer.cli import add_config_args, positive_int
    p = sub.add_parser("finetune", help="DP-SGD fine-tuning on the private data",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Fine-tune the selected parameters (finetune.policy) of the pretrained LDM on "
                                   "data.private with DP-SGD. Sigma is calibrated to finetune.epsilon (or set "
                                   "finetune.noise_multiplier to get the epsilon reported). Resumes if interrupted "
                                   "(Ctrl-C saves a checkpoint after the current step). Runs on several processes "
                                   "under torchrun or the deepspeed launcher (ZeRO stage from "
                                   "finetune.deepspeed_config).",
                       epilog="frequent keys (KEY=VALUE after the options; every key: --print-config):\n"
                              "  finetune.name=NAME        a run beside the others of the same base, in "
                              "OUTPUT_DIR/EXPERIMENT/finetune-NAME\n"
                              "  finetune.base=DIR         the pretrained LDM (a pretrain-ldm or import-compvis "
                              "folder; default: EXPERIMENT/ldm)\n"
                              "  finetune.epsilon=10       the budget, with finetune.delta=1e-5 (< 1/N)\n"
                              "  finetune.total_epsilon=12 cap on the private set's epsilon over the experiment's "
                              "DP runs on it, composed\n"
                              "  finetune.policy=attention attention | attention_blocks | embedder_only | full | lora (finetune.lora_rank=4)\n"
                              "  finetune.steps=200 finetune.expected_batch_size=500 finetune.max_grad_norm=1")
    add_config_args(p)
    p.set_defaults(func=lambda args: run(args.config_obj) and 0)

    p = sub.add_parser("audit", help="empirical privacy audit of the fine-tuning plan (canaries, one run)",
                       description="Train the fine-tuning plan of the config once with gradient-space canaries, "
                                   "each included with probability 1/2, and guess from the released noisy "
                                   "gradients which were included (Steinke, Nasr and Jagielski 2023). The last line "
                                   "is 'epsilon lower bound: X at 95% confidence; claimed epsilon: Y'. A bound "
                                   "above the claim means the DP-SGD step is broken. The bound cannot exceed a "
                                   "ceiling set by the number of canaries (4.6 for 1000). The audit is itself a DP "
                                   "computation on data.private: no model is kept, its steps count in the private "
                                   "set's total, and another audit needs another finetune.name.")
    add_config_args(p)
    p.add_argument("--quick", action="store_true", help="on the quick demo settings (as `dpldm demo --quick`)")
    p.add_argument("--canaries", type=positive_int, default=1000, help="number of canaries m (default: 1000)")
    p.add_argument("--confidence", type=float, default=0.95, help="confidence of the bound (default: 0.95)")
    p.set_defaults(func=lambda args: run_audit(args.config_obj, args.canaries, args.confidence) and 0)
