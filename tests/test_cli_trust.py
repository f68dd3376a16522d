"""The command line's edges: one-line errors with the right exit code, nothing written by a command
that refuses, plain help, recorded commands that re-run, and clean stops on Ctrl-C."""
from __future__ import annotations

import argparse
import json
import os
import shlex
import signal

import pytest
import torch
import yaml

from trainer import cli


def run_cli(argv, capsys) -> tuple[int, str]:
    """Exit code and stderr of ``dpldm argv`` (argparse's own refusals included)."""
    try:
        code = cli.main([str(a) for a in argv])
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().err


def assert_one_line(err: str, command: str) -> None:
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("usage:")
             and not line.startswith(" ")]
    assert "Traceback" not in err
    assert len(lines) == 1 and lines[0].startswith(f"dpldm {command}: "), err


def test_user_mistakes_are_one_line_errors_with_exit_codes(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty").mkdir()
    cases = [  # (argv, exit code, words of the message)
        (["fid", "empty", "empty"], 1, "no image files"),
        (["sample", "--checkpoint", "nowhere", "--out", "s"], 1, "no such run folder"),
        (["sample", "--checkpoint", "empty", "--out", "s"], 1, "not an LDM run folder"),
        (["sample", "--checkpoint", "empty", "--num", "0", "--out", "s"], 2, "--num: must be at least 1"),
        (["sample", "--checkpoint", "empty", "--eta", "1.5", "--out", "s"], 2, "--eta: must be in [0, 1]"),
        (["sample", "--checkpoint", "empty", "--classes", "a,b", "--out", "s"], 2, "--classes"),
        (["evaluate"], 2, "--samples DIR or --checkpoint"),
        (["finetune", "--output-dir", "runs"], 1, "run `dpldm pretrain-ldm"),
        (["pretrain-ldm", "--output-dir", "runs"], 1, "run `dpldm pretrain-ae"),
        (["finetune", "finetune.nope=1"], 2, "finetune.nope"),
        (["import-compvis", "missing.yaml", "missing.ckpt", "out"], 1, "missing.yaml"),
        (["pretrain-ae", "--output-dir", "runs", "device=cuda:99"], 2, "device: 'cuda:99'"),
        (["pretrain-ae", "--output-dir", "runs", "device=tpu"], 2, "device: must be auto, cpu, cuda or cuda:N"),
        (["pretrain-ae", "--output-dir", "runs", "precision=fp16"], 2, "precision"),
        (["sample", "--checkpoint", "empty", "--device", "cuda:99", "--out", "s"], 2, "--device: 'cuda:99'"),
        (["evaluate", "--checkpoint", "empty", "--device", "cuda:99"], 2, "--device: 'cuda:99'"),
    ]
    for argv, code, words in cases:
        got, err = run_cli(argv, capsys)
        assert got == code, (argv, err)
        assert words in err, (argv, err)
        assert_one_line(err, argv[0])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"], "refusing commands wrote nothing"
    assert not (tmp_path / "s").exists()


def test_broken_files_and_bad_flags_are_one_line_errors_that_write_nothing(tmp_path, capsys, monkeypatch):
    """Files a user passes or a run folder holds that cannot be read (text where a checkpoint, a tar shard,
    weights or a JSON record belongs; binary where YAML belongs; a file where a folder belongs) and flag
    values out of range: one line each, exit 2 for a flag or config, 1 for a file, nothing written."""
    from trainer.config import dump_config, load_config
    from trainer.io import save_safetensors
    from trainer.stages.common import build_autoencoder
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'notes.txt'}")
    (tmp_path / "notes.txt").write_text("not a store, a tar, weights or a checkpoint\n")
    (tmp_path / "shard-000000.tar").write_text("not a tar\n")
    (tmp_path / "binary.yaml").write_bytes(bytes(range(256)))
    (tmp_path / "pics").mkdir()  # an image without a caption
    from PIL import Image
    Image.new("L", (8, 8)).save(tmp_path / "pics" / "0.png")
    (tmp_path / "no-models.yaml").write_text("autoencoder: {embed_dim: 4}\nldm: {conditioner: {n_classes: 10}}\n")
    (tmp_path / "cv.yaml").write_text("model: {target: ldm.models.diffusion.ddpm.LatentDiffusion, params: [1, 2]}\n")
    fake = tmp_path / "fakerun"  # an LDM folder whose records were damaged
    fake.mkdir()
    (fake / "ldm.json").write_text("{not json")
    ae = tmp_path / "ae"  # a real autoencoder folder, and one whose weights are text
    ae.mkdir()
    cfg = load_config("demo")
    dump_config(cfg, ae / "config.yaml")
    save_safetensors(build_autoencoder(cfg).state_dict(), ae / "autoencoder.safetensors")
    broken = tmp_path / "broken-ae"
    broken.mkdir()
    dump_config(cfg, broken / "config.yaml")
    (broken / "autoencoder.safetensors").write_text("text")
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    cases = [  # (argv, exit code, words of the message)
        (["prepare", "letters", "--count", "-5", "o"], 2, "--count: must be at least 1"),
        (["prepare", "letters", "--resume", "--overwrite", "o"], 2, "not allowed with argument --resume"),
        (["prepare", "letters", "--caption-template", "a {nope}", "o"], 2, "may hold only {label}"),
        (["prepare", "letters", "--elastic", "nan", "o"], 2, "must be a finite number"),
        (["prepare", "letters", "--count", "3", "--no-progress", "notes.txt"], 2, "OUT: notes.txt is a file"),
        (["prepare", "letters", "--min-size", "100", "--max-size", "10", "o"], 2,
         "--max-size 10 is smaller than --min-size 100"),
        (["prepare", "imagefolder", "ae", "--captions-file", "missing.jsonl", "o"], 2,
         "--captions-file: missing.jsonl: no such file"),
        (["prepare", "imagefolder", "pics", "--require-captions", "--no-progress", "o"], 1, "caption"),  # no o/ left
        (["sample", "--checkpoint", "fakerun", "--out", "s"], 1, "ldm.json: unreadable"),
        (["sample", "--checkpoint", "fakerun", "--guidance-scale", "nan", "--out", "s"], 2, "finite"),
        (["sample", "--checkpoint", "fakerun", "--out", "notes.txt"], 2, "--out: notes.txt is a file"),
        (["sample", "--checkpoint", "fakerun", "--out", "ae"], 2, "--out: ae is not empty"),
        (["sample", "--checkpoint", "fakerun", "--classes", "", "--out", "s"], 2, "--classes: empty"),
        (["encode", "--autoencoder", "broken-ae", "shard-000000.tar", "c"], 1, "not a readable safetensors"),
        (["encode", "--autoencoder", "ae", "--resolution", "7", "shard-000000.tar", "c"], 2, "multiple of"),
        (["encode", "--autoencoder", "ae", "--world-size", "0", "shard-000000.tar", "c"], 2, "--world-size"),
        (["encode", "--autoencoder", "ae", "shard-000000.tar", "c"], 1, "not a readable tar shard"),
        (["encode", "--autoencoder", "ae", "missing.tar", "c"], 2, "SHARDS: no such shard file(s): missing.tar"),
        (["encode", "--autoencoder", "nowhere", "shard-000000.tar", "c"], 1,
         "--autoencoder: nowhere is not a pretrain-ae run folder"),  # a folder on disk, as sample's --checkpoint
        (["encode", "--autoencoder", "ae", "shard-000000.tar", "notes.txt"], 2, "OUT: notes.txt is a file"),
        (["compare", "--out", "notes.txt"], 2, "--out: notes.txt is a file"),
        (["fid", "ae", "ae", "--cache-dir", "notes.txt"], 2, "--cache-dir: notes.txt is a file"),
        (["evaluate", "--samples", "ae", "--cache-dir", "notes.txt"], 2, "--cache-dir: notes.txt is a file"),
        (["fid", "shard-000000.tar", "shard-000000.tar"], 1, "not a readable tar shard"),
        (["import-compvis", "cv.yaml", "notes.txt", "imported"], 2, "cv.yaml"),
        (["finetune", f"finetune.deepspeed_config={tmp_path / 'nope.json'}"], 2, "nope.json: file not found"),
        (["pretrain-ae", "--config", "binary.yaml"], 2, "binary.yaml: not a readable YAML text file"),
        (["pretrain-ae", "--config", "no-models.yaml"], 2, "no-models.yaml: autoencoder.ddconfig: empty"),
        (["pretrain-ldm", "--config", "no-models.yaml"], 2, "no-models.yaml: ldm.unet: empty"),
        (["pretrain-ldm", "ldm.conditioner.type=text"], 2, "ldm.conditioner.type: text needs captions"),
        (["pretrain-ae", "data.public.source=shards", "data.public.path=shard-000000.tar"], 2,
         "data.public.path: shard-000000.tar: not a readable tar shard (truncated header)"),
        (["pretrain-ae", "data.public.source=shards", "data.public.path=ae"], 2,
         "data.public.path: folder ae holds no shard-*.tar files"),
        (["evaluate", "--samples", "o", "--metrics", "bogus"], 2, "--metrics: ['bogus']"),
        (["compare"], 1, "no MLflow store at"),
    ]
    for argv, code, words in cases:
        got, err = run_cli(argv, capsys)
        assert got == code, (argv, err)
        assert words in err, (argv, err)
        assert_one_line(err, " ".join(argv[:2]) if argv[0] == "prepare" and "usage:" in err else argv[0])  # its prog
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before, "refusing commands wrote nothing"


def test_a_shard_image_that_does_not_decode_is_one_line_also_from_a_loader_worker(tmp_path, capsys, monkeypatch):
    """A sample found broken mid-run (here the first public batch): exit 1, the shard and the sample named
    in one line, the progress bar closed before it; a DataLoader worker's traceback is not printed."""
    from pathlib import Path

    from conftest import mlflow_store
    from trainer.data.shards import write_shard
    monkeypatch.chdir(tmp_path)
    write_shard(Path("bad-000000.tar"), [{"__key__": f"{i}", "png": b"not an image", "cls": b"1"} for i in range(8)])
    with mlflow_store(tmp_path):
        for workers in (0, 1):
            got, err = run_cli(["pretrain-ae", "--output-dir", f"runs{workers}", "data.public.source=shards",
                                "data.public.path=bad-000000.tar", f"data.public.num_workers={workers}",
                                "autoencoder.train.steps=2"], capsys)
            assert got == 1, err
            last = err.replace("\r", "\n").strip().splitlines()[-1]
            assert last.startswith("dpldm pretrain-ae: error: bad-000000.tar: sample ") and \
                "cannot decode .png (UnidentifiedImageError)" in last and "Traceback" not in err, err


def test_help_is_plain_text_and_version_and_print_config(capsys, tmp_path, monkeypatch):
    parser = cli.build_parser()
    commands = parser._subparsers._group_actions[0].choices
    assert {"import-compvis", "audit", "compare"} <= set(commands)
    for name, sub in commands.items():
        parsers = [sub] + (list(sub._subparsers._group_actions[0].choices.values()) if sub._subparsers else [])
        for p in parsers:
            text = p.format_help()
            for markup in ("``", ":mod:", ":func:", ":class:", ":data:", ":meth:"):
                assert markup not in text, f"dpldm {name} --help shows {markup}"
    assert "finetune.name" in commands["finetune"].format_help()
    assert "finetune.base" in commands["finetune"].format_help()

    code, _ = run_cli(["--version"], capsys)
    assert code == 0
    monkeypatch.chdir(tmp_path)
    assert cli.main(["finetune", "--print-config", "finetune.epsilon=3", "--output-dir", "out"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["finetune"]["epsilon"] == 3 and printed["output_dir"] == "out"
    assert list(tmp_path.iterdir()) == [], "--print-config runs nothing"


def test_prepare_records_a_command_that_reruns_and_refuses_an_empty_result(tmp_path, capsys):
    out = tmp_path / "letters"
    argv = ["prepare", "letters", "--count", "12", "--samples-per-shard", "5", "--format", "jpg", "--quality", "90",
            "--caption-template", "the letter {label}", "--no-require-captions", str(out)]
    assert cli.main(argv) == 0
    capsys.readouterr()
    recorded = json.loads((out / "meta.json").read_text())["command"]
    words = shlex.split(recorded)
    assert words[0] == "dpldm"
    parser = cli.build_parser()
    skip = {"func", "source_parser", "no_progress"}
    original = {k: v for k, v in vars(parser.parse_args(argv)).items() if k not in skip}
    again = {k: v for k, v in vars(parser.parse_args(words[1:])).items() if k not in skip}
    assert again == original, recorded

    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "broken.png").write_bytes(b"not a png")
    code, err = run_cli(["prepare", "imagefolder", folder, tmp_path / "shards", "--on-error", "skip",
                         "--no-progress"], capsys)
    assert code == 1 and "no sample written" in err and "broken.png" in err
    assert_one_line(err, "prepare")
    assert not (tmp_path / "shards").exists()


def test_pretraining_loop_checkpoints_and_stops_on_ctrl_c(tmp_path):
    from trainer.config import TrainConfig
    from trainer.stages.common import STATE_FILE
    from trainer.stages.loop import Trainer
    from trainer.tracking import Run

    model = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    train = TrainConfig(steps=10, checkpoint_every=100, log_every=100)
    trainer = Trainer(tmp_path, {"model": model}, opt, train, torch.Generator().manual_seed(0), desc="test")

    def step(k: int) -> dict[str, float]:
        if k == 2:  # Ctrl-C arrives during the third step
            os.kill(os.getpid(), signal.SIGINT)
        loss = model(torch.ones(1, 2)).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        return {"loss": float(loss)}

    previous = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        trainer.fit(step, Run(active=False))
    assert signal.getsignal(signal.SIGINT) is previous, "the handler is restored"
    state = torch.load(tmp_path / STATE_FILE, weights_only=True)
    assert state["step"] == 3, "the step under way finished and was checkpointed"
    resumed = Trainer(tmp_path, {"model": torch.nn.Linear(2, 1)}, torch.optim.SGD(model.parameters(), lr=0.1),
                      train, torch.Generator().manual_seed(0), desc="test")
    assert resumed.step == 3
    assert torch.equal(resumed.modules["model"].weight, model.weight)


def test_positive_int_flag_type():
    assert cli.positive_int("3") == 3
    for bad in ("0", "-1", "x"):
        with pytest.raises(argparse.ArgumentTypeError):
            cli.positive_int(bad)


def test_a_tracking_store_mlflow_cannot_use_or_reach_is_one_line_naming_the_setting(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "bogus://x")
    code, err = run_cli(["compare"], capsys)
    assert code == 1 and "dpldm compare: error: MLflow: " in err
    assert "(tracking store MLFLOW_TRACKING_URI=bogus://x)" in err
    assert_one_line(err, "compare")
    import socket
    with socket.socket() as closed:  # a port nothing listens on: refused at once (MLflow would retry for minutes)
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://someone:secret@127.0.0.1:{port}")
    for argv in (["compare"], ["pretrain-ae", "--output-dir", "runs"]):
        code, err = run_cli(argv, capsys)
        assert code == 1 and f"MLflow tracking server (MLFLOW_TRACKING_URI): http://***@127.0.0.1:{port} cannot " \
                             "be reached" in err and "secret" not in err
        assert_one_line(err, argv[0])
    code, err = run_cli(["evaluate", "--samples", "o", "--metrics", "bogus"], capsys)  # logs nowhere: not asked
    assert code == 2 and "--metrics: ['bogus']" in err
    assert list(tmp_path.iterdir()) == []


def test_an_interrupt_says_how_to_go_on_only_where_a_command_can(tmp_path, capsys, monkeypatch):
    """Ctrl-C: the stages resume when run again, `prepare` with --resume, the others just stop; an
    interrupt before the command starts is one line too."""
    from trainer.stages import evaluate, prepare
    monkeypatch.chdir(tmp_path)

    def interrupted(*a, **kw):
        raise KeyboardInterrupt
    monkeypatch.setattr(prepare, "run", interrupted)
    monkeypatch.setattr(evaluate, "_run_evaluate", interrupted)
    monkeypatch.setattr(cli, "_config_of", interrupted)
    for argv, words in ((["pretrain-ae"], "dpldm pretrain-ae: interrupted; run the same command again to resume"),
                        (["prepare", "letters", "o"],
                         "dpldm prepare: interrupted; run it again with --resume to go on"),
                        (["evaluate", "--samples", "o"], "dpldm evaluate: interrupted\n")):
        code, err = run_cli(argv, capsys)
        assert code == 130 and err.endswith(words if words.endswith("\n") else words + "\n"), err
    monkeypatch.setattr(cli, "build_parser", interrupted)
    code, err = run_cli(["sample"], capsys)
    assert code == 130 and err == "dpldm: interrupted\n"


def test_demo_prints_its_resolved_config_like_every_stage(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["demo", "--quick", "--seed", "7", "--print-config", "finetune.steps=3"]) == 0
    printed = capsys.readouterr().out
    assert "seed: 7" in printed and "steps: 3" in printed and "experiment: demo-quick" in printed
    assert list(tmp_path.iterdir()) == []
