"""Loading CompVis-layout checkpoints and the safetensors helpers, on tiny modules."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn as nn

from trainer.models import (
    AutoencoderKL,
    CheckpointError,
    ClassEmbedder,
    UNetModel,
    load_ldm_checkpoint,
    load_safetensors,
    save_safetensors,
)

TINY_UNET = dict(image_size=8, in_channels=4, out_channels=4, model_channels=32, num_res_blocks=1,
                 attention_resolutions=[2], channel_mult=[1, 2], num_heads=2,
                 use_spatial_transformer=True, context_dim=16)
TINY_DDCONFIG = dict(double_z=True, z_channels=4, resolution=16, in_channels=3, out_ch=3, ch=32,
                     ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[], dropout=0.0)


def modules(seed: int) -> tuple[UNetModel, AutoencoderKL, ClassEmbedder]:
    torch.manual_seed(seed)
    return UNetModel(**TINY_UNET), AutoencoderKL(TINY_DDCONFIG, embed_dim=4), ClassEmbedder(16, n_classes=3)


def compvis_state_dict(unet: nn.Module, ae: nn.Module, cond: nn.Module) -> dict[str, torch.Tensor]:
    """What a CompVis LatentDiffusion checkpoint holds, including keys the loader must ignore."""
    sd = {"betas": torch.linspace(1e-4, 2e-2, 10), "alphas_cumprod": torch.ones(10)}
    sd.update({"model.diffusion_model." + k: v.clone() for k, v in unet.state_dict().items()})
    sd.update({"first_stage_model." + k: v.clone() for k, v in ae.state_dict().items()})
    sd.update({"cond_stage_model." + k: v.clone() for k, v in cond.state_dict().items()})
    sd.update({"model_ema.diffusion_model" + k.replace(".", ""): v + 1.0 for k, v in unet.state_dict().items()})
    sd["model_ema.decay"] = torch.tensor(0.9999)
    sd["model_ema.num_updates"] = torch.tensor(10, dtype=torch.int32)
    return sd


def assert_same_weights(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=0, msg=k)


def differs(a: nn.Module, b: nn.Module) -> bool:
    return any(not torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


@pytest.fixture
def source():
    return modules(seed=0)


def test_loads_compvis_ckpt_strict(tmp_path: Path, source):
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": compvis_state_dict(*source), "global_step": 7, "epoch": 1}, path)
    targets = modules(seed=1)
    assert all(differs(s, t) for s, t in zip(source, targets))
    report = load_ldm_checkpoint(path, *targets, strict=True)
    for s, t in zip(source, targets):
        assert_same_weights(s, t)
    assert report.ok and report.parts["unet"].loaded == len(source[0].state_dict())
    assert report.ignored["EMA weights (pass use_ema=True to load them)"] == len(source[0].state_dict()) + 2
    assert report.ignored["other entries (noise schedule buffers, ...)"] == 2
    assert "unet (model.diffusion_model.)" in str(report)


def test_loads_safetensors_and_ema(tmp_path: Path, source):
    path = save_safetensors(compvis_state_dict(*source), tmp_path / "model.safetensors", {"step": 7, "note": "x"})
    loaded = load_safetensors(path)
    assert loaded.metadata == {"step": "7", "note": "x"}
    unet = modules(seed=1)[0]
    report = load_ldm_checkpoint(path, unet=unet, use_ema=True)
    for k, v in source[0].state_dict().items():
        torch.testing.assert_close(unet.state_dict()[k], v + 1.0, rtol=0, atol=0)
    assert report.ignored["non-EMA UNet weights (use_ema=True)"] == len(source[0].state_dict())
    assert report.ignored["modules not passed to the loader"] > 0


def test_missing_key_raises_and_leaves_modules_untouched(tmp_path: Path, source):
    sd = compvis_state_dict(*source)
    del sd["model.diffusion_model.out.2.weight"]
    path = tmp_path / "missing.ckpt"
    torch.save({"state_dict": sd}, path)
    targets = modules(seed=1)
    before = [{k: v.clone() for k, v in m.state_dict().items()} for m in targets]
    with pytest.raises(CheckpointError, match=r"1 missing from checkpoint: model\.diffusion_model\.out\.2\.weight"):
        load_ldm_checkpoint(path, *targets)
    for m, saved in zip(targets, before):
        assert all(torch.equal(m.state_dict()[k], v) for k, v in saved.items())
    report = load_ldm_checkpoint(path, *targets, strict=False)
    assert not report.ok and report.parts["unet"].missing == ["model.diffusion_model.out.2.weight"]
    assert report.parts["autoencoder"].ok


def test_unexpected_and_misshaped_keys_raise(tmp_path: Path, source):
    sd = compvis_state_dict(*source)
    sd["model.diffusion_model.extra.weight"] = torch.zeros(3)
    sd["cond_stage_model.embedding.weight"] = torch.zeros(5, 16)
    path = tmp_path / "extra.safetensors"
    save_safetensors(sd, path)
    with pytest.raises(CheckpointError) as info:
        load_ldm_checkpoint(path, *modules(seed=1))
    message = str(info.value)
    assert "unexpected in checkpoint: model.diffusion_model.extra.weight" in message
    assert "shape mismatch: cond_stage_model.embedding.weight: (5, 16) vs (4, 16)" in message


def test_lists_first_keys_and_counts_the_rest(tmp_path: Path, source):
    sd = compvis_state_dict(*source)
    for i in range(8):
        sd[f"model.diffusion_model.extra{i}"] = torch.zeros(1)
    path = tmp_path / "many.ckpt"
    torch.save(sd, path)  # flat state dict, no "state_dict" nesting
    with pytest.raises(CheckpointError, match=r"8 unexpected in checkpoint: .*extra4 \(and 3 more\)"):
        load_ldm_checkpoint(path, unet=modules(seed=1)[0])


def test_bare_autoencoder_checkpoint_ignores_loss(tmp_path: Path, source):
    ae = source[1]
    sd = {k: v.clone() for k, v in ae.state_dict().items()}
    sd["loss.logvar"] = torch.zeros(())
    sd["loss.discriminator.main.0.weight"] = torch.zeros(2, 2)
    path = tmp_path / "kl-f2.ckpt"
    torch.save({"state_dict": sd}, path)
    target = modules(seed=1)[1]
    report = load_ldm_checkpoint(path, autoencoder=target)
    assert_same_weights(ae, target)
    assert report.parts["autoencoder"].prefix == "" and report.ignored["autoencoder training loss"] == 2


class Marker:
    """An object whose unpickling would create a file: loading it must be refused, not executed."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def test_pickle_with_arbitrary_object_is_refused(tmp_path: Path, source):
    marker = tmp_path / "executed"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": compvis_state_dict(*source), "callbacks": Marker(marker)}, path)
    with pytest.raises(CheckpointError, match=r"refusing to load .*arbitrary code.*Unsupported global"):
        load_ldm_checkpoint(path, unet=modules(seed=1)[0])
    assert not marker.exists()


def test_missing_file_is_named(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="nope.ckpt"):
        load_ldm_checkpoint(tmp_path / "nope.ckpt", unet=modules(seed=1)[0])


def test_save_safetensors_handles_shared_and_noncontiguous_tensors(tmp_path: Path):
    base = torch.arange(12.0).reshape(3, 4)
    lin = nn.Linear(4, 3)
    state = {"a": base, "b": base, "t": base.t(), "w": lin.weight}
    path = save_safetensors(state, tmp_path / "sub" / "x.safetensors", metadata={"cfg": {"lr": 0.1}})
    loaded = load_safetensors(path)
    for k, v in state.items():
        torch.testing.assert_close(loaded.state_dict[k], v.detach(), rtol=0, atol=0)
    assert loaded.metadata == {"cfg": '{"lr": 0.1}'}
    assert not (tmp_path / "sub" / "x.safetensors.tmp").exists()
    with pytest.raises(TypeError, match="'n'"):
        save_safetensors({"n": 3}, tmp_path / "bad.safetensors")
