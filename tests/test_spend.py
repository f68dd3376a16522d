"""What a private set has spent over an experiment's runs: which runs count, and their composition."""
import json
from pathlib import Path

import pytest

from trainer.config import DataSource, dump_config, load_config
from trainer.data.shards import write_shard
from trainer.errors import RunError
from trainer.privacy import Mechanism, composed_epsilon, epsilon
from trainer.stages.spend import charges, compose

DELTA = 1e-5


def fake_run(experiment, name, split, sigma=1.0, q=0.01, taken=100, planned=100, report=None):
    """A run folder as a DP run leaves it: its config (private MNIST ``split``) and its ledger journal."""
    run_dir = experiment / name
    run_dir.mkdir(parents=True)
    dump_config(load_config("demo", [f"data.private.split={split}"]), run_dir / "config.yaml")
    (run_dir / "ledger.json").write_text(json.dumps(
        {"noise_multiplier": sigma, "sample_rate": q, "delta": DELTA, "epsilon_budget": 50.0,
         "planned_steps": planned, "steps_taken": taken}))
    if report:
        (run_dir / report).write_text("{}")
    return run_dir


def test_the_runs_whose_private_sets_share_examples_count_each_for_what_it_may_spend(tmp_path):
    exp = tmp_path / "exp"
    fake_run(exp, "finetune", "train", taken=100, report="privacy-report.json")
    fake_run(exp, "finetune-val", "val", sigma=2.0)
    fake_run(exp, "finetune-all", "trainval", taken=40, planned=300)  # unfinished: it may take all 300
    fake_run(exp, "audit", "train", sigma=3.0, q=0.1, taken=7, planned=9, report="audit-report.json")
    (exp / "ldm").mkdir()  # pretraining folders have no journal
    (exp / "ldm" / "config.yaml").write_text("{}")

    train = {c.run: c for c in charges(exp, DataSource(source="mnist", split="train"))}
    assert sorted(train) == ["audit", "finetune", "finetune-all"]
    assert (train["finetune"].steps, train["finetune-all"].steps, train["audit"].steps) == (100, 300, 7)
    assert train["finetune"].ended and train["audit"].ended and not train["finetune-all"].ended
    assert "MNIST's train split" in train["finetune-all"].why
    assert sorted(c.run for c in charges(exp, DataSource(source="mnist", split="val"))) == \
        ["finetune-all", "finetune-val"]
    assert charges(exp, DataSource(source="mnist", split="test")) == []

    spend = compose(list(train.values()), DELTA)
    mechanisms = [Mechanism(1.0, 0.01, 100), Mechanism(1.0, 0.01, 300), Mechanism(3.0, 0.1, 7)]
    assert spend.delta == DELTA and spend.epsilon == pytest.approx(composed_epsilon(mechanisms, DELTA))
    assert max(epsilon(*m, DELTA) for m in mechanisms) < spend.epsilon < sum(epsilon(*m, DELTA) for m in mechanisms)
    assert "finetune-all (planned 300 steps)" in spend.line() and f"({spend.epsilon:.4g}, 1e-05)-DP together" \
        in spend.line()
    assert [r["run"] for r in spend.to_dict()["runs"]] == ["audit", "finetune", "finetune-all"]


def test_a_run_whose_set_cannot_be_read_counts_and_a_broken_journal_is_refused(tmp_path):
    exp = tmp_path / "exp"
    fake_run(exp, "finetune-lost", "val")
    (exp / "finetune-lost" / "config.yaml").unlink()
    (found,) = charges(exp, DataSource(source="mnist", split="test"))
    assert found.run == "finetune-lost" and "cannot be read" in found.why
    fake_run(exp, "finetune-moved", "val")  # its shards are gone (or named relative to another folder)
    recorded = load_config(str(exp / "finetune-moved" / "config.yaml"))
    recorded.data.private = DataSource(source="shards", path="elsewhere/shard-{000000..000003}.tar")
    dump_config(recorded, exp / "finetune-moved" / "config.yaml")
    assert {c.run: c.why for c in charges(exp, DataSource(source="mnist", split="test"))}["finetune-moved"] == \
        "its private set (shards elsewhere/shard-{000000..000003}.tar) cannot be shown disjoint from this one"
    fake_run(exp, "finetune-torn", "train")
    (exp / "finetune-torn" / "ledger.json").write_text('{"noise_multiplier": 1.0')
    with pytest.raises(RunError, match=r"finetune-torn/ledger.json: unreadable"):
        charges(exp, DataSource(source="mnist", split="test"))
    for bad in (2.9, -1, True, "7"):  # a broken count is refused, never rounded down to fewer steps
        (exp / "finetune-torn" / "ledger.json").write_text(json.dumps(
            {"noise_multiplier": 1.0, "sample_rate": 0.01, "delta": DELTA, "planned_steps": 3, "steps_taken": bad}))
        with pytest.raises(RunError, match=r"finetune-torn/ledger.json: unreadable \(steps must be a whole"):
            charges(exp, DataSource(source="mnist", split="test"))


@pytest.mark.parametrize("trace", ["finetuned.safetensors", "finetuned-ema.safetensors", "finetune-state.pt",
                                   "checkpoints"])
def test_a_dp_run_whose_records_were_lost_is_refused_not_left_out(tmp_path, trace):
    """A folder with a fine-tune's weights, resume state or checkpoints but neither journal nor report (lost,
    deleted) has charged steps nobody can count: every total over the experiment refuses, never skips it.
    A folder a session left before its first step (config and finetune.json only) charged nothing."""
    exp = tmp_path / "exp"
    fake_run(exp, "finetune", "trainval", report="privacy-report.json")
    started = fake_run(exp, "finetune-started", "trainval")
    (started / "ledger.json").unlink()
    (started / "finetune.json").write_text("{}")
    assert [c.run for c in charges(exp, DataSource(source="mnist", split="trainval"))] == ["finetune"]
    lost = fake_run(exp, "finetune-lost", "trainval")
    (lost / "ledger.json").unlink()
    (lost / trace).mkdir() if trace == "checkpoints" else (lost / trace).write_bytes(b"")
    with pytest.raises(RunError, match=r"finetune-lost: holds a DP run's weights or state but no record"):
        charges(exp, DataSource(source="mnist", split="trainval"))


def test_one_run_alone_is_its_own_epsilon(tmp_path):
    exp = tmp_path / "exp"
    fake_run(exp, "finetune", "trainval", report="privacy-report.json")
    spend = compose(charges(exp, DataSource(source="mnist", split="trainval")), DELTA)
    assert spend.epsilon == pytest.approx(epsilon(1.0, 0.01, 100, DELTA))


def prepared(folder: Path, source: dict | None) -> DataSource:
    """One shard in ``folder``, with a ``meta.json`` naming the prepared ``source`` (None: no meta.json)."""
    folder.mkdir(parents=True)
    write_shard(folder / "shard-000000.tar", [{"__key__": "x", "png": b""}])
    if source is not None:
        (folder / "meta.json").write_text(json.dumps({"source": source}))
    return DataSource(source="shards", path=str(folder))


def test_runs_count_unless_their_sets_are_provably_disjoint(tmp_path):
    """Disjoint: MNIST parts that do not meet, or other shard files of one folder. Two folders
    prepared from differently described sources may still hold the same images: they count."""
    exp = tmp_path / "exp"
    faces = prepared(tmp_path / "faces", {"type": "imagefolder", "root": "/data/faces"})
    scans = prepared(tmp_path / "scans", {"type": "imagefolder", "root": "/data/faces/alice"})
    copy = prepared(tmp_path / "copy", None)  # a copy of some set, nothing says which
    digits = prepared(tmp_path / "digits", {"type": "mnist", "split": "train"})
    write_shard(tmp_path / "faces" / "shard-000001.tar", [{"__key__": "y", "png": b"other image"}])
    other_range = DataSource(source="shards", path=str(tmp_path / "faces" / "shard-000001.tar"))
    faces = DataSource(source="shards", path=str(tmp_path / "faces" / "shard-000000.tar"))
    # a shard copied under another name into the prepared folder, and a folder of shards nobody prepared
    write_shard(tmp_path / "faces" / "shard-000002.tar", [{"__key__": "z", "png": b""}])
    copied = DataSource(source="shards", path=str(tmp_path / "faces" / "shard-000002.tar"))
    (tmp_path / "loose").mkdir()
    for i, image in enumerate((b"", b"other image")):
        write_shard(tmp_path / "loose" / f"shard-00000{i}.tar", [{"__key__": "x", "png": image}])
    loose = DataSource(source="shards", path=str(tmp_path / "loose" / "shard-000001.tar"))
    for name, private in (("finetune-scans", scans), ("finetune-copy", copy), ("finetune-digits", digits),
                          ("finetune-range", other_range), ("finetune-copied", copied), ("finetune-loose", loose)):
        run_dir = fake_run(exp, name, "train")
        recorded = load_config(str(run_dir / "config.yaml"))
        recorded.data.private = private
        dump_config(recorded, run_dir / "config.yaml")
    found = {c.run: c.why for c in charges(exp, faces)}
    assert sorted(found) == ["finetune-copied", "finetune-copy", "finetune-digits", "finetune-loose",
                             "finetune-scans"], "the other range is disjoint"
    assert all("cannot be shown disjoint" in why for why in found.values())
    loose_first = DataSource(source="shards", path=str(tmp_path / "loose" / "shard-000000.tar"))
    assert "finetune-loose" in {c.run for c in charges(exp, loose_first)}, "no meta.json: nothing says disjoint"
    assert {c.run: c.why for c in charges(exp, DataSource(source="mnist", split="trainval"))}["finetune-digits"] == \
        "MNIST's train split"
    assert sorted(c.run for c in charges(exp, DataSource(source="mnist", split="test"))) == \
        ["finetune-copied", "finetune-copy", "finetune-loose", "finetune-range", "finetune-scans"], \
        "digits prepared from MNIST's train split: disjoint"


def test_a_run_without_a_journal_counts_from_its_report(tmp_path):
    exp = tmp_path / "exp"
    old_audit = exp / "audit"  # an audit from before audits journaled their steps
    old_audit.mkdir(parents=True)
    dump_config(load_config("demo"), old_audit / "config.yaml")
    (old_audit / "audit-report.json").write_text(json.dumps(
        {"noise_multiplier": 2.0, "sample_rate": 0.05, "steps": 40, "delta": DELTA}))
    run = fake_run(exp, "finetune", "trainval", sigma=1.5, taken=30, planned=30, report="privacy-report.json")
    (run / "privacy-report.json").write_text(json.dumps(
        {"noise_multiplier": 1.5, "sample_rate": 0.01, "steps": 30, "planned_steps": 30, "delta": DELTA}))
    (run / "ledger.json").unlink()  # lost: the report still says what was spent
    found = {c.run: (c.noise_multiplier, c.sample_rate, c.steps, c.ended) for c in
             charges(exp, DataSource(source="mnist", split="trainval"))}
    assert found == {"audit": (2.0, 0.05, 40, True), "finetune": (1.5, 0.01, 30, True)}


def test_pretraining_on_an_earlier_dp_runs_private_set_is_refused_and_writes_nothing(tmp_path):
    """A public stage after a DP run of its experiment: public MNIST train digits when that run kept
    MNIST's train split private are refused before anything is written (a base pretrained on them would
    release them without DP); MNIST's test split, and a run of another experiment, are not in the way."""
    from trainer.config import ConfigError
    from trainer.stages import pretrain_ae, pretrain_ldm
    from trainer.stages.spend import refuse_private_as_public
    fake_run(tmp_path / "runs" / "exp", "finetune", "trainval")
    public = ["data.private=null", "data.public.source=mnist", f"output_dir={tmp_path / 'runs'}"]
    for stage in (pretrain_ae, pretrain_ldm):
        with pytest.raises(ConfigError, match=r"data.public: shares examples with, or cannot be checked against, the private set of a DP run "
                                              r".*\(MNIST's train split \(the private set of the DP run .*finetune\)"):
            stage.run(load_config("demo", public + ["experiment=exp", "data.public.split=train"]))
    assert sorted(p.name for p in (tmp_path / "runs" / "exp").iterdir()) == ["finetune"]
    refuse_private_as_public(DataSource(source="mnist", split="test"), tmp_path / "runs" / "exp")
    refuse_private_as_public(DataSource(source="mnist", split="train"), tmp_path / "runs" / "other")
    (tmp_path / "runs" / "exp" / "finetune" / "config.yaml").write_text("data: [")
    with pytest.raises(ConfigError, match=r"cannot be read .*config.yaml"):
        refuse_private_as_public(DataSource(source="mnist", split="test"), tmp_path / "runs" / "exp")


def test_the_content_check_reads_each_private_set_once_however_many_runs_trained_on_it(tmp_path, monkeypatch):
    """Two DP runs on one private set and a byte copy of it as public data: both runs are named, and the
    images are compared once (each comparison reads every image of both sets)."""
    import shutil

    from trainer.config import ConfigError
    from trainer.data import provenance
    from trainer.stages.spend import refuse_private_as_public
    exp = tmp_path / "runs" / "exp"
    (tmp_path / "private").mkdir()
    write_shard(tmp_path / "private" / "shard-000000.tar", [{"__key__": f"{i}", "png": bytes([i]) * 40}
                                                            for i in range(3)])
    for name in ("finetune", "finetune-again"):
        run_dir = fake_run(exp, name, "trainval")
        recorded = load_config(str(run_dir / "config.yaml"))
        recorded.data.private = DataSource(source="shards", path=str(tmp_path / "private"))
        dump_config(recorded, run_dir / "config.yaml")
    (tmp_path / "public").mkdir()
    shutil.copy(tmp_path / "private" / "shard-000000.tar", tmp_path / "public" / "shard-000007.tar")
    real, calls = provenance.images_in_common, []
    monkeypatch.setattr(provenance, "images_in_common", lambda *a, **kw: calls.append(a) or real(*a, **kw))
    with pytest.raises(ConfigError) as refused:
        refuse_private_as_public(DataSource(source="shards", path=str(tmp_path / "public")), exp)
    assert "DP run " + str(exp / "finetune") + ")" in str(refused.value)
    assert "DP run " + str(exp / "finetune-again") + ")" in str(refused.value)
    assert len(calls) == 1


def test_pretraining_on_a_copy_of_a_dp_runs_private_images_is_refused_whatever_names_them(tmp_path):
    """No path or meta.json links the public shards to a DP run's private set: a byte copy of its private
    shards, or MNIST digits prepared into shards again without their meta.json, are still refused, by the
    images' content; private shards that can no longer be read refuse too (nothing could be compared)."""
    import shutil

    from trainer.config import ConfigError
    from trainer.data.shards import WriteOptions, write_shards
    from trainer.data.sources import mnist_source
    from trainer.stages.spend import refuse_private_as_public
    exp = tmp_path / "runs" / "exp"
    (tmp_path / "private").mkdir()
    write_shard(tmp_path / "private" / "shard-000000.tar", [{"__key__": f"{i}", "png": bytes([i]) * 40}
                                                            for i in range(3)])
    run_dir = fake_run(exp, "finetune", "trainval")
    recorded = load_config(str(run_dir / "config.yaml"))
    recorded.data.private = DataSource(source="shards", path=str(tmp_path / "private"))
    dump_config(recorded, run_dir / "config.yaml")
    (tmp_path / "public").mkdir()
    shutil.copy(tmp_path / "private" / "shard-000000.tar", tmp_path / "public" / "shard-000007.tar")
    copy = DataSource(source="shards", path=str(tmp_path / "public"))
    with pytest.raises(ConfigError, match=r"data.public: .*shard images byte for byte the same as the private shards' "
                                          r"images \(the private set of the DP run .*finetune\)"):
        refuse_private_as_public(copy, exp)
    other = prepared(tmp_path / "other", None)
    refuse_private_as_public(other, exp)  # other images: nothing shared
    shutil.rmtree(tmp_path / "private")
    with pytest.raises(ConfigError, match=r"images that cannot be compared \(.*\) \(the private set of the DP "
                                          r"run .*finetune\)"):
        refuse_private_as_public(other, exp)
    refuse_private_as_public(DataSource(source="letters"), exp)  # rendered letters: nothing to compare or read

    digits_exp = tmp_path / "runs" / "digits"
    fake_run(digits_exp, "finetune", "trainval")  # MNIST's 60,000 training digits, in memory
    write_shards(mnist_source("train"), tmp_path / "digits", WriteOptions(limit=4), progress_bar=False)
    (tmp_path / "digits" / "meta.json").unlink()  # what they were prepared from is forgotten
    with pytest.raises(ConfigError, match=r"shard images whose pixels are digits of MNIST's train \+ val split"):
        refuse_private_as_public(DataSource(source="shards", path=str(tmp_path / "digits")), digits_exp)
    refuse_private_as_public(other, digits_exp)


def test_a_folder_prepared_again_since_a_run_no_longer_proves_its_shard_ranges_disjoint(tmp_path):
    """Two shard ranges of one prepared folder are disjoint only while the folder holds what the runs
    trained on: prepared again (another --samples-per-shard, images added), the same shard names hold
    other images. A run records its folders' preparation ids; one that no longer matches counts, and
    pretraining on a shard of that folder is refused."""
    from trainer.config import ConfigError
    from trainer.stages.private_set import private_set_identity
    from trainer.stages.spend import refuse_private_as_public
    folder = tmp_path / "faces"
    folder.mkdir()
    for k in range(2):
        write_shard(folder / f"shard-00000{k}.tar", [{"__key__": f"{k}", "png": bytes([k]) * 40}])
    meta = {"source": {"type": "imagefolder", "root": "/data/faces"}, "preparation": "a" * 16}
    (folder / "meta.json").write_text(json.dumps(meta))
    first, second = (DataSource(source="shards", path=str(folder / f"shard-00000{k}.tar")) for k in range(2))
    exp = tmp_path / "exp"
    run_dir = fake_run(exp, "finetune-first", "train")
    recorded = load_config(str(run_dir / "config.yaml"))
    recorded.data.private = first
    dump_config(recorded, run_dir / "config.yaml")
    ledger = json.loads((run_dir / "ledger.json").read_text())
    ledger["private_set"] = private_set_identity(first, 1)
    assert ledger["private_set"]["preparations"] == {str(folder.resolve()): "a" * 16}
    (run_dir / "ledger.json").write_text(json.dumps(ledger))
    assert charges(exp, second) == [], "the other shard of the same preparation: disjoint"
    refuse_private_as_public(second, exp)

    (folder / "meta.json").write_text(json.dumps({**meta, "preparation": "b" * 16}))  # prepared again
    [charge] = charges(exp, second)
    assert charge.run == "finetune-first" and "prepared again since it ran" in charge.why
    with pytest.raises(ConfigError, match=r"shards in .*faces, prepared again since the DP run trained on that folder"):
        refuse_private_as_public(second, exp)
    del ledger["private_set"]["preparations"]  # a run that recorded no id: any id now is another preparation
    (run_dir / "ledger.json").write_text(json.dumps(ledger))
    assert [c.run for c in charges(exp, second)] == ["finetune-first"]

    # the same run with its folder gone: judged from the ids its MLflow run logged
    import shutil

    import mlflow
    from conftest import mlflow_store
    shutil.rmtree(run_dir)
    with mlflow_store(tmp_path):
        mlflow.set_experiment("exp")
        for recorded in ("b" * 16, "a" * 16):  # this preparation, then an earlier one
            with mlflow.start_run(run_name=f"finetune-{recorded[0]}"):
                mlflow.set_tags({"privacy": "dp-sgd"})
                mlflow.log_params({"data.private.source": "shards", "data.private.path": first.path,
                                   "privacy.sigma": "1.0", "privacy.q": "0.01", "finetune.delta": "1e-5",
                                   "finetune.steps": "10",
                                   "privacy.preparations": json.dumps({str(folder.resolve()): recorded})})
        assert [c.run.split()[0] for c in charges(exp, second)] == ["finetune-a"]
        with pytest.raises(ConfigError, match=r"prepared again since the DP run .*finetune-a"):
            refuse_private_as_public(second, exp)


def test_a_dp_run_whose_folder_is_gone_still_counts_from_its_mlflow_run(tmp_path):
    """The MLflow run shares the model: a DP fine-tune whose folder was deleted or moved counts from its
    logged plan (steps taken once ended, else planned), once: not beside the folder that holds it."""
    import mlflow
    from conftest import mlflow_store

    from trainer.config import flatten
    exp = tmp_path / "runs" / "exp"

    def logged(name, steps=None, **private):
        cfg = load_config("demo", ["finetune.steps=300", "data.test=null",
                                   *(f"data.private.{k}={v}" for k, v in private.items())])
        mlflow.set_experiment("exp")
        with mlflow.start_run(run_name=name) as run:
            mlflow.set_tags({"stage": "finetune", "privacy": "dp-sgd"})
            mlflow.log_params({k: str(v) for k, v in flatten(cfg.to_dict()).items()})
            mlflow.log_params({"privacy.sigma": "1.5", "privacy.q": "0.02"})
            if steps is not None:
                mlflow.log_metric("privacy.steps", steps)
        return run.info.run_id

    with mlflow_store(tmp_path):
        assert charges(exp, DataSource(source="mnist", split="trainval")) == []  # no store yet: none created
        assert not (tmp_path / "mlflow.db").exists()
        gone = logged("finetune-gone", steps=120)
        logged("finetune-test", split="test")  # MNIST's test digits: disjoint from the training digits
        unfinished = logged("finetune-open")
        kept = logged("finetune-kept", steps=50)
        run_dir = fake_run(exp, "finetune-kept", "trainval")
        ledger = json.loads((run_dir / "ledger.json").read_text())
        (run_dir / "ledger.json").write_text(json.dumps({**ledger, "mlflow_run_id": kept}))
        found = {c.run: c for c in charges(exp, DataSource(source="mnist", split="trainval"))}
        assert sorted(found) == ["finetune-gone (MLflow run %s, no folder here)" % gone, "finetune-kept",
                                 "finetune-open (MLflow run %s, no folder here)" % unfinished]
        assert [(c.noise_multiplier, c.sample_rate, c.steps, c.ended) for c in found.values() if "gone" in c.run] == \
            [(1.5, 0.02, 120, True)]
        assert [(c.steps, c.ended) for c in found.values() if "open" in c.run] == [(300, False)], "planned steps"
        mlflow.MlflowClient().delete_run(gone)  # in the trash, its model kept until garbage collection: it counts
        assert any(gone in c.run for c in charges(exp, DataSource(source="mnist", split="trainval")))
        assert found["finetune-kept"].steps == 100, "counted once, from its folder's journal"
        legacy = json.loads((run_dir / "ledger.json").read_text())
        del legacy["mlflow_run_id"]  # a journal that names no run: its folder holds the run of its name
        (run_dir / "ledger.json").write_text(json.dumps(legacy))
        assert "finetune-kept" in {c.run for c in charges(exp, DataSource(source="mnist", split="trainval"))}
        assert len(charges(exp, DataSource(source="mnist", split="trainval"))) == 3
        # pretraining on what such a run kept private is refused too; MNIST's test split only the test run kept
        from trainer.config import ConfigError
        from trainer.stages.spend import refuse_private_as_public
        with pytest.raises(ConfigError, match=r"MNIST's train split \(the private set of the DP run finetune-gone, "
                                              rf"MLflow run {gone}\)"):
            refuse_private_as_public(DataSource(source="mnist", split="train"), exp)
        with pytest.raises(ConfigError, match=r"MNIST's test split \(the private set of the DP run finetune-test"):
            refuse_private_as_public(DataSource(source="mnist", split="test"), exp)
