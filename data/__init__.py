"""Dataset registry: name -> uint8 image tensors + labels, and device-side batching.

`load_dataset` reads a dataset through torchvision (or scikit-learn for the
bundled digits) into CPU tensors; `data.batches` keeps them on the training
device and does shuffling, crop/flip and normalisation there.
"""
from .sources import DATASETS, DataError, DatasetInfo, Split, balanced_subset, load_dataset

__all__ = ["DATASETS", "DataError", "DatasetInfo", "Split", "balanced_subset", "load_dataset"]
