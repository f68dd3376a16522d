"""Frechet distance, TF bilinear resizing, precision/recall, feature cache: small numeric cases, no network."""
import numpy as np
import pytest
import torch

from trainer.eval.fid import (cached_features, feature_statistics, fid_from_features, frechet_distance,
                              inception_input, resize_bilinear_tf)
from trainer.eval.images import images_from_array
from trainer.eval.precision_recall import knn_radii, precision_recall


def _psd_sqrt(m: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh(m)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def _brute_force(mu1, s1, mu2, s2) -> float:
    """The 2-Wasserstein distance of two Gaussians in its symmetric form, via eigendecompositions."""
    r1 = _psd_sqrt(s1)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(_psd_sqrt(r1 @ s2 @ r1)))


def _random_spd(rng, d):
    a = rng.standard_normal((d, d))
    return a @ a.T + 0.1 * np.eye(d)


@pytest.mark.parametrize("d", [1, 3, 8])
def test_frechet_distance_matches_brute_force_on_small_gaussians(d):
    rng = np.random.default_rng(d)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    s1, s2 = _random_spd(rng, d), _random_spd(rng, d)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(_brute_force(mu1, s1, mu2, s2), rel=1e-8, abs=1e-9)


def test_frechet_distance_closed_form_for_diagonal_covariances():
    var1, var2 = np.array([1.0, 4.0, 9.0]), np.array([4.0, 4.0, 1.0])
    mu1, mu2 = np.zeros(3), np.array([1.0, 2.0, 0.0])
    expected = 1 + 4 + np.sum((np.sqrt(var1) - np.sqrt(var2)) ** 2)  # 5 + 1 + 0 + 4
    assert frechet_distance(mu1, np.diag(var1), mu2, np.diag(var2)) == pytest.approx(expected)
    assert frechet_distance(mu1, np.diag(var1), mu1, np.diag(var1)) == pytest.approx(0.0, abs=1e-10)


def test_frechet_distance_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="statistics do not match"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(2), np.eye(2))


def test_singular_covariances_use_the_offset_fix():
    # rank-1 covariances: the product is singular, the root still finite and the distance sane
    s = np.zeros((4, 4))
    s[0, 0] = 1.0
    value = frechet_distance(np.zeros(4), s, np.ones(4), s)
    assert np.isfinite(value) and value == pytest.approx(4.0, abs=1e-4)


@pytest.mark.parametrize("n1,n2", [(10, 12), (40, 30)])  # below and above d = 64
def test_fid_from_features_in_the_sample_span_equals_the_full_computation(n1, n2):
    rng = np.random.default_rng(n1)
    d = 64
    f1 = rng.standard_normal((n1, d)) * rng.random(d) * 3
    f2 = rng.standard_normal((n2, d)) * rng.random(d) + 0.5
    full = frechet_distance(*feature_statistics(f1), *feature_statistics(f2))
    assert fid_from_features(f1, f2) == pytest.approx(full, rel=1e-6)
    assert fid_from_features(f1, f1) == pytest.approx(0.0, abs=1e-5)  # traces are ~100


def test_feature_statistics_are_mean_and_unbiased_covariance():
    f = np.array([[0.0, 1.0], [2.0, 3.0], [4.0, 8.0]])
    mu, sigma = feature_statistics(f)
    np.testing.assert_allclose(mu, [2.0, 4.0])
    np.testing.assert_allclose(sigma, np.cov(f.T, ddof=1))
    with pytest.raises(ValueError, match="n >= 2"):
        feature_statistics(f[:1])


def test_resize_bilinear_tf_uses_asymmetric_source_coordinates():
    # TF1 resize_bilinear: out[j] = in at j * in/out, last sample repeated at the border
    x = torch.tensor([[[[0.0, 10.0]]]])  # [1, 1, 1, 2]
    out = resize_bilinear_tf(x, 1, 4)
    torch.testing.assert_close(out, torch.tensor([[[[0.0, 5.0, 10.0, 10.0]]]]))
    down = resize_bilinear_tf(torch.arange(4.0).reshape(1, 1, 1, 4), 1, 2)
    torch.testing.assert_close(down, torch.tensor([[[[0.0, 2.0]]]]))


def test_inception_input_replicates_gray_and_scales_to_tf_range():
    img = np.full((28, 28, 1), 255, dtype=np.uint8)
    img[0, 0, 0] = 0
    x = inception_input(img)
    assert x.shape == (3, 299, 299)
    assert x[0, 0, 0] == -1.0 and x.max() == pytest.approx(127 / 128)
    torch.testing.assert_close(x[0], x[2])
    with pytest.raises(ValueError, match="uint8"):
        inception_input(img.astype(np.float32))


def test_knn_radii_exclude_the_point_itself():
    pts = torch.tensor([[0.0], [1.0], [3.0], [7.0]], dtype=torch.float64)
    torch.testing.assert_close(knn_radii(pts, 1), torch.tensor([1.0, 1.0, 2.0, 4.0], dtype=torch.float64))
    torch.testing.assert_close(knn_radii(pts, 2), torch.tensor([3.0, 2.0, 3.0, 6.0], dtype=torch.float64))


def test_precision_recall_on_overlapping_and_disjoint_clouds():
    rng = np.random.default_rng(0)
    real = rng.standard_normal((200, 4))
    same = rng.standard_normal((200, 4))
    far = rng.standard_normal((200, 4)) + 20.0
    collapsed = rng.standard_normal((200, 4)) * 0.05  # high quality, poor coverage
    pr_same = precision_recall(real, same)
    assert pr_same["precision"] > 0.8 and pr_same["recall"] > 0.8
    assert precision_recall(real, far) == {"precision": 0.0, "recall": 0.0}
    pr_collapsed = precision_recall(real, collapsed)
    assert pr_collapsed["precision"] == 1.0 and pr_collapsed["recall"] < 0.2


class _CountingNetwork:
    """Stands in for InceptionFeatures in cache tests: mean pixel as a 1-d feature, calls counted."""
    digest = "counting-network"

    def __init__(self):
        self.calls = 0

    def __call__(self, images, batch_size=32, progress=True):
        self.calls += 1
        return np.array([[img.mean()] for img in images], dtype=np.float32)


def test_reference_features_are_cached_by_content(tmp_path):
    network = _CountingNetwork()
    a = images_from_array(np.arange(4 * 3 * 3, dtype=np.uint8).reshape(4, 3, 3))
    same_content = images_from_array(np.arange(4 * 3 * 3, dtype=np.uint8).reshape(4, 3, 3))
    other = images_from_array(np.arange(4 * 3 * 3, dtype=np.uint8).reshape(4, 3, 3)[::-1])
    first = cached_features(a, network, tmp_path)
    np.testing.assert_array_equal(cached_features(same_content, network, tmp_path), first)
    assert network.calls == 1 and len(list(tmp_path.glob("*.npy"))) == 1
    cached_features(other, network, tmp_path)
    assert network.calls == 2 and len(list(tmp_path.glob("*.npy"))) == 2
