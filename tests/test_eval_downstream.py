"""Downstream accuracy protocol with real MNIST standing in for synthetic data."""
import numpy as np
import pytest
import torch

from trainer.data.mnist import load_mnist
from trainer.eval.downstream import build_classifier, downstream_accuracy, match_format, per_class_accuracy


@pytest.fixture(scope="module")
def mnist():
    x, y = load_mnist("train")
    xt, yt = load_mnist("test")
    return x[:3000], y[:3000], xt[:1000], yt[:1000]


def test_real_mnist_as_synthetic_gives_high_accuracy(mnist):
    x, y, xt, yt = mnist
    result = downstream_accuracy(x[:2000], y[:2000], xt, yt, classifier="mlp", epochs=3, seed=0)
    assert result["accuracy"] > 0.75
    assert result["num_train"] == 1800 and result["num_val"] == 200 and result["num_test"] == 1000
    # the selected epoch is the best on the held-out synthetic split
    assert result["val_history"][result["selected_epoch"] - 1] == result["val_accuracy"] == max(result["val_history"])


@pytest.mark.parametrize("name", ["cnn", "cnn_bn"])
def test_cnns_learn_mnist(mnist, name):
    x, y, xt, yt = mnist
    result = downstream_accuracy(x[:1500], y[:1500], xt[:500], yt[:500], classifier=name, epochs=2, seed=0,
                                 batch_size=64)
    assert result["accuracy"] > 0.6  # chance is 0.1; few steps on a tiny set


def test_shuffled_labels_give_chance_accuracy(mnist):
    x, y, xt, yt = mnist
    shuffled = np.random.default_rng(0).permutation(y)
    result = downstream_accuracy(x[:2000], shuffled[:2000], xt, yt, classifier="logreg", epochs=2, seed=0)
    assert 0.02 < result["accuracy"] < 0.2


def test_same_seed_same_result(mnist):
    x, y, xt, yt = mnist
    a = downstream_accuracy(x[:500], y[:500], xt[:200], yt[:200], classifier="logreg", epochs=2, seed=3)
    b = downstream_accuracy(x[:500], y[:500], xt[:200], yt[:200], classifier="logreg", epochs=2, seed=3)
    assert a == b


def test_selection_never_looks_at_the_test_set(mnist):
    # test labels that disagree with everything learnt must not change which epoch is chosen
    x, y, xt, yt = mnist
    a = downstream_accuracy(x[:600], y[:600], xt[:200], yt[:200], classifier="logreg", epochs=3, seed=1)
    b = downstream_accuracy(x[:600], y[:600], xt[:200], (yt[:200] + 1) % 10, classifier="logreg", epochs=3, seed=1)
    assert a["selected_epoch"] == b["selected_epoch"] and a["val_history"] == b["val_history"]


def test_real_images_are_brought_to_the_synthetic_format():
    real = np.full((2, 28, 28, 1), 200, np.uint8)
    padded = match_format(real, 1, 32, 32)
    assert padded.shape == (2, 32, 32, 1) and padded[0, 0, 0, 0] == 0 and padded[0, 2, 2, 0] == 200
    rgb = match_format(real, 3, 16, 16)
    assert rgb.shape == (2, 16, 16, 3) and abs(int(rgb[0, 8, 8, 1]) - 200) <= 1
    gray = match_format(np.full((1, 4, 4, 3), 100, np.uint8), 1, 4, 4)
    assert gray.shape == (1, 4, 4, 1) and gray[0, 0, 0, 0] == 100


@pytest.mark.parametrize("name", ["cnn", "cnn_bn", "mlp", "logreg"])
@pytest.mark.parametrize("size", [(37, 50), (6, 9)])
def test_classifiers_handle_rgb_and_odd_sizes(name, size):
    model = build_classifier(name, 3, *size, 4).eval()
    assert model(torch.zeros(2, 3, *size)).shape == (2, 4)


def test_bad_arguments_are_named(mnist):
    x, y, xt, yt = mnist
    with pytest.raises(ValueError, match="classifier"):
        downstream_accuracy(x[:10], y[:10], xt[:10], yt[:10], classifier="svm")
    with pytest.raises(ValueError, match="labels"):
        downstream_accuracy(x[:10], y[:9], xt[:10], yt[:10])


def test_per_class_accuracy_finds_the_class_the_synthetic_set_lacks(mnist):
    """A generator that never draws a 2: the classifier cannot recognise the real 2s, the other digits stay high."""
    x, y, xt, yt = mnist
    keep = y[:2000] != 2
    result = downstream_accuracy(x[:2000][keep], y[:2000][keep], xt, yt, classifier="mlp", epochs=3, seed=0,
                                 num_classes=10)
    per_class = result["per_class_accuracy"]
    assert per_class[2] == 0.0 and min(a for c, a in enumerate(per_class) if c != 2) > 0.5
    counts = np.bincount(np.asarray(yt), minlength=10)  # the overall accuracy is their count-weighted mean
    assert result["accuracy"] == pytest.approx(float(np.dot(per_class, counts) / counts.sum()))


def test_per_class_accuracy_against_a_loop():
    labels = torch.tensor([0, 0, 1, 1, 1, 3])
    predictions = torch.tensor([0, 1, 1, 1, 0, 3])
    expected = []
    for c in range(4):
        rows = [i for i in range(len(labels)) if labels[i] == c]
        expected.append(sum(int(predictions[i] == c) for i in rows) / len(rows) if rows else None)
    assert per_class_accuracy(predictions, labels, 4) == expected == [0.5, 2 / 3, None, 1.0]
