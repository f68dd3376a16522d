"""End-to-end stages on tiny settings: demo --quick, resume, sampling, CLI errors, privacy plan checks."""
import json
import shutil

import numpy as np
import pytest
import torch
from conftest import load_bench, mlflow_store

from trainer import cli
from trainer.config import ConfigError, dump_config, load_config
from trainer.data.mnist import load_mnist
from trainer.stages import finetune, private_set
from trainer.stages.demo import QUICK

TINY = QUICK + ["data.public.num_examples=520", "data.private.num_examples=1000", "autoencoder.train.batch_size=8",
                "autoencoder.train.steps=4", "ldm.train.steps=4", "finetune.steps=3"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    with mlflow_store(tmp_path_factory.mktemp("stages")) as root:
        yield root


@pytest.mark.slow
def test_demo_quick_runs_the_whole_pipeline(workdir, capsys, monkeypatch):
    from trainer.distributed import SingleProcess
    real, encodings = SingleProcess.encode, []
    monkeypatch.setattr(SingleProcess, "encode", lambda self, *a: encodings.append(1) or real(self, *a))
    assert cli.main(["demo", "--quick", "--output-dir", str(workdir / "runs")]) == 0
    assert len(encodings) == 1  # the private set is encoded once for both fine-tunes
    out = capsys.readouterr().out
    assert "privacy report" in out and "mlflow ui" in out
    ft = workdir / "runs" / "demo-quick" / "finetune"
    report = json.loads((ft / "privacy-report.json").read_text())
    assert 0 < report["epsilon"] <= 10.0 and report["delta"] == 1e-5
    assert report["steps"] == load_config("demo", QUICK).finetune.steps
    assert (ft / "samples.png").is_file()
    # only the fine-tuned parameters are saved, and they are exactly the selected ones
    from safetensors.torch import load_file
    saved = load_file(str(ft / "finetuned.safetensors"))
    assert sorted(saved) == sorted(report["trainable_names"])
    assert all(k.startswith("cond_stage_model.") or ".transformer_blocks." in k or ".proj_" in k or ".norm." in k
               for k in saved)
    import mlflow
    runs = mlflow.search_runs(experiment_names=["demo-quick"])
    assert {"pretrain-ae", "pretrain-ldm", "finetune"} <= set(runs["tags.mlflow.runName"])
    ft_run = runs[runs["tags.mlflow.runName"] == "finetune"].iloc[0]
    assert ft_run["metrics.privacy.epsilon"] == pytest.approx(report["epsilon"])
    # every digit's share of the real test digits recognised: logged, and printed on one line per run
    per_class = [ft_run[f"metrics.eval.accuracy_class_{c}"] for c in range(10)]
    assert all(0 <= a <= 1 for a in per_class) and "\neval.accuracy per class: 0 " in out
    # the epsilon = 1 run: the same pretrained base, its own budget, evaluated, and the comparison printed
    eps1 = workdir / "runs" / "demo-quick" / "finetune-eps1"
    report1 = json.loads((eps1 / "privacy-report.json").read_text())
    assert 0 < report1["epsilon"] <= 1.0 and report1["noise_multiplier"] > report["noise_multiplier"]
    assert json.loads((eps1 / "finetune.json").read_text())["base"] == "../ldm"
    assert "finetune-eps1: eval.num_samples 100, eval.num_real 200, " in out and "accuracy vs epsilon" in out
    assert "\neval.num_samples: 100\n" in out and "\neval.accuracy_epoch: " in out  # counts print as integers
    assert "; per class: 0 " in out.split("finetune-eps1: eval.num_samples")[1].splitlines()[0]
    assert (workdir / "runs" / "demo-quick" / "accuracy_vs_epsilon.png").is_file()
    table = out.split("dpldm compare --experiment demo-quick")[1]
    assert "finetune-eps1" in table and "\nfinetune " in table
    # together: both runs' steps composed at the demo's delta (tests/test_accounting.py checks the composition)
    from trainer.privacy import Mechanism, composed_epsilon
    eps = composed_epsilon([Mechanism(r["noise_multiplier"], r["sample_rate"], r["steps"]) for r in (report, report1)],
                           report["delta"])
    assert max(report["epsilon"], report1["epsilon"]) < eps < report["epsilon"] + report1["epsilon"]
    assert f"(finetune, finetune-eps1) are ({eps:.4g}, {report['delta']:g})-DP together" in out


@pytest.mark.parametrize("value, error", [("1,0", "--also-epsilon"), ("1,-1", "--also-epsilon"), ("1;3", "--also-epsilon"),
                                          ("1,200", "--also-epsilon")])
def test_demo_refuses_a_bad_extra_epsilon_before_writing(tmp_path, capsys, value, error):
    runs = tmp_path / "runs"
    try:
        code = cli.main(["demo", "--quick", "--output-dir", str(runs), "--also-epsilon", value, "finetune.steps=3"])
    except SystemExit as stop:  # argparse's own usage errors
        code = stop.code
    assert code == 2
    assert error in capsys.readouterr().err and not runs.exists()


@pytest.mark.slow
def test_the_scaled_config_runs_at_tiny_size(tmp_path):
    """configs/mnist.yaml (the GPU config: f = 4 autoencoder, K = 4, FID) end to end, shrunk to CPU size.

    Its models keep their architecture; data, steps and the evaluation are fewer than the quick demo's, and
    the public EMNIST shards (a download) are replaced by rendered letters.
    """
    with mlflow_store(tmp_path):
        assert cli.main(["demo", "--config", "mnist", "--quick", "--output-dir", str(tmp_path / "runs"),
                         "data.public={source: letters, num_examples: 520, resolution: 32, seed: 0}",
                         "data.private.num_examples=600", "autoencoder.train.steps=4",
                         "autoencoder.train.checkpoint_every=2", "ldm.train.steps=4", "ldm.train.checkpoint_every=2",
                         "finetune.steps=2", "finetune.checkpoint_every=1", "sample.ddim_steps=3",
                         "eval.ddim_steps=3", "eval.num_per_class=4"]) == 0
    ft = tmp_path / "runs" / "demo-quick" / "finetune"
    report = json.loads((ft / "privacy-report.json").read_text())
    cfg = load_config("mnist")
    assert report["noise_multiplicity"] == cfg.finetune.noise_multiplicity == 4
    assert 0 < report["epsilon"] <= cfg.finetune.epsilon
    report1 = json.loads((ft.parent / "finetune-eps1" / "privacy-report.json").read_text())  # its sweep
    assert 0 < report1["epsilon"] <= 1.0
    latents = load_config(str(tmp_path / "runs" / "demo-quick" / "ldm" / "config.yaml")).ldm.unet
    assert latents["image_size"] == 8 and latents == cfg.ldm.unet  # the scaled UNet, unchanged


@pytest.mark.slow
def test_grids_and_evaluation_sample_at_their_own_guidance_and_batch_size(workdir, monkeypatch):
    """sample.sampler, sample.guidance_scale and sample.eta guide `dpldm sample` (and the grids); eval.sampler,
    eval.guidance_scale, eval.ddim_steps and eval.eta the evaluation's samples; both denoise sample.batch_size
    images at a time."""
    from trainer.pipeline import LatentDiffusion
    from trainer.stages.evaluate import evaluate_checkpoint
    ft = workdir / "runs" / "demo-quick" / "finetune"
    if not ft.is_dir():  # keep the test independent of order
        assert cli.main(["demo", "--quick", "--output-dir", str(workdir / "runs")]) == 0
    calls = []
    real = LatentDiffusion.sample_latents
    monkeypatch.setattr(LatentDiffusion, "sample_latents",
                        lambda self, c, *a, **k: calls.append((len(c), k["guidance_scale"], k["steps"], k["eta"],
                                                               k["sampler"])) or real(self, c, *a, **k))
    cfg_path = ft / "config.yaml"
    text = cfg_path.read_text()
    cfg = load_config(str(cfg_path))
    assert (cfg.sample.guidance_scale, cfg.eval.guidance_scale) == (3.0, 1.0)  # the demo's
    assert (cfg.sample.eta, cfg.eval.eta) == (1.0, 0.0)  # the demo's: stochastic grids, deterministic evaluation
    assert (cfg.sample.ddim_steps, cfg.eval.ddim_steps) == (10, 10)  # --quick's and the demo's
    try:
        cfg.sample.batch_size, cfg.eval.ddim_steps, cfg.sample.eta, cfg.eval.eta = 7, 3, 1.0, 0.25
        dump_config(cfg, cfg_path)
        evaluate_checkpoint(ft, metrics=["accuracy"], num_per_class=2, log=False)
        # 20 samples, 7 at a time, at the evaluation's guidance, steps and eta
        assert calls == [(7, 1.0, 3, 0.25, "ddim"), (7, 1.0, 3, 0.25, "ddim"), (6, 1.0, 3, 0.25, "ddim")]
        calls.clear()
        cfg.eval.sampler, cfg.eval.eta = "dpmpp_2m", 0.0
        dump_config(cfg, cfg_path)
        evaluate_checkpoint(ft, metrics=["accuracy"], num_per_class=1, log=False)
        assert calls == [(7, 1.0, 3, 0.0, "dpmpp_2m"), (3, 1.0, 3, 0.0, "dpmpp_2m")]
        calls.clear()
        assert cli.main(["sample", "--checkpoint", str(ft), "--classes", "3", "--num", "2",
                         "--out", str(workdir / "g")]) == 0
        assert calls == [(2, 3.0, 10, 1.0, "ddim")]
        calls.clear()
        assert cli.main(["sample", "--checkpoint", str(ft), "--classes", "3", "--num", "2",
                         "--out", str(workdir / "g2"), "--ddim-steps", "2"]) == 0
        assert calls == [(2, 3.0, 2, 1.0, "ddim")]
        calls.clear()
        assert cli.main(["sample", "--checkpoint", str(ft), "--classes", "3", "--num", "2",
                         "--out", str(workdir / "g3"), "--eta", "0"]) == 0
        assert calls == [(2, 3.0, 10, 0.0, "ddim")]
        calls.clear()
        assert cli.main(["sample", "--checkpoint", str(ft), "--classes", "3", "--num", "2",
                         "--out", str(workdir / "g4"), "--sampler", "dpmpp_2m"]) == 0
        assert calls == [(2, 3.0, 10, 0.0, "dpmpp_2m")]  # the deterministic sampler: the grids' eta 1 falls to 0
        calls.clear()
        assert cli.main(["sample", "--checkpoint", str(ft), "--out", str(workdir / "g5"), "--sampler", "dpmpp_2m",
                         "--eta", "0.5"]) == 2  # refused before any sampling, nothing written
        assert calls == [] and not (workdir / "g5").exists()
        # the decoder's channels-last layout on the CPU changes the time, not the images
        from trainer.runs import generate, load_pipeline
        ldm, autoencoder, meta, _ = load_pipeline(ft)
        images = generate(ldm, autoencoder, torch.arange(10), tuple(meta["latent_shape"]), cfg,
                          torch.Generator().manual_seed(0), eta=0.0, ddim_steps=3, progress=False)
        z = ldm.sample_latents(torch.arange(10), tuple(meta["latent_shape"]), steps=3, eta=0.0,
                               guidance_scale=cfg.sample.guidance_scale, generator=torch.Generator().manual_seed(0),
                               sampler="ddim")
        torch.testing.assert_close(images, autoencoder.decode(z).clamp(-1, 1), rtol=0, atol=1e-4)
    finally:
        cfg_path.write_text(text)


@pytest.mark.slow
def test_evaluate_checkpoint_logs_to_the_run_named_by_run(workdir, capsys):
    import mlflow
    ft = workdir / "runs" / "demo-quick" / "finetune"
    if not ft.is_dir():  # keep the test independent of order
        assert cli.main(["demo", "--quick", "--output-dir", str(workdir / "runs")]) == 0
    mlflow.set_tracking_uri(None)  # the store of `workdir`
    with mlflow.start_run(run_name="elsewhere", experiment_id=mlflow.create_experiment("evaluate-run")) as run:
        run_id = run.info.run_id
    assert cli.main(["evaluate", "--checkpoint", str(ft), "--num", "2", "--metrics", "accuracy",
                     "--run", run_id]) == 0
    assert "accuracy: " in capsys.readouterr().out
    assert mlflow.get_run(run_id).data.metrics["eval.num_samples"] == 20  # 2 per class, logged where asked

    # another DP run of the experiment kept the MNIST test split private: scores on it are not DP
    other = ft.parent / "finetune-on-test"
    other.mkdir()
    try:
        dump_config(load_config("demo", ["data.private.split=test", "data.test=null"]), other / "config.yaml")
        (other / "ledger.json").write_text("{}")
        with mlflow.start_run(run_name="second", experiment_id=mlflow.get_experiment_by_name("evaluate-run")
                              .experiment_id) as run:
            second = run.info.run_id
        assert cli.main(["evaluate", "--checkpoint", str(ft), "--num", "1", "--metrics", "accuracy",
                         "--run", second]) == 0
        err = capsys.readouterr().err
        assert "the scores are not DP" in err and "finetune-on-test" in err
        logged = mlflow.get_run(second).data.metrics
        assert logged["nonprivate/eval.num_samples"] == 10 and not any(k.startswith("eval.") for k in logged)
    finally:
        shutil.rmtree(other)


@pytest.mark.slow
def test_sample_command_writes_images_per_class(workdir):
    ft = workdir / "runs" / "demo-quick" / "finetune"
    if not ft.is_dir():  # keep the test independent of order
        assert cli.main(["demo", "--quick", "--output-dir", str(workdir / "runs")]) == 0
    out = workdir / "samples"
    assert cli.main(["sample", "--checkpoint", str(ft), "--classes", "3,7", "--num", "2", "--out", str(out),
                     "--ddim-steps", "3"]) == 0
    assert len(list((out / "3").glob("*.png"))) == 2 and len(list((out / "7").glob("*.png"))) == 2
    assert (out / "grid.png").is_file()


@pytest.mark.slow
def test_utility_benchmark_scores_ceilings_and_a_run(workdir, tmp_path, monkeypatch, capsys):
    """bench/bench_utility.py: real, autoencoder and fine-tuned rows under one protocol."""
    runs = workdir / "runs" / "demo-quick"
    if not (runs / "finetune").is_dir():
        assert cli.main(["demo", "--quick", "--output-dir", str(workdir / "runs")]) == 0
    bench = load_bench("bench_utility")
    out = tmp_path / "utility.md"
    seen = []  # the FID network is tested elsewhere; here: which sets each row compares

    def fake_fid(reference, candidate):
        seen.append((len(reference), reference[0].shape, len(candidate), candidate[0].shape))
        return 12.5
    monkeypatch.setattr(bench, "fid", fake_fid)
    rows = bench.main(["--ae", str(runs / "ae"), "--finetune", str(runs / "finetune"), "--nonprivate",
                       str(runs / "finetune"), "--per-class", "4", "--seeds", "2", "--ddim-steps", "2", "--fid",
                       "--out", str(out)])
    assert seen == [(10000, (32, 32, 1), 40, (32, 32, 1))] * 4 and all(r["fid"] == 12.5 for r in rows)
    assert [r["row"] for r in rows] == ["real", "autoencoder", "finetune", "finetune non-private"]
    assert all(len(r["accuracy"]) == 2 and all(0 <= a <= 1 for a in r["accuracy"]) for r in rows)
    assert rows[2]["sample_s"] > 0 and "epsilon" in rows[2]["note"] and "no noise" in rows[3]["note"]
    assert out.read_text().count("\n| ") == 12  # two tables: header, separator, 4 rows
    counts = np.bincount(np.asarray(load_mnist("test")[1]), minlength=10)  # per class: its share of each mean
    for r in rows:
        assert len(r["per_class"]) == 10
        assert float(np.dot(r["per_class"], counts) / counts.sum()) == pytest.approx(sum(r["accuracy"]) / 2)
    # the non-private fine-tuning trains exactly the DP run's parameters, and moves them
    from safetensors.torch import load_file
    import trainer.models
    dp = load_file(str(runs / "finetune" / "finetuned.safetensors"))
    real_new, from_rows = trainer.models.new_class_embedder, []
    monkeypatch.setattr(trainer.models, "new_class_embedder", lambda *a: from_rows.append(a[2]) or real_new(*a))
    ldm = bench.nonprivate_finetune(runs / "finetune")[0]
    letters = json.loads((runs / "ldm" / "ldm.json").read_text())["label_names"]
    assert from_rows == [[letters.index(c) for c in "olzeysbtgq"]]  # the DP run's public initial rows
    tuned = {n: p for n, p in ldm.named_parameters() if n in dp}
    assert sorted(tuned) == sorted(dp)
    base = bench.load_pipeline(runs / "ldm")[0].state_dict()
    trained = [n for n in tuned if not n.startswith("cond_stage_model.")]
    assert trained and any(not torch.equal(tuned[n], base[n]) for n in trained)
    frozen = {n: p for n, p in ldm.state_dict().items() if n not in dp and not n.startswith("cond_stage_model.")}
    assert frozen and all(torch.equal(p, base[n]) for n, p in frozen.items())
    # the balanced subset: per_class of every class, and too few examples is an error naming the flag
    labels = torch.arange(10).repeat_interleave(5).numpy()
    idx = bench.balanced(labels, 3, seed=0)
    assert sorted(torch.from_numpy(labels[idx]).bincount().tolist()) == [3] * 10
    with pytest.raises(ValueError, match="--per-class"):
        bench.balanced(labels, 6, seed=0)
    # real rows need per_class real digits of every class (the quick private set: 2,000 digits, ~180 per
    # class); without them the synthetic rows may take more, as the protocol's 6,000 per class
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--ae", str(runs / "ae"), "--per-class", "250", "--out", str(tmp_path / "no.md")])
    assert exit_info.value.code == 2 and not (tmp_path / "no.md").exists()
    assert "--per-class 250" in capsys.readouterr().err
    # --classifier and --epochs replace the run's eval.classifier and eval.epochs in every row
    used = []
    real_accuracy = bench.downstream_accuracy
    monkeypatch.setattr(bench, "downstream_accuracy",
                        lambda *a, **k: used.append((k["classifier"], k["epochs"])) or real_accuracy(*a, **k))
    bench.main(["--ae", str(runs / "ae"), "--per-class", "4", "--seeds", "1", "--classifier", "mlp",
                "--epochs", "1", "--out", str(out)])
    assert used == [("mlp", 1)] * 2 and "classifier `mlp` (1 epochs" in out.read_text()
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--ae", str(runs / "ae"), "--epochs", "0"])
    assert exit_info.value.code == 2 and "--epochs 0" in capsys.readouterr().err
    real_generate, sampled_with = bench.generate, []
    monkeypatch.setattr(bench, "generate", lambda *a, **k: sampled_with.append(
        (len(a[2]), k["ddim_steps"], k["eta"])) or real_generate(*a, **k))
    rows = bench.main(["--ae", str(runs / "ae"), "--finetune", str(runs / "finetune"), "--per-class", "250",
                       "--seeds", "1", "--ddim-steps", "2", "--eta", "1", "--no-ceilings"])
    assert [r["row"] for r in rows] == ["finetune"] and "2 DDIM steps, eta 1" in rows[0]["note"]
    assert sampled_with == [(2500, 2, 1.0)]
    sampled_with.clear()  # without --ddim-steps/--eta: the run's eval.ddim_steps and eval.eta, not its sample.*
    cfg_path = runs / "finetune" / "config.yaml"
    text = cfg_path.read_text()
    try:
        cfg = load_config(str(cfg_path))
        cfg.sample.ddim_steps, cfg.eval.ddim_steps, cfg.sample.eta, cfg.eval.eta = 4, 3, 0.0, 0.5
        dump_config(cfg, cfg_path)
        rows = bench.main(["--ae", str(runs / "ae"), "--finetune", str(runs / "finetune"), "--per-class", "2",
                           "--seeds", "1", "--no-ceilings"])
    finally:
        cfg_path.write_text(text)
    assert sampled_with == [(20, 3, 0.5)] and "3 DDIM steps, eta 0.5" in rows[0]["note"]
    sampled_with.clear()  # --sampler dpmpp_2m: the run's eval.eta gives way to 0, and an eta above 0 is refused
    rows = bench.main(["--ae", str(runs / "ae"), "--finetune", str(runs / "finetune"), "--per-class", "2",
                       "--seeds", "1", "--no-ceilings", "--sampler", "dpmpp_2m", "--ddim-steps", "3"])
    assert sampled_with == [(20, 3, 0.0)] and "3 DPM-Solver++(2M) steps, eta 0" in rows[0]["note"]
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--ae", str(runs / "ae"), "--finetune", str(runs / "finetune"), "--sampler", "dpmpp_2m",
                    "--eta", "0.5", "--out", str(tmp_path / "no.md")])
    assert exit_info.value.code == 2 and not (tmp_path / "no.md").exists()
    assert "--eta: must be 0 with the deterministic sampler dpmpp_2m" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:  # a folder that is not a run: one line naming the flag, no work
        bench.main(["--ae", str(runs / "ae"), "--finetune", str(runs / "s600a"), "--out", str(tmp_path / "no.md")])
    assert exit_info.value.code == 2 and not (tmp_path / "no.md").exists()
    assert "--finetune" in capsys.readouterr().err


def test_finetune_refuses_a_base_whose_pretraining_was_interrupted(workdir, monkeypatch, capsys):
    """An interrupted pretrain-ldm keeps its weights and ldm.json: fine-tuning on it must refuse
    (naming the step reached), whether the base is the experiment's own or ``finetune.base``."""
    from trainer.stages import loop, pretrain_ae, pretrain_ldm
    overrides = TINY + ["experiment=cut", f"output_dir={workdir / 'runs'}", "ldm.train.checkpoint_every=1"]
    pretrain_ae.run(load_config("demo", overrides))

    class StopAtStepTwo(loop.StopRequest):
        reads = 0

        @property
        def requested(self):  # the loop reads it once per step
            StopAtStepTwo.reads += 1
            return StopAtStepTwo.reads >= 2

        @requested.setter
        def requested(self, value):
            pass

    monkeypatch.setattr(loop, "StopRequest", StopAtStepTwo)
    with pytest.raises(KeyboardInterrupt):
        pretrain_ldm.run(load_config("demo", overrides))
    monkeypatch.undo()
    ldm_dir = workdir / "runs" / "cut" / "ldm"
    assert (ldm_dir / "ldm.json").is_file() and (ldm_dir / "unet.safetensors").is_file()
    for extra in ([], [f"finetune.base={ldm_dir}", "finetune.name=explicit"]):
        capsys.readouterr()
        assert cli.main(["finetune", "--config", "demo", *overrides, *extra]) == 1
        err = capsys.readouterr().err
        assert "pretrain-ldm stopped at step 2 of 4" in err and "Traceback" not in err
    assert not (workdir / "runs" / "cut" / "finetune").exists()
    assert not (workdir / "runs" / "cut" / "finetune-explicit").exists()
    for argv in (["sample", "--checkpoint", str(ldm_dir), "--out", str(workdir / "cut-samples")],
                 ["evaluate", "--checkpoint", str(ldm_dir), "--metrics", "accuracy"]):  # nor sampled, nor scored
        assert cli.main(argv) == 1
        assert "pretrain-ldm stopped at step 2 of 4" in capsys.readouterr().err
    assert not (workdir / "cut-samples").exists()
    pretrain_ldm.run(load_config("demo", overrides))  # resumes to step 4: now a finished base
    from trainer.stages.common import earlier_stage
    assert earlier_stage(load_config("demo", overrides), "pretrain-ldm") == ldm_dir
    # a config whose architecture sections differ from the base's: the base's are used, and said so
    capsys.readouterr()
    assert cli.main(["finetune", "--config", "demo", *overrides, "ldm.train.lr=0.123"]) == 0
    assert "the config's `ldm` section differs from the base's" in capsys.readouterr().err
    assert load_config(str(workdir / "runs" / "cut" / "finetune" / "config.yaml")).ldm.train.lr != 0.123


def test_a_public_stage_that_has_trained_resumes_only_under_its_settings(workdir, capsys):
    """Its weights and its recorded config.yaml must agree (every later stage reads the record): a changed
    architecture, learning rate or public set is refused before anything is written; training longer is
    not. A public set that cannot be read leaves no folder."""
    overrides = TINY + ["experiment=resume-settings", f"output_dir={workdir / 'runs'}"]
    ae = workdir / "runs" / "resume-settings" / "ae"
    assert cli.main(["pretrain-ae", "--config", "demo", *overrides]) == 0
    recorded = (ae / "config.yaml").read_bytes()
    for change, key in (("autoencoder.ddconfig.ch=64", "autoencoder.ddconfig.ch"),
                        ("autoencoder.train.lr=0.01", "autoencoder.train.lr"),
                        ("data.public.seed=3", "data.public.seed")):
        capsys.readouterr()
        assert cli.main(["pretrain-ae", "--config", "demo", *overrides, change]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"dpldm pretrain-ae: config error: {key}: {ae} has trained with") and err.count("\n") == 1
        assert (ae / "config.yaml").read_bytes() == recorded
    assert cli.main(["pretrain-ae", "--config", "demo", *overrides, "autoencoder.train.steps=5"]) == 0
    assert load_config(str(ae / "config.yaml")).autoencoder.train.steps == 5
    capsys.readouterr()
    assert cli.main(["pretrain-ae", "--config", "demo", *overrides, "autoencoder.train.steps=3"]) == 2
    assert "has trained 5 steps already, more than 3" in capsys.readouterr().err
    assert cli.main(["pretrain-ae", "--config", "demo", *overrides, "autoencoder.train.steps=5", "precision=bf16",
                     "data.public.num_workers=0"]) == 0  # the device, precision and readers are not the model's
    # an autoencoder an LDM was pretrained on is not trained further, and the LDM does not resume over other weights
    assert cli.main(["pretrain-ldm", "--config", "demo", *overrides, "autoencoder.train.steps=5"]) == 0
    ldm_record = (ae.parent / "ldm" / "config.yaml").read_bytes()
    capsys.readouterr()
    assert cli.main(["pretrain-ae", "--config", "demo", *overrides, "autoencoder.train.steps=6"]) == 2
    assert "would train the autoencoder" in capsys.readouterr().err
    from trainer.io import load_safetensors, save_safetensors
    tensors = dict(load_safetensors(ae / "autoencoder.safetensors").state_dict)  # replaced by other weights
    save_safetensors({k: v + 1e-3 for k, v in tensors.items()}, ae / "autoencoder.safetensors")
    assert cli.main(["pretrain-ldm", "--config", "demo", *overrides, "autoencoder.train.steps=5",
                     "ldm.train.steps=6"]) == 1
    assert "has trained on the latents of other autoencoder weights" in capsys.readouterr().err
    assert (ae.parent / "ldm" / "config.yaml").read_bytes() == ldm_record
    capsys.readouterr()
    nowhere = ["experiment=nowhere", "data.public.source=shards", f"data.public.path={workdir / 'no-shards'}"]
    assert cli.main(["pretrain-ae", "--config", "demo", *overrides, *nowhere]) == 2  # the config names them
    assert "data.public.path: " in capsys.readouterr().err and not (workdir / "runs" / "nowhere").exists()


def test_a_pretraining_resumes_over_its_public_shards_moved_but_not_over_other_images(tmp_path):
    """The record names the shards by absolute path: moved (the experiment copied elsewhere) they are the
    same images and the stage resumes; other images in their place are refused."""
    import shutil

    from trainer.data.provenance import record_public_images
    from trainer.io import save_state
    from trainer.stages.common import STATE_FILE, refuse_changed_settings, save_run_config
    for name, seed in (("letters", 0), ("other", 1)):
        assert cli.main(["prepare", "letters", "--count", "12", "--seed", str(seed), "--no-progress",
                         str(tmp_path / name)]) == 0
    shutil.copytree(tmp_path / "letters", tmp_path / "moved")

    def cfg(folder):
        return load_config("demo", ["data.public.source=shards", f"data.public.path={tmp_path / folder}"])
    run_dir = tmp_path / "ae"
    save_run_config(cfg("letters"), run_dir)
    record_public_images(cfg("letters").data.public, run_dir)
    save_state({"step": 2}, run_dir / STATE_FILE)
    sections = ("seed", "data.public", "autoencoder")
    refuse_changed_settings(cfg("letters"), run_dir, sections)
    refuse_changed_settings(cfg("moved"), run_dir, sections)
    with pytest.raises(ConfigError, match="data.public.path: .* has trained with"):
        refuse_changed_settings(cfg("other"), run_dir, sections)


@pytest.mark.slow
def test_interrupted_finetune_resumes_and_never_undercounts(workdir, monkeypatch):
    overrides = TINY + ["experiment=resume", f"output_dir={workdir / 'runs'}", "finetune.checkpoint_every=1"]
    cfg = load_config("demo", overrides)
    from trainer.stages import pretrain_ae, pretrain_ldm
    pretrain_ae.run(cfg)
    pretrain_ldm.run(cfg)

    from trainer.privacy import DPGradientEngine
    real_finalize = DPGradientEngine.finalize
    calls = {"n": 0}

    def failing_finalize(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # dies inside step 2, after the ledger recorded it
        return real_finalize(self, *a, **k)

    monkeypatch.setattr(DPGradientEngine, "finalize", failing_finalize)
    with pytest.raises(KeyboardInterrupt):
        finetune.run(cfg)
    run_dir = workdir / "runs" / "resume" / "finetune"
    ledger = json.loads((run_dir / "ledger.json").read_text())
    assert ledger["steps_taken"] == 2  # step 2 counts although it never finished
    monkeypatch.setattr(DPGradientEngine, "finalize", real_finalize)
    finetune.run(cfg)
    report = json.loads((run_dir / "privacy-report.json").read_text())
    # the plan has 3 steps; 2 were spent before the crash (one lost), so only 1 more is allowed
    assert report["steps"] == 3 and report["planned_steps"] == 3
    assert report["epsilon"] <= 10.0


def test_bad_privacy_plans_fail_before_any_work(tmp_path):
    cfg = load_config("demo", ["finetune.delta=0.01"])
    with pytest.raises(ConfigError, match="finetune.delta"):
        finetune.plan_privacy(cfg, num_private=1000)
    cfg = load_config("demo", ["finetune.expected_batch_size=2000"])
    with pytest.raises(ConfigError, match="finetune.expected_batch_size"):
        finetune.plan_privacy(cfg, num_private=1000)


def test_calibrated_plan_meets_the_target():
    from trainer.privacy import epsilon
    cfg = load_config("demo", ["finetune.steps=20", "finetune.expected_batch_size=100"])
    q, sigma = finetune.plan_privacy(cfg, num_private=10000)
    assert q == pytest.approx(0.01)
    assert epsilon(sigma, q, 20, 1e-5) <= 10.0 < epsilon(0.98 * sigma, q, 20, 1e-5)


def test_cli_reports_config_errors_with_the_key(capsys, tmp_path):
    assert cli.main(["pretrain-ae", "--output-dir", str(tmp_path), "autoencoder.train.stepz=3"]) == 2
    assert "autoencoder.train.stepz" in capsys.readouterr().err


@pytest.mark.parametrize("overrides, key", [(["ldm.unet.model_channels=48"], "ldm.unet.model_channels"),
                                            (["ldm.unet.num_heads=-1", "ldm.unet.num_head_channels=-1"], "ldm.unet")])
def test_an_unbuildable_unet_is_refused_before_any_work(capsys, tmp_path, overrides, key):
    """One line naming the key, exit 2, nothing written: not a traceback after encoding the letters."""
    runs = tmp_path / "runs"
    assert cli.main(["pretrain-ldm", "--output-dir", str(runs), *overrides]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dpldm pretrain-ldm: config error:") and key in err and len(err.strip().splitlines()) == 1
    assert not runs.exists()


def test_help_lists_every_stage(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    text = capsys.readouterr().out
    for stage in ("prepare", "encode", "pretrain-ae", "pretrain-ldm", "finetune", "sample", "demo"):
        assert stage in text


@pytest.mark.slow
@pytest.mark.parametrize("cond", ["class", "text"])
def test_pretraining_streams_shards_with_labels_or_captions(tmp_path, workdir, cond):
    from trainer.data.shards import WriteOptions, write_shards
    from trainer.data.sources import letters_source
    from trainer.stages import pretrain_ae, pretrain_ldm
    from trainer.runs import load_pipeline
    shards = tmp_path / "shards"
    write_shards(letters_source(40, size=28, seed=1), shards,
                 WriteOptions(samples_per_shard=16, caption_template="a handwritten letter {label}"),
                 progress_bar=False)
    overrides = [f"output_dir={tmp_path / 'runs'}", f"experiment=shards-{cond}", "data.public.source=shards",
                 f"data.public.path={shards}/shard-{{000000..000002}}.tar", "data.public.num_workers=0",
                 "autoencoder.train.steps=2", "autoencoder.train.batch_size=4",
                 "ldm.train.steps=2", "ldm.train.batch_size=4", "sample.ddim_steps=2", "sample.num_per_class=1",
                 f"ldm.conditioner.type={cond}", "ldm.conditioner.max_length=12",
                 "sample.prompts=[\"a handwritten letter b\"]"]
    cfg = load_config("demo", overrides)
    pretrain_ae.run(cfg)
    ldm_dir = pretrain_ldm.run(cfg)
    for stage in (ldm_dir, ldm_dir.parent / "ae"):  # what a later private set is checked against
        assert np.load(stage / "public-images.npy").shape == (40, 16)
    meta = json.loads((ldm_dir / "ldm.json").read_text())
    assert meta["latent_shape"] == [4, 4, 4]
    if cond == "class":
        assert meta["label_names"][:3] == ["a", "b", "c"]
    ldm, _, _, _ = load_pipeline(ldm_dir)
    context = ldm.context(["a handwritten letter q"] if cond == "text" else torch.tensor([16]))
    assert context.shape[0] == 1 and context.shape[-1] == 64


def test_grey_in_memory_sets_feed_an_rgb_autoencoder(tmp_path):
    """Letters (public) and MNIST (private) are grey: an autoencoder of 3 input channels takes them with
    the grey repeated, in every stage that loads them (it crashed at the first encoding)."""
    from trainer.stages import pretrain_ae, pretrain_ldm
    cfg = load_config("demo", TINY + [f"output_dir={tmp_path / 'runs'}", "experiment=rgb",
                                      "autoencoder.ddconfig.in_channels=3", "autoencoder.ddconfig.out_ch=3",
                                      "finetune.steps=2", "finetune.expected_batch_size=16",
                                      "finetune.physical_batch_size=8"])
    pretrain_ae.run(cfg)
    pretrain_ldm.run(cfg)
    report = json.loads((finetune.run(cfg) / "privacy-report.json").read_text())
    assert report["steps"] == 2 and report["N"] == 1000


def test_private_set_identity_names_the_set_not_the_plumbing():
    """The identity a DP run's ledger records: another split, other shard files or another size differ,
    the same set read another way (workers, resolution) does not; it survives JSON."""
    from dataclasses import replace

    from trainer.config import DataSource
    identity = private_set.private_set_identity
    train = DataSource(source="mnist", split="train", num_examples=1000)
    assert identity(train, 1000) != identity(replace(train, split="val"), 1000)
    assert identity(train, 1000) != identity(train, 999)
    assert identity(replace(train, num_workers=4, resolution=28), 1000) == identity(train, 1000)
    shards = DataSource(source="shards", path="/a/shard-000000.tar")
    assert identity(shards, 300) != identity(replace(shards, path="/b/shard-000000.tar"), 300)
    recorded = identity(replace(train, elastic=16.0, fonts="matplotlib"), 1000)
    assert json.loads(json.dumps(recorded)) == recorded


@pytest.mark.slow
def test_finetune_on_private_shards_uses_a_latent_cache(tmp_path, workdir, monkeypatch, capsys):
    """Private shards are counted for the plan, then encoded once into a latent cache kept apart from the
    run folders (results only) and shared by the experiment's fine-tunes; a refused plan writes nothing,
    and a shard listed twice is refused (its examples would count twice in N)."""
    from trainer.data import latent_cache
    from trainer.data.shards import WriteOptions, write_shards
    from trainer.data.sources import mnist_source
    from trainer.stages import pretrain_ae, pretrain_ldm
    shards = tmp_path / "private"
    write_shards(mnist_source("train"), shards, WriteOptions(samples_per_shard=100, limit=300), progress_bar=False)
    overrides = TINY + [f"output_dir={tmp_path / 'runs'}", "experiment=private-shards", "finetune.steps=2",
                        "data.private.source=shards", f"data.private.path={shards}/shard-{{000000..000002}}.tar",
                        "finetune.expected_batch_size=16", "finetune.physical_batch_size=8"]
    cfg = load_config("demo", overrides)
    pretrain_ae.run(cfg)
    pretrain_ldm.run(cfg)
    experiment = tmp_path / "runs" / "private-shards"
    with pytest.raises(ConfigError, match=r"finetune.delta: 0.5 must be < 1/N .*N = 300"):
        finetune.run(load_config("demo", overrides + ["finetune.delta=0.5"]))
    assert not (experiment / "private").exists() and not (experiment / "finetune").exists()
    twice = f"data.private.path={shards}/shard-{{000000..000002}}.tar::{shards}/shard-000001.tar"
    with pytest.raises(ConfigError, match=r"data.private.path: .*shard-000001.tar: the same samples as shard"):
        finetune.run(load_config("demo", overrides + [twice]))
    assert not (experiment / "private").exists()
    with pytest.raises(ConfigError, match=r"--canaries: must be in \[1, "):  # an audit refused before encoding
        finetune.run_audit(cfg, canaries=10 ** 9)
    assert not (experiment / "private").exists() and not (experiment / "audit").exists()

    run_dir = finetune.run(cfg)
    report = json.loads((run_dir / "privacy-report.json").read_text())
    [cache] = (experiment / "private").iterdir()
    manifest = json.loads((cache / "manifest.json").read_text())
    assert report["N"] == 300 == manifest["count"] and report["steps"] == 2
    assert report["data"].startswith("shards:")
    assert report["public_pretraining_data"] == \
        "checked: no example in common with the public data the base's LDM and autoencoder recorded"
    assert manifest["complete"] and manifest["latent_shape"] == [4, 4, 4]
    assert not list(run_dir.rglob("*.npy")), "private latents in the run folder"
    digest = private_set.private_shards(cfg).digest  # a hash of every private example: never in a released file
    assert not [f for f in run_dir.rglob("*") if f.is_file() and (digest.encode() in f.read_bytes()
                                                                   or cache.name.encode() in f.read_bytes())]

    def encode_again(*a, **kw):
        raise AssertionError("the private shards were encoded again")
    monkeypatch.setattr(latent_cache, "_encode_shard", encode_again)
    second = finetune.run(load_config("demo", overrides + ["finetune.name=again"]))
    assert json.loads((second / "privacy-report.json").read_text())["N"] == 300
    assert [cache] == list((experiment / "private").iterdir())
    shutil.rmtree(experiment / "private")  # deleted when done: a finished run, or a changed plan, encodes nothing
    assert finetune.run(cfg) == run_dir
    with pytest.raises(ConfigError, match="the privacy plan of a run and its private set"):
        finetune.run(load_config("demo", overrides + ["finetune.steps=3"]))
    assert not (experiment / "private").exists()
    # Other people, as many of them (the same q and sigma): the run's steps stay charged to its first set
    others = tmp_path / "others"
    write_shards(mnist_source("val"), others, WriteOptions(samples_per_shard=100, limit=300), progress_bar=False)
    recorded = {name: (run_dir / name).read_bytes() for name in ("config.yaml", "ledger.json")}
    with pytest.raises(ConfigError, match=r"ledger.json: ledger state has private_set=.*data.private"):
        finetune.run(load_config("demo", overrides + [f"data.private.path={others}/shard-{{000000..000002}}.tar"]))
    assert {name: (run_dir / name).read_bytes() for name in recorded} == recorded
    assert not (experiment / "private").exists()
    # a private image that does not decode: found while encoding, before any step; one line naming the
    # shard and the sample (exit 1), nothing charged
    from trainer.data.shards import write_shard
    monkeypatch.undo()  # encoding again
    broken = tmp_path / "broken"
    broken.mkdir()
    shutil.copy(shards / "shard-000000.tar", broken / "shard-000000.tar")
    write_shard(broken / "shard-000001.tar", [{"__key__": "bad", "png": b"not an image", "cls": b"3"}])
    capsys.readouterr()
    assert cli.main(["finetune", *overrides, f"data.private.path={broken}", "finetune.name=broken"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith(
        f"dpldm finetune: error: {broken / 'shard-000001.tar'}: sample bad: cannot decode .png"), err
    assert not (experiment / "finetune-broken").exists()
