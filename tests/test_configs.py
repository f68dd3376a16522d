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


def test_the_demo_fine_tunes_the_decoders_attention_and_the_embedder():
    """The demo's trainable set (finetune.attention_from 5): the last 3 of the UNet's output blocks'
    4 SpatialTransformers and the class embedder, nothing in the encoder, the middle block or the first
    output transformer."""
    from trainer.models import SpatialTransformer
    from trainer.selection import select_trainable
    from trainer.stages.common import build_ldm
    cfg = load_config("demo")
    with torch.device("meta"):
        ldm = build_ldm(cfg)
    select_trainable(ldm, cfg.finetune.policy, cfg.finetune.attention_from)
    blocks = [n for n, m in ldm.unet.named_modules() if isinstance(m, SpatialTransformer)]
    decoder = [n for n in blocks if n.startswith("output_blocks.")]
    assert len(blocks) == 7 and len(decoder) == 4
    last_three = decoder[1:]
    trained = {n for n, p in ldm.named_parameters() if p.requires_grad}
    expected = {f"unet.{n}" for b in last_three for n, _ in ldm.unet.get_submodule(b).named_parameters(prefix=b)}
    expected |= {f"cond_stage_model.{n}" for n, _ in ldm.cond_stage_model.named_parameters()}
    assert trained == expected


def test_the_demo_sweep_gives_each_budget_its_own_steps_and_batch_size():
    """`dpldm demo`'s extra budgets: the config's sweep (epsilon 1 for the demo), each with the steps,
    expected batch size and lr of its entry or else finetune's; --also-epsilon budgets take a matching entry's;
    an explicit finetune.steps / finetune.expected_batch_size / finetune.lr (as --quick sets the first two) wins."""
    from trainer.config import QUICK_DEMO
    from trainer.stages.demo import sweep_configs

    def runs(overrides, epsilons=None, name="demo"):
        cfg = load_config(name, overrides)
        return [(c.finetune.name, c.finetune.epsilon, c.finetune.steps, c.finetune.expected_batch_size)
                for c in sweep_configs(cfg, name, overrides, epsilons)]
    main = load_config("demo").finetune
    steps, batch = main.steps, main.expected_batch_size
    assert (steps, batch) == (800, 2000)
    assert runs([]) == [("eps1", 1.0, 600, 500)]  # the demo's own entry: epsilon 1 keeps batch 500
    own = ["sweep=[{epsilon: 1, steps: 30, expected_batch_size: 70}, {epsilon: 2}]"]
    assert runs(own) == [("eps1", 1.0, 30, 70), ("eps2", 2.0, steps, batch)]
    assert runs(own, [1.0, 3.0]) == [("eps1", 1.0, 30, 70), ("eps3", 3.0, steps, batch)]
    assert runs(own, [3.0, 1.0, 3.0]) == [("eps3", 3.0, steps, batch), ("eps1", 1.0, 30, 70)]  # once each
    assert runs(own, []) == []
    assert runs(QUICK_DEMO + own) == [("eps1", 1.0, 4, 64), ("eps2", 2.0, 4, 64)]
    assert runs(["finetune.epsilon=1"]) == []  # the main run is that budget already
    assert runs([], name="demo-text") == []
    lrs = ["sweep=[{epsilon: 1, lr: 0.0007}, {epsilon: 2}]"]
    assert [c.finetune.lr for c in sweep_configs(load_config("demo", lrs), "demo", lrs, None)] == [0.0007, main.lr]
    lrs.append("finetune.lr=0.0001")
    assert [c.finetune.lr for c in sweep_configs(load_config("demo", lrs), "demo", lrs, None)] == [0.0001, 0.0001]
    mnist = load_config("mnist").finetune
    assert runs([], name="mnist") == [("eps1", 1.0, mnist.steps, mnist.expected_batch_size)]
