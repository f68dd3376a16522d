"""Data-parallel DP fine-tuning on 2 CPU processes (gloo): ZeRO-3, exact updates, noise once, resume.

The multi-process parts run this file as a worker under ``torchrun`` or the ``deepspeed``
launcher (``python tests/test_distributed.py <scenario> ...``); the exact launch lines are in
``_torchrun``, ``_deepspeed`` and ``test_zero3_finetune_interrupted_and_resumed_on_another_world_size``.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from trainer.config import load_config
from trainer.stages.demo import QUICK

ROOT = Path(__file__).resolve().parent.parent
# a tiny UNet and autoencoder, a few hundred MNIST digits, 4 DP steps
TINY = QUICK + [
    "experiment=dist", "data.public.num_examples=256", "data.private.num_examples=300",
    "autoencoder.train.batch_size=8", "autoencoder.train.steps=2",
    "ldm.unet.model_channels=32", "ldm.unet.num_head_channels=16", "ldm.unet.context_dim=32",
    "ldm.conditioner.embed_dim=32", "ldm.train.steps=2", "ldm.train.batch_size=16",
    "finetune.steps=4", "finetune.expected_batch_size=40", "finetune.physical_batch_size=16",
    "finetune.checkpoint_every=2", "finetune.log_every=1", "sample.ddim_steps=2", "sample.num_per_class=1",
]
# the update scenarios: a fixed problem, no pretraining needed
N_EXAMPLES, CLIP, SIGMA, EXPECTED_BATCH = 24, 0.05, 1.5, 4.0
SGD_LR, ADAMW_LR = 10.0, 1e-3  # SGD: updates (~1e-4) far above float32 rounding of the weights (~1e-7)
BATCHES = [[0, 1, 2, 3, 4, 6, 8, 10, 12], [2, 1, 3, 5, 7, 9, 11, 23]]  # 2 ranks: rank 1, then rank 0, pads


# --- the fixed problem shared by the workers and the single-process reference ----------------------

def tiny_problem():
    """Models with perturbed weights (so every trainable parameter gets a gradient), images, labels,
    and a fixed (timestep, noise) draw per example: the same on every process."""
    from trainer.selection import select_trainable
    from trainer.stages.common import build_autoencoder
    from trainer.stages.common import build_ldm
    cfg = load_config("demo", TINY)
    torch.manual_seed(0)
    ldm, autoencoder = build_ldm(cfg, 0.5), build_autoencoder(cfg)
    with torch.no_grad():
        for p in ldm.parameters():
            p.add_(0.05 * torch.randn_like(p))
    select_trainable(ldm, "attention", 1)
    autoencoder.eval().requires_grad_(False)
    g = torch.Generator().manual_seed(1)
    images = torch.rand(N_EXAMPLES, 1, 32, 32, generator=g) * 2 - 1
    labels = torch.randint(0, 26, (N_EXAMPLES,), generator=g)
    t = torch.randint(0, 1000, (N_EXAMPLES,), generator=g)
    with torch.no_grad():
        latent_shape = autoencoder.encode(images[:1])[0].shape[1:]
    noise = torch.randn(N_EXAMPLES, *latent_shape, generator=g)
    return cfg, ldm, autoencoder, images, labels, t, noise


def fixed_losses(ldm, mean, labels, t, noise):
    """Per-example losses of rows (no randomness): eps-prediction MSE with the rows' fixed draws."""
    def example_losses(rows: torch.Tensor) -> torch.Tensor:
        z0 = mean[rows] * ldm.scale_factor
        pred = ldm.eps(ldm.schedule.q_sample(z0, t[rows], noise[rows]), t[rows], ldm.context(labels[rows]))
        return (pred - noise[rows]).pow(2).flatten(1).mean(dim=1)
    return example_losses


NAN_EXAMPLE = 5  # in BATCHES[1], on rank 1 of 2


def with_nan(noise: torch.Tensor) -> torch.Tensor:
    """The fixed noise draws with NAN_EXAMPLE's made NaN (its loss and gradient are then NaN)."""
    out = noise.clone()
    out[NAN_EXAMPLE] = float("nan")
    return out


def micro_batches(indices: list[int], size: int = 4) -> list[torch.Tensor]:
    idx = torch.tensor(indices, dtype=torch.int64)
    return list(torch.split(idx, size)) if len(idx) else [idx]


def flat_trainable(ldm) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in ldm.parameters() if p.requires_grad])


def synthetic_grads(params, step: int) -> list[torch.Tensor]:
    """A fixed gradient per parameter, to compare optimizers on exactly the same input."""
    return [torch.randn(p.shape, generator=torch.Generator().manual_seed(1000 * step + i)) for i, p in enumerate(params)]


# --- workers (run under a launcher) --------------------------------------------------------------

def update_worker(out: Path, deepspeed_config: str) -> None:
    """(a) two noise-free DP steps on BATCHES with SGD on the shards (update = -SGD_LR * summed gradient),
    (d) one more step in fp32 and in bf16 autocast from the same weights, (b) two sharded-AdamW steps on
    synthetic gradients, (c) one noisy DP step on empty batches."""
    from trainer.distributed import DistributedRun, load_deepspeed_config
    from trainer.privacy import DPGradientEngine
    cfg, ldm, autoencoder, images, labels, t, noise = tiny_problem()
    rt = DistributedRun(load_deepspeed_config(deepspeed_config, cfg.finetune))
    rank, world = rt.rank, rt.world_size
    rt.place(ldm, autoencoder)
    layout = rt.layout()
    mean, _, local_labels = rt.encode(autoencoder, images, labels)
    pad_t, pad_noise = t[:1], torch.zeros_like(noise[:1])  # the padding row's draw (its loss counts 0)
    example_losses = fixed_losses(ldm, mean, local_labels, torch.cat([t[rank::world], pad_t]),
                                  torch.cat([noise[rank::world], pad_noise]))
    params = [p for p in ldm.parameters() if p.requires_grad]

    def sharded_sgd(lr: float):
        optimizer = rt.make_optimizer(params, lr, 0.0)
        optimizer.optimizer = torch.optim.SGD([optimizer.master], lr=lr)
        return optimizer

    engine = DPGradientEngine(ldm, max_grad_norm=CLIP, noise_multiplier=0.0, expected_batch_size=EXPECTED_BATCH)
    optimizer = sharded_sgd(SGD_LR)
    steps = []
    for batch in BATCHES:
        mine = [i for i in batch if i % world == rank]
        metrics = rt.train_step(engine, optimizer, micro_batches(mine), example_losses)
        steps.append({"metrics": metrics, "params": flat_trainable(ldm)})
    # (d) the same step in bf16 autocast (fp32 weights): close to the fp32 update
    start = [p.detach().clone() for p in params]
    updates = []
    for dtype in (None, torch.bfloat16):
        rt.settings.autocast_dtype = dtype
        with torch.no_grad():
            for p, p0 in zip(params, start):
                p.copy_(p0)
        before = flat_trainable(ldm)
        mine = [i for i in BATCHES[0] if i % world == rank]
        rt.train_step(engine, sharded_sgd(SGD_LR), micro_batches(mine), example_losses)
        updates.append(flat_trainable(ldm) - before)
    rt.settings.autocast_dtype = None
    with torch.no_grad():
        for p, p0 in zip(params, start):
            p.copy_(p0)
    # (e) BATCHES[1] again, example NAN_EXAMPLE's loss NaN: every rank redoes the step, that example left out
    nan_losses = fixed_losses(ldm, mean, local_labels, torch.cat([t[rank::world], pad_t]),
                              torch.cat([with_nan(noise)[rank::world], pad_noise]))
    mine = [i for i in BATCHES[1] if i % world == rank]
    nan_step = {"metrics": rt.train_step(engine, sharded_sgd(SGD_LR), micro_batches(mine), nan_losses),
                "params": flat_trainable(ldm)}
    with torch.no_grad():
        for p, p0 in zip(params, start):
            p.copy_(p0)
    engine.detach()

    optimizer = rt.make_optimizer(params, ADAMW_LR, 0.01)
    for k in range(2):
        for p, g in zip(params, synthetic_grads(params, k)):
            p.grad = g / world  # the sum over ranks is g
        optimizer.step()
    adamw = flat_trainable(ldm)

    engine = DPGradientEngine(ldm, max_grad_norm=CLIP, noise_multiplier=SIGMA, expected_batch_size=EXPECTED_BATCH)
    optimizer = sharded_sgd(1.0)  # the update is the noisy gradient itself
    before = flat_trainable(ldm)
    rt.train_step(engine, optimizer, micro_batches([]), example_losses)
    noisy_update = before - flat_trainable(ldm)
    if rt.is_main:
        torch.save({"layout": layout, "steps": steps, "bf16_vs_fp32": updates, "adamw": adamw,
                    "noisy_update": noisy_update, "nan_step": nan_step}, out)
    rt.close(finished=True)


class Interrupted(Exception):
    """Raised by the finetune worker right after a chosen checkpoint."""


def unlike_plans_worker(rank1_override: str, overrides: list[str]) -> None:
    """``dpldm finetune`` where rank 1 alone adds ``rank1_override``: every rank must refuse."""
    from trainer.config import ConfigError
    from trainer.errors import RunError
    from trainer.stages import finetune
    try:
        finetune.run(load_config("demo", overrides + ([rank1_override] if os.environ["RANK"] == "1" else [])))
    except (RunError, ConfigError) as refused:
        print(f"rank {os.environ['RANK']} refused: {refused}")


def finetune_worker(stop_after: int, overrides: list[str]) -> None:
    """``dpldm finetune`` with these overrides; with ``stop_after > 0``, stop right after that step's checkpoint."""
    from trainer.distributed import DistributedRun
    from trainer.stages import finetune
    save = DistributedRun.save_checkpoint

    def save_then_stop(self, run_dir, step, *args, **kwargs):
        save(self, run_dir, step, *args, **kwargs)
        if step == stop_after:
            raise Interrupted(step)

    DistributedRun.save_checkpoint = save_then_stop
    try:
        finetune.run(load_config("demo", overrides))
    except Interrupted as stop:
        print(f"interrupted after the checkpoint of step {stop}")


# --- launching ------------------------------------------------------------------------------------

def _env(tmp: Path) -> dict:
    env = dict(os.environ, MLFLOW_TRACKING_URI=f"sqlite:///{tmp}/mlflow.db", PYTHONPATH=str(ROOT),
               OMP_NUM_THREADS="1")
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def _run(cmd: list[str], tmp: Path, timeout: int = 240) -> str:
    done = subprocess.run(cmd, cwd=tmp, env=_env(tmp), capture_output=True, text=True, timeout=timeout)
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{output[-4000:]}"
    return output


TEARDOWN_ABORT = "terminate called without an active exception"


def _run_again_on_teardown_abort(cmd: list[str], tmp: Path) -> str:
    """``_run`` of a worker that does the same whenever it runs, launched once more if a rank aborted in
    C++ with TEARDOWN_ABORT: a rare crash (once in some hundred launches), where a rank died about when
    the work ends (after normal work the ranks meet at a barrier before leaving the group, see
    ``Runtime.close``; after an error they cannot). Any other failure, or the same crash twice, fails."""
    for attempt in (1, 2):
        try:
            return _run(cmd, tmp)
        except AssertionError as failure:
            if attempt == 2 or TEARDOWN_ABORT not in str(failure):
                raise
            warnings.warn(f"{' '.join(cmd[-3:])}: a rank aborted ({TEARDOWN_ABORT}); launched again")
    raise AssertionError("unreachable")


def _run_update(world: int, out: Path, tmp: Path) -> None:
    """The update worker (a pure function of the fixed problem, writing one file)."""
    _run_again_on_teardown_abort(_torchrun(world, "update", str(out), "zero3"), tmp)


def _free_port() -> str:
    from trainer.distributed import _free_port
    return str(_free_port())


def _torchrun(nproc: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
            _free_port(), __file__, *args]


def _deepspeed(hostfile: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--hostfile", str(hostfile), "--no_ssh",
            "--node_rank", "0", "--master_addr", "127.0.0.1", "--master_port", _free_port(), "--no_local_rank",
            __file__, *args]


# --- tests ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def updates(tmp_path_factory):
    """The update worker on 1 and on 2 processes (ZeRO-3), and the single-process reference."""
    tmp = tmp_path_factory.mktemp("updates")
    for world in (1, 2):
        _run_update(world, tmp / f"world{world}.pt", tmp)
    from trainer.privacy import DPGradientEngine
    from trainer.distributed import SingleProcess
    cfg, ldm, autoencoder, images, labels, t, noise = tiny_problem()
    rt = SingleProcess()
    mean, _, labels = rt.encode(autoencoder, images, labels)
    params = [p for p in ldm.parameters() if p.requires_grad]
    engine = DPGradientEngine(ldm, max_grad_norm=CLIP, noise_multiplier=0.0, expected_batch_size=EXPECTED_BATCH)
    optimizer = torch.optim.SGD(params, lr=SGD_LR)
    reference = {"steps": []}
    for batch in BATCHES:
        metrics = rt.train_step(engine, optimizer, micro_batches(batch), fixed_losses(ldm, mean, labels, t, noise))
        reference["steps"].append({"metrics": metrics, "params": flat_trainable(ldm)})
    start = [p.detach().clone() for p in params]  # (e): BATCHES[1] without NAN_EXAMPLE, then back
    rt.train_step(engine, torch.optim.SGD(params, lr=SGD_LR),
                  micro_batches([i for i in BATCHES[1] if i != NAN_EXAMPLE]), fixed_losses(ldm, mean, labels, t, noise))
    reference["nan_step"] = flat_trainable(ldm)
    with torch.no_grad():
        for p, p0 in zip(params, start):
            p.copy_(p0)
    engine.detach()
    optimizer = rt.make_optimizer(params, ADAMW_LR, 0.01)  # torch.optim.AdamW
    for k in range(2):
        for p, g in zip(params, synthetic_grads(params, k)):
            p.grad = g
        optimizer.step()
    reference["adamw"] = flat_trainable(ldm)
    return {1: torch.load(tmp / "world1.pt", weights_only=True), 2: torch.load(tmp / "world2.pt", weights_only=True),
            "reference": reference}


@pytest.mark.multiprocess
@pytest.mark.slow
def test_zero3_gives_each_rank_half_of_the_frozen_weights(updates):
    one, two = updates[1]["layout"], updates[2]["layout"]
    assert one["zero_stage"] == two["zero_stage"] == 3
    assert one["frozen_parameters_held_per_rank"] == [one["frozen_parameters"]]
    held = two["frozen_parameters_held_per_rank"]
    assert len(held) == 2
    for n in held:  # partitions are padded per tensor: about half, never much more
        assert 0.49 <= n / two["frozen_parameters"] <= 0.52


@pytest.mark.multiprocess
@pytest.mark.slow
def test_two_ranks_update_like_one_process_without_noise(updates):
    previous = None
    for step, ref in enumerate(updates["reference"]["steps"]):
        for world in (1, 2):
            got = updates[world]["steps"][step]
            assert got["metrics"]["batch_size"] == ref["metrics"]["batch_size"] == len(BATCHES[step])
            assert got["metrics"]["loss"] == pytest.approx(ref["metrics"]["loss"], rel=1e-5)
            assert got["metrics"]["clip_fraction"] == pytest.approx(ref["metrics"]["clip_fraction"])
            torch.testing.assert_close(got["params"], ref["params"], rtol=0, atol=5e-7)
        moved = (ref["params"] - (previous if previous is not None else ref["params"])).abs()
        if previous is not None:  # the updates are far larger than the tolerance
            assert moved.median() > 2e-5 and moved.max() > 1e-3
        previous = ref["params"]
    ref_update = updates["reference"]["adamw"] - previous
    assert ref_update.abs().median() > 1e-3  # two AdamW steps of lr 1e-3
    for world in (1, 2):  # the sharded AdamW is AdamW (up to float32 rounding of the weights)
        update = updates[world]["adamw"] - updates[world]["steps"][-1]["params"]
        torch.testing.assert_close(update, ref_update, rtol=0, atol=3e-7)


@pytest.mark.multiprocess
@pytest.mark.slow
def test_an_example_with_a_nan_loss_is_left_out_of_the_step_on_every_rank(updates):
    """Its NaN would spread to the whole released gradient: every rank redoes the step (ZeRO-3's
    gathers need the same forwards on all), and the update is the one without that example."""
    for world in (1, 2):
        got = updates[world]["nan_step"]
        assert got["metrics"]["nonfinite"] == 1 and got["metrics"]["batch_size"] == len(BATCHES[1]) - 1
        torch.testing.assert_close(got["params"], updates["reference"]["nan_step"], rtol=0, atol=5e-7)
    assert (updates["reference"]["nan_step"] - updates["reference"]["steps"][-1]["params"]).abs().max() > 1e-3


@pytest.mark.multiprocess
@pytest.mark.slow
def test_bf16_autocast_update_is_close_to_the_fp32_one(updates):
    for world in (1, 2):
        fp32, bf16 = (u.double() for u in updates[world]["bf16_vs_fp32"])
        assert fp32.norm() > 1e-3
        assert torch.nn.functional.cosine_similarity(fp32, bf16, dim=0) > 0.99
        assert (bf16.norm() / fp32.norm()).item() == pytest.approx(1.0, abs=0.05)


@pytest.mark.multiprocess
@pytest.mark.slow
def test_noise_is_added_once_per_coordinate_whatever_the_world_size(updates):
    expected_var = (SIGMA * CLIP / EXPECTED_BATCH) ** 2
    draws = {}
    for world in (1, 2):
        g = updates[world]["noisy_update"].double()
        assert g.numel() > 100_000
        assert abs(g.mean()) < 5 * (expected_var / g.numel()) ** 0.5
        # a second noising rank doubles the variance; none halves it to 0
        assert g.var().item() == pytest.approx(expected_var, rel=0.03)
        draws[world] = g
    # different runs draw different noise (OS entropy, no shared seed)
    corr = torch.corrcoef(torch.stack([draws[1], draws[2]]))[0, 1]
    assert abs(corr) < 0.02


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """Tiny pretrain-ae and pretrain-ldm runs (in this process) for the stage tests."""
    tmp = tmp_path_factory.mktemp("stage")
    old = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp}/mlflow.db"
    from trainer.stages import pretrain_ae, pretrain_ldm
    cfg = load_config("demo", TINY + [f"output_dir={tmp / 'runs'}"])
    pretrain_ae.run(cfg)
    pretrain_ldm.run(cfg)
    if old is None:
        os.environ.pop("MLFLOW_TRACKING_URI")
    else:
        os.environ["MLFLOW_TRACKING_URI"] = old
    return tmp


@pytest.mark.multiprocess
@pytest.mark.slow
def test_zero3_finetune_interrupted_and_resumed_on_another_world_size(pretrained):
    from safetensors.torch import load_file

    from trainer.privacy import PrivacyLedger
    from trainer.stages.finetune import plan_privacy
    from trainer.stages.private_set import private_set_identity
    tmp = pretrained
    overrides = TINY + [f"output_dir={tmp / 'runs'}", "finetune.deepspeed_config=zero3", "finetune.ema_decay=0.5"]
    run_dir = tmp / "runs" / "dist" / "finetune"
    hostfile = tmp / "hostfile"
    hostfile.write_text("localhost slots=2\n")

    # 2 ranks under the deepspeed launcher, stopped right after the checkpoint of step 2 (of 4)
    out = _run(_deepspeed(hostfile, "finetune", "2", *overrides), tmp)
    assert "interrupted after the checkpoint of step 2" in out
    layout = json.loads((run_dir / "distributed.json").read_text())
    assert layout["world_size"] == 2 and layout["zero_stage"] == 3
    assert all(0.49 <= n / layout["frozen_parameters"] <= 0.52 for n in layout["frozen_parameters_held_per_rank"])
    assert json.loads((run_dir / "ledger.json").read_text())["steps_taken"] == 2
    assert json.loads((run_dir / "checkpoints" / "latest.json").read_text())["step"] == 2
    assert sorted(p.name for p in (run_dir / "checkpoints" / "step-000002").iterdir()) == [
        "finetuned-ema.safetensors", "rank-00000-of-00002.pt", "rank-00001-of-00002.pt", "trainable.safetensors"]
    assert json.loads((run_dir / "checkpoints" / "latest.json").read_text())["ledger"]["steps_taken"] == 2
    for rank in (0, 1):  # optimizer shard and step only: no sampler or generator state to replay batches or noise
        shard = torch.load(run_dir / "checkpoints" / "step-000002" / f"rank-{rank:05d}-of-00002.pt", weights_only=True)
        assert set(shard) == {"step", "rank", "world_size", "optimizer"}

    # resumed as one plain process (a world of one) with the same DeepSpeed config: it finishes the plan
    _run([sys.executable, "-m", "trainer.cli", "finetune", *overrides], tmp)
    cfg = load_config("demo", overrides)
    q, sigma = plan_privacy(cfg, cfg.data.private.num_examples)
    uninterrupted = PrivacyLedger(sigma, q, cfg.finetune.delta, cfg.finetune.epsilon, cfg.finetune.steps,
                                  private_set=private_set_identity(cfg.data.private, cfg.data.private.num_examples))
    for _ in range(cfg.finetune.steps):
        uninterrupted.record_step()
    journal = json.loads((run_dir / "ledger.json").read_text())
    assert journal.pop("mlflow_run_id") and journal == uninterrupted.state_dict()
    report = json.loads((run_dir / "privacy-report.json").read_text())
    assert report["steps"] == 4 and report["epsilon"] == pytest.approx(uninterrupted.spent_epsilon())
    latest = json.loads((run_dir / "checkpoints" / "latest.json").read_text())
    assert latest["step"] == 4 and latest["world_size"] == 1
    assert [p.name for p in (run_dir / "checkpoints").glob("step-*")] == ["step-000004"]
    weights = load_file(str(run_dir / "finetuned.safetensors"))
    assert sorted(weights) == sorted(report["trainable_names"])
    ema = load_file(str(run_dir / "finetuned-ema.safetensors"))  # the EMA resumed with the run: what is sampled
    assert sorted(ema) == sorted(weights) and any(not torch.equal(ema[k], weights[k]) for k in ema)
    assert (run_dir / "samples.png").is_file()


@pytest.mark.multiprocess
@pytest.mark.slow
@pytest.mark.parametrize("difference", ["clipping norm", "private images"])
def test_ranks_that_plan_differently_all_refuse_before_writing(pretrained, difference):
    """Rank 1 alone clips at another norm, or reads other private images (as many, other contents): the
    ranks compare their privacy plans and every one refuses (a rank that clipped, noised or accounted
    otherwise, or trained on other people, would void the guarantee), writing nothing."""
    from trainer.data.shards import WriteOptions, write_shards
    from trainer.data.sources import mnist_source
    tmp = pretrained
    name = "unlike-" + difference.replace(" ", "-")
    overrides = TINY + [f"output_dir={tmp / 'runs'}", f"finetune.name={name}"]
    if difference == "clipping norm":
        rank1 = "finetune.max_grad_norm=2.0"
    else:
        for split in ("train", "val"):
            write_shards(mnist_source(split), tmp / f"digits-{split}", WriteOptions(samples_per_shard=50, limit=150),
                         progress_bar=False)
        overrides += ["data.private.source=shards", f"data.private.path={tmp / 'digits-train'}"]
        rank1 = f"data.private.path={tmp / 'digits-val'}"
    out = _run_again_on_teardown_abort(_torchrun(2, "unlike-plans", rank1, *overrides), tmp)
    for rank in (0, 1):
        assert f"rank {rank} refused: the processes hold different privacy plans" in out
    assert not (tmp / "runs" / "dist" / f"finetune-{name}").exists()


@pytest.mark.multiprocess
def test_a_rank_whose_own_check_refuses_takes_the_others_with_it(pretrained):
    """Rank 1 alone names a class the base lacks: it refuses with that reason and rank 0 refuses too
    (instead of waiting in its next collective until the launcher stops it), writing nothing."""
    tmp = pretrained
    overrides = TINY + [f"output_dir={tmp / 'runs'}", "finetune.name=unlike-classes"]
    out = _run_again_on_teardown_abort(_torchrun(2, "unlike-plans", "finetune.new_class_from=[o,l,z,e,y,s,b,t,g,nine]",
                                                *overrides), tmp)
    assert "rank 1 refused: finetune.new_class_from: 'nine' not among the classes of the base" in out
    assert "rank 0 refused: another process refused the run" in out
    assert not (tmp / "runs" / "dist" / "finetune-unlike-classes").exists()


@pytest.mark.multiprocess
@pytest.mark.slow
def test_zero3_finetune_on_private_shards_encodes_them_before_partitioning(pretrained):
    """Two ranks under ZeRO-3 on private shards: they encode the cache with the whole encoder (after
    partitioning it would fail), complete it (no parts left) outside the run folder, and train on its N."""
    from trainer.data.shards import WriteOptions, write_shards
    from trainer.data.sources import mnist_source
    tmp = pretrained
    shards = tmp / "private-shards"
    write_shards(mnist_source("train"), shards, WriteOptions(samples_per_shard=50, limit=150), progress_bar=False)
    overrides = TINY + [f"output_dir={tmp / 'runs'}", "finetune.deepspeed_config=zero3", "finetune.name=shards",
                        "finetune.steps=2", "data.private.source=shards", f"data.private.path={shards}"]
    hostfile = tmp / "hostfile-shards"
    hostfile.write_text("localhost slots=2\n")
    _run(_deepspeed(hostfile, "finetune", "0", *overrides), tmp)
    run_dir = tmp / "runs" / "dist" / "finetune-shards"
    report = json.loads((run_dir / "privacy-report.json").read_text())
    assert report["N"] == 150 and report["steps"] == 2
    assert json.loads((run_dir / "distributed.json").read_text())["zero_stage"] == 3
    [cache] = (tmp / "runs" / "dist" / "private").iterdir()
    assert json.loads((cache / "manifest.json").read_text())["count"] == 150 and not (cache / "parts").exists()
    assert not list(run_dir.rglob("*.npy"))


if __name__ == "__main__":  # worker entry: python tests/test_distributed.py <scenario> <args...>
    scenario, *rest = sys.argv[1:]
    if scenario == "update":
        update_worker(Path(rest[0]), rest[1])
    elif scenario == "finetune":
        finetune_worker(int(rest[0]), rest[1:])
    elif scenario == "unlike-plans":
        unlike_plans_worker(rest[0], rest[1:])
    else:
        raise SystemExit(f"unknown scenario {scenario!r} (update | finetune | unlike-plans)")
