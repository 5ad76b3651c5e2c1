"""Reading each dataset from its on-disk format into (N, C, H, W) uint8 tensors."""
from __future__ import annotations

import importlib
import os
import pickle
from dataclasses import dataclass
from typing import Callable, Dict, Tuple

import numpy as np
import torch

# digits' split is fixed (independent of --seed) so that runs stay comparable.
DIGITS_SPLIT_SEED = 0
DIGITS_TEST_FRACTION = 0.25
DIGITS_MAX_VALUE = 16  # scikit-learn's digits are 4-bit intensities 0..16


class DataError(Exception):
    """The dataset is missing, corrupt or cannot be subset as asked; the message is one line."""


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    channels: int
    image_size: int
    num_classes: int
    augment_by_default: bool  # random crop + flip, as in the usual CIFAR/SVHN recipes


@dataclass
class Split:
    images: torch.Tensor  # (N, C, H, W) uint8
    labels: torch.Tensor  # (N,) int64

    def __len__(self) -> int:
        return self.labels.shape[0]

    def to(self, device) -> "Split":
        return Split(self.images.to(device), self.labels.to(device))


def _digits(data_dir: str, download: bool) -> Tuple[Split, Split]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = np.rint(digits.images * (255.0 / DIGITS_MAX_VALUE)).astype(np.uint8)[:, None]
    x_train, x_test, y_train, y_test = train_test_split(
        images, digits.target, test_size=DIGITS_TEST_FRACTION, stratify=digits.target,
        random_state=DIGITS_SPLIT_SEED)
    return _split(x_train, y_train), _split(x_test, y_test)


def _torchvision(cls_name: str, layout: str, split_kwargs: Tuple[dict, dict], label_attr: str = "targets"):
    """A loader over a torchvision dataset class; `layout` names its array axes."""
    def load(data_dir: str, download: bool) -> Tuple[Split, Split]:
        import torchvision.datasets as tvd

        cls = getattr(tvd, cls_name)
        splits = []
        for kwargs in split_kwargs:
            dataset = cls(root=data_dir, download=download, **kwargs)
            images = np.asarray(dataset.data)
            if layout == "NHW":
                images = images[:, None]
            elif layout == "NHWC":
                images = images.transpose(0, 3, 1, 2)
            splits.append(_split(images, np.asarray(getattr(dataset, label_attr))))
        return tuple(splits)
    return load


def _split(images: np.ndarray, labels: np.ndarray) -> Split:
    return Split(torch.from_numpy(np.ascontiguousarray(images, dtype=np.uint8)),
                 torch.from_numpy(np.asarray(labels, dtype=np.int64)))


# name -> (info, loader, files whose presence means "downloaded", relative to --data-dir)
DATASETS: Dict[str, Tuple[DatasetInfo, Callable, Tuple[str, ...]]] = {
    "digits": (DatasetInfo("digits", 1, 8, 10, False), _digits, ()),
    "mnist": (DatasetInfo("mnist", 1, 28, 10, False),
              _torchvision("MNIST", "NHW", ({"train": True}, {"train": False})), ("MNIST",)),
    "fashionmnist": (DatasetInfo("fashionmnist", 1, 28, 10, False),
                     _torchvision("FashionMNIST", "NHW", ({"train": True}, {"train": False})), ("FashionMNIST",)),
    "cifar10": (DatasetInfo("cifar10", 3, 32, 10, True),
                _torchvision("CIFAR10", "NHWC", ({"train": True}, {"train": False})), ("cifar-10-batches-py",)),
    "cifar100": (DatasetInfo("cifar100", 3, 32, 100, True),
                 _torchvision("CIFAR100", "NHWC", ({"train": True}, {"train": False})), ("cifar-100-python",)),
    "svhn": (DatasetInfo("svhn", 3, 32, 10, True),
             _torchvision("SVHN", "NCHW", ({"split": "train"}, {"split": "test"}), label_attr="labels"),
             ("train_32x32.mat", "test_32x32.mat")),
}


# Packages each dataset's loader imports: (module, the name pip installs it by).
TORCHVISION = ("torchvision", "torchvision")
REQUIRED_PACKAGES = {"digits": (("sklearn", "scikit-learn"),), "svhn": (TORCHVISION, ("scipy", "scipy"))}


def _require_packages(name: str) -> None:
    """Import the loader's packages first, so that a missing one is named as such, not taken for missing data."""
    for module, pip_name in REQUIRED_PACKAGES.get(name, (TORCHVISION,)):
        try:
            importlib.import_module(module)
        except ImportError as error:
            raise DataError(f"{name} needs the Python package {pip_name}, which cannot be imported "
                            f"({_one_line(error)}); install it: pip install -r requirements.txt") from None


# What reading a missing, truncated or foreign file raises inside torchvision, pickle,
# scipy.io or torch.frombuffer (a garbage pickle alone can raise most of these).
READ_ERRORS = (RuntimeError, OSError, EOFError, ValueError, KeyError, IndexError, TypeError,
               AttributeError, ImportError, AssertionError, pickle.UnpicklingError)


def _read_errors() -> tuple:
    try:
        from scipy.io.matlab import MatReadError  # SVHN's .mat files; not an OSError/ValueError
    except ImportError:
        return READ_ERRORS
    return READ_ERRORS + (MatReadError,)


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def load_dataset(name: str, data_dir: str, download: bool) -> Tuple[DatasetInfo, Split, Split]:
    """Read both splits on the CPU; raise DataError with one line if that fails."""
    info, loader, markers = DATASETS[name]
    _require_packages(name)
    present = [m for m in markers if os.path.exists(os.path.join(data_dir, m))]
    try:
        train, test = loader(data_dir, download)
    except _read_errors() as error:
        reason = _one_line(error)
        if not markers:  # bundled with a package: there is nothing to download
            raise DataError(f"{name} could not be loaded ({reason})") from None
        if download:
            raise DataError(f"{name}: download or check under --data-dir {data_dir!r} failed ({reason})") from None
        if not present:
            raise DataError(f"{name} is not under --data-dir {data_dir!r}; add --download to fetch it") from None
        raise DataError(f"{name} files under --data-dir {data_dir!r} are corrupt or unreadable ({reason}); "
                        f"delete {', '.join(present)} and rerun with --download") from None
    problem = _shape_problem(info, train, test) or _label_problem(info.num_classes, train, test)
    if problem:
        raise DataError(f"{name} files under --data-dir {data_dir!r} are corrupt ({problem}); "
                        f"delete {', '.join(present) or 'them'} and rerun with --download")
    return info, train, test


def _shape_problem(info: DatasetInfo, *splits) -> str:
    expected = (info.channels, info.image_size, info.image_size)
    for split in splits:
        if tuple(split.images.shape[1:]) != expected or split.images.shape[0] != split.labels.shape[0]:
            return (f"images of shape {tuple(split.images.shape)} with {split.labels.shape[0]} labels, "
                    f"expected (N, {', '.join(map(str, expected))})")
    return ""


def _label_problem(num_classes: int, *splits) -> str:
    for split in splits:
        if len(split) and (split.labels.min() < 0 or split.labels.max() >= num_classes):
            return f"labels outside 0..{num_classes - 1}"
    return ""


def balanced_subset(split: Split, per_class: int, num_classes: int) -> Split:
    """The first `per_class` samples of every class, in file order (seed-independent)."""
    chosen = []
    for c in range(num_classes):
        index = torch.nonzero(split.labels == c).flatten()
        if index.numel() < per_class:
            raise DataError(f"--samples-per-class {per_class}: class {c} has only {index.numel()} training samples")
        chosen.append(index[:per_class])
    keep = torch.cat(chosen).sort().values
    return Split(split.images[keep], split.labels[keep])
