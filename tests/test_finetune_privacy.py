"""The fine-tuning stage fails closed: exact ledger on every path, sane budgets, no secret state on disk."""
import json
import math
import re

import pytest
import torch
from conftest import mlflow_store

from trainer import cli
from trainer.config import ConfigError, dump_config, load_config
from trainer.errors import RunError
from trainer.stages import finetune, private_set
from trainer.stages.demo import QUICK

TINY = QUICK + ["data.public.num_examples=520", "data.private.num_examples=1000", "autoencoder.train.batch_size=8",
                "autoencoder.train.steps=4", "ldm.train.steps=4", "finetune.steps=3", "finetune.checkpoint_every=1",
                "experiment=ledger"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny pretrained base (autoencoder + LDM) shared by the runs below."""
    from trainer.stages import pretrain_ae, pretrain_ldm
    with mlflow_store(tmp_path_factory.mktemp("ledger")) as root:
        cfg = load_config("demo", TINY + [f"output_dir={root / 'runs'}"])
        pretrain_ae.run(cfg)
        pretrain_ldm.run(cfg)
        yield root


def tiny(base, name, *extra):
    return load_config("demo", TINY + [f"output_dir={base / 'runs'}", f"finetune.name={name}", *extra])


def run_dir(base, name):
    return base / "runs" / "ledger" / f"finetune-{name}"


def crash_in_step(monkeypatch, k):
    """Make the engine die inside step ``k`` (after the ledger charged it)."""
    from trainer.privacy import DPGradientEngine
    real = DPGradientEngine.finalize
    calls = {"n": 0}

    def finalize(self, *a, **kw):
        calls["n"] += 1
        if calls["n"] == k:
            raise KeyboardInterrupt
        return real(self, *a, **kw)

    monkeypatch.setattr(DPGradientEngine, "finalize", finalize)
    return lambda: monkeypatch.setattr(DPGradientEngine, "finalize", real)


def never_encode(monkeypatch):
    """Make encoding the private set an error (a run that refuses or has nothing to do must not)."""
    def encode(*a, **kw):
        raise AssertionError("the private set was encoded")
    monkeypatch.setattr(finetune.SingleProcess, "encode", encode)


def has_byte_tensor(obj) -> bool:
    """Torch generator states are uint8 tensors; nothing of the kind may be in a checkpoint."""
    if isinstance(obj, torch.Tensor):
        return obj.dtype == torch.uint8
    if isinstance(obj, dict):
        return any(has_byte_tensor(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return any(has_byte_tensor(v) for v in obj)
    return False


@pytest.mark.slow
def test_lost_ledger_after_a_crash_is_refused_and_nothing_is_recounted(base, monkeypatch, capsys):
    cfg = tiny(base, "lost")
    restore = crash_in_step(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        finetune.run(cfg)
    restore()
    folder = run_dir(base, "lost")
    assert json.loads((folder / "ledger.json").read_text())["steps_taken"] == 2
    state = torch.load(folder / "finetune-state.pt", weights_only=True)
    assert state["ledger"]["steps_taken"] == 1 and state["step"] == 1  # checkpointed after step 1
    assert not has_byte_tensor(state) and set(state) == {"optimizer", "step", "mlflow_run_id", "ledger"}
    journal = (folder / "ledger.json").read_text()
    (folder / "ledger.json").unlink()
    with pytest.raises(RunError, match="ledger.json: missing"):
        finetune.run(cfg)
    argv = ["finetune", "--output-dir", str(base / "runs"), *TINY, "finetune.name=lost"]
    assert cli.main(argv) == 1
    assert "error: " in capsys.readouterr().err
    assert not (folder / "ledger.json").exists(), "a refused run writes nothing"
    # the experiment's total cannot count its steps either: a run capped by it refuses, before writing anything
    argv[-1:] = ["finetune.name=beside", "finetune.total_epsilon=100"]
    assert cli.main(argv) == 2 and not run_dir(base, "beside").exists()
    assert f"{folder}: holds a DP run's" in capsys.readouterr().err
    (folder / "ledger.json").write_text(journal)  # restored: the module's later runs count it again


@pytest.mark.slow
def test_a_session_stopped_before_its_first_checkpoint_resumes_its_mlflow_run(base, monkeypatch):
    """A crash in step 1 (charged, never checkpointed): the resumed session logs to the MLflow run the
    journal names, not to a second one that the spend would count beside the folder."""
    import mlflow

    from trainer.stages.spend import charges
    cfg = tiny(base, "early")
    restore = crash_in_step(monkeypatch, 1)
    with pytest.raises(KeyboardInterrupt):
        finetune.run(cfg)
    restore()
    finetune.run(cfg)
    runs = [r for r in mlflow.search_runs(experiment_names=["ledger"], output_format="list")
            if r.info.run_name == "finetune-early"]
    assert len(runs) == 1
    assert json.loads((run_dir(base, "early") / "ledger.json").read_text())["mlflow_run_id"] == runs[0].info.run_id
    assert [c.run for c in charges(base / "runs" / "ledger", cfg.data.private) if "early" in c.run] == \
        ["finetune-early"]


@pytest.mark.slow
def test_finished_run_keeps_its_ledger_and_refuses_a_bigger_plan_or_an_older_journal(base, monkeypatch, capsys):
    cfg = tiny(base, "done")
    folder = finetune.run(cfg)
    report = json.loads((folder / "privacy-report.json").read_text())
    assert report["steps"] == 3
    assert "treated as public" in report["N_is_public"] and report["label_names_from"]
    from safetensors import safe_open
    with safe_open(str(folder / "finetuned.safetensors"), "pt") as fh:
        assert json.loads(fh.metadata()["ledger"])["steps_taken"] == 3  # the ledger travels with the weights
    never_encode(monkeypatch)  # below: nothing to do, or a refusal; neither touches the private images
    finetune.run(cfg)  # a rerun of a finished run takes no step, re-accounts and re-logs nothing
    assert json.loads((folder / "privacy-report.json").read_text())["steps"] == 3
    assert "already finished" in capsys.readouterr().out
    import mlflow
    [run] = [r for r in mlflow.search_runs(experiment_names=["ledger"], output_format="list")
             if r.info.run_name == "finetune-done"]
    assert len(mlflow.MlflowClient().get_metric_history(run.info.run_id, "wall_time_s")) == 1
    # the run that shares the model holds DP results only: no non-DP diagnostic of the private batches by default
    assert "privacy.epsilon_spent" in run.data.metrics
    assert not [k for k in run.data.metrics if k.startswith("nonprivate/")] and "nonprivate_diagnostics" not in \
        run.data.tags
    # the journal names the MLflow run: the spend counts this run once, from its folder
    assert json.loads((folder / "ledger.json").read_text())["mlflow_run_id"] == run.info.run_id

    config_before = (folder / "config.yaml").read_text()
    with pytest.raises(ConfigError, match="plan of a run and its private set"):
        finetune.run(tiny(base, "done", "finetune.steps=6"))
    assert (folder / "config.yaml").read_text() == config_before, "a refused run leaves the config as it was"
    argv = ["finetune", "--output-dir", str(base / "runs"), *TINY, "finetune.name=done", "finetune.steps=6"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith("dpldm finetune: config error: ") and "Traceback" not in err

    journal = json.loads((folder / "ledger.json").read_text())
    (folder / "ledger.json").write_text(json.dumps({**journal, "steps_taken": 1}))  # an older copy
    with pytest.raises(RunError, match="behind"):
        finetune.run(cfg)


@pytest.mark.slow
def test_ctrl_c_finishes_the_step_checkpoints_and_resumes(base, monkeypatch, capsys):
    import os
    import signal

    import mlflow

    from trainer.privacy import DPGradientEngine
    real = DPGradientEngine.finalize
    calls = {"n": 0}

    def finalize(self, *a, **kw):  # Ctrl-C arrives during step 2
        calls["n"] += 1
        if calls["n"] == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return real(self, *a, **kw)

    monkeypatch.setattr(DPGradientEngine, "finalize", finalize)
    cfg = tiny(base, "ctrlc")
    with pytest.raises(KeyboardInterrupt):
        finetune.run(cfg)
    folder = run_dir(base, "ctrlc")
    state = torch.load(folder / "finetune-state.pt", weights_only=True)
    assert state["step"] == 2 and state["ledger"]["steps_taken"] == 2, "step 2 finished and was checkpointed"
    assert json.loads((folder / "ledger.json").read_text())["steps_taken"] == 2
    [run] = [r for r in mlflow.search_runs(experiment_names=["ledger"], output_format="list")
             if r.info.run_name == "finetune-ctrlc"]
    assert run.info.status == "KILLED"
    for argv in (["sample", "--checkpoint", str(folder), "--out", str(folder / "peek")],
                 ["evaluate", "--checkpoint", str(folder)]):  # its checkpoint is not the run's result
        capsys.readouterr()
        assert cli.main(argv) == 1
        assert "its DP fine-tuning was interrupted" in capsys.readouterr().err
    assert not (folder / "peek").exists()
    monkeypatch.setattr(DPGradientEngine, "finalize", real)
    finetune.run(cfg)
    assert "resuming at step 2: 2 steps already charged" in capsys.readouterr().out
    assert json.loads((folder / "privacy-report.json").read_text())["steps"] == 3
    assert mlflow.get_run(run.info.run_id).info.status == "FINISHED"


@pytest.mark.slow
def test_lora_policy_fine_tunes_and_its_run_samples(base):
    """policy=lora end to end: the run stores only the adapters (and the embedder) and records how to
    rebuild them; `load_pipeline` puts them back on the frozen base and samples."""
    from trainer.runs import generate, load_pipeline
    folder = finetune.run(tiny(base, "lora", "finetune.policy=lora", "finetune.lora_rank=2",
                               "finetune.attention_from=2", "finetune.ema_decay=null",  # the last weights are sampled
                               "finetune.log_nonprivate=true"))
    import mlflow
    [run] = [r for r in mlflow.search_runs(experiment_names=["ledger"], output_format="list")
             if r.info.run_name == "finetune-lora"]
    assert {"nonprivate/loss", "nonprivate/clip_fraction", "nonprivate/batch_size"} <= set(run.data.metrics)
    assert run.data.tags["nonprivate_diagnostics"] == "logged"  # asked for, and labelled as such
    meta = json.loads((folder / "finetune.json").read_text())
    assert meta["lora"] == {"rank": 2, "alpha": None, "attention_from": 2}
    assert all("lora_" in n or n.startswith("cond_stage_model.") for n in meta["trainable"])
    ldm, autoencoder, info, cfg = load_pipeline(folder)
    tuned = dict(ldm.named_parameters())
    from safetensors.torch import load_file
    for name, value in load_file(str(folder / "finetuned.safetensors")).items():
        assert torch.equal(tuned[name].detach(), value), name
    images = generate(ldm, autoencoder, torch.tensor([0, 1]), tuple(info["latent_shape"]), cfg,
                      torch.Generator().manual_seed(0), progress=False)
    assert images.shape[0] == 2 and torch.isfinite(images).all()


def test_new_classes_start_from_the_named_base_classes(base):
    """finetune.new_class_from: each fresh class row starts as the named public class's row (public
    weights only), the null row as the base's; an unknown name is refused before any private data is read."""
    from trainer.distributed import SingleProcess
    from trainer.runs import load_pipeline
    ldm, _, meta, _ = load_pipeline(base / "runs" / "ledger" / "ldm")
    rows, public = ldm.cond_stage_model.embedding.weight.detach(), meta["label_names"]
    picked = ["o", "l", "z", "e", "y", "s", "b", "t", "g", "q"]
    overrides = [f"finetune.new_class_from=[{','.join(picked)}]"]
    session = finetune._prepare(tiny(base, "from", *overrides), SingleProcess(), seed=0)
    new = session.ldm.cond_stage_model.embedding.weight
    torch.testing.assert_close(new.detach(), rows[[public.index(c) for c in picked] + [len(public)]])
    assert new.requires_grad
    with pytest.raises(ConfigError, match=r"finetune.new_class_from: '7' not among the classes of the base"):
        finetune._prepare(tiny(base, "from", "finetune.new_class_from=[o,l,z,e,y,s,b,7,g,q]"), SingleProcess(),
                          seed=0)


def test_a_fixed_seed_is_refused_over_several_processes(tmp_path):
    """`_prepare(seed=...)` seeds the sampler and the noise: over several ranks every rank would draw the same
    stream (inclusions correlated across ranks, noise repeated). Refused before anything is read."""
    from trainer.distributed import SingleProcess

    rt = SingleProcess()
    rt.world_size = 2  # what a rank of two sees; nothing below the check runs
    cfg = load_config("demo", TINY + [f"output_dir={tmp_path}"])
    with pytest.raises(ValueError, match="seed: a fixed seed is for one process only, got 2 processes"):
        finetune._prepare(cfg, rt, seed=0)
    assert not any(tmp_path.iterdir())


def test_ema_of_the_dp_steps_is_the_sampled_result_and_its_setting_cannot_change(base, monkeypatch):
    """finetune.ema_decay: finetuned-ema.safetensors holds the EMA of the weights after every DP step
    (recomputed here from the recorded steps), `load_pipeline` samples it, the last step's weights stay in
    finetuned.safetensors; a resume must keep the run's EMA setting."""
    from safetensors.torch import load_file

    from trainer.runs import load_pipeline
    real_prepare, real_step = finetune._prepare, finetune.SingleProcess.train_step
    sessions, seen = [], []

    def prepare(*a, **kw):
        sessions.append(real_prepare(*a, **kw))
        return sessions[-1]

    def weights() -> dict[str, torch.Tensor]:
        return {k: p.detach().clone() for k, p in sessions[-1].state.trainable.items()}

    def train_step(*a, **kw):
        if not seen:
            seen.append(weights())
        out = real_step(*a, **kw)
        seen.append(weights())
        return out

    monkeypatch.setattr(finetune, "_prepare", prepare)
    monkeypatch.setattr(finetune.SingleProcess, "train_step", train_step)
    folder = finetune.run(tiny(base, "ema", "finetune.ema_decay=0.6"))
    assert len(seen) == 4  # the start and 3 steps
    expected = seen[0]
    for step in seen[1:]:
        expected = {k: 0.6 * expected[k] + 0.4 * step[k] for k in expected}
    ema, last = load_file(str(folder / "finetuned-ema.safetensors")), load_file(str(folder / "finetuned.safetensors"))
    assert set(ema) == set(expected) == set(last)
    for k in expected:
        torch.testing.assert_close(ema[k], expected[k])
        torch.testing.assert_close(last[k], seen[-1][k])
    assert any(not torch.allclose(ema[k], last[k]) for k in ema)
    tuned = dict(load_pipeline(folder)[0].named_parameters())
    assert all(torch.equal(tuned[k].detach(), ema[k]) for k in ema)

    monkeypatch.setattr(finetune.SingleProcess, "train_step", real_step)
    for name, extra in (("ema-crash", ["finetune.ema_decay=0.6"]), ("no-ema-crash", ["finetune.ema_decay=null"])):
        undo = crash_in_step(monkeypatch, 2)
        with pytest.raises(KeyboardInterrupt):
            finetune.run(tiny(base, name, *extra))
        undo()
    never_encode(monkeypatch)  # the refusals below happen before the private set is read
    with pytest.raises(ConfigError, match="started with finetune.ema_decay set"):
        finetune.run(tiny(base, "ema-crash", "finetune.ema_decay=null"))
    with pytest.raises(ConfigError, match="missing, but finetune.ema_decay is set"):
        finetune.run(tiny(base, "no-ema-crash", "finetune.ema_decay=0.6"))
    with pytest.raises(ConfigError, match="finetune.ema_decay: must be in"):
        tiny(base, "x", "finetune.ema_decay=1.0")


@pytest.mark.slow
def test_the_cosine_schedule_continues_after_a_resume_and_the_runs_own_condition_dropout_applies(base, monkeypatch, capsys):
    """finetune.lr_schedule, finetune.cond_drop_prob (the fine-tuning's own, not the base's) and
    finetune.t_range are applied."""
    import os
    import signal

    from trainer.pipeline import LatentDiffusion
    real_step, real_drop, real_loss = finetune.SingleProcess.train_step, LatentDiffusion.drop_conditions, LatentDiffusion.loss
    seen, drops, ranges = [], set(), set()
    monkeypatch.setattr(LatentDiffusion, "drop_conditions",
                        lambda self, conds, prob, *a: drops.add(prob) or real_drop(self, conds, prob, *a))
    monkeypatch.setattr(LatentDiffusion, "loss",
                        lambda self, *a, **kw: ranges.add(tuple(kw.get("t_range") or ())) or real_loss(self, *a, **kw))

    def train_step(self, engine, optimizer, *a, **kw):
        seen.append(optimizer.param_groups[0]["lr"])
        if len(seen) == 2:  # Ctrl-C during step 2: it finishes, is checkpointed, and the run stops
            os.kill(os.getpid(), signal.SIGINT)
        return real_step(self, engine, optimizer, *a, **kw)

    monkeypatch.setattr(finetune.SingleProcess, "train_step", train_step)
    cfg = tiny(base, "cosine", "finetune.lr_schedule=cosine", "finetune.lr=0.01", "finetune.cond_drop_prob=0.25",
               "finetune.t_range=[200, 1000]")
    with pytest.raises(KeyboardInterrupt):
        finetune.run(cfg)
    finetune.run(cfg)
    assert "resuming at step 2" in capsys.readouterr().out
    assert seen == pytest.approx([0.01 * (1 + math.cos(math.pi * k / 3)) / 2 for k in range(3)], rel=1e-12)
    assert seen[:2] == [0.01, pytest.approx(0.0075)]
    assert drops - {0.0} == {0.25}  # the run's own, never the base's 0.1 (0.0: ldm.loss's own no-op call)
    assert ranges == {(200, 1000)}


@pytest.mark.slow
@pytest.mark.parametrize("setting", ["precision=auto", "finetune.precision=auto"])
def test_bf16_fine_tuning_keeps_the_dp_step_in_float32(base, monkeypatch, setting):
    """precision=auto (or finetune.precision=auto over a float32 top level) on a CPU with AVX-512 BF16 is
    bf16: the forward runs under autocast, the engine's self-check passes with its bf16 tolerance, every
    released example contribution is clipped in float32, the run reports as usual and its MLflow run
    records the precision it ran at. The probe (float32 whatever the precision) is judged at float32's
    tolerance, the first private micro-batch (bf16) at bf16's."""
    import mlflow

    from trainer.privacy import DPGradientEngine, engine as engine_module
    seen, tolerances = {}, {"probe": set(), "private": set()}
    real, real_check, real_differs = DPGradientEngine.accumulate, DPGradientEngine.check, engine_module._differs

    def accumulate(self, losses):
        seen["rtol"], seen["autocast"], seen["phase"] = self.self_check_rtol, torch.is_autocast_enabled("cpu"), "private"
        return real(self, losses)

    def check(self, *args, **kwargs):
        seen["phase"] = "probe"
        return real_check(self, *args, **kwargs)

    def differs(a, ref, atol, rtol, *rest):
        tolerances[seen["phase"]].add(rtol)
        return real_differs(a, ref, atol, rtol, *rest)

    monkeypatch.setattr(DPGradientEngine, "accumulate", accumulate)
    monkeypatch.setattr(DPGradientEngine, "check", check)
    monkeypatch.setattr(engine_module, "_differs", differs)
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx512_bf16": True})
    with mlflow_store(base):
        name = "bf16" if setting.startswith("precision") else "bf16ft"
        folder = finetune.run(tiny(base, name, setting, "device=cpu"))
        run, = mlflow.search_runs(experiment_names=["ledger"], output_format="list",
                                  filter_string=f"tags.mlflow.runName = 'finetune-{name}'")
    assert run.data.tags["precision"] == "bf16" and run.data.params[setting.split("=")[0]] == "auto"
    report = json.loads((folder / "privacy-report.json").read_text())
    assert report["steps"] == 3 and report["epsilon"] <= 10
    from trainer.privacy.engine import SELF_CHECK_RTOL, SELF_CHECK_RTOL_BF16
    assert seen["rtol"] == SELF_CHECK_RTOL_BF16
    assert tolerances == {"probe": {SELF_CHECK_RTOL}, "private": {SELF_CHECK_RTOL_BF16}}
    assert seen["autocast"] is False, "the DP step itself runs outside autocast"


@pytest.mark.slow
def test_the_probe_self_check_is_float32_and_passes_a_barely_trained_unet_under_bf16(tmp_path):
    """A UNet two steps from its zeroed output projections: under bf16 autocast autograd's batch gradient of
    a SpatialTransformer's proj_out bias (a sum over batch and map whose terms cancel) was 60 % away from the
    engine's float32 sums, and the probe refused a sound model. The probe runs in float32: it passes, and the
    run then trains under bf16 (its first private micro-batch checked at the bf16 tolerance)."""
    from trainer.distributed import SingleProcess
    from trainer.runtime import Placement
    from trainer.stages import pretrain_ae, pretrain_ldm
    small = QUICK + ["experiment=probe", "data.public.num_examples=256", "data.private.num_examples=300",
                     "autoencoder.train.batch_size=8", "autoencoder.train.steps=2", "ldm.unet.model_channels=32",
                     "ldm.unet.num_head_channels=16", "ldm.unet.context_dim=32", "ldm.conditioner.embed_dim=32",
                     "ldm.train.steps=2", "ldm.train.batch_size=16", "finetune.steps=2",
                     "finetune.expected_batch_size=40", "finetune.physical_batch_size=16", "sample.ddim_steps=2",
                     "sample.num_per_class=1", f"output_dir={tmp_path / 'runs'}"]
    with mlflow_store(tmp_path):
        pretrain_ae.run(load_config("demo", small))
        pretrain_ldm.run(load_config("demo", small))
        cfg = load_config("demo", small + ["precision=bf16"])
        rt = SingleProcess(Placement.from_config(cfg))
        session = finetune._prepare(cfg, rt, seed=0)
        with torch.autocast("cpu", dtype=torch.bfloat16):  # even inside a bf16 region the probe is float32
            assert session.probe_losses(torch.arange(finetune.PROBE_SIZE)).dtype == torch.float32
        session.check_engine(rt)
        session.engine.detach()
        report = json.loads((finetune.run(cfg) / "privacy-report.json").read_text())
    assert report["steps"] == 2


@pytest.mark.slow
def test_a_model_refused_by_the_self_check_is_never_charged(base, monkeypatch):
    from trainer.privacy import DPGradientEngine, EngineSelfCheckError

    def refuse(self, *a, **kw):
        self._refuse("module 'x' mixes examples")

    monkeypatch.setattr(DPGradientEngine, "_verify_sums", refuse)
    with pytest.raises(EngineSelfCheckError):
        finetune.run(tiny(base, "refused"))
    folder = run_dir(base, "refused")
    assert not (folder / "ledger.json").exists() and not (folder / "config.yaml").exists()


@pytest.mark.slow
def test_examples_left_out_for_a_non_finite_gradient_are_reported_once_the_steps_end(base, monkeypatch, capsys):
    """One private example's loss is NaN whenever it is drawn: it is left out of its steps, and the
    warning comes after the progress bar has closed, naming no step (which steps drew it is private)."""
    real, poisoned = finetune.DPSession.example_losses, []

    def example_losses(self, rows):
        losses = real(self, rows)
        poisoned[:] = poisoned or [int(rows[0])]
        return losses * torch.where(rows.to(losses.device) == poisoned[0], float("nan"), 1.0)  # NaN gradient too
    monkeypatch.setattr(finetune.DPSession, "example_losses", example_losses)
    folder = finetune.run(tiny(base, "nan", "finetune.log_nonprivate=true"))
    err = capsys.readouterr().err
    warning = err.index("warning (non-private diagnostic): in this session some examples' gradients were not finite")
    assert err.rindex("finetune (DP)") < warning and not re.search(r"step \d", err[warning:].splitlines()[0])
    import mlflow
    run = mlflow.get_run(json.loads((folder / "ledger.json").read_text())["mlflow_run_id"])
    assert run.data.metrics["nonprivate/nonfinite_examples"] >= 1
    finetune.run(tiny(base, "finite"))
    assert "were not finite" not in capsys.readouterr().err


def test_private_shards_without_class_labels_are_refused_before_anything_is_charged(base):
    """Shards whose samples carry no .cls label, or one past the model's classes, under a class-conditioned
    model: refused when counted, before a run folder, a latent cache or an MLflow run exists (the first
    DP step would fail after being charged, at every try)."""
    import io

    import mlflow
    from PIL import Image

    from trainer.data.mnist import DIGIT_NAMES, load_mnist
    from trainer.data.shards import WriteOptions, write_shard, write_shards
    from trainer.data.sources import array_source

    def png_bytes(image):
        out = io.BytesIO()
        Image.fromarray(image).save(out, format="png")
        return out.getvalue()
    images = load_mnist("val")[0][:300]
    private = base / "runs" / "ledger" / "private"
    cached = sorted(private.iterdir()) if private.is_dir() else []
    logged = len(mlflow.search_runs(experiment_names=["ledger"], output_format="list"))
    write_shards(array_source("digits", {"type": "test"}, images, None, list(DIGIT_NAMES)), base / "unlabelled",
                 WriteOptions(), progress_bar=False)
    (base / "label-past-the-classes").mkdir()  # a shard no `dpldm prepare` wrote (it checks labels against names)
    write_shard(base / "label-past-the-classes" / "shard-000000.tar",
                [{"__key__": f"{i:04d}", "png": png_bytes(image), "cls": b"12" if i == 7 else b"3"}
                 for i, image in enumerate(images)])
    for name in ("unlabelled", "label-past-the-classes"):
        with pytest.raises(ConfigError, match=r"data.private.path: some samples carry no class label .* outside 0..9"):
            finetune.run(tiny(base, name, "data.private.source=shards", f"data.private.path={base / name}",
                              "finetune.expected_batch_size=32"))
        assert not run_dir(base, name).exists()
    assert (sorted(private.iterdir()) if private.is_dir() else []) == cached
    assert len(mlflow.search_runs(experiment_names=["ledger"], output_format="list")) == logged


def test_an_ldm_whose_autoencoder_was_trained_further_or_replaced_is_refused(base, tmp_path):
    """The autoencoder's weights changed since the LDM was pretrained on its latents (a longer pretrain-ae
    over the finished one): loading the pipeline (fine-tune, sample, evaluate) is refused, naming the file."""
    import shutil

    from trainer.io import load_safetensors, save_safetensors
    from trainer.runs import load_pipeline
    for stage in ("ae", "ldm"):
        shutil.copytree(base / "runs" / "ledger" / stage, tmp_path / stage)
    load_pipeline(tmp_path / "ldm")
    weights = tmp_path / "ae" / "autoencoder.safetensors"
    tensors = dict(load_safetensors(weights).state_dict)
    first = next(iter(tensors))
    tensors[first] = tensors[first] + 1e-3
    save_safetensors(tensors, weights)
    with pytest.raises(RunError, match=r"ae: its autoencoder.safetensors is not the one .*ldm was trained on"):
        load_pipeline(tmp_path / "ldm")
    assert cli.main(["sample", "--checkpoint", str(tmp_path / "ldm"), "--out", str(tmp_path / "s")]) == 1
    assert not (tmp_path / "s").exists()


def test_an_autoencoder_an_ldm_was_pretrained_on_is_not_trained_further(base, tmp_path):
    """`pretrain-ae` with more steps over the finished autoencoder of an experiment whose LDM learned on
    its latents: refused before anything changes (the LDM and its fine-tunes would no longer decode)."""
    import shutil

    from trainer.stages import pretrain_ae
    for stage in ("ae", "ldm"):
        shutil.copytree(base / "runs" / "ledger" / stage, tmp_path / "runs" / "ledger" / stage)
    weights = tmp_path / "runs" / "ledger" / "ae" / "autoencoder.safetensors"
    before = weights.read_bytes()
    longer = load_config("demo", TINY + [f"output_dir={tmp_path / 'runs'}", "autoencoder.train.steps=6"])
    with pytest.raises(ConfigError, match=r"autoencoder.train.steps: 6 would train the autoencoder .* further \(it "
                                          r"took 4\), but the LDM in .*ldm was pretrained on its latents"):
        pretrain_ae.run(longer)
    assert weights.read_bytes() == before
    (tmp_path / "runs" / "ledger" / "ldm" / "ldm.json").unlink()  # no LDM on it: it may train further
    pretrain_ae._refuse_training_under_an_ldm(weights.parent, 6)


def test_secure_noise_and_a_drowning_plan_warns(base, capsys):
    folder = finetune.run(tiny(base, "secure", "finetune.secure_noise=true", "finetune.epsilon=0.05"))
    report = json.loads((folder / "privacy-report.json").read_text())
    assert report["secure_noise"] is True and report["epsilon"] <= 0.05
    assert report["signal_to_noise_bound"] < 1
    assert "dpldm finetune: warning: sigma" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="finetune.total_epsilon"):  # the same plan, refused: its warning unsaid
        finetune.run(tiny(base, "capped", "finetune.epsilon=0.05", "finetune.total_epsilon=0.01"))
    assert "noise drowns the signal" not in capsys.readouterr().err


def test_runs_on_one_private_set_are_reported_together_and_held_to_the_total_budget(base, monkeypatch, capsys):
    from trainer.privacy import Mechanism, composed_epsilon

    def cfg(name, *extra):  # an experiment of its own over the shared base: only these runs count
        return tiny(base, name, "experiment=spend", f"finetune.base={base / 'runs' / 'ledger' / 'ldm'}", *extra)
    first = json.loads((finetune.run(cfg("a", "finetune.epsilon=2")) / "privacy-report.json").read_text())
    assert "private_set_spend" not in first
    folder = base / "runs" / "spend" / "finetune-b"
    with monkeypatch.context() as patch:
        never_encode(patch)
        cap = round(first["epsilon"] + 0.2, 2)  # a second run of epsilon 2 adds more than that
        with pytest.raises(ConfigError, match=rf"finetune.total_epsilon: {cap:g} would be exceeded: .*\(finetune-a, "
                                              r"finetune-b \(planned 3 steps\)\)"):
            finetune.run(cfg("b", "finetune.epsilon=2", f"finetune.total_epsilon={cap}"))
    assert not folder.exists(), "a refused run writes nothing"
    capsys.readouterr()
    second = json.loads((finetune.run(cfg("b", "finetune.epsilon=2", "finetune.total_epsilon=4"))
                         / "privacy-report.json").read_text())
    spend = second["private_set_spend"]
    runs = [Mechanism(r["noise_multiplier"], r["sample_rate"], r["steps"]) for r in (first, second)]
    assert [r["run"] for r in spend["runs"]] == ["finetune-a", "finetune-b"] and all(r["ended"] for r in spend["runs"])
    assert spend["delta"] == first["delta"] == second["delta"]
    assert spend["epsilon"] == pytest.approx(composed_epsilon(runs, spend["delta"]))
    assert max(first["epsilon"], second["epsilon"]) < spend["epsilon"] < first["epsilon"] + second["epsilon"]
    assert f"({spend['epsilon']:.4g}, 1e-05)-DP together" in capsys.readouterr().out


def test_a_run_started_meanwhile_counts_against_the_total_budget(base, monkeypatch):
    """The cap is checked again under the experiment's lock when the run journals its plan: a run
    of the experiment that journaled its plan after this one's first check still counts."""
    cfg = tiny(base, "late", "experiment=race", f"finetune.base={base / 'runs' / 'ledger' / 'ldm'}",
               "finetune.epsilon=2", "finetune.total_epsilon=2.1")
    other = base / "runs" / "race" / "finetune-early"
    real = finetune.DPSession.load_private

    def load_private(self, *a, **kw):  # meanwhile another run on the same set journals an epsilon-2 plan
        real(self, *a, **kw)
        other.mkdir(parents=True)
        dump_config(cfg, other / "config.yaml")
        (other / "ledger.json").write_text(json.dumps({**self.state.ledger.state_dict(), "steps_taken": 0}))
    monkeypatch.setattr(finetune.DPSession, "load_private", load_private)
    with pytest.raises(RunError, match=r"finetune.total_epsilon: 2.1 would be exceeded: .*\(finetune-early "
                                       r"\(planned 3 steps\), finetune-late \(planned 3 steps\)\)"):
        finetune.run(cfg)
    assert not (base / "runs" / "race" / "finetune-late" / "ledger.json").exists()


def test_a_second_session_on_a_run_is_refused_before_any_step(base, monkeypatch):
    """Two sessions on one run would each journal only their own steps: the run folder is held by
    one session, and a journal that moved since this session read it is refused."""
    from trainer.io import try_lock
    cfg, folder = tiny(base, "twice"), run_dir(base, "twice")
    folder.mkdir(parents=True)
    holder = try_lock(folder / ".session.lock")
    with pytest.raises(RunError, match=rf"{folder}: another session is running this run \(pid \d+ on "):
        finetune.run(cfg)
    holder.close()
    assert sorted(p.name for p in folder.iterdir()) == [".session.lock"], "nothing charged or written"
    real = finetune.DPSession.load_private

    def load_private(self, *a, **kw):  # meanwhile another session charges a step
        real(self, *a, **kw)
        (folder / "ledger.json").write_text(json.dumps({**self.state.ledger.state_dict(), "steps_taken": 1}))
    monkeypatch.setattr(finetune.DPSession, "load_private", load_private)
    with pytest.raises(RunError, match=r"ledger.json: another session charged steps since this one read it"):
        finetune.run(cfg)
    assert json.loads((folder / "ledger.json").read_text())["steps_taken"] == 1
    assert not (folder / "config.yaml").exists()


@pytest.mark.parametrize("override,key", [("finetune.max_grad_norm=.inf", "finetune.max_grad_norm"),
                                          ("finetune.max_grad_norm=.nan", "finetune.max_grad_norm"),
                                          ("finetune.total_epsilon=.inf", "finetune.total_epsilon"),
                                          ("finetune.epsilon=.inf", "finetune.epsilon"),
                                          ("finetune.epsilon=1000", "finetune.epsilon"),
                                          ("finetune.epsilon=.nan", "finetune.epsilon")])
def test_non_finite_or_absurd_budgets_are_refused(override, key):
    with pytest.raises(ConfigError, match=key):
        load_config("demo", [override])


def test_a_noise_multiplier_that_spends_an_absurd_epsilon_is_refused():
    cfg = load_config("demo", ["finetune.epsilon=null", "finetune.noise_multiplier=0.3", "finetune.steps=2000",
                               "finetune.expected_batch_size=1000"])
    with pytest.raises(ConfigError, match="finetune.noise_multiplier"):
        finetune.plan_privacy(cfg, num_private=1000)


def test_signal_to_noise_bound():
    from trainer.privacy import signal_to_noise_bound
    assert signal_to_noise_bound(2.0, 100, 400, 10_000) == pytest.approx(20 * 100 / (2.0 * 100))
    ratio, warning = finetune.noise_warning(123.0, 500, 200, 1_662_080)
    assert ratio < 1 and warning.startswith("warning: sigma = 123 is so large that the noise drowns the signal")
    assert finetune.noise_warning(1.0, 500, 200, 1000) == (signal_to_noise_bound(1.0, 500, 200, 1000), None)


def test_label_names_never_come_from_private_labels():
    cfg = load_config("demo")
    assert private_set.label_names(cfg, ["zero", "one"]) == (["zero", "one"], "the data source's declared classes")
    names, source = private_set.label_names(cfg, [])
    assert names == [str(i) for i in range(10)] and "new_class_embedder" in source
    names, source = private_set.label_names(
        load_config("demo", ["finetune.new_class_embedder=null", "finetune.new_class_from=null"]), [])
    assert len(names) == 26 and "n_classes" in source


# --- dpldm audit -----------------------------------------------------------------------------------

AUDIT = ["finetune.epsilon=1", "finetune.expected_batch_size=250", "finetune.physical_batch_size=250",
         "finetune.steps=12"]


def no_clipping(monkeypatch):
    from trainer.privacy import DPGradientEngine
    monkeypatch.setattr(DPGradientEngine, "_clip_factors", lambda self, norms: torch.ones_like(norms))


def no_noise(monkeypatch):
    from trainer.privacy import DPGradientEngine
    monkeypatch.setattr(DPGradientEngine, "_standard_normal", lambda self, shape: torch.zeros(shape))


@pytest.mark.slow
@pytest.mark.parametrize("bug", [None, no_noise, no_clipping])
def test_audit_catches_a_run_without_noise_or_clipping_and_passes_a_correct_one(base, monkeypatch, bug):
    if bug is not None:
        bug(monkeypatch)
    name = "audit" if bug is None else f"audit-{bug.__name__}"  # each audit's record stays in its folder
    result = finetune.run_audit(tiny(base, name, *AUDIT), canaries=500, seed=11)
    assert result.claimed <= 1.0
    if bug is None:
        assert result.lower_bound <= result.claimed
    else:
        assert result.lower_bound > 2.5 * result.claimed, result
    assert result.lower_bound <= result.ceiling


def test_audit_bound_against_direct_binomial_tails():
    """With delta = 0 the bound is the eps where P[Binomial(r, e^eps / (1 + e^eps)) >= v] = alpha."""
    from scipy import stats

    from trainer.privacy.audit import epsilon_lower_bound, p_value
    m, r, v, alpha = 1000, 200, 170, 0.01
    eps = epsilon_lower_bound(m, r, v, 0.0, alpha)
    tail = lambda e: stats.binom.sf(v - 1, r, 1 / (1 + math.exp(-e)))  # noqa: E731
    assert tail(eps) == pytest.approx(alpha, rel=1e-3)
    assert p_value(m, r, v, eps, 1e-5) > p_value(m, r, v, eps, 0.0), "delta only weakens the bound"
    assert epsilon_lower_bound(m, r, v, 1e-5, alpha) < eps
    assert epsilon_lower_bound(m, r, r // 2, 0.0, alpha) == 0.0  # guessing at chance certifies nothing


def test_audit_last_line_on_the_cli(base, capsys):
    argv = ["audit", "--output-dir", str(base / "runs"), "--canaries", "50", *TINY, "finetune.name=cli"]
    earlier = list((base / "runs" / "ledger").glob("*/ledger.json"))
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    last = out.strip().splitlines()[-1]
    assert re.fullmatch(r"epsilon lower bound: \d+\.\d{3} at 95% confidence; claimed epsilon: \d+\.\d{3}", last)
    # with the module's earlier runs (when they ran first), the audit reports the private set's total
    assert ("The audit is a DP run on the private set too: the experiment's " in out) == bool(earlier)
    journal = base / "runs" / "ledger" / "audit-cli" / "ledger.json"
    assert json.loads(journal.read_text())["steps_taken"] == 3
    assert cli.main(argv) == 1, "a second audit in the folder would overwrite the first one's record"
    assert f"{journal.parent}: an earlier run here charged the private set" in capsys.readouterr().err
    journal.unlink()  # an audit of an older version: its report only
    assert cli.main(argv) == 1 and (journal.parent / "audit-report.json").is_file() and not journal.exists()


def test_an_encoding_memo_encodes_the_private_set_once_per_encoder_and_source(base, monkeypatch):
    """The demo's sweep shares one memo: a second fine-tune of the same private set with the same
    encoder reuses the rows, bit for bit what encoding again gives; another source is encoded anew."""
    real, encoded = finetune.SingleProcess.encode, []

    def encode(self, autoencoder, images, labels):
        rows = real(self, autoencoder, images, labels)
        encoded.append(rows)
        return rows
    monkeypatch.setattr(finetune.SingleProcess, "encode", encode)
    real_step, padding = finetune.SingleProcess.train_step, []

    def train_step(self, *a, **kw):  # every run knows its padding row (an example may be left out)
        padding.append(self.padding_row)
        return real_step(self, *a, **kw)
    monkeypatch.setattr(finetune.SingleProcess, "train_step", train_step)
    memo = finetune.EncodingMemo()
    with mlflow_store(base):
        finetune.run(tiny(base, "memo-a"), memo)
        finetune.run(tiny(base, "memo-b", "finetune.epsilon=1"), memo)
        assert len(encoded) == 1 and len(memo) == 1
        (mean, std, labels), = memo.values()
        assert mean.shape[0] == 1000 + 1 and padding == [1000] * 6  # the private rows and the padding row
        finetune.run(tiny(base, "memo-c"))  # no memo: encoded again, identically
        assert len(encoded) == 2
        assert torch.equal(encoded[1][0], mean) and torch.equal(encoded[1][1], std)
        assert torch.equal(encoded[1][2], labels)
        finetune.run(tiny(base, "memo-d", "data.private.num_examples=800"), memo)  # another private set
    assert len(encoded) == 3 and len(memo) == 1
    assert next(iter(memo.values()))[0].shape[0] == 800 + 1
