"""The real loaders on tiny files in each dataset's true on-disk format, and device batching.

Only torchvision's md5 check is patched (as torchvision's own tests do): the
files are read by the real torchvision classes through `data.load_dataset`.
"""
import math
import os
import pickle
import struct

import numpy as np
import pytest
import scipy.io
import torch
import torchvision.datasets.cifar
import torchvision.datasets.mnist
import torchvision.datasets.svhn

from data import DataError, Split, balanced_subset, load_dataset
from data.batches import CROP_PADDING, Normalizer, TrainBatches, channel_stats, eval_batches, random_crop_flip

IMAGE_DATASETS = ("mnist", "fashionmnist", "cifar10", "cifar100", "svhn")


@pytest.fixture(autouse=True)
def no_md5(monkeypatch):
    """torchvision checks existence and md5; keep the existence check only."""
    def exists(fpath, md5=None):
        return os.path.isfile(fpath)
    for module in (torchvision.datasets.cifar, torchvision.datasets.mnist, torchvision.datasets.svhn):
        monkeypatch.setattr(module, "check_integrity", exists)


def random_images(seed, n, channels, size=None):
    size = size or (28 if channels == 1 else 32)
    return np.random.default_rng(seed).integers(0, 256, (n, channels, size, size), dtype=np.uint8)


# ---------------------------------------------------------------- format writers

def cifar_rows(images):
    """CIFAR's (N, 3072) rows: the R, G then B plane, each 32x32 row-major, written index by index."""
    n = images.shape[0]
    rows = np.zeros((n, 3072), dtype=np.uint8)
    for c in range(3):
        for r in range(32):
            for k in range(32):
                rows[:, c * 1024 + r * 32 + k] = images[:, c, r, k]
    return rows


def write_pickle(path, obj):
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def write_cifar10(root, train_batches, test_images, test_labels):
    """train_batches: five (images, labels) pairs -> data_batch_1..5."""
    folder = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(folder, exist_ok=True)
    for i, (images, labels) in enumerate(train_batches, start=1):
        write_pickle(os.path.join(folder, f"data_batch_{i}"),
                     {"batch_label": f"training batch {i} of 5", "data": cifar_rows(images),
                      "labels": list(map(int, labels)), "filenames": [f"{j}.png" for j in range(len(labels))]})
    write_pickle(os.path.join(folder, "test_batch"),
                 {"batch_label": "testing batch 1 of 1", "data": cifar_rows(test_images),
                  "labels": list(map(int, test_labels)), "filenames": [f"{j}.png" for j in range(len(test_labels))]})
    write_pickle(os.path.join(folder, "batches.meta"),
                 {"label_names": [f"class{c}" for c in range(10)], "num_cases_per_batch": 2, "num_vis": 3072})
    return folder


def write_cifar100(root, splits):
    """splits: {"train": (images, fine, coarse), "test": (...)}."""
    folder = os.path.join(root, "cifar-100-python")
    os.makedirs(folder, exist_ok=True)
    for name, (images, fine, coarse) in splits.items():
        write_pickle(os.path.join(folder, name),
                     {"batch_label": name, "data": cifar_rows(images), "fine_labels": list(map(int, fine)),
                      "coarse_labels": list(map(int, coarse)), "filenames": [f"{j}.png" for j in range(len(fine))]})
    write_pickle(os.path.join(folder, "meta"), {"fine_label_names": [f"fine{c}" for c in range(100)],
                                                "coarse_label_names": [f"coarse{c}" for c in range(20)]})
    return folder


def idx_bytes(array, magic):
    """IDX: big-endian magic (0x0000 0x08=uint8 ndim), big-endian int32 dims, then the bytes."""
    return struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def write_mnist(root, folder_name, train, test):
    """train/test: (images (N, 28, 28), labels) written as the four uncompressed IDX files."""
    raw = os.path.join(root, folder_name, "raw")
    os.makedirs(raw, exist_ok=True)
    for prefix, (images, labels) in (("train", train), ("t10k", test)):
        with open(os.path.join(raw, f"{prefix}-images-idx3-ubyte"), "wb") as f:
            f.write(idx_bytes(images.astype(np.uint8), 0x00000803))
        with open(os.path.join(raw, f"{prefix}-labels-idx1-ubyte"), "wb") as f:
            f.write(idx_bytes(labels.astype(np.uint8), 0x00000801))
    return raw


def write_svhn(root, splits):
    """splits: {"train": (X (32, 32, 3, N), y (N, 1) with 10 for digit 0), "test": ...}."""
    os.makedirs(root, exist_ok=True)
    for name, (X, y) in splits.items():
        scipy.io.savemat(os.path.join(root, f"{name}_32x32.mat"), {"X": X, "y": y})


# ---------------------------------------------------------------- CIFAR

def test_cifar10_reads_every_batch_pixels_and_labels(tmp_path):
    batches = [(random_images(i, 2, 3), np.array([i, (i + 3) % 10])) for i in range(5)]
    test_images = random_images(9, 3, 3)
    test_images[1] = 0
    test_images[1, 2, 5, 7] = 255  # blue channel, row 5, column 7
    write_cifar10(tmp_path, batches, test_images, [7, 8, 9])

    info, train, test = load_dataset("cifar10", str(tmp_path), download=False)

    assert (info.channels, info.image_size, info.num_classes) == (3, 32, 10)
    assert train.images.dtype == torch.uint8 and train.images.shape == (10, 3, 32, 32)
    assert test.images.shape == (3, 3, 32, 32)
    assert np.array_equal(train.images.numpy(), np.concatenate([b[0] for b in batches]))
    assert np.array_equal(test.images.numpy(), test_images)
    assert test.images[1, 2, 5, 7] == 255 and int(test.images[1].sum()) == 255
    assert train.labels.dtype == torch.int64
    assert train.labels.tolist() == [0, 3, 1, 4, 2, 5, 3, 6, 4, 7]
    assert test.labels.tolist() == [7, 8, 9]


def test_cifar10_row_layout_is_channel_planes_row_major(tmp_path):
    rows = np.zeros((1, 3072), dtype=np.uint8)
    rows[0, 1 * 1024 + 2 * 32 + 30] = 77  # green, row 2, column 30, written straight into the raw row
    folder = write_cifar10(tmp_path, [(random_images(i, 1, 3), [i]) for i in range(5)],
                           random_images(5, 1, 3), [0])
    write_pickle(os.path.join(folder, "test_batch"), {"data": rows, "labels": [4]})

    _, _, test = load_dataset("cifar10", str(tmp_path), download=False)

    assert test.images[0, 1, 2, 30] == 77 and int(test.images.sum()) == 77


def test_cifar100_uses_fine_labels(tmp_path):
    train_images, test_images = random_images(1, 4, 3), random_images(2, 3, 3)
    write_cifar100(tmp_path, {"train": (train_images, [0, 42, 99, 57], [0, 1, 19, 2]),
                              "test": (test_images, [13, 64, 1], [3, 4, 5])})

    info, train, test = load_dataset("cifar100", str(tmp_path), download=False)

    assert info.num_classes == 100
    assert train.labels.tolist() == [0, 42, 99, 57]
    assert test.labels.tolist() == [13, 64, 1]
    assert np.array_equal(train.images.numpy(), train_images)
    assert np.array_equal(test.images.numpy(), test_images)


# ---------------------------------------------------------------- MNIST and FashionMNIST

@pytest.mark.parametrize("name, folder", [("mnist", "MNIST"), ("fashionmnist", "FashionMNIST")])
def test_mnist_family_reads_idx_files(tmp_path, name, folder):
    train_images = random_images(3, 5, 1)[:, 0]
    test_images = np.zeros((2, 28, 28), dtype=np.uint8)
    test_images[1, 3, 20] = 201  # row 3, column 20
    write_mnist(tmp_path, folder, (train_images, np.array([5, 0, 4, 1, 9])), (test_images, np.array([7, 2])))

    info, train, test = load_dataset(name, str(tmp_path), download=False)

    assert (info.channels, info.image_size, info.num_classes) == (1, 28, 10)
    assert train.images.dtype == torch.uint8 and train.images.shape == (5, 1, 28, 28)
    assert test.images.shape == (2, 1, 28, 28)
    assert np.array_equal(train.images[:, 0].numpy(), train_images)
    assert test.images[1, 0, 3, 20] == 201 and int(test.images.sum()) == 201
    assert train.labels.tolist() == [5, 0, 4, 1, 9]
    assert test.labels.tolist() == [7, 2]


# ---------------------------------------------------------------- SVHN

def test_svhn_reads_mat_layout_and_maps_10_to_0(tmp_path):
    X_train = np.random.default_rng(4).integers(0, 256, (32, 32, 3, 4), dtype=np.uint8)
    X_test = np.zeros((32, 32, 3, 2), dtype=np.uint8)
    X_test[3, 20, 1, 1] = 200  # row 3, column 20, green, image 1
    write_svhn(tmp_path, {"train": (X_train, np.array([[10], [1], [9], [10]], dtype=np.uint8)),
                          "test": (X_test, np.array([[3], [10]], dtype=np.uint8))})

    info, train, test = load_dataset("svhn", str(tmp_path), download=False)

    assert (info.channels, info.image_size, info.num_classes) == (3, 32, 10)
    assert train.images.dtype == torch.uint8 and train.images.shape == (4, 3, 32, 32)
    assert np.array_equal(train.images.numpy(), X_train.transpose(3, 2, 0, 1))
    assert test.images[1, 1, 3, 20] == 200 and int(test.images.sum()) == 200
    assert train.labels.tolist() == [0, 1, 9, 0]
    assert test.labels.tolist() == [3, 0]


# ---------------------------------------------------------------- digits and subsets

def test_digits_split_is_stratified_75_25_and_fixed():
    info, train, test = load_dataset("digits", "unused", download=False)
    _, train_again, test_again = load_dataset("digits", "unused", download=False)

    assert (info.channels, info.image_size, info.num_classes) == (1, 8, 10)
    assert len(train) + len(test) == 1797
    assert abs(len(test) / 1797 - 0.25) < 0.005
    assert train.images.dtype == torch.uint8 and train.images.shape[1:] == (1, 8, 8)
    assert int(train.images.max()) == 255  # 4-bit 0..16 rescaled to 0..255
    total = torch.bincount(torch.cat([train.labels, test.labels]), minlength=10).double()
    test_share = torch.bincount(test.labels, minlength=10) / total
    assert torch.all((test_share - 0.25).abs() < 0.01)
    assert torch.equal(train.images, train_again.images) and torch.equal(train.labels, train_again.labels)
    assert torch.equal(test.images, test_again.images)


def test_digits_split_ignores_the_global_seed():
    torch.manual_seed(1)
    np.random.seed(1)
    _, train_a, _ = load_dataset("digits", "unused", download=False)
    torch.manual_seed(2)
    np.random.seed(2)
    _, train_b, _ = load_dataset("digits", "unused", download=False)
    assert torch.equal(train_a.labels, train_b.labels)


def test_balanced_subset_takes_first_per_class_in_file_order():
    labels = torch.tensor([2, 0, 1, 0, 2, 1, 0, 2, 1])
    split = Split(torch.arange(9, dtype=torch.uint8).view(9, 1, 1, 1), labels)

    subset = balanced_subset(split, 2, 3)

    assert subset.images.flatten().tolist() == [0, 1, 2, 3, 4, 5]
    assert subset.labels.tolist() == [2, 0, 1, 0, 2, 1]


def test_balanced_subset_refuses_a_short_class():
    split = Split(torch.zeros(3, 1, 1, 1, dtype=torch.uint8), torch.tensor([0, 0, 1]))
    with pytest.raises(DataError, match="class 1 has only 1"):
        balanced_subset(split, 2, 2)


# ---------------------------------------------------------------- missing and corrupt files

@pytest.mark.parametrize("name", IMAGE_DATASETS)
def test_missing_data_names_download_and_data_dir(tmp_path, name):
    data_dir = str(tmp_path / "nothing-here")
    with pytest.raises(DataError) as caught:
        load_dataset(name, data_dir, download=False)
    message = str(caught.value)
    assert "--download" in message and data_dir in message and "\n" not in message


def test_failed_download_is_reported_as_a_download_failure(tmp_path, monkeypatch):
    from urllib.error import URLError

    def offline(*args, **kwargs):
        raise URLError("no network")
    monkeypatch.setattr(torchvision.datasets.cifar, "download_and_extract_archive", offline)
    with pytest.raises(DataError, match="download") as caught:
        load_dataset("cifar10", str(tmp_path), download=True)
    assert "corrupt" not in str(caught.value)


def assert_one_line_data_error(name, data_dir):
    with pytest.raises(DataError) as caught:
        load_dataset(name, data_dir, download=False)
    message = str(caught.value)
    assert message and "\n" not in message and data_dir in message
    return message


def tiny_cifar10(root):
    return write_cifar10(root, [(random_images(i, 1, 3), [i]) for i in range(5)], random_images(5, 1, 3), [0])


def test_truncated_cifar_batch_is_a_data_error(tmp_path):
    path = os.path.join(tiny_cifar10(tmp_path), "data_batch_3")
    content = open(path, "rb").read()
    open(path, "wb").write(content[:len(content) // 2])
    assert "corrupt" in assert_one_line_data_error("cifar10", str(tmp_path))


def test_cifar_batch_of_the_wrong_size_is_a_data_error(tmp_path):
    folder = tiny_cifar10(tmp_path)
    write_pickle(os.path.join(folder, "test_batch"), {"data": np.zeros((1, 1000), np.uint8), "labels": [0]})
    assert_one_line_data_error("cifar10", str(tmp_path))


def test_cifar_labels_out_of_range_are_a_data_error(tmp_path):
    write_cifar10(tmp_path, [(random_images(i, 1, 3), [i]) for i in range(5)], random_images(5, 1, 3), [10])
    assert "labels outside" in assert_one_line_data_error("cifar10", str(tmp_path))


def test_cifar_missing_one_batch_is_a_data_error(tmp_path):
    os.remove(os.path.join(tiny_cifar10(tmp_path), "data_batch_5"))
    assert "--download" in assert_one_line_data_error("cifar10", str(tmp_path))


def tiny_mnist(root):
    images = np.zeros((2, 28, 28), np.uint8)
    return write_mnist(root, "MNIST", (images, np.array([0, 1])), (images, np.array([1, 0])))


def test_wrong_idx_magic_is_a_data_error(tmp_path):
    path = os.path.join(tiny_mnist(tmp_path), "train-images-idx3-ubyte")
    content = open(path, "rb").read()
    open(path, "wb").write(struct.pack(">I", 0x12345678) + content[4:])
    assert "corrupt" in assert_one_line_data_error("mnist", str(tmp_path))


def test_idx_labels_of_the_wrong_dtype_are_a_data_error(tmp_path):
    path = os.path.join(tiny_mnist(tmp_path), "train-labels-idx1-ubyte")
    open(path, "wb").write(idx_bytes(np.array([0, 1], dtype=">i4"), 0x00000C01))  # int32 labels
    assert_one_line_data_error("mnist", str(tmp_path))


def test_truncated_idx_images_are_a_data_error(tmp_path):
    path = os.path.join(tiny_mnist(tmp_path), "t10k-images-idx3-ubyte")
    content = open(path, "rb").read()
    open(path, "wb").write(content[:100])
    assert_one_line_data_error("mnist", str(tmp_path))


def test_idx_images_of_the_wrong_size_are_a_data_error(tmp_path):
    raw = tiny_mnist(tmp_path)
    with open(os.path.join(raw, "train-images-idx3-ubyte"), "wb") as f:
        f.write(idx_bytes(np.zeros((2, 8, 8), np.uint8), 0x00000803))
    assert "shape" in assert_one_line_data_error("mnist", str(tmp_path))


@pytest.mark.parametrize("content", [b"", b"not a mat file at all" * 20, None], ids=["empty", "garbage", "truncated"])
def test_unreadable_svhn_mat_is_a_data_error(tmp_path, content):
    X = np.zeros((32, 32, 3, 2), np.uint8)
    write_svhn(tmp_path, {"train": (X, np.array([[1], [2]])), "test": (X, np.array([[1], [2]]))})
    path = os.path.join(tmp_path, "train_32x32.mat")
    if content is None:
        content = open(path, "rb").read()[:300]
    open(path, "wb").write(content)
    assert "corrupt" in assert_one_line_data_error("svhn", str(tmp_path))


def test_svhn_mat_without_images_is_a_data_error(tmp_path):
    X = np.zeros((32, 32, 3, 2), np.uint8)
    write_svhn(tmp_path, {"train": (X, np.array([[1], [2]])), "test": (X, np.array([[1], [2]]))})
    scipy.io.savemat(os.path.join(tmp_path, "test_32x32.mat"), {"y": np.array([[1]])})
    assert_one_line_data_error("svhn", str(tmp_path))


# ---------------------------------------------------------------- device batching

def identity_normalizer(channels=1):
    return Normalizer(torch.zeros(channels), torch.ones(channels), "cpu", channels_last=False)


def make_batches(n, batch_size, seed, augment=False, drop_last=False, channels=1, size=4):
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, channels, size, size).contiguous()
    generator = torch.Generator().manual_seed(seed)
    return TrainBatches(images, torch.arange(n), batch_size, identity_normalizer(channels), generator,
                        augment=augment, drop_last=drop_last)


def test_train_batches_cover_every_sample_once_per_epoch():
    batches = make_batches(23, 5, seed=0)
    assert len(batches) == 5
    for _ in range(2):
        seen = []
        shapes = []
        for x, y in batches:
            assert x.dtype == torch.float32
            assert torch.equal(x[:, 0, 0, 0].long(), y)  # each image stays with its label
            shapes.append(tuple(x.shape))
            seen += y.tolist()
        assert sorted(seen) == list(range(23))
        assert shapes == [(5, 1, 4, 4)] * 4 + [(3, 1, 4, 4)]
    assert seen != list(range(23))  # shuffled


def test_train_batches_drop_last_keeps_full_batches():
    batches = make_batches(23, 5, seed=0, drop_last=True)
    shapes = [tuple(x.shape) for x, _ in batches]
    assert len(batches) == 4 and shapes == [(5, 1, 4, 4)] * 4


@pytest.mark.parametrize("n, drop_last, sizes", [
    (21, False, [5] * 4),      # a remainder of one sample is dropped: batch norm cannot train on it
    (22, False, [5] * 4 + [2]),  # a remainder of two is kept
    (22, True, [5] * 4),
    (20, False, [5] * 4),
])
def test_train_batches_drop_a_last_batch_of_one_sample(n, drop_last, sizes):
    batches = make_batches(n, 5, seed=0, drop_last=drop_last)
    labels = [y for _, y in batches]
    assert len(batches) == len(sizes) and [len(y) for y in labels] == sizes
    assert len(set(torch.cat(labels).tolist())) == sum(sizes)  # distinct samples of the epoch's order


def test_train_batches_order_depends_only_on_the_seed():
    def epoch_orders(seed):
        batches = make_batches(30, 7, seed=seed)
        return [torch.cat([y for _, y in batches]).tolist() for _ in range(2)]
    first, again, other = epoch_orders(3), epoch_orders(3), epoch_orders(4)
    assert first == again
    assert first[0] != first[1]  # a new order every epoch
    assert first != other


def test_eval_batches_are_clean_and_in_order():
    images = torch.arange(7, dtype=torch.uint8).view(7, 1, 1, 1).expand(7, 1, 3, 3).contiguous()
    normalize = Normalizer(torch.tensor([1.0]), torch.tensor([2.0]), "cpu", channels_last=False)
    batches = list(eval_batches(images, torch.arange(7), 3, normalize))
    assert [tuple(x.shape) for x, _ in batches] == [(3, 1, 3, 3), (3, 1, 3, 3), (1, 1, 3, 3)]
    assert torch.cat([y for _, y in batches]).tolist() == list(range(7))
    values = torch.cat([x for x, _ in batches])
    assert torch.equal(values, (images.float() - 1.0) / 2.0)


def crop_offsets(image, padded, padding):
    """Every (dy, dx, flipped) at which `image` is a (flipped) crop of `padded`."""
    _, H, W = image.shape
    found = []
    for dy in range(2 * padding + 1):
        for dx in range(2 * padding + 1):
            crop = padded[:, dy:dy + H, dx:dx + W]
            found += [(dy, dx, flip) for flip in (False, True) if torch.equal(image, crop.flip(-1) if flip else crop)]
    return found


def test_random_crop_flip_is_a_crop_of_the_padded_image():
    images = torch.randint(1, 256, (64, 3, 6, 5), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    out = random_crop_flip(images, torch.Generator().manual_seed(1))
    assert out.shape == images.shape and out.dtype == torch.uint8
    padded = torch.nn.functional.pad(images, (CROP_PADDING,) * 4)
    found = [crop_offsets(out[i], padded[i], CROP_PADDING) for i in range(images.shape[0])]
    assert all(found), "every output is a (flipped) crop of its own zero-padded input"
    flips = sum(f[0][2] for f in found)
    assert 0 < flips < images.shape[0]  # both flipped and unflipped crops occur
    assert len({f[0][:2] for f in found}) > 10  # offsets vary across images


def test_augmented_batches_are_reproducible_for_a_seed():
    def epoch(seed):
        return [x for x, _ in make_batches(20, 8, seed=seed, augment=True, channels=3, size=8)]
    assert all(torch.equal(a, b) for a, b in zip(epoch(5), epoch(5)))


def test_channel_stats_normalise_train_data_to_zero_mean_unit_std():
    generator = torch.Generator().manual_seed(0)
    images = torch.stack([torch.randint(0, 50, (40, 6, 6), generator=generator),
                          torch.randint(100, 256, (40, 6, 6), generator=generator),
                          torch.full((40, 6, 6), 7)], dim=1).to(torch.uint8)
    mean, std = channel_stats(images)

    expected = images.double().transpose(0, 1).reshape(3, -1)
    assert torch.allclose(mean, expected.mean(dim=1))
    assert torch.allclose(std[:2], expected[:2].std(dim=1))
    assert std[2] == 1  # a constant channel is centred, not divided by zero

    x = Normalizer(mean, std, "cpu", channels_last=False)(images)
    per_channel = x.transpose(0, 1).reshape(3, -1).double()
    assert torch.allclose(per_channel.mean(dim=1), torch.zeros(3, dtype=torch.float64), atol=1e-5)
    assert torch.allclose(per_channel[:2].std(dim=1), torch.ones(2, dtype=torch.float64), atol=1e-5)
    assert torch.all(per_channel[2] == 0)


def test_normalizer_channels_last_keeps_values():
    images = torch.randint(0, 256, (2, 3, 5, 5), dtype=torch.uint8)
    mean, std = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([2.0, 4.0, 8.0])
    plain = Normalizer(mean, std, "cpu", channels_last=False)(images)
    last = Normalizer(mean, std, "cpu", channels_last=True)(images)
    assert last.is_contiguous(memory_format=torch.channels_last)
    assert plain.is_contiguous() and not plain.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(plain, last)
    assert torch.allclose(plain[1, 2], (images[1, 2].float() - 3.0) / 8.0)


def test_channel_stats_keep_a_std_below_one():
    # Half zeros, half ones: std sqrt(n / (4 (n - 1))) < 1, a real spread that must not become 1.
    images = torch.zeros(10, 2, 2, 2, dtype=torch.uint8)
    images[:5] = 1
    images[:, 1] = torch.arange(40, dtype=torch.uint8).view(10, 2, 2) * 3  # a wide second channel
    mean, std = channel_stats(images)
    n = 10 * 2 * 2
    assert mean[0] == 0.5 and std[0] == pytest.approx(math.sqrt(n / (4 * (n - 1))), rel=1e-14)
    values = 3 * torch.arange(40, dtype=torch.float64)
    assert mean[1] == pytest.approx(values.mean().item()) and std[1] == pytest.approx(values.std().item())


def test_random_crop_offsets_cover_zero_to_twice_the_padding():
    images = torch.randint(1, 256, (300, 1, 6, 5), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    out = random_crop_flip(images, torch.Generator().manual_seed(3), padding=2)
    padded = torch.nn.functional.pad(images, (2,) * 4)
    found = [crop_offsets(out[i], padded[i], 2) for i in range(images.shape[0])]
    assert all(len(f) == 1 for f in found)  # nonzero pixels: a crop's offset is unambiguous
    assert {f[0][0] for f in found} == set(range(5)) and {f[0][1] for f in found} == set(range(5))


# ---------------------------------------------------------------- every tensor on the images' device

# With the default device set to 'meta' (no data), a tensor made without the images' device fails the
# first operation that meets a CPU tensor, or shows in the outputs' .device (otherwise only a run on a
# GPU, such as bench/gpu_check.sh's, would show such a slip).
DEFAULT_ELSEWHERE = "meta"


def test_batching_makes_no_tensor_on_the_default_device():
    images = torch.randint(1, 256, (12, 2, 6, 5), dtype=torch.uint8, generator=torch.Generator().manual_seed(4))
    labels = torch.arange(12)
    generators = [torch.Generator().manual_seed(5) for _ in range(2)]
    with torch.device(DEFAULT_ELSEWHERE):
        mean, std = channel_stats(images)
        normalize = Normalizer(mean, std, "cpu", channels_last=False)
        crops = random_crop_flip(images, generators[0])
        batches = list(TrainBatches(images, labels, 5, normalize, generators[1], augment=True, drop_last=False))
        clean = list(eval_batches(images, labels, 5, normalize))
    flat = images.transpose(0, 1).reshape(2, -1).double()
    assert mean.device.type == std.device.type == "cpu"
    torch.testing.assert_close(mean, flat.mean(dim=1), rtol=1e-14, atol=0)
    torch.testing.assert_close(std, flat.std(dim=1), rtol=1e-14, atol=0)
    padded = torch.nn.functional.pad(images, (CROP_PADDING,) * 4)
    assert crops.device.type == "cpu" and all(crop_offsets(crops[i], padded[i], CROP_PADDING) for i in range(12))
    assert all(x.device.type == y.device.type == "cpu" for x, y in batches + clean)
    assert sorted(torch.cat([y for _, y in batches]).tolist()) == list(range(12))
    expected = (images.float() - mean.float().view(1, -1, 1, 1)) / std.float().view(1, -1, 1, 1)
    torch.testing.assert_close(torch.cat([x for x, _ in clean]), expected, rtol=1e-6, atol=1e-6)


def test_normalizer_moves_its_statistics_to_the_given_device():
    normalize = Normalizer(torch.tensor([1.0, 2.0]), torch.tensor([4.0, 8.0]), DEFAULT_ELSEWHERE, channels_last=False)
    assert normalize.mean.device.type == normalize.inv_std.device.type == DEFAULT_ELSEWHERE
    assert normalize.mean.shape == normalize.inv_std.shape == (1, 2, 1, 1)
