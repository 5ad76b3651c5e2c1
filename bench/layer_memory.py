"""Extra memory and time of per-layer NC (--nc-layers all) in the measurement pass.

    python bench/layer_memory.py --model resnet18 --num-train 50000 --device cuda
    python bench/layer_memory.py --model resnet18 --width 0.125 --num-train 2048 --device cpu

Synthetic CIFAR-shaped data. Prints, for the measurement pass without and with
--nc-layers all: its time and, on CUDA, the allocator's peak; and the bytes the
per-layer statistics hold (the float64 moments and the NCC sample), which do not
grow with the number of training images beyond the sample.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import layers  # noqa: E402
from cli import parse_args  # noqa: E402
from data import DATASETS, Split  # noqa: E402
from distributed import DistContext  # noqa: E402
from main import build_run, resolve_defaults, resolve_device  # noqa: E402
from train import collect_features, measure  # noqa: E402


def parse_flags(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", default="resnet18", metavar="NAME", help="registry model")
    parser.add_argument("--width", type=float, default=1.0, metavar="X", help="channel multiplier")
    parser.add_argument("--dataset", default="cifar10", choices=sorted(DATASETS), metavar="NAME",
                        help="dataset whose shape is used")
    parser.add_argument("--num-train", type=int, default=50000, metavar="N", help="training images")
    parser.add_argument("--device", default="auto", metavar="DEV", help="auto, cpu or cuda[:N]")
    return parser.parse_args(argv)


def synthetic(info, count, seed):
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (count, info.channels, info.image_size, info.image_size), dtype=torch.uint8,
                           generator=generator)
    return Split(images, torch.arange(count) % info.num_classes)


def held_bytes(statistics: layers.LayerStatistics) -> int:
    """Bytes of the per-layer state at the end of a pass: the moments and the kept sample rows."""
    moments = sum(t.numel() * t.element_size() for m in statistics.moments.values() for t in m.statistics())
    sample = sum(t.numel() * t.element_size() for rows in statistics.samples.values() for t in rows)
    return moments + sample


def timed_pass(run, device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    measure(run, with_nc=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else float("nan")
    return seconds, peak


def main(argv=None) -> int:
    flags = parse_flags(argv)
    device = resolve_device(flags.device)
    info = DATASETS[flags.dataset][0]
    train, test = synthetic(info, flags.num_train, 0), synthetic(info, flags.num_train // 5, 1)
    args = parse_args(["--dataset", flags.dataset, "--model", flags.model, "--width", str(flags.width),
                       "--device", str(device), "--epochs", "1", "--nc-layers", "all"])
    resolve_defaults(args, info, device)
    run = build_run(args, info, train, test, device, DistContext())
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    print(f"device: {name} | {flags.model} width {flags.width} | {len(train)} train / {len(test)} test images | "
          f"stages {', '.join(run.nc_layers)}")
    stages = run.nc_layers
    for label, chosen in (("without --nc-layers", []), ("with --nc-layers all", stages)):
        run.nc_layers = chosen
        timed_pass(run, device)  # warm-up
        seconds, peak = timed_pass(run, device)
        print(f"measurement pass {label:22s}: {seconds:7.3f} s, peak allocated {peak:9.1f} MiB")
    statistics = layers.LayerStatistics(stages, info.num_classes, run.layer_sample_rows)
    collect_features(run.model, run.eval_splits["train"], args.eval_batch_size, run.normalize, run.eval_autocast,
                     statistics)
    print(f"per-layer statistics held at the end of the pass: {held_bytes(statistics) / 2**20:.1f} MiB "
          f"(float64 moments of every stage + the NCC sample's vectors)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
