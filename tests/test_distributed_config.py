"""DeepSpeed configs for DP fine-tuning: the shipped ones pass, the ones that would break DP are refused."""
import json

import pytest
import torch
from torch import nn

from trainer import cli
from trainer.config import ConfigError, load_config
from trainer.distributed import (DEEPSPEED_CONFIGS, check_deepspeed_config, frozen_subtrees, load_deepspeed_config,
                                 resolve_deepspeed_config)
from trainer.stages import finetune

FT = load_config("demo", ["finetune.expected_batch_size=512", "finetune.physical_batch_size=64"]).finetune


@pytest.mark.parametrize("name, stage, offload", [("zero2", 2, False), ("zero3", 3, False),
                                                  ("zero3-offload", 3, True)])
def test_shipped_configs_are_accepted(name, stage, offload):
    settings = load_deepspeed_config(name, FT)
    assert settings.zero_stage == stage and settings.offload_optimizer is offload
    assert settings.autocast_dtype is None
    # DeepSpeed gets the experiment's micro-batch, no clipping, and nothing the trainer applies itself
    assert settings.config["train_micro_batch_size_per_gpu"] == 64
    assert settings.config["gradient_clipping"] == 0
    assert "gradient_accumulation_steps" not in settings.config and "train_batch_size" not in settings.config


def test_configs_resolve_by_path_or_shipped_name(tmp_path):
    assert resolve_deepspeed_config("zero3") == DEEPSPEED_CONFIGS / "zero3.json"
    assert resolve_deepspeed_config("zero3.json") == DEEPSPEED_CONFIGS / "zero3.json"
    own = tmp_path / "mine.json"
    own.write_text(json.dumps({"zero_optimization": {"stage": 1}}))
    assert resolve_deepspeed_config(str(own)) == own
    with pytest.raises(ConfigError, match="finetune.deepspeed_config: zero9: file not found"):
        resolve_deepspeed_config("zero9")
    bad = tmp_path / "bad.json"
    bad.write_text("{stage: 3")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_deepspeed_config(str(bad), FT)


@pytest.mark.parametrize("raw, key, advice", [
    ({"gradient_clipping": 1.0}, "gradient_clipping", "set it to 0"),
    ({"fp16": {"enabled": True}}, "fp16.enabled", "loss scale"),
    ({"amp": {"enabled": True}}, "amp.enabled", "loss scale"),
    ({"bf16": {"enabled": True}}, "bf16.enabled", "torch_autocast"),
    ({"bfloat16": {"enabled": True}}, "bfloat16.enabled", "torch_autocast"),
    ({"torch_autocast": {"enabled": True, "dtype": "float16"}}, "torch_autocast.dtype", "bfloat16"),
    ({"gradient_accumulation_steps": 4}, "gradient_accumulation_steps", "set it to 1"),
    ({"train_batch_size": 256}, "train_batch_size", "set it to 512"),
    ({"train_micro_batch_size_per_gpu": 16}, "train_micro_batch_size_per_gpu", "set it to 64"),
    ({"optimizer": {"type": "AdamW", "params": {"lr": 1e-4}}}, "optimizer", "remove the optimizer section"),
    ({"scheduler": {"type": "WarmupLR"}}, "scheduler", "remove the scheduler section"),
    ({"zero_optimization": {"stage": 4}}, "zero_optimization.stage", "use 0, 1, 2 or 3"),
    ({"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "nvme"}}},
     "zero_optimization.offload_optimizer.device", '"cpu"'),
    ({"zero_optimization": {"stage": 2, "offload_param": {"device": "cpu"}}}, "zero_optimization.offload_param",
     "stage to 3"),
    ([1, 2], "top level", "JSON object"),
])
def test_configs_that_break_dp_are_refused_with_the_reason(raw, key, advice):
    with pytest.raises(ConfigError) as err:
        check_deepspeed_config(raw, FT, "my.json")
    message = str(err.value)
    assert "my.json" in message and key in message and advice in message


def test_matching_batch_sizes_and_bf16_autocast_are_accepted():
    raw = {"train_batch_size": 512, "train_micro_batch_size_per_gpu": 64, "gradient_accumulation_steps": 1,
           "gradient_clipping": 0.0, "fp16": {"enabled": False},
           "torch_autocast": {"enabled": True, "dtype": "bfloat16"}, "zero_optimization": {"stage": 3}}
    settings = check_deepspeed_config(raw, FT)
    assert settings.autocast_dtype is torch.bfloat16 and "torch_autocast" not in settings.config


def test_the_stage_refuses_a_bad_config_before_any_work(tmp_path, capsys):
    bad = tmp_path / "clipping.json"
    bad.write_text(json.dumps({"zero_optimization": {"stage": 3}, "gradient_clipping": 1.0}))
    cfg = load_config("demo", [f"output_dir={tmp_path / 'runs'}", f"finetune.deepspeed_config={bad}"])
    with pytest.raises(ConfigError, match="gradient_clipping"):
        finetune.run(cfg)
    assert not (tmp_path / "runs").exists()
    assert cli.main(["finetune", "--output-dir", str(tmp_path / "runs"), f"finetune.deepspeed_config={bad}"]) == 2
    assert "gradient_clipping" in capsys.readouterr().err


@pytest.mark.parametrize("var", ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "SLURM_STEP_NUM_TASKS"])
def test_a_process_started_by_mpirun_or_srun_without_world_size_is_refused(tmp_path, capsys, monkeypatch, var):
    """Each of the N processes would otherwise fine-tune on the whole private set alone (N releases)."""
    monkeypatch.setenv("WORLD_SIZE", "1")  # as a container may export it: still one of 4 independent processes
    monkeypatch.setenv(var, "4")
    assert cli.main(["finetune", "--output-dir", str(tmp_path / "runs")]) == 2
    assert f"launched as one of several processes ({var}=4) and WORLD_SIZE is not above 1" in capsys.readouterr().err
    assert cli.main(["audit", "--output-dir", str(tmp_path / "runs")]) == 2
    assert f"({var}=4): dpldm audit runs in one process" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()
    if var == "SLURM_STEP_NUM_TASKS":  # srun is refused with a DeepSpeed config too (nothing discovers its ranks)
        assert cli.main(["finetune", "--output-dir", str(tmp_path / "runs"), "finetune.deepspeed_config=zero3"]) == 2
        assert f"({var}=4) and WORLD_SIZE is not above 1" in capsys.readouterr().err
    monkeypatch.setenv(var, "1")  # one process: on to the next check (no base here)
    assert cli.main(["finetune", "--output-dir", str(tmp_path / "runs")]) == 1
    assert "pretrain-ldm" in capsys.readouterr().err


def test_deepspeed_config_key_is_validated():
    with pytest.raises(ConfigError, match="finetune.deepspeed_config"):
        load_config("demo", ["finetune.deepspeed_config=''"])
    assert load_config("demo", ["finetune.deepspeed_config=zero3"]).finetune.deepspeed_config == "zero3"


def test_frozen_subtrees_are_the_largest_all_frozen_modules():
    class Scaled(nn.Module):  # a trainable parameter of its own around a frozen child
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(2))
            self.inner = nn.Linear(2, 2)

    model = nn.Sequential(nn.Linear(2, 2), nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)), nn.ReLU(),
                          nn.Linear(2, 2), Scaled())
    model.requires_grad_(False)
    model[1][1].requires_grad_(True)
    model[3].weight.requires_grad_(True)  # a module with one trainable and one frozen parameter
    model[4].scale.requires_grad_(True)
    # the mixed Linear and Scaled (with its frozen child) stay whole; ReLU has no weights
    assert frozen_subtrees(model) == [model[0], model[1][0]]
    assert frozen_subtrees(model[0]) == [model[0]]
