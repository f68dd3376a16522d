"""The private set of a DP fine-tune, before its first step: counted (N for the plan), checked (no
example of the base's public pretraining data, no caption among the public prompts) and encoded into
a latent cache kept apart from the run folders.

What it returns from private data is either public by design (N, treated as public; class names from
the source's schema) or private and kept out of every released file (the shards' digest and image
fingerprints, compared only; the latents and captions, trained on and written only to the latent cache
outside the run folders). Its refusals name keys and files, never an example.
"""
from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch

from trainer.config import Config, ConfigError, DataSource, load_config
from trainer.errors import RunError, first_line
from trainer.pipeline import autoencoder_encode_fn
from trainer.stages.common import PRIVACY_REPORT, ImageSet, image_channels, resolve_recorded


@dataclass
class PrivateShards:
    """A private shard set, counted (``count`` samples, ``captioned`` of them with captions) but not
    encoded yet; ``digest``: sha256 over the shards' contents; ``images`` and ``captions``: their images'
    fingerprints and their caption lines (private: compared, never written); ``names``: the class names
    ``dpldm prepare`` recorded beside the shards (public: the source's schema), or []; ``labels``: the
    class labels the samples carry (-1: none; private: checked, never written)."""
    urls: list[str]
    count: int
    captioned: int
    digest: str
    images: frozenset[bytes]
    captions: frozenset[str]
    names: list[str]
    labels: frozenset[int]


@dataclass
class EncodedPrivateSet:
    """A private set already encoded: posterior mean/std [N, c, h, w], labels [N], captions."""
    mean: torch.Tensor
    std: torch.Tensor
    labels: torch.Tensor
    captions: list[list[str]]


def label_names(cfg: Config, declared: list[str]) -> tuple[list[str], str]:
    """The private label names and where they come from, never from the private labels themselves.

    ``declared`` are the names the data source declares (its schema: MNIST's digits, the class
    folders ``dpldm prepare`` recorded); else ``finetune.new_class_embedder`` (a count), else the
    public conditioner's ``label_names`` or ``n_classes``.
    """
    if declared:
        return list(declared), "the data source's declared classes"
    ft, cond = cfg.finetune, cfg.ldm.conditioner
    if ft.new_class_embedder:
        return [str(i) for i in range(ft.new_class_embedder)], "finetune.new_class_embedder (a count)"
    if cond.label_names:
        return [str(x) for x in cond.label_names], "ldm.conditioner.label_names"
    return [str(i) for i in range(cond.n_classes or 0)], "ldm.conditioner.n_classes (a count)"


def private_shards(cfg: Config) -> PrivateShards:
    """Count ``data.private``'s shards without encoding them (N for the plan, before anything is written)."""
    from trainer.data.latent_cache import shard_label_names
    from trainer.data.reader import count_distinct_samples, expand_urls
    if not cfg.data.private.path:
        raise ConfigError("data.private.path: a shard pattern is needed for source=shards")
    try:
        urls = expand_urls(cfg.data.private.path)
        count, digest, images, captioned, captions, labels = count_distinct_samples(urls)
        return PrivateShards(urls, count, captioned, digest, images, captions, list(shard_label_names(urls) or []),
                             labels)
    except (ValueError, OSError) as err:
        raise ConfigError(f"data.private.path: {first_line(err)}") from None


def check_captions(cfg: Config, source: "PrivateShards | ImageSet", base_dir: Path) -> str | None:
    """Under a text-conditioned base (``cfg.ldm`` is the base's), refuse (ConfigError) a private set
    without a single caption (in-memory sources have none; shards were counted with theirs), and return
    a note for the terminal when only some samples have one (the others train on the empty prompt)."""
    if cfg.ldm.conditioner.type != "text":
        return None
    if not isinstance(source, PrivateShards):
        raise ConfigError(f"data.private.source: {cfg.data.private.source!r} holds no captions, and the base "
                          f"({base_dir}) is text-conditioned: give shards with .txt captions (source=shards)")
    if not source.captioned:
        raise ConfigError(f"data.private.path: the shards hold no .txt captions, and the base ({base_dir}) is "
                          "text-conditioned")
    if source.captioned < source.count:  # how many is not said: terminal output ends up in kept logs
        return ("note (non-private diagnostic): some private samples have no .txt caption: they train on the empty "
                "prompt (the unconditional branch of the guidance)")
    return None


def check_labels(source: "PrivateShards | ImageSet", n_classes: int) -> None:
    """Refuse (ConfigError) private shards with a sample whose class label is missing or not one of the
    ``n_classes`` classes (those of a class-conditioned model and of the set's names, the fewer): its first
    DP step, or the loading of the set, would fail after being charged.
    (How many is not said: the message ends up in kept logs.)"""
    if isinstance(source, PrivateShards) and any(not 0 <= label < n_classes for label in source.labels):
        raise ConfigError(f"data.private.path: some samples carry no class label (a .cls member) or one outside "
                          f"0..{n_classes - 1}, and the model is class-conditioned ({n_classes} classes): prepare "
                          "them from class folders (`dpldm prepare imagefolder` reads one folder per class)")


def private_set_identity(private: DataSource, n: int) -> dict:
    """Whose budget a DP run spends, as its ledger records it (a resume on another set is refused):
    the source's settings (shards by their absolute paths), the number of examples and the random
    preparation ids of the shards' folders (``provenance.preparations``: a folder prepared again holds
    other images under the same names). Never a hash of the contents: the ledger is released with the
    run, and a hash of the whole set would let anyone who knows all but one example test candidates
    for the last."""
    from trainer.data.provenance import preparations
    spec = {k: v for k, v in dataclasses.asdict(private).items() if k not in ("num_workers", "resolution")}
    prepared = preparations(private)
    return {**spec, "examples": n, **({"preparations": prepared} if prepared else {})}


def private_cache_dir(cfg: Config, encoder_hash: str, shards: PrivateShards) -> Path:
    """``<output_dir>/<experiment>/private/latents-<key>``: private data, kept apart from the run folders
    (which hold results only) and shared by the experiment's fine-tunes of the same encoder and shards
    (by their contents: two sets never share a cache)."""
    from trainer.data.latent_cache import VERSION
    key = hashlib.sha256(f"{encoder_hash}\0{shards.digest}\0{cfg.data.private.resolution}\0{image_channels(cfg)}"
                         f"\0{VERSION}".encode()).hexdigest()[:16]
    return Path(cfg.output_dir) / cfg.experiment / "private" / f"latents-{key}"


def encode_private_shards(cfg: Config, autoencoder, encoder_hash: str, shards: PrivateShards,
                          rt) -> EncodedPrivateSet:
    """Encode the private shards once into their latent cache and load it. Every rank encodes its share
    of the shards with the whole (not yet partitioned) encoder; resumable. Refused (RunError) when the
    cache does not hold the ``shards.count`` examples the plan was made for."""
    from trainer.data.latent_cache import LatentCache, build_latent_cache
    out = private_cache_dir(cfg, encoder_hash, shards)
    build_latent_cache(autoencoder_encode_fn(autoencoder, rt.device), shards.urls, out, encoder_hash,
                       cfg.data.private.resolution, batch_size=64, rank=rt.rank, world_size=rt.world_size,
                       channels=image_channels(cfg), pad_small=True, progress_bar=rt.is_main,
                       source_digest=shards.digest)
    cache = LatentCache(out, expected_encoder_hash=encoder_hash, in_memory=True)
    if len(cache.labels) != shards.count:
        raise RunError(f"{out}: holds {len(cache.labels)} examples, but the shards held {shards.count} when the "
                       "privacy plan was made (did they change?); refused before this session's first step")
    return EncodedPrivateSet(torch.from_numpy(cache.mean).float(), torch.from_numpy(cache.std).float(),
                             cache.labels, cache.captions)


def refuse_private_prompts(prompts: list | None, captions: Iterable[str], template: str | None,
                           names: list[str], reader: object = None) -> None:
    """Refuse (ConfigError naming ``sample.prompts``) a prompt that is the caption of a private example
    as the text encoder ``reader`` reads them (``provenance.private_prompts``): the run's grids and evaluation
    are drawn from its prompts, which its config, MLflow params and grids release as DP results."""
    from trainer.data.provenance import private_prompts
    hits = private_prompts(prompts or [], captions, template, names, text_reader(reader))
    if hits:
        raise ConfigError(f"sample.prompts: entry {hits[0]} is the caption of a private example: the run's grids, "
                          "config and MLflow params would release it as a DP result; prompts are public "
                          "inputs, write your own")


def caption_prompts(run_dir: Path, cfg: Config, prompts: list[str], names: list[str],
                    conditioner: object = None) -> list[int]:
    """The indices of ``prompts`` that are captions of the private shards of the DP run in ``run_dir``
    (``cfg``: its config; ``conditioner``: its model's), when they are here ([]: a public run, or a
    released model sampled without its private set); when only some of them are here, theirs. Shards
    that are here but cannot be read raise (DataError, OSError): the check is not skipped."""
    private = cfg.data.private
    if not (run_dir / PRIVACY_REPORT).is_file() or private is None or private.source != "shards" or not private.path:
        return []
    from trainer.data.latent_cache import shard_caption_template
    from trainer.data.provenance import private_prompts
    from trainer.data.reader import expand_urls, shard_captions
    try:
        urls = expand_urls(private.path, present_only=True)  # only some of them here: those are compared
    except (ValueError, OSError):  # none here
        return []
    return private_prompts(prompts, shard_captions(urls), shard_caption_template(urls), names,
                           text_reader(conditioner))


def text_reader(conditioner: object) -> object:
    """``conditioner`` when it reads prompts as word pieces (a ``TextEmbedder``), else None."""
    return conditioner if hasattr(conditioner, "word_pieces") else None


def refuse_public_overlap(cfg: Config, base_dir: Path, base_cfg: Config, meta: dict,
                          private_images: frozenset[bytes] | None = None) -> str:
    """Refuse a private set that shares examples with the public data the base's LDM (``base_cfg``) or
    its autoencoder (the ``config.yaml`` it recorded) was pretrained on: those examples are in the
    released model without DP. Refuses too when those public shards cannot be read from here
    (moved, deleted, or a relative path recorded by an older version): the check would prove nothing.
    ``private_images``: the private shards' image fingerprints when the caller has read them (else
    they are read here if needed).

    Returns what the privacy report says of it. A base imported from a CompVis checkpoint (``meta``'s
    ``imported_from``) was pretrained on data this project never saw: nothing can be checked, and the
    answer says so (the run goes on: fine-tuning a public checkpoint is the method)."""
    from trainer.data.provenance import (PUBLIC_IMAGES, images_in_common, public_images, shard_images,
                                         shared_examples, unreadable)
    imported = meta.get("imported_from")
    if imported:
        return (f"not checked: the base {base_dir} was imported from the checkpoint {imported['checkpoint']} "
                f"(sha256 {imported['checkpoint_sha256']}), whose pretraining data are not known here; a private "
                "example that was in them is in the released model without DP")
    sources = [("LDM", base_dir / "config.yaml", base_cfg.data.public)]
    if meta.get("autoencoder"):  # an imported base records none: its autoencoder is not ours to check
        ae_config = resolve_recorded(meta["autoencoder"], base_dir) / "config.yaml"
        if not ae_config.is_file():
            raise ConfigError(f"finetune.base: {ae_config}: missing, so the private set cannot be checked against "
                              "the public data the base's autoencoder was pretrained on: restore it")
        sources.append(("autoencoder", ae_config, load_config(str(ae_config)).data.public))
    for what, path, public in sources:
        problem = unreadable(public)
        if problem:
            raise ConfigError(f"finetune.base: the public shards the base's {what} was pretrained on ({path}: "
                              f"data.public.path {public.path}) cannot be read ({problem}), so the private set "
                              "cannot be checked against them: restore them there")
        # by settings and meta.json, else by the images' content (a copy no path names): the bytes of the
        # public images the stage recorded it trained on (below), else of its public shards as they are now;
        # digits by their pixels
        recorded = public_images(path.parent)
        shared = shared_examples(public, cfg.data.private) or \
            images_in_common(public, cfg.data.private, frozenset() if recorded else private_images)
        if recorded:
            private_images = frozenset(shard_images(cfg.data.private)) if private_images is None else private_images
            seen = len(private_images & recorded)
            if seen:
                shared.append(f"{seen} of its images are byte for byte images fingerprinted in "
                              f"{path.parent / PUBLIC_IMAGES}")
        if shared:
            raise ConfigError(f"data.private: shares examples with the public data the base's {what} was pretrained "
                              f"on without DP ({path}: {'; '.join(shared)}): the private set must be disjoint "
                              "from it")
    return f"checked: no example in common with the public data the base's {' and '.join(w for w, _, _ in sources)} " \
           "recorded"
