"""`dpldm import-compvis` against a small checkpoint written with the original CompVis `ldm` modules.

The reference is PyPI `stable-diffusion-sdkit==2.1.5` (module `ldm`): its UNetModel, KL
Encoder/Decoder, beta schedule and DDIMSampler. Its `LatentDiffusion` and `ClassEmbedder` need
pytorch_lightning and open_clip, so the checkpoint is assembled here with their key layout
(`model.diffusion_model.*`, `first_stage_model.*`, `cond_stage_model.embedding.weight`, schedule
buffers) and DDIMSampler drives a stand-in exposing what it reads of a LatentDiffusion.
"""
from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import yaml
from PIL import Image

from ldm.models.diffusion.ddim import DDIMSampler
from ldm.modules.diffusionmodules import model as ref_ae
from ldm.modules.diffusionmodules.openaimodel import UNetModel as RefUNetModel
from ldm.modules.diffusionmodules.util import make_beta_schedule
from trainer.cli import main
from trainer.config import load_config

DDCONFIG = dict(double_z=True, z_channels=4, resolution=32, in_channels=1, out_ch=1, ch=32, ch_mult=[1, 2],
                num_res_blocks=1, attn_resolutions=[], dropout=0.0)
UNET = dict(image_size=16, in_channels=4, out_channels=4, model_channels=32, attention_resolutions=[2],
            num_res_blocks=1, channel_mult=[1, 2], num_heads=2, use_spatial_transformer=True, transformer_depth=1,
            context_dim=32, legacy=False)
ROWS, SCALE, T = 5, 0.7, 1000  # class embedder rows (the last is the null class), scale_factor, timesteps


def compvis_config() -> dict:
    """A latent-diffusion config in the layout of CompVis' configs/latent-diffusion/*.yaml."""
    return {"model": {"base_learning_rate": 1.0e-6, "target": "ldm.models.diffusion.ddpm.LatentDiffusion", "params": {
        "linear_start": 0.0015, "linear_end": 0.0195, "num_timesteps_cond": 1, "log_every_t": 200, "timesteps": T,
        "first_stage_key": "image", "cond_stage_key": "class_label", "image_size": 16, "channels": 4,
        "cond_stage_trainable": True, "conditioning_key": "crossattn", "monitor": "val/loss", "use_ema": False,
        "scale_factor": SCALE,
        "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": UNET},
        "first_stage_config": {"target": "ldm.models.autoencoder.AutoencoderKL", "params": {
            "embed_dim": 4, "monitor": "val/rec_loss", "ddconfig": DDCONFIG,
            "lossconfig": {"target": "torch.nn.Identity"}}},
        "cond_stage_config": {"target": "ldm.modules.encoders.modules.ClassEmbedder",
                              "params": {"embed_dim": 32, "n_classes": ROWS, "key": "class_label"}}}}}


class Reference(nn.Module):
    """The modules of a CompVis LatentDiffusion under their attribute names, from the original code."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.model = nn.Module()
        self.model.diffusion_model = RefUNetModel(**UNET)
        self.first_stage_model = nn.Module()
        self.first_stage_model.encoder = ref_ae.Encoder(**DDCONFIG)
        self.first_stage_model.decoder = ref_ae.Decoder(**DDCONFIG)
        self.first_stage_model.quant_conv = nn.Conv2d(8, 8, 1)
        self.first_stage_model.post_quant_conv = nn.Conv2d(4, 4, 1)
        self.cond_stage_model = nn.Module()
        self.cond_stage_model.embedding = nn.Embedding(ROWS, 32)
        gen = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():  # the zero-initialised output layers get values, or half the network is untested
            for p in self.parameters():
                if not p.any():
                    p.copy_(0.05 * torch.randn(p.shape, generator=gen))
        betas = make_beta_schedule("linear", T, linear_start=0.0015, linear_end=0.0195)
        alphas_cumprod = np.cumprod(1.0 - betas)
        for name, value in (("betas", betas), ("alphas_cumprod", alphas_cumprod),
                            ("alphas_cumprod_prev", np.append(1.0, alphas_cumprod[:-1]))):
            self.register_buffer(name, torch.tensor(value, dtype=torch.float32))
        # what DDIMSampler reads of a LatentDiffusion
        self.num_timesteps, self.parameterization = T, "eps"

    @property
    def device(self) -> torch.device:
        return self.betas.device

    def apply_model(self, x, t, c):  # DiffusionWrapper, conditioning_key "crossattn"
        return self.model.diffusion_model(x, t, context=c)

    @torch.no_grad()
    def sample(self, labels: torch.Tensor, x_T: torch.Tensor, steps: int, scale: float) -> torch.Tensor:
        """Images in [-1, 1] by the original DDIMSampler and decoder (eta 0)."""
        emb = self.cond_stage_model.embedding
        cond = emb(labels)[:, None]
        uncond = emb(torch.full_like(labels, ROWS - 1))[:, None]
        z, _ = DDIMSampler(self).sample(steps, len(labels), tuple(x_T.shape[1:]), conditioning=cond, x_T=x_T,
                                        eta=0.0, unconditional_guidance_scale=scale,
                                        unconditional_conditioning=uncond, verbose=False)
        fs = self.first_stage_model
        return fs.decoder(fs.post_quant_conv(z / SCALE)).clamp(-1, 1)


@pytest.fixture(scope="module")
def compvis(tmp_path_factory):
    root = tmp_path_factory.mktemp("compvis")
    ref = Reference().eval()
    (root / "config.yaml").write_text(yaml.safe_dump(compvis_config()))
    torch.save({"state_dict": ref.state_dict(), "global_step": 3, "epoch": 1}, root / "model.ckpt")
    return root, ref


def test_imported_checkpoint_samples_like_the_original_code(compvis, tmp_path, monkeypatch):
    root, ref = compvis
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    out = tmp_path / "imported"
    assert main(["import-compvis", str(root / "config.yaml"), str(root / "model.ckpt"), str(out)]) == 0
    meta = json.loads((out / "ldm.json").read_text())
    assert meta["latent_shape"] == [4, 16, 16] and meta["scale_factor"] == SCALE and meta["autoencoder"] == "autoencoder"

    labels, seed, steps, scale = torch.tensor([0, 1, 2, 3]), 5, 10, 2.0
    x_T = torch.randn((4, 4, 16, 16), generator=torch.Generator().manual_seed(seed))  # what `dpldm sample` draws
    expected = ref.sample(labels, x_T, steps, scale)

    # through the Python API, in floats
    from trainer.runs import generate, load_pipeline
    ldm, autoencoder, meta, cfg = load_pipeline(out)
    cfg.sample.ddim_steps, cfg.sample.guidance_scale = steps, scale
    ours = generate(ldm, autoencoder, labels, (4, 16, 16), cfg, torch.Generator().manual_seed(seed), progress=False)
    assert (ours - expected).abs().max() < 1e-4

    # through `dpldm sample` on the imported folder, in PNG bytes
    assert main(["sample", "--checkpoint", str(out), "--classes", "0,1,2,3", "--num", "1", "--seed", str(seed),
                 "--ddim-steps", str(steps), "--guidance-scale", str(scale), "--out", str(tmp_path / "s")]) == 0
    want = ((expected + 1) * 127.5).round().clamp(0, 255).byte()[:, 0].numpy().astype(int)
    for i in range(4):
        png = np.asarray(Image.open(tmp_path / "s" / str(i) / f"{i:06d}.png")).astype(int)
        assert np.abs(png - want[i]).max() <= 1

    # a moved copy still samples (the folder records its autoencoder relative to itself)
    moved = tmp_path / "elsewhere" / "copy"
    moved.parent.mkdir()
    out.rename(moved)
    assert main(["sample", "--checkpoint", str(moved), "--classes", "1", "--num", "1", "--ddim-steps", "2",
                 "--out", str(tmp_path / "s2")]) == 0


def test_dp_finetune_on_an_imported_base(compvis, tmp_path, monkeypatch, capsys):
    """A short DP fine-tune with finetune.base = the imported folder; then the run is moved and sampled,
    and its MLflow run holds the weights and a logged model that samples by run id."""
    import mlflow
    root, _ = compvis
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    base = tmp_path / "bases" / "tiny-cin"
    assert main(["import-compvis", str(root / "config.yaml"), str(root / "model.ckpt"), str(base)]) == 0
    overrides = [f"finetune.base={base}", "experiment=on-imported", "data.private.num_examples=200",
                 "finetune.steps=2", "finetune.expected_batch_size=20", "finetune.physical_batch_size=20",
                 "finetune.checkpoint_every=1", "sample.ddim_steps=2", "sample.num_per_class=1",
                 "finetune.attention_from=4"]  # this UNet has 4 SpatialTransformers (the demo's from its 5th of 7)
    # the demo's digit rows start from letters; this base's classes are 0-3
    argv = ["finetune", "--config", "demo", "--output-dir", str(tmp_path / "runs"), *overrides]
    assert main(argv) == 2
    assert "finetune.new_class_from: 'o', 'l'" in capsys.readouterr().err
    assert not (tmp_path / "runs" / "on-imported" / "finetune" / "finetuned.safetensors").exists()
    overrides.append("finetune.new_class_from=[0,1,2,3,0,1,2,3,0,1]")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["finetune", "--config", "demo", "--output-dir", str(tmp_path / "runs"), *overrides]) == 0
    # logging the model prints none of MLflow's advice (a missing type hint, no input example) to the user
    assert not [str(w.message) for w in caught if "type hint" in str(w.message) or "input example" in str(w.message)]
    run_dir = tmp_path / "runs" / "on-imported" / "finetune"
    ft = json.loads((run_dir / "finetune.json").read_text())
    assert not Path(ft["base"]).is_absolute()
    report = json.loads((run_dir / "privacy-report.json").read_text())
    assert report["steps"] == 2 and 0 < report["epsilon"] <= 10
    # what the checkpoint was pretrained on is not known here: said in the report and on stderr, never "checked"
    assert report["public_pretraining_data"].startswith(f"not checked: the base {base} was imported from")
    assert "whose pretraining data are not known here" in capsys.readouterr().err

    # the weights and the privacy report are artifacts; the logged model samples by run id
    mlflow.set_tracking_uri(None)
    client = mlflow.MlflowClient()
    [run] = mlflow.search_runs(experiment_names=["on-imported"], output_format="list")
    assert run.info.run_name == "finetune" and run.info.status == "FINISHED"
    files = {a.path for a in client.list_artifacts(run.info.run_id, "weights")}
    assert files == {"weights/finetuned.safetensors", "weights/finetuned-ema.safetensors",  # demo: ema_decay 0.99
                     "weights/finetune.json", "weights/privacy-report.json"}
    model = mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/model")
    images = model.predict({"class": [0, 3]}, params={"seed": 1})
    assert images.shape == (2, 32, 32, 1) and images.dtype == np.uint8
    assert not np.array_equal(model.predict({"class": [0, 3]}, params={"seed": 2}), images)  # the seed is used
    # guidance: the run's sample.guidance_scale unless the caller sets it
    scale = load_config(str(run_dir / "config.yaml")).sample.guidance_scale
    assert np.array_equal(model.predict({"class": [0, 3]}, params={"seed": 1, "guidance_scale": scale}), images)
    assert not np.array_equal(model.predict({"class": [0, 3]}, params={"seed": 1, "guidance_scale": 1.0}), images)

    # the experiment folder and its base move together: still a working pair
    (tmp_path / "moved").mkdir()
    (tmp_path / "bases").rename(tmp_path / "moved" / "bases")
    (tmp_path / "runs").rename(tmp_path / "moved" / "runs")
    assert main(["sample", "--checkpoint", str(tmp_path / "moved" / "runs" / "on-imported" / "finetune"),
                 "--classes", "0", "--num", "1", "--ddim-steps", "2", "--out", str(tmp_path / "s")]) == 0


def test_import_refuses_bad_checkpoints_and_configs_writing_nothing(compvis, tmp_path, capsys):
    root, ref = compvis
    sd = ref.state_dict()
    broken = dict(sd)
    del broken["model.diffusion_model.out.2.weight"]
    broken["model.diffusion_model.extra.weight"] = torch.zeros(1)
    torch.save({"state_dict": broken}, tmp_path / "broken.ckpt")
    out = tmp_path / "out"
    assert main(["import-compvis", str(root / "config.yaml"), str(tmp_path / "broken.ckpt"), str(out)]) == 1
    err = capsys.readouterr().err
    assert "model.diffusion_model.out.2.weight" in err and "model.diffusion_model.extra.weight" in err
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["broken.ckpt"]

    # a pickle that needs more than tensors is refused, not executed
    torch.save({"state_dict": sd, "callback": copy.copy(compvis_config)}, tmp_path / "pickled.ckpt")
    assert main(["import-compvis", str(root / "config.yaml"), str(tmp_path / "pickled.ckpt"), str(out)]) == 1
    assert "refusing to load" in capsys.readouterr().err

    # unsupported model kinds name the CompVis key
    bad = compvis_config()
    bad["model"]["params"]["first_stage_config"]["target"] = "ldm.models.autoencoder.VQModelInterface"
    (tmp_path / "vq.yaml").write_text(yaml.safe_dump(bad))
    assert main(["import-compvis", str(tmp_path / "vq.yaml"), str(root / "model.ckpt"), str(out)]) == 2
    assert "first_stage_config.target" in capsys.readouterr().err
    bad = compvis_config()
    del bad["model"]["params"]["first_stage_config"]
    (tmp_path / "no-ae.yaml").write_text(yaml.safe_dump(bad))
    assert main(["import-compvis", str(tmp_path / "no-ae.yaml"), str(root / "model.ckpt"), str(out)]) == 2
    assert f"{tmp_path / 'no-ae.yaml'}: model.params.first_stage_config: missing" in capsys.readouterr().err
    bad = compvis_config()
    bad["model"]["params"]["linear_end"] = 0.012  # not the schedule stored in the checkpoint
    (tmp_path / "schedule.yaml").write_text(yaml.safe_dump(bad))
    assert main(["import-compvis", str(tmp_path / "schedule.yaml"), str(root / "model.ckpt"), str(out)]) == 2
    assert "betas" in capsys.readouterr().err
    assert not out.exists()
