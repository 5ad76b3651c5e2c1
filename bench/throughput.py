"""Images per second of the project's training epoch and NC pass, against the classic loop.

The classic loop is what most training scripts do: a torchvision Dataset with
PIL transforms, a DataLoader with worker processes, fp32, mixup on the batch,
and `.item()` after every step. Both sides train the same model on the same
data shape with the same batch size. Real data are used when present under
--data-dir, otherwise synthetic uint8 images of the dataset's shape.

    python bench/throughput.py --model resnet18 --dataset cifar10 --device cuda
    python bench/throughput.py --model resnet18 --width 0.125 --num-train 2048 --device cpu

The last line is `speedup: X`, project images/s over classic images/s.
"""
from __future__ import annotations

import argparse
import os
import resource
import sys
import time
import warnings

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cli import parse_args  # noqa: E402
from data import DATASETS, DataError, Split, load_dataset  # noqa: E402
from data.batches import channel_stats  # noqa: E402
from distributed import DistContext  # noqa: E402
from main import build_run, configure_backends, resolve_defaults, resolve_device  # noqa: E402
from models import build_model  # noqa: E402
from train import measure, train_one_epoch  # noqa: E402

SYNTHETIC_TEST_FRACTION = 0.2  # test split size relative to the training split, like CIFAR's 10k/50k
CROP_PADDING = 4
# Training-split sizes, for synthetic stand-ins of the real data.
TRAIN_SIZES = {"digits": 1347, "mnist": 60000, "fashionmnist": 60000, "cifar10": 50000, "cifar100": 50000,
               "svhn": 73257}


def parse_flags(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", default="resnet18", metavar="NAME", help="registry model")
    parser.add_argument("--width", type=float, default=1.0, metavar="X", help="channel multiplier")
    parser.add_argument("--dataset", default="cifar10", choices=sorted(DATASETS), metavar="NAME",
                        help="dataset whose shape (and data, if present) is used")
    parser.add_argument("--data-dir", default="./data", metavar="DIR", help="where real data would be")
    parser.add_argument("--num-train", type=int, default=None, metavar="N",
                        help="training images per epoch (default: the dataset's size, 50000 for CIFAR)")
    parser.add_argument("--batch-size", type=int, default=128, metavar="B", help="batch size of both loops")
    parser.add_argument("--device", default="auto", metavar="DEV", help="auto, cpu or cuda[:N]")
    parser.add_argument("--workers", type=int, default=None, metavar="W",
                        help="DataLoader workers of the classic loop (default: CPU count, at most 8)")
    parser.add_argument("--epochs", type=int, default=2, metavar="E",
                        help="timed epochs of each loop, after one warm-up epoch")
    parser.add_argument("--classic-steps", type=int, default=None, metavar="S",
                        help="time only S steps of the classic loop (it is slow); images/s is unaffected")
    parser.add_argument("--compile", action="store_true", help="torch.compile the project's training step")
    parser.add_argument("--compile-mode", default="reduce-overhead", metavar="MODE",
                        help="torch.compile mode: default, reduce-overhead (CUDA graphs) or max-autotune")
    parser.add_argument("--no-amp", action="store_true", help="fp32 for the project's loop too")
    parser.add_argument("--no-classic", action="store_true",
                        help="time only the project's loop (e.g. to estimate epoch times of a sweep)")
    parser.add_argument("--check-syncs", action="store_true",
                        help="CUDA only: run one more project epoch under torch.cuda.set_sync_debug_mode and "
                             "report every host sync it makes")
    return parser.parse_args(argv)


def bench_data(flags):
    """(train, test, source): real splits when present, else synthetic ones of the same shape."""
    info = DATASETS[flags.dataset][0]
    n = flags.num_train or TRAIN_SIZES[flags.dataset]
    try:
        _, train, test = load_dataset(flags.dataset, flags.data_dir, download=False)
        return Split(train.images[:n], train.labels[:n]), test, "real"
    except DataError:
        generator = torch.Generator().manual_seed(0)
        def synthetic(count):
            images = torch.randint(0, 256, (count, info.channels, info.image_size, info.image_size),
                                   dtype=torch.uint8, generator=generator)
            return Split(images, torch.arange(count) % info.num_classes)
        return synthetic(n), synthetic(max(info.num_classes, int(n * SYNTHETIC_TEST_FRACTION))), "synthetic"


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device) -> float:
    """Peak GPU memory since the last reset, or the process's peak RSS on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def project_run(flags, train, test, device):
    argv = ["--dataset", flags.dataset, "--model", flags.model, "--width", str(flags.width),
            "--batch-size", str(flags.batch_size), "--epochs", str(flags.epochs + 1), "--no-progress",
            "--device", str(device), "--feature-epochs", "0"]
    argv += ["--compile", "--compile-mode", flags.compile_mode] if flags.compile else []
    argv += ["--no-amp"] if flags.no_amp else []
    args = parse_args(argv)
    info = DATASETS[flags.dataset][0]
    resolve_defaults(args, info, device)
    configure_backends(args, device)  # cudnn autotuning, as main.py sets it (a global flag: the classic loop gets it too)
    return build_run(args, info, train, test, device, DistContext())


def time_project(run, flags, device):
    """(training images/s, NC-pass images/s, seconds per epoch, seconds per NC pass)."""
    train_one_epoch(run, 0)  # warm-up: cudnn autotuning, compilation, allocator
    synchronize(device)
    start = time.perf_counter()
    for epoch in range(flags.epochs):
        train_one_epoch(run, epoch + 1)
    synchronize(device)
    epoch_s = (time.perf_counter() - start) / flags.epochs
    measure(run, with_nc=True)  # warm-up of the inference shapes
    synchronize(device)
    start = time.perf_counter()
    measure(run, with_nc=True)
    synchronize(device)
    nc_s = time.perf_counter() - start
    images = sum(len(split) for split in run.eval_splits.values())
    return len(run.batches.labels) / epoch_s, images / nc_s, epoch_s, nc_s


class ClassicDataset(torch.utils.data.Dataset):
    """A torchvision-style dataset: HWC uint8 arrays, PIL images, per-image transforms."""

    def __init__(self, split: Split, transform):
        self.images = split.images.permute(0, 2, 3, 1).numpy()
        self.labels = split.labels.numpy()
        self.transform = transform

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        from PIL import Image

        image = self.images[index]
        image = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
        return self.transform(image), int(self.labels[index])


def count_host_syncs(run) -> list:
    """Messages of the host syncs one training epoch makes (CUDA's sync debug mode)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            train_one_epoch(run, 0)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    messages = [str(w.message).splitlines()[0] for w in caught]
    # the mode announces itself once ("... is a prototype feature ..."); that notice is no sync
    return [m for m in messages if "synchroniz" in m and "prototype feature" not in m]


def classic_loader(split: Split, flags, augment: bool):
    import torchvision.transforms as T

    mean, std = (stat / 255 for stat in channel_stats(split.images))  # ToTensor scales to [0, 1]
    mean, std = mean.tolist(), std.tolist()
    size = split.images.shape[-1]
    steps = [T.RandomCrop(size, padding=CROP_PADDING), T.RandomHorizontalFlip()] if augment else []
    transform = T.Compose([*steps, T.ToTensor(), T.Normalize(mean, std)])
    workers = flags.workers if flags.workers is not None else min(8, os.cpu_count() or 1)
    return torch.utils.data.DataLoader(ClassicDataset(split, transform), batch_size=flags.batch_size,
                                       shuffle=True, num_workers=workers, pin_memory=True,
                                       persistent_workers=workers > 0, drop_last=False)


def classic_epoch(model, optimizer, loader, device, num_classes, max_steps=None):
    """The classic step: fp32, mixup on the batch, `.item()` every step. Returns images seen."""
    model.train()
    seen = 0
    for step, (x, y) in enumerate(loader):
        if max_steps is not None and step >= max_steps:
            break
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        lam = float(np.random.beta(1.0, 1.0))
        partner = torch.randperm(x.shape[0], device=device)
        mixed = lam * x + (1 - lam) * x[partner]
        logits = model(mixed)
        loss = lam * F.cross_entropy(logits, y) + (1 - lam) * F.cross_entropy(logits, y[partner])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        running_loss = loss.item()  # noqa: F841  (the per-step host sync of the classic loop)
        running_acc = (logits.argmax(1) == y).float().mean().item()  # noqa: F841
        seen += x.shape[0]
    return seen


def time_classic(flags, train, device, augment):
    info = DATASETS[flags.dataset][0]
    torch.manual_seed(0)
    model = build_model(flags.model, info.channels, info.image_size, info.num_classes, flags.width).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    loader = classic_loader(train, flags, augment)
    warmup_steps = flags.classic_steps or None
    classic_epoch(model, optimizer, loader, device, info.num_classes, warmup_steps)
    synchronize(device)
    start, seen = time.perf_counter(), 0
    for _ in range(flags.epochs):
        seen += classic_epoch(model, optimizer, loader, device, info.num_classes, flags.classic_steps)
    synchronize(device)
    return seen / (time.perf_counter() - start)


def main(argv=None) -> int:
    flags = parse_flags(argv)
    device = resolve_device(flags.device)
    train, test, source = bench_data(flags)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    print(f"device: {name} | torch {torch.__version__} | {flags.model} width {flags.width} | {flags.dataset}-shaped "
          f"{source} data, {len(train)} train / {len(test)} test images | batch {flags.batch_size}", flush=True)
    run = project_run(flags, train, test, device)
    reset_peak(device)
    train_rate, nc_rate, epoch_s, nc_s = time_project(run, flags, device)
    project_peak = peak_memory_gib(device)
    print(f"project training: {train_rate:9.0f} img/s  ({epoch_s:.2f} s/epoch; amp {run.cfg.amp}, "
          f"channels_last {run.cfg.channels_last}, compile {run.cfg.compile and run.cfg.compile_mode}; peak memory {project_peak:.2f} GiB)")
    print(f"project NC pass:  {nc_rate:9.0f} img/s  ({nc_s:.2f} s for train + test, "
          f"{100 * nc_s / (epoch_s + nc_s):.0f}% of epoch + NC pass)", flush=True)
    if flags.check_syncs and device.type == "cuda":
        syncs = count_host_syncs(run)
        print(f"host syncs inside a training epoch: {len(syncs)}" + (f" (first: {syncs[0]})" if syncs else ""))
    del run
    if flags.no_classic:
        return 0
    reset_peak(device)
    classic_rate = time_classic(flags, train, device, DATASETS[flags.dataset][0].augment_by_default)
    print(f"classic loop:     {classic_rate:9.0f} img/s  ({len(train) / classic_rate:.2f} s/epoch; "
          f"peak memory {peak_memory_gib(device):.2f} GiB)")
    print(f"speedup: {train_rate / classic_rate:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
