"""MNIST from the raw IDX files (gzip) for the seeds' experiments: no torchvision needed.

Images are padded from 28x28 to 32x32 with black borders (the smallest size the models
take; padding keeps the strokes exactly as drawn) and returned as uint8 (N, 32, 32, 1).
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np

MNIST_DIR = Path(os.environ.get("GANSPECT_MNIST", "/work/shared/data/mnist"))


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    magic = int.from_bytes(data[:4], "big")
    ndim = magic & 0xFF
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def load_mnist(split: str, root: Path = MNIST_DIR) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N, 32, 32, 1), labels int64 (N,)) of split "train" (60,000) or "test" (10,000)."""
    prefix = {"train": "train", "test": "t10k"}[split]
    images = _read_idx(root / f"{prefix}-images-idx3-ubyte.gz")
    labels = _read_idx(root / f"{prefix}-labels-idx1-ubyte.gz").astype(np.int64)
    padded = np.zeros((len(images), 32, 32, 1), dtype=np.uint8)
    padded[:, 2:30, 2:30, 0] = images
    return padded, labels


def load_all_mnist(root: Path = MNIST_DIR) -> tuple[np.ndarray, np.ndarray]:
    """All 70,000 images (train then test), for protocols that make their own split."""
    xa, ya = load_mnist("train", root)
    xb, yb = load_mnist("test", root)
    return np.concatenate([xa, xb]), np.concatenate([ya, yb])
