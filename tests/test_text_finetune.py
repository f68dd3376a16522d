"""Text-conditioned DP fine-tuning: what trains (the encoder stays frozen), and exact clipping on it."""
import copy
import dataclasses
import shutil

import pytest
import torch
from conftest import assert_engine_matches_brute_force, mlflow_store

from trainer.config import ConfigError, dump_config, load_config
from trainer.models import SpatialTransformer, TextEmbedder
from trainer.selection import select_trainable
from trainer.stages.common import build_ldm

PROMPTS = ["a handwritten digit seven", "the digit 3, bold", "zero", "a thin one written quickly", ""]


def tiny_text_ldm(context_dim: int = 32):
    return build_ldm(load_config("demo", [
        "ldm.unet.model_channels=32", "ldm.unet.channel_mult=[1,2]", "ldm.unet.attention_resolutions=[1]",
        f"ldm.unet.context_dim={context_dim}", "ldm.unet.num_head_channels=16",
        "ldm.conditioner={type: text, max_length: 12}"]))


def count(modules):
    return sum(p.numel() for m in modules for p in m.parameters())


def test_attention_policy_keeps_the_text_encoder_frozen_and_trains_its_projection():
    ldm = tiny_text_ldm()
    emb = ldm.cond_stage_model
    assert isinstance(emb, TextEmbedder) and emb.proj is not None
    sel = select_trainable(ldm, "attention")
    blocks = [m for m in ldm.unet.modules() if isinstance(m, SpatialTransformer)]
    assert sel.trainable_count == count(blocks) + count([emb.proj])
    assert "cond_stage_model.proj.weight" in sel.trainable
    assert not any(n.startswith("cond_stage_model.backbone.") for n in sel.trainable)
    assert count([emb.backbone]) > 20e6 > sel.trainable_count  # MiniLM (22.7M) is not trained
    ldm.train()
    assert not emb.backbone.training, "a frozen encoder runs in eval mode (no dropout)"


def test_top_encoder_layers_on_request():
    ldm = tiny_text_ldm()
    sel = select_trainable(ldm, "attention", text_encoder_layers=2)
    layers = ldm.cond_stage_model.backbone.encoder.layer
    top = {n for n in sel.trainable if n.startswith("cond_stage_model.backbone.")}
    assert top and all(n.startswith(("cond_stage_model.backbone.encoder.layer.4.",
                                     "cond_stage_model.backbone.encoder.layer.5.")) for n in top)
    assert len(top) == sum(1 for _ in layers[4:].parameters()) and len(layers) == 6
    with pytest.raises(ValueError, match="text_encoder_layers"):
        select_trainable(ldm, "attention", text_encoder_layers=7)


def test_no_projection_and_a_frozen_encoder_leave_only_the_unet_attention():
    ldm = tiny_text_ldm(context_dim=384)  # MiniLM's width: no projection
    sel = select_trainable(ldm, "attention")
    assert all(n.startswith("unet.") for n in sel.trainable)
    with pytest.raises(ValueError, match="text_encoder_layers"):
        select_trainable(ldm, "embedder_only")


@pytest.mark.parametrize("layers", [0, 1])
def test_text_fine_tuning_is_exact_against_the_reference_and_a_brute_force_loop(layers):
    torch.manual_seed(0)
    ldm = tiny_text_ldm()
    with torch.no_grad():  # LDM zero-initialises its output layers: every gradient upstream would be 0
        for p in ldm.unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    select_trainable(ldm, "attention", text_encoder_layers=layers)
    ldm.eval()  # deterministic forward: an example gives the same loss alone and in the batch
    n, g = len(PROMPTS), torch.Generator().manual_seed(1)
    z0, noise = torch.randn(n, 4, 4, 4, generator=g), torch.randn(n, 4, 4, 4, generator=g)
    t = torch.randint(0, 1000, (n,), generator=g)

    def losses_of(rows: torch.Tensor) -> torch.Tensor:
        x_t = ldm.schedule.q_sample(z0[rows], t[rows], noise[rows])
        context = ldm.context([PROMPTS[i] for i in rows.tolist()])
        return (ldm.eps(x_t, t[rows], context) - noise[rows]).pow(2).flatten(1).mean(dim=1)

    # reference mode runs the encoder's attention under vmap, another float32 kernel path (2e-4 seen)
    assert_engine_matches_brute_force(ldm, losses_of, n, {"fast": 1e-4, "reference": 1e-3})


# --- the whole text path -------------------------------------------------------------------------

def test_a_prompt_that_is_a_private_caption_is_refused_unless_the_prepare_template_made_it():
    from trainer.stages.private_set import refuse_private_prompts
    captions = {"a handwritten digit 7", "my cat Tom, three years old", "Tom"}
    template, names = "a handwritten digit {label}", ["6", "7"]
    refuse_private_prompts(["a handwritten digit 7", "a cat", ""], captions, template, names)  # public strings
    refuse_private_prompts(None, captions, template, names)
    with pytest.raises(ConfigError, match=r"sample.prompts: entry 1 is the caption of a private example"):
        refuse_private_prompts(["a cat", "Tom"], captions, template, names)
    with pytest.raises(ConfigError, match="entry 0"):  # no template recorded: the same words are a private caption
        refuse_private_prompts(["a handwritten digit 7"], captions, None, names)
    with pytest.raises(ConfigError, match="entry 1"):  # other capitals, spaces and punctuation: the same caption
        refuse_private_prompts(["a cat", "My cat  TOM three years old."], captions, template, names)


def test_a_private_caption_is_recognised_as_the_text_encoder_reads_it():
    """With the text encoder's word pieces: a prompt that differs from a private caption only in capitals,
    punctuation or words past the encoder's cut is that caption (it gives the same conditioning); another
    word within the cut is another prompt."""
    from trainer.stages.private_set import refuse_private_prompts
    reader = TextEmbedder(max_length=12)  # 10 word pieces beside [CLS] and [SEP]
    captions = {"patient zq0007 has a fracture of the left wrist"}  # patient z ##q ##00 ##0 ##7 has a fracture of | ..
    refuse_private_prompts(["patient zq0007 has a fracture"], captions, None, [], reader)  # 9 pieces: another
    for variant in ("Patient ZQ0007 has a fracture of the right knee", "patient, zq0007 - has a FRACTURE of..."):
        with pytest.raises(ConfigError, match="entry 0"):
            refuse_private_prompts([variant], captions, None, [], reader)
    refuse_private_prompts(["Patient ZQ0007 has a fracture of the right knee"], captions, None, [],
                           TextEmbedder(max_length=16))  # within a longer cut: another prompt
    # punctuation inside the cut: what the encoder reads of the caption, typed as a prompt
    commas = {"patient, zq0007, has, a fracture of the left wrist"}
    prompt = "patient, zq0007, has,"
    assert torch.equal(reader([prompt]), reader(list(commas)))  # the same conditioning
    with pytest.raises(ConfigError, match="entry 0"):
        refuse_private_prompts([prompt], commas, None, [], reader)


def test_only_a_caption_the_prepare_template_made_exactly_is_public():
    """A private caption written by a person that looks like the template's output (other capitals,
    punctuation, or a tail past the encoder's cut) is still private."""
    from trainer.stages.private_set import refuse_private_prompts
    template, names = "a handwritten digit {label}", ["7"]
    reader = TextEmbedder(max_length=8)  # 6 word pieces: "a handwritten digit 7" fits in 5
    refuse_private_prompts(["a handwritten digit 7"], {"a handwritten digit 7"}, template, names, reader)
    for caption in ("A handwritten digit 7!", "a handwritten digit 7 of my daughter Ann"):
        with pytest.raises(ConfigError, match="entry 0"):
            refuse_private_prompts([caption], {caption}, template, names, reader)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    with mlflow_store(tmp_path_factory.mktemp("text")) as root:
        yield root


@pytest.mark.slow
def test_demo_text_quick_then_sampling_from_public_prompts(store, capsys):
    import json

    import mlflow

    from trainer import cli
    runs = store / "runs"
    assert cli.main(["demo", "--text", "--quick", "--output-dir", str(runs)]) == 0
    out = capsys.readouterr().out
    assert "eval.accuracy" in out and "prompted digits" in out
    data, private = runs / "demo-text-quick" / "data", runs / "demo-text-quick" / "private"
    letters = json.loads((data / "letters" / "meta.json").read_text())
    digits = json.loads((private / "mnist" / "meta.json").read_text())  # private data, apart from the results
    assert not (data / "mnist").exists()
    assert letters["captions"]["template"] == "the letter {label}" and letters["count"] == 1040
    assert digits["captions"]["with_captions"] == digits["count"] == 2000
    from trainer.config import QUICK_DEMO, load_config
    from trainer.stages.demo import prepare_captioned_shards
    cfg = load_config("demo-text", QUICK_DEMO + ["experiment=demo-text-quick", f"output_dir={runs}"])
    prepare_captioned_shards(cfg)  # a second demo run keeps the finished shards
    assert cfg.data.private.path == str(private / "mnist")
    assert json.loads((private / "mnist" / "meta.json").read_text())["created"] == digits["created"]
    ft = runs / "demo-text-quick" / "finetune"
    report = json.loads((ft / "privacy-report.json").read_text())
    assert 0 < report["epsilon"] <= 10 and report["data"].startswith("shards:")
    assert "cond_stage_model.proj.weight" in report["trainable_names"]
    assert not any(n.startswith("cond_stage_model.backbone.") for n in report["trainable_names"])
    assert len(list((runs / "demo-text-quick" / "private").glob("latents-*/manifest.json"))) == 1
    assert not list(ft.rglob("*.npy")), "private latents in the run folder"
    finetune_runs = mlflow.search_runs(experiment_names=["demo-text-quick"])
    ft_run = finetune_runs[finetune_runs["tags.mlflow.runName"] == "finetune"].iloc[0]
    assert ft_run["metrics.eval.accuracy"] >= 0
    # alone on its private set when it ended: the set's epsilon is its own, recorded for `dpldm compare`
    assert ft_run["metrics.privacy.private_set_epsilon"] == pytest.approx(report["epsilon"], rel=1e-3)
    samples = store / "samples"
    assert cli.main(["sample", "--checkpoint", str(ft), "--prompts", "a handwritten digit 4", "--num", "2",
                     "--out", str(samples), "--ddim-steps", "3"]) == 0
    assert len(list((samples / "all").glob("*.png"))) == 2


@pytest.mark.slow
def test_the_shipped_celebahq_text_config_fine_tunes_at_tiny_size(store, tmp_path, capsys):
    """configs/celebahq256-text.yaml through the full code path: captioned folder -> shards -> AE, LDM, DP."""
    import json

    import numpy as np
    from PIL import Image

    from trainer.data.shards import WriteOptions, write_shards
    from trainer.data.sources import imagefolder_source
    from trainer.stages import finetune, pretrain_ae, pretrain_ldm
    rng = np.random.default_rng(0)
    for split, n in (("public", 24), ("private", 40)):
        folder = tmp_path / f"{split}-images"
        folder.mkdir()
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")
            (folder / f"{i:03d}.txt").write_text(f"a face {i % 3} with {'blond' if i % 2 else 'dark'} hair\n")
        write_shards(imagefolder_source(folder), tmp_path / split, WriteOptions(samples_per_shard=16),
                     progress_bar=False)
    cfg = load_config("celebahq256-text", [
        f"output_dir={store / 'runs'}", f"data.public.path={tmp_path / 'public'}",
        f"data.private.path={tmp_path / 'private'}", "data.public.resolution=16", "data.private.resolution=16",
        "data.public.num_workers=0", "autoencoder.ddconfig.resolution=16", "autoencoder.ddconfig.ch=32",
        "autoencoder.ddconfig.ch_mult=[1,2]", "autoencoder.ddconfig.num_res_blocks=1",
        "autoencoder.train={steps: 2, batch_size: 4, checkpoint_every: 2}",
        "ldm.unet.image_size=8", "ldm.unet.model_channels=32", "ldm.unet.channel_mult=[1,2]",
        "ldm.unet.attention_resolutions=[1]", "ldm.unet.num_res_blocks=1", "ldm.conditioner.max_length=12",
        "ldm.train={steps: 2, batch_size: 4, checkpoint_every: 2}",
        "finetune.steps=2", "finetune.expected_batch_size=8", "finetune.physical_batch_size=4",
        "finetune.noise_multiplicity=2", "finetune.checkpoint_every=1", "finetune.delta=1e-3",
        "sample.ddim_steps=2", "sample.num_per_class=1"])
    pretrain_ae.run(cfg)
    pretrain_ldm.run(cfg)
    # a private example's caption as a prompt: the grids, config and params would release it as a DP result
    leaky = copy.deepcopy(cfg)
    leaky.sample.prompts = ["a smiling face", "A face 1 with BLOND hair."]  # as the text encoder reads it
    with pytest.raises(ConfigError, match=r"sample.prompts: entry 1 is the caption of a private example"):
        finetune.run(leaky)
    run_dir = finetune.stage_dir(cfg, "finetune")
    assert not run_dir.exists() and not (run_dir.parent / "private").exists(), "refused before writing or encoding"
    # private images without captions for a text-conditioned base: refused before any step is charged
    from trainer.data.shards import write_shard
    (tmp_path / "uncaptioned").mkdir()
    write_shard(tmp_path / "uncaptioned" / "shard-000000.tar",
                [{"__key__": f"{i:03d}", "png": (tmp_path / "private-images" / f"{i:03d}.png").read_bytes()}
                 for i in range(40)])
    for private, words in (({"source": "mnist", "split": "val", "path": None}, "'mnist' holds no captions"),
                           ({"path": str(tmp_path / "uncaptioned")}, "the shards hold no .txt captions")):
        captionless = copy.deepcopy(cfg)
        captionless.data.private = dataclasses.replace(cfg.data.private, **private)
        captionless.finetune.delta = 1e-5  # below 1/N for MNIST's 10,000 too: only the captions can refuse it
        with pytest.raises(ConfigError, match=rf"data.private.(source|path): .*{words}.*text-conditioned"):
            finetune.run(captionless)
        assert not run_dir.exists(), "refused before the run folder (and its journal) is written"
        assert not (run_dir.parent / "private").exists(), "refused before encoding"
    assert finetune.run(cfg) == run_dir
    report = json.loads((run_dir / "privacy-report.json").read_text())
    assert report["steps"] == 2 and report["N"] == 40 and report["epsilon"] <= 10
    # context_dim 384 = MiniLM's width: no projection, the encoder stays frozen, only the UNet attention trains
    assert all(n.startswith("unet.") for n in report["trainable_names"])
    # `dpldm sample` on the DP run: a private caption as a prompt is refused (nothing written), or written
    # and labelled a non-private diagnostic; a public prompt is a DP release
    from trainer import cli
    out = tmp_path / "samples"
    sample = ["sample", "--checkpoint", str(run_dir), "--num", "1", "--ddim-steps", "2", "--out", str(out)]
    assert cli.main(sample + ["--prompts", "a smiling face", "A face 2 with blond hair!"]) == 2
    assert not out.exists()
    assert cli.main(sample + ["--prompts", "a face 2 with blond hair", "--nonprivate-diagnostic"]) == 0
    assert "prompts [0]" in (out / "NONPRIVATE.txt").read_text() and (out / "grid.png").is_file()
    assert cli.main(sample[:-1] + [str(tmp_path / "public-samples"), "--prompts", "a smiling face"]) == 0
    assert not (tmp_path / "public-samples" / "NONPRIVATE.txt").exists()
    # the diagnostic's scores are never logged to the DP run as its own, nor a private caption's in its config
    import mlflow

    from trainer.tracking import find_run_by_checkpoint
    run_id = find_run_by_checkpoint(cfg.experiment, run_dir)
    before = mlflow.get_run(run_id).data.metrics
    assert cli.main(["evaluate", "--samples", str(out / "all"), "--run", run_id]) == 2
    assert "--samples: " + str(out / "NONPRIVATE.txt") in capsys.readouterr().err
    copy_dir = run_dir.parent / "finetune-copied"  # beside it: the base is recorded relative to the folder
    shutil.copytree(run_dir, copy_dir)
    try:
        recorded = load_config(str(copy_dir / "config.yaml"))
        recorded.sample.prompts = ["A FACE 0 with dark hair", "a smiling face", "a sad face"]
        dump_config(recorded, copy_dir / "config.yaml")
        assert cli.main(["evaluate", "--checkpoint", str(copy_dir), "--run", run_id]) == 2
        assert "config.yaml: sample.prompts: entry 0 is the caption of an example" in capsys.readouterr().err
    finally:
        shutil.rmtree(copy_dir)
    assert mlflow.get_run(run_id).data.metrics == before


def test_a_text_conditioned_base_refuses_a_captionless_private_set_and_notes_a_partly_captioned_one(tmp_path):
    from trainer.stages.private_set import PrivateShards, check_captions
    text = load_config("demo-text")

    def shards(count, captioned):
        return PrivateShards(["s.tar"], count, captioned, "0" * 64, frozenset(), frozenset(), [], frozenset())
    assert check_captions(text, shards(40, 40), tmp_path) is None
    note = check_captions(text, shards(40, 30), tmp_path)
    assert note is not None and "some private samples have no .txt caption" in note and "10" not in note
    with pytest.raises(ConfigError, match=r"data.private.path: the shards hold no .txt captions"):
        check_captions(text, shards(40, 0), tmp_path)
    with pytest.raises(ConfigError, match=r"data.private.source: 'mnist' holds no captions"):
        check_captions(load_config("demo-text", ["data.private={source: mnist, split: val}"]), None, tmp_path)
    assert check_captions(load_config("demo"), shards(40, 0), tmp_path) is None  # class labels: no captions needed
