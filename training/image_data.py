"""Image datasets for the CNN experiments, read from their original file formats.

Fashion-MNIST: the idx files (gzipped or not) as shipped by Debian `dataset-fashion-mnist`.
CIFAR-10: the `cifar-10-batches-py` folder (pickled batches) from a path the user gives; no
package reachable here ships it.
"""

from __future__ import annotations

import gzip
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")


@dataclass
class ImageSplit:
    images: torch.Tensor  # float32 [N, C, H, W], normalised per channel
    labels: torch.Tensor  # int64 [N]


def _open(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def read_idx(path: Path) -> np.ndarray:
    """An idx file: magic (0, 0, dtype 0x08 = uint8, ndim), big-endian dims, then the data."""
    with _open(path) as f:
        zero, dtype, ndim = struct.unpack(">HBB", f.read(4))
        if zero != 0 or dtype != 0x08:
            raise ValueError(f"{path} is not a uint8 idx file")
        shape = struct.unpack(">" + "I" * ndim, f.read(4 * ndim))
        data = np.frombuffer(f.read(), dtype=np.uint8)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{path}: expected {shape} values, found {data.size}")
    return data.reshape(shape)


def _find(folder: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(f"{stem}[.gz] not in {folder} (apt-get install dataset-fashion-mnist)")


def _normalise(images: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(images.astype(np.float32) / 255.0)
    mean = x.mean(dim=(0, 2, 3), keepdim=True)
    std = x.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
    return (x - mean) / std


def load_fashion_mnist(folder: Path = FASHION_MNIST_DIR) -> tuple[ImageSplit, ImageSplit]:
    """(train, test) with images [N, 1, 28, 28]."""
    splits = []
    for prefix in ("train", "t10k"):
        images = read_idx(_find(folder, f"{prefix}-images-idx3-ubyte"))[:, None]
        labels = read_idx(_find(folder, f"{prefix}-labels-idx1-ubyte"))
        splits.append(ImageSplit(_normalise(images), torch.from_numpy(labels.astype(np.int64))))
    return splits[0], splits[1]


def _cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with open(path, "rb") as f:
        entry = pickle.load(f, encoding="bytes")
    data = np.asarray(entry[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
    return data, np.asarray(entry[b"labels"], dtype=np.int64)


def load_cifar10(folder: Path) -> tuple[ImageSplit, ImageSplit]:
    """(train, test) from a `cifar-10-batches-py` folder: data_batch_1..5 and test_batch."""
    folder = Path(folder)
    train_files = sorted(folder.glob("data_batch_*"))
    if not train_files or not (folder / "test_batch").is_file():
        raise FileNotFoundError(f"{folder} is not a cifar-10-batches-py folder")
    parts = [_cifar_batch(p) for p in train_files]
    test_x, test_y = _cifar_batch(folder / "test_batch")
    train_x = np.concatenate([x for x, _ in parts])
    train_y = np.concatenate([y for _, y in parts])
    both = _normalise(np.concatenate([train_x, test_x]))  # one set of statistics for both splits
    n = len(train_x)
    return (ImageSplit(both[:n], torch.from_numpy(train_y)), ImageSplit(both[n:], torch.from_numpy(test_y)))


def endless_image_batches(split: ImageSplit, batch_size: int, seed: int = 0):
    """(images, labels) forever, reshuffled every epoch."""
    gen = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(split.labels), generator=gen)
        for first in range(0, len(order) - batch_size + 1, batch_size):
            idx = order[first : first + batch_size]
            yield split.images[idx], split.labels[idx]
