"""Config loading: typed sections, errors that name the file and the key, overrides."""
import pytest

from trainer.config import ConfigError, config_from_dict, load_config


def test_demo_config_loads_with_compvis_names():
    cfg = load_config("demo")
    assert cfg.ldm.unet["use_spatial_transformer"] is True
    assert cfg.autoencoder.ddconfig["ch_mult"] == [1, 2, 2, 2]
    assert cfg.finetune.epsilon == 10.0 and cfg.finetune.delta == 1e-5


@pytest.mark.parametrize("override, key", [
    ("finetune.epsilonn=3", "finetune.epsilonn"),
    ("finetune.delta=2", "finetune.delta"),
    ("finetune.max_grad_norm=0", "finetune.max_grad_norm"),
    ("finetune.physical_batch_size=0", "finetune.physical_batch_size"),
    ("finetune.epsilon=-1", "finetune.epsilon"),
    ("finetune.noise_multiplier=1.0", "finetune.epsilon"),  # both set
    ("ldm.unet.model_chanels=32", "ldm.unet.model_chanels"),
    ("autoencoder.ddconfig.zchannels=3", "autoencoder.ddconfig.zchannels"),
    ("autoencoder.train.steps=abc", "autoencoder.train.steps"),
    ("finetune.policy=everything", "finetune.policy"),
    ("finetune.new_class_from=[a,b]", "finetune.new_class_from"),  # 2 names for 10 new classes
    ("finetune.lr_schedule=linear", "finetune.lr_schedule"),
    ("finetune.context_grad=frozen", "finetune.context_grad"),
    ("finetune.cond_drop_prob=1.5", "finetune.cond_drop_prob"),
    ("finetune.t_range=[500, 2000]", "finetune.t_range"),  # past ldm.schedule.timesteps
    ("finetune.t_range=[300, 300]", "finetune.t_range"),
    ("finetune.t_range=[0.2, 1]", "finetune.t_range"),
    ("finetune.t_range=300", "finetune.t_range"),
    ("data.public=3", "data.public"),
    ("autoencoder.embed_dim=8", "ldm.unet.in_channels"),  # the LDM's channels are the latent's
    ("ldm.unet.out_channels=8", "ldm.unet.out_channels"),
    ("data.public.fonts=comic-sans", "data.public.fonts"),
    ("data.public.elastic=-2", "data.public.elastic"),
    ("data.private.split=training", "data.private.split"),
    ("sweep=[{epsilon: 0}]", "sweep[0].epsilon"),
    ("sweep=[{epsilon: 1, steps: 2.5}]", "sweep[0].steps"),
    ("sweep=[{epsilon: 1, expected_batch_size: 0}]", "sweep[0].expected_batch_size"),
    ("sweep=[{epsilon: 1, lr: 0}]", "sweep[0].lr"),
    ("sweep=[{epsilon: 1, lr: true}]", "sweep[0].lr"),
    ("sweep=[{epsilon: 1, ema_decay: 0.9}]", "sweep[0]"),
    ("finetune.lr=0", "finetune.lr"),
    ("ldm.train.lr=-0.001", "ldm.train.lr"),
    ("autoencoder.train.lr=.inf", "autoencoder.train.lr"),
    ("sweep=[3]", "sweep[0]"),
    ("sample.batch_size=0", "sample.batch_size"),
    ("sample.guidance_scale=-1", "sample.guidance_scale"),
    ("sample.eta=1.5", "sample.eta"),
    ("sample.eta=-0.1", "sample.eta"),
    ("sample.eta=null", "sample.eta"),
    ("eval.eta=1.5", "eval.eta"),
    ("eval.guidance_scale=-0.5", "eval.guidance_scale"),
    ("eval.guidance_scale=high", "eval.guidance_scale"),
    ("eval.ddim_steps=0", "eval.ddim_steps"),
    ("eval.ddim_steps=2.5", "eval.ddim_steps"),
    ("sample.sampler=euler", "sample.sampler"),
    ("eval.sampler=plms", "eval.sampler"),
    ("sample.sampler=dpmpp_2m", "sample.eta"),  # the demo's sample.eta is 1: the deterministic sampler has none
    ("eval.sampler=dpmpp_2m|eval.eta=0.5", "eval.eta"),
    ("eval.sampler=dpmpp_2m|eval.eta=null", "eval.eta"),  # eval.eta null takes sample.eta (1)
    ("autoencoder.train.steps=-5", "autoencoder.train.steps"),  # a resumed stage would call itself finished
    ("ldm.train.batch_size=0", "ldm.train.batch_size"),
    ("ldm.train.checkpoint_every=0", "ldm.train.checkpoint_every"),
    ("finetune.log_every=0", "finetune.log_every"),
    ("ldm.unet.model_channels=0", "ldm.unet.model_channels"),
    ("ldm.unet.image_size=4.5", "ldm.unet.image_size"),
    ("autoencoder.ddconfig.ch=0", "autoencoder.ddconfig.ch"),
    # every block normalises in 32 groups: each width a multiple of 32
    ("ldm.unet.model_channels=48", "ldm.unet.model_channels"),
    ("ldm.unet.channel_mult=[1,1.5]", "ldm.unet.channel_mult"),
    ("ldm.unet.channel_mult=[]", "ldm.unet.channel_mult"),
    ("autoencoder.ddconfig.ch_mult=[]", "autoencoder.ddconfig.ch_mult"),
    ("ldm.unet.num_heads=0", "ldm.unet.num_heads"),
    ("autoencoder.ddconfig.ch=48", "autoencoder.ddconfig.ch"),
    # what only the model code knows, found by building it on the meta device
    ("ldm.unet.num_heads=-1|ldm.unet.num_head_channels=-1", "ldm.unet: the model cannot be built"),
    ("autoencoder.ddconfig.attn_type=linear", "autoencoder.ddconfig: the model cannot be built"),
    ("eval.epochs=0", "eval.epochs"),
    # one folder name each: a run in a sub-folder escapes the experiment's accounting (its runs are one level down)
    ("finetune.name=x/c", "finetune.name"),
    ("finetune.name=..", "finetune.name"),
    ("experiment=a/b", "experiment"),
    ("experiment=..", "experiment"),
    ("experiment=", "experiment"),
    ("eval.num_per_class=-1", "eval.num_per_class"),
    # NaN or inf anywhere, and the ranges a value trains or samples anything sensible in
    ("autoencoder.train.kl_weight=.nan", "autoencoder.train.kl_weight"),
    ("finetune.lora_alpha=.nan", "finetune.lora_alpha"),
    ("finetune.lora_alpha=0", "finetune.lora_alpha"),
    ("data.public.elastic=.inf", "data.public.elastic"),
    ("sample.guidance_scale=.nan", "sample.guidance_scale"),
    ("ldm.scale_factor=.nan", "ldm.scale_factor"),
    ("ldm.scale_factor=0", "ldm.scale_factor"),
    ("finetune.weight_decay=-1", "finetune.weight_decay"),
    ("autoencoder.train.weight_decay=-1", "autoencoder.train.weight_decay"),
    ("autoencoder.train.kl_weight=-1", "autoencoder.train.kl_weight"),
    ("ldm.train.cond_drop_prob=5", "ldm.train.cond_drop_prob"),
    ("ldm.schedule.timesteps=0", "ldm.schedule.timesteps"),
    ("ldm.schedule.linear_start=0.5|ldm.schedule.linear_end=0.1", "ldm.schedule.linear_start"),
    ("data.public.resolution=-4", "data.public.resolution"),
    ("data.public.num_examples=0", "data.public.num_examples"),
    ("data.public.num_workers=-1", "data.public.num_workers"),
    ("eval.num_real=-1", "eval.num_real"),
    ("ldm.conditioner.label_names=[a,b]", "ldm.conditioner.label_names"),
])
def test_bad_values_name_file_and_key(override, key):
    with pytest.raises(ConfigError) as err:
        load_config("demo", override.split("|"))  # "|" joins several overrides
    assert key in str(err.value) and "demo.yaml" in str(err.value)


def test_context_grad_trainable_needs_trainable_transformers():
    for policy in ("full", "embedder_only"):
        with pytest.raises(ConfigError, match="finetune.context_grad: trainable needs finetune.policy attention"):
            load_config("demo", ["finetune.context_grad=trainable", f"finetune.policy={policy}"])
    assert load_config("demo", ["finetune.context_grad=trainable", "finetune.policy=lora"]).finetune.context_grad \
        == "trainable"


def test_overrides_parse_yaml_values():
    cfg = load_config("demo", ["finetune.epsilon=null", "finetune.noise_multiplier=1.5", "ldm.unet.channel_mult=[1,2,3]"])
    assert cfg.finetune.epsilon is None and cfg.finetune.noise_multiplier == 1.5
    assert cfg.ldm.unet["channel_mult"] == [1, 2, 3]


def test_the_evaluation_takes_its_own_sampler_or_the_samples():
    cfg = load_config("demo", ["sample.guidance_scale=3", "eval.guidance_scale=1.25", "sample.ddim_steps=25",
                               "eval.ddim_steps=10", "sample.eta=1.0", "eval.eta=0.0"])
    assert cfg.eval_sampler() == {"sampler": "ddim", "guidance_scale": 1.25, "ddim_steps": 10, "eta": 0.0}
    cfg = load_config("demo", ["sample.guidance_scale=2.5", "eval.guidance_scale=null", "sample.ddim_steps=25",
                               "eval.ddim_steps=null", "sample.eta=0.5", "eval.eta=null"])
    assert cfg.eval_sampler() == {"sampler": "ddim", "guidance_scale": 2.5, "ddim_steps": 25, "eta": 0.5}
    cfg = load_config("demo", ["eval.sampler=dpmpp_2m", "eval.eta=0"])
    assert (cfg.sample.sampler, cfg.eval_sampler()["sampler"]) == ("ddim", "dpmpp_2m")


def test_missing_file_is_named(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "demo").mkdir()  # e.g. runs written with --output-dir demo: the shipped config is still found
    assert load_config("demo").experiment == "demo"
    with pytest.raises(ConfigError, match=r"nope.yaml: config file not found$"):
        load_config(str(tmp_path / "nope.yaml"))
    with pytest.raises(ConfigError, match=r"^dmeo: config file not found, nor a shipped config \(.*demo, demo-text"):
        load_config("dmeo")
    with pytest.raises(ConfigError, match=r": a folder, not a config file"):
        load_config(str(tmp_path))
    (tmp_path / "empty.yaml").write_text("# nothing yet\n")
    with pytest.raises(ConfigError, match=r"empty.yaml: empty"):
        load_config(str(tmp_path / "empty.yaml"))
    with pytest.raises(ConfigError, match=r"^override 'autoencoder.train.stpes=3' \(over .*demo.yaml\): "
                                          r"autoencoder.train.stpes: unknown key"):
        load_config("demo", ["autoencoder.train.steps=9", "autoencoder.train.stpes=3"])
    with pytest.raises(ConfigError,
                       match=r"^override 'finetune=\{epsilon: -1\}' \(over .*\): finetune.epsilon: must be"):
        load_config("demo", ["finetune={epsilon: -1}"])
    for bad in ("=3", "finetune..epsilon=3", ".x=1"):
        with pytest.raises(ConfigError, match=r"override .*: expected key=value with a dotted key"):
            load_config("demo", [bad])


def test_round_trip_through_dict():
    cfg = load_config("demo")
    again = config_from_dict(cfg.to_dict())
    assert again.to_dict() | {"source_file": None} == cfg.to_dict() | {"source_file": None}


def test_malformed_override_is_rejected():
    with pytest.raises(ConfigError, match="key=value"):
        load_config("demo", ["finetune.epsilon"])


def test_config_choices_match_the_modules_that_implement_them():
    """config.py lists choices without importing torch; each list must stay the implementing module's own."""
    from trainer.config import CHOICES
    from trainer.eval.downstream import CLASSIFIERS
    from trainer.runtime import PRECISIONS
    from trainer.selection import POLICIES
    assert CHOICES["eval.classifier"] == set(CLASSIFIERS)
    assert CHOICES["finetune.policy"] == set(POLICIES)
    assert CHOICES["precision"] == set(PRECISIONS)


def test_yaml_syntax_errors_are_one_line_naming_file_or_override(tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("finetune:\n  epsilon: [1,\n")
    with pytest.raises(ConfigError) as err:
        load_config(str(broken))
    assert str(err.value).startswith(f"{broken}: not valid YAML at line 3, column 1: ")
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError) as err:
        load_config("demo", ["finetune.t_range=[1,"])
    assert str(err.value).startswith("override finetune.t_range: not valid YAML at line 1, column 4: ")
    assert "\n" not in str(err.value)
