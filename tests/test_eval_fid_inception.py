"""FID and precision/recall with the real TF-Inception network on small MNIST / letter sets (~0.2-0.4 s per image)."""
import argparse
import io
import tarfile

import numpy as np
import pytest
from PIL import Image

from trainer.data.letters import render_letters
from trainer.data.mnist import load_mnist
from trainer.eval.fid import FEATURE_DIM, InceptionFeatures, feature_statistics, fid_from_features, frechet_distance
from trainer.eval.images import images_from_array
from trainer.eval.precision_recall import precision_recall
from trainer.stages import evaluate

N = 30


@pytest.fixture(scope="module")
def features():
    """Inception features of N MNIST test digits, N MNIST train digits and N rendered letters."""
    rng = np.random.default_rng(0)
    test, _ = load_mnist("test")
    train, _ = load_mnist("train")
    letters, _, _ = render_letters(N, size=28, seed=0)
    sets = {"mnist_test": test[rng.choice(len(test), N, replace=False)],
            "mnist_train": train[rng.choice(len(train), N, replace=False)],
            "letters": letters}
    network = InceptionFeatures()
    return {name: network(images_from_array(x), batch_size=15, progress=False) for name, x in sets.items()}


@pytest.mark.slow
def test_features_are_pool3_and_finite(features):
    for feats in features.values():
        assert feats.shape == (N, FEATURE_DIM) and np.isfinite(feats).all()
        assert (feats >= 0).all()  # pool3 follows a ReLU


@pytest.mark.slow
def test_fid_of_a_set_with_itself_is_zero(features):
    f = features["mnist_test"]
    # the plain statistics path on 256 of the 2048 dimensions (a full 2048-d sqrtm costs 20-50 s here)
    mu, sigma = feature_statistics(f[:, :256])
    assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-3)
    assert fid_from_features(f, f) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.slow
def test_mnist_is_far_closer_to_mnist_than_to_letters(features):
    same = fid_from_features(features["mnist_test"], features["mnist_train"])
    other = fid_from_features(features["mnist_test"], features["letters"])
    assert 0 < same < 0.7 * other


@pytest.mark.slow
def test_precision_recall_separate_domains(features):
    same = precision_recall(features["mnist_test"], features["mnist_train"])
    other = precision_recall(features["mnist_test"], features["letters"])
    # with 30 points in 2048-d the k-NN balls are wide, so only the ordering is sharp
    assert same["precision"] > 0.8 and same["recall"] > 0.6
    assert same["precision"] > other["precision"] + 0.1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dpldm")
    evaluate.register(parser.add_subparsers(dest="command", required=True))
    return parser


@pytest.mark.slow
def test_fid_cli_folder_against_shards_of_the_same_images(tmp_path, capsys, monkeypatch):
    images, labels = load_mnist("test")
    images, labels = images[:10], labels[:10]
    folder = tmp_path / "folder"
    with tarfile.open(tmp_path / "set-000.tar", "w") as tar:
        for i, (img, y) in enumerate(zip(images, labels)):
            (folder / str(y)).mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(folder / str(y) / f"{i:04d}.png")
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, format="PNG")
            info = tarfile.TarInfo(f"{i:04d}.png")
            info.size = len(buf.getvalue())
            tar.addfile(info, io.BytesIO(buf.getvalue()))
    cache = tmp_path / "cache"
    args = _parser().parse_args(["fid", str(folder), f"{tmp_path}/set-{{000..000}}.tar",
                                 "--cache-dir", str(cache), "--batch-size", "5"])
    assert args.func(args) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("FID: ") and abs(float(last.split()[1])) < 1e-3
    assert len(list(cache.glob("*.npy"))) == 1  # the reference (PATH_A) features
    # without --cache-dir a folder's features stay in memory: the reference may be a private set
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    args = _parser().parse_args(["fid", str(folder), f"{tmp_path}/set-{{000..000}}.tar", "--batch-size", "5"])
    assert args.func(args) == 0 and not (tmp_path / "xdg").exists()
