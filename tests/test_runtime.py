"""The runtime: fused AdamW is the same update as torch's per-tensor loop, and either's state loads; the
config's precision resolves per device."""
from __future__ import annotations

import copy

import pytest
import torch

from trainer.config import ConfigError, load_config
from trainer.runtime import Placement, adamw, resolve_precision


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.GroupNorm(4, 8), torch.nn.Flatten(),
                               torch.nn.Linear(8 * 6 * 6, 5))


def _steps(model: torch.nn.Module, opt: torch.optim.Optimizer, seeds: range) -> None:
    for seed in seeds:
        g = torch.Generator().manual_seed(seed)
        x, y = torch.randn(4, 3, 8, 8, generator=g), torch.randint(0, 5, (4,), generator=g)
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def _close(a: torch.nn.Module, b: torch.nn.Module) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)


def test_adamw_is_fused_on_the_cpu_and_steps_as_the_loop_does():
    ours, loop = _model(), _model()
    opt = adamw(ours.parameters(), lr=1e-2, weight_decay=0.1)
    ref = torch.optim.AdamW(loop.parameters(), lr=1e-2, weight_decay=0.1, foreach=False)
    assert opt.defaults["fused"] is True
    before = copy.deepcopy(ours)
    _steps(ours, opt, range(6))
    _steps(loop, ref, range(6))
    _close(ours, loop)
    assert any(not torch.equal(p, q) for p, q in zip(ours.parameters(), before.parameters()))


def test_a_checkpoint_of_either_optimizer_resumes_in_the_other():
    """A run saved by the loop optimizer (the earlier stages) resumes under the fused one, and back."""
    for save_fused in (False, True):
        a, b = _model(), _model()
        opt_a = adamw(a.parameters(), 1e-2, 0.1) if save_fused else \
            torch.optim.AdamW(a.parameters(), lr=1e-2, weight_decay=0.1, foreach=False)
        _steps(a, opt_a, range(3))
        b.load_state_dict(a.state_dict())
        opt_b = torch.optim.AdamW(b.parameters(), lr=1e-2, weight_decay=0.1, foreach=False) if save_fused else \
            adamw(b.parameters(), 1e-2, 0.1)
        opt_b.load_state_dict(copy.deepcopy(opt_a.state_dict()))  # as from disk: no shared moments
        _steps(a, opt_a, range(3, 6))
        _steps(b, opt_b, range(3, 6))
        _close(a, b)


@pytest.mark.parametrize("capabilities,expected", [({"avx512_bf16": True, "amx_bf16": False}, "bf16"),
                                                   ({"avx512_bf16": False, "amx_bf16": True}, "bf16"),
                                                   ({"avx512_bf16": False, "amx_bf16": False}, "fp32"),
                                                   ({}, "fp32")])
def test_auto_precision_is_bf16_only_where_the_cpu_multiplies_bf16_natively(monkeypatch, capabilities, expected):
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: capabilities)
    assert resolve_precision("auto", torch.device("cpu")) == expected
    assert Placement.from_config(load_config("demo", ["device=cpu", "precision=auto"])).precision == expected
    for fixed in ("fp32", "bf16"):  # a fixed setting is kept whatever the processor
        assert resolve_precision(fixed, torch.device("cpu")) == fixed


def test_auto_precision_on_cuda_follows_the_gpus_bf16_support(monkeypatch):
    for supported, expected in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: supported)
        assert resolve_precision("auto", torch.device("cuda")) == expected


def test_an_unknown_precision_names_the_key():
    with pytest.raises(ConfigError, match="precision: must be one of fp32, bf16, auto, got 'fp16'"):
        resolve_precision("fp16", torch.device("cpu"))


def test_the_dp_steps_take_finetune_precision_and_the_public_stages_the_top_level_one(monkeypatch):
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx512_bf16": True})
    cfg = load_config("demo", ["device=cpu", "precision=fp32", "finetune.precision=auto"])
    assert Placement.from_config(cfg).precision == "fp32"
    assert Placement.from_config(cfg, private=True).precision == "bf16"
    unset = load_config("demo", ["device=cpu", "precision=auto"])  # finetune.precision null: the top-level one
    assert Placement.from_config(unset, private=True).precision == "bf16"
    with pytest.raises(ConfigError, match=r"finetune.precision: must be one of \['auto', 'bf16', 'fp32'\], got 'fp16'"):
        load_config("demo", ["finetune.precision=fp16"])
