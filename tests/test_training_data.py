"""Image loaders on generated files of the real formats, and the CNN partitions."""

import gzip
import pickle
import struct

import numpy as np
import pytest
import torch

from training.cnn_models import resnet20, vgg11_bn
from training.image_data import endless_image_batches, load_cifar10, load_fashion_mnist, read_idx


def write_idx(path, array: np.ndarray, compress: bool) -> None:
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(">" + "I" * array.ndim, *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if compress:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)


@pytest.mark.parametrize("compress", [True, False])
def test_fashion_mnist_loader_reads_idx_files(tmp_path, compress):
    rng = np.random.default_rng(0)
    images = {"train": rng.integers(0, 256, (12, 28, 28)), "t10k": rng.integers(0, 256, (5, 28, 28))}
    labels = {"train": rng.integers(0, 10, 12), "t10k": rng.integers(0, 10, 5)}
    for split in ("train", "t10k"):
        write_idx(tmp_path / f"{split}-images-idx3-ubyte", images[split], compress)
        write_idx(tmp_path / f"{split}-labels-idx1-ubyte", labels[split], compress)
    train, test = load_fashion_mnist(tmp_path)
    assert train.images.shape == (12, 1, 28, 28) and test.images.shape == (5, 1, 28, 28)
    assert train.labels.tolist() == labels["train"].tolist()
    # normalised per split, pixel order kept (a bright pixel stays brighter than a dark one)
    assert abs(float(train.images.mean())) < 1e-5
    flat = images["train"][3].ravel()
    lo, hi = int(flat.argmin()), int(flat.argmax())
    assert train.images[3, 0].ravel()[lo] < train.images[3, 0].ravel()[hi]


def test_idx_reader_rejects_truncated_and_foreign_files(tmp_path):
    bad = tmp_path / "bad"
    bad.write_bytes(struct.pack(">HBB", 0, 0x0D, 1) + struct.pack(">I", 3) + b"\0" * 12)
    with pytest.raises(ValueError):
        read_idx(bad)
    short = tmp_path / "short"
    short.write_bytes(struct.pack(">HBB", 0, 0x08, 1) + struct.pack(">I", 10) + b"\1" * 4)
    with pytest.raises(ValueError):
        read_idx(short)


def test_cifar10_loader_reads_pickled_batches(tmp_path):
    rng = np.random.default_rng(1)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    expected = []
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (4, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, 4).tolist()
        (folder / name).write_bytes(pickle.dumps({b"data": data, b"labels": labels, b"batch_label": name.encode()}))
        expected.append((data, labels))
    train, test = load_cifar10(folder)
    assert train.images.shape == (20, 3, 32, 32) and test.images.shape == (4, 3, 32, 32)
    assert train.labels.tolist() == sum((l for _, l in expected[:5]), [])
    assert test.labels.tolist() == expected[5][1]
    # rows are channel-major (R plane, G plane, B plane): the red plane of image 0 keeps its pixel order
    red = expected[0][0][0, :1024].reshape(32, 32)
    lo, hi = np.unravel_index(red.argmin(), red.shape), np.unravel_index(red.argmax(), red.shape)
    assert train.images[0, 0][lo] < train.images[0, 0][hi]


def test_cifar10_loader_names_a_wrong_folder(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_cifar10(tmp_path)


def test_batches_cover_an_epoch_without_repeats():
    from training.image_data import ImageSplit

    split = ImageSplit(torch.arange(10.0).view(10, 1, 1, 1), torch.arange(10))
    it = endless_image_batches(split, 5, seed=0)
    seen = torch.cat([next(it)[1], next(it)[1]])
    assert sorted(seen.tolist()) == list(range(10))


@pytest.mark.parametrize(("factory", "n_parts"), [(resnet20, 3), (vgg11_bn, 5)])
@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32)])
def test_cnn_rungs_classify_both_image_sizes(factory, n_parts, shape):
    torch.manual_seed(0)
    net = factory(in_channels=shape[0], width=0.25).eval()
    assert len(net) == n_parts
    outs = net.rung_outputs(torch.randn(2, *shape), list(range(n_parts)))
    assert all(outs[k].shape == (2, 10) for k in range(n_parts))
    sizes = [net.rung_parameters(k) for k in range(n_parts)]
    assert sizes == sorted(sizes) and sizes[0] < sizes[-1]
