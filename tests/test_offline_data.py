"""Offline sets: rendered letters (public) and MNIST from its package (restricted unpickler)."""
import gzip
import io
import pickle

import numpy as np
import pytest

from trainer.data import mnist
from trainer.data.letters import render_letters


def test_letters_are_deterministic_balanced_and_mnist_like():
    x, y, names = render_letters(52, size=28, seed=3)
    x2, y2, _ = render_letters(52, size=28, seed=3)
    assert x.shape == (52, 28, 28) and x.dtype == np.uint8 and np.array_equal(x, x2) and np.array_equal(y, y2)
    assert np.bincount(y, minlength=26).tolist() == [2] * 26 and names[0] == "a" and names[25] == "z"
    assert not np.array_equal(x, render_letters(52, size=28, seed=4)[0])
    # white strokes on black, inside the 20x20 box like MNIST, centred by mass
    assert x[:, :2].max() == 0 and x[:, -2:].max() == 0 and x.max() == 255
    ys, xs = np.indices((28, 28))
    cy = (x * ys).sum((1, 2)) / x.sum((1, 2))
    assert np.all(np.abs(cy - 14) < 2.5)


def test_letters_in_more_fonts_with_elastic_strokes(tmp_path):
    from trainer.data.letters import MATPLOTLIB_TEXT_FONTS, elastic, font_files
    files = font_files("matplotlib")
    assert len(files) == len(MATPLOTLIB_TEXT_FONTS) > 20
    x, y, _ = render_letters(104, size=28, seed=3, fonts="matplotlib")
    assert np.array_equal(x, render_letters(104, size=28, seed=3, fonts="matplotlib")[0])
    assert not np.array_equal(x, render_letters(104, size=28, seed=3)[0])
    assert np.bincount(y, minlength=26).tolist() == [4] * 26 and x.max() == 255 and x[:, :2].max() == 0
    # a font folder: every .ttf/.otf in it, sorted
    for name in ("b.ttf", "a.TTF", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    assert [f.rsplit("/", 1)[1] for f in font_files(str(tmp_path))] == ["a.TTF", "b.ttf"]
    with pytest.raises(ValueError, match="neither a font set"):
        font_files(str(tmp_path / "nowhere"))
    # the displacement field's blur is scipy's Gaussian filter (mirrored borders, 3 sigma)
    from scipy.ndimage import gaussian_filter

    from trainer.data.letters import _smooth
    field = np.random.default_rng(1).uniform(-1, 1, (28, 28))
    np.testing.assert_allclose(_smooth(field, 4.0), gaussian_filter(field, 4.0, mode="mirror", truncate=3.0), atol=1e-12)
    # the elastic warp: identity at alpha 0, a bounded bend otherwise, deterministic for a seed
    img = x[0]
    assert np.array_equal(elastic(img, np.random.default_rng(0), 0.0, 4.0), img)
    bent = elastic(img, np.random.default_rng(0), 34.0, 4.0)
    assert not np.array_equal(bent, img) and np.array_equal(bent, elastic(img, np.random.default_rng(0), 34.0, 4.0))
    assert abs(int(bent.astype(int).sum()) - int(img.astype(int).sum())) < 0.25 * img.astype(int).sum()
    warped, _, _ = render_letters(104, size=28, seed=3, fonts="matplotlib", elastic_alpha=20)
    assert warped.shape == x.shape and not np.array_equal(warped, x)
    with pytest.raises(ValueError, match="elastic_alpha"):
        render_letters(2, elastic_alpha=-1)


def test_mnist_splits_and_values():
    x, y = mnist.load_mnist("test")
    assert x.shape == (10000, 28, 28) and x.dtype == np.uint8 and y.shape == (10000,)
    assert y[:5].tolist() == [7, 2, 1, 0, 4] and set(np.unique(y)) == set(range(10))
    train, val = mnist.load_mnist("train"), mnist.load_mnist("val")
    assert len(train[0]) == 50000 and len(val[0]) == 10000
    # trainval is MNIST's original training set: train then val, its published class counts, no test digit
    tx, ty = mnist.load_mnist("trainval")
    assert np.array_equal(tx, np.concatenate([train[0], val[0]])) and np.array_equal(ty, np.concatenate([train[1], val[1]]))
    assert np.bincount(ty).tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    assert not {img.tobytes() for img in x} & {img.tobytes() for img in tx}
    with pytest.raises(ValueError, match="split must be one of train, val, test, trainval"):
        mnist.load_mnist("dev")


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_restricted_unpickler_refuses_code(capsys):
    blob = io.BytesIO()
    with gzip.open(blob, "wb") as fh:
        pickle.dump(((Evil(), np.zeros(2)),), fh)
    blob.seek(0)
    with gzip.open(blob, "rb") as fh, pytest.raises(pickle.UnpicklingError, match="builtins.print"):
        mnist._NumpyOnlyUnpickler(fh, encoding="latin1").load()
    assert "pwned" not in capsys.readouterr().out
