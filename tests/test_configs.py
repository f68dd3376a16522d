"""Every shipped config loads, validates, and builds its models (on the meta device)."""
from pathlib import Path

import pytest
import torch

from trainer.config import REPO_CONFIGS, load_config
from trainer.stages.common import build_autoencoder, build_unet

CONFIGS = sorted(p.stem for p in Path(REPO_CONFIGS).glob("*.yaml"))


def test_the_embedded_default_is_shipped():
    assert "demo" in CONFIGS


@pytest.mark.parametrize("name", CONFIGS)
def test_config_builds(name):
    cfg = load_config(name)
    with torch.device("meta"):
        ae = build_autoencoder(cfg)
        unet = build_unet(cfg)
    assert sum(p.numel() for p in unet.parameters()) > 0
    x = torch.empty(1, cfg.autoencoder.ddconfig["in_channels"], cfg.data.public.resolution,
                    cfg.data.public.resolution, device="meta")
    mean, _ = ae.encode(x)
    assert mean.shape[1] == cfg.ldm.unet["in_channels"]  # the UNet takes the autoencoder's latents
    assert mean.shape[-1] == cfg.ldm.unet["image_size"]
