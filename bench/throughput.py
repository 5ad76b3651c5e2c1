"""Speed of the project's training epoch per model and path: img/s, FLOPs, MFU, and the NC pass's cost.

A path is one way main.py can run the training step:
  eager                     no torch.compile (bf16 autocast and channels_last as main.py sets them)
  eager-nchw                eager without channels_last (conv nets only)
  compile-MODE              torch.compile with MODE: default, reduce-overhead (CUDA graphs),
                            max-autotune, max-autotune-no-cudagraphs
  default                   what main.py does on this device with no flags (one of the above)
  classic                   a classic loop written here: torchvision Dataset, PIL transforms, DataLoader
                            workers, fp32, mixup on the batch, `.item()` every step
Every path trains the same model on the same data shape with the same batch size, for one
warm-up epoch (compilation, cudnn autotuning) and --epochs timed ones; the median is kept.
Training FLOPs per image are counted by torch.utils.flop_counter (bench/flops.py); MFU is
printed for bf16 paths on a device of that file's peak table. Real data are used when present
under --data-dir, otherwise synthetic uint8 images of the dataset's shape; shortened epochs
(--num-train) are scaled to the full split in the s/epoch columns.

    python bench/throughput.py --models resnet18,wrn40_10,vit_b_4 --dataset cifar100 --num-train 10000 \\
        --paths eager,compile-reduce-overhead --device cuda
    python bench/throughput.py --models resnet18 --width 0.125 --num-train 2048 --paths eager,classic --device cpu

Per path one line; per model the NC pass and the other per-epoch costs of a run (feature
snapshot, checkpoint write); with two paths of which one is classic, the last line is
`speedup: X`, project images/s over classic images/s. --json appends one record per path.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import re
import resource
import statistics
import sys
import tempfile
import time
import warnings

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.flops import mfu, peak_bf16_tflops, training_flops_per_image  # noqa: E402
from checkpoint import capture_state  # noqa: E402
from cli import COMPILE_MODES, DefaultsFormatter, OneLineParser, UsageError, parse_args  # noqa: E402
from collapse_metrics import nc_statistics  # noqa: E402
from compilation import compiling, first_line  # noqa: E402
from data import DATASETS, DataError, Split, load_dataset  # noqa: E402
from data.batches import channel_stats, eval_batches  # noqa: E402
from distributed import DistContext  # noqa: E402
from main import build_run, configure_backends, resolve_defaults, resolve_device  # noqa: E402
from models import MODELS, build_model  # noqa: E402
from run_io import CHECKPOINT_FILE, RunLog  # noqa: E402
from train import exact_float32, float32_products, measure, measure_epoch, train_one_epoch  # noqa: E402

SYNTHETIC_TEST_FRACTION = 0.2  # test split size relative to the training split, like CIFAR's 10k/50k
CROP_PADDING = 4
# Split sizes, for synthetic stand-ins of the real data and for scaling short epochs to full ones.
TRAIN_SIZES = {"digits": 1347, "mnist": 60000, "fashionmnist": 60000, "cifar10": 50000, "cifar100": 50000,
               "svhn": 73257}
TEST_SIZES = {"digits": 450, "mnist": 10000, "fashionmnist": 10000, "cifar10": 10000, "cifar100": 10000,
              "svhn": 26032}
# Path name -> main.py flags. "default" and "classic" are resolved or handled apart.
PATH_FLAGS = {"eager": ["--no-compile"], "eager-nchw": ["--no-compile", "--no-channels-last"],
              **{f"compile-{mode}": ["--compile", "--compile-mode", mode] for mode in COMPILE_MODES}}
PATHS = ("default", *PATH_FLAGS, "classic")
PROFILE_TOP = 10
NC_REPEATS = 2  # timed NC passes after a warm-up one (each is 1/3 of a training epoch's FLOPs or less)
# Names of matrix work: cuBLAS/cuDNN/CUTLASS GEMM and convolution kernels, flash attention, Triton GEMM
# templates (triton_tem_), and on the CPU the matmul operators; everything else is elementwise work,
# reductions (batch norm too: cuDNN's "bn_" kernels are not matched) or copies. A heuristic, by name.
MATRIX_KERNEL = re.compile(r"gemm|xmma|cutlass|conv|fprop|dgrad|wgrad|flash|fmha|triton_tem|aten::(addmm|mm|bmm)$",
                           re.I)


def _comma_list(choices):
    def parse(text):
        items = [item.strip() for item in text.split(",") if item.strip()]
        unknown = [item for item in items if item not in choices]
        if unknown or not items:
            raise argparse.ArgumentTypeError(f"{','.join(unknown) or text!r}: choose from {', '.join(choices)}")
        return list(dict.fromkeys(items))
    return parse


def parse_flags(argv=None):
    parser = OneLineParser(prog="throughput.py", description=__doc__.split("\n\n")[0],
                           formatter_class=DefaultsFormatter)
    parser.add_argument("--models", type=_comma_list(sorted(MODELS)), default="resnet18", metavar="A,B",
                        help="registry models, comma-separated")
    parser.add_argument("--paths", type=_comma_list(PATHS), default="default", metavar="P,Q",
                        help=f"paths to time on each model, comma-separated, from: {', '.join(PATHS)}; "
                             "default: default (the path main.py takes on the device)")
    parser.add_argument("--width", type=float, default=1.0, metavar="X", help="channel multiplier of every model")
    parser.add_argument("--dataset", default="cifar10", choices=sorted(DATASETS), metavar="NAME",
                        help="dataset whose shape (and data, if present) is used")
    parser.add_argument("--data-dir", default="./data", metavar="DIR", help="where real data would be")
    parser.add_argument("--num-train", type=int, default=None, metavar="N",
                        help="training images per epoch (default: the dataset's size, 50000 for CIFAR)")
    parser.add_argument("--batch-size", type=int, default=128, metavar="B", help="batch size of every path")
    parser.add_argument("--device", default="auto", metavar="DEV", help="auto, cpu or cuda[:N]")
    parser.add_argument("--workers", type=int, default=None, metavar="W",
                        help="DataLoader workers of the classic loop (default: CPU count, at most 8)")
    parser.add_argument("--epochs", type=int, default=3, metavar="E",
                        help="timed epochs of each path, after one warm-up epoch (the median is reported)")
    parser.add_argument("--classic-steps", type=int, default=None, metavar="S",
                        help="time only S steps of each classic epoch (it is slow); images/s is unaffected")
    parser.add_argument("--no-amp", action="store_true", help="fp32 for the project's paths too (no MFU then)")
    parser.add_argument("--no-nc", action="store_true",
                        help="skip the NC pass and the other per-epoch costs (feature snapshot, checkpoint)")
    parser.add_argument("--check-syncs", action="store_true",
                        help="CUDA only: run one more epoch per path under torch.cuda.set_sync_debug_mode and "
                             "report every host sync it makes")
    parser.add_argument("--profile-below", type=float, default=None, metavar="MFU",
                        help="profile one epoch of each path whose MFU is below this fraction (or unknown) and "
                             f"print its top {PROFILE_TOP} kernels (CPU: operators)")
    parser.add_argument("--profile-paths", type=_comma_list(PATHS), default=None, metavar="P,Q",
                        help="with --profile-below, profile only these paths (default: every path)")
    parser.add_argument("--json", default=None, metavar="FILE", help="append one JSON record per path to FILE")
    return parser.parse_args(argv)


# ---------------------------------------------------------------- data and device

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


def device_label(device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"


def timed(function, device):
    """(seconds, result) of function(), with the device's queue drained on both sides."""
    synchronize(device)
    start = time.perf_counter()
    result = function()
    synchronize(device)
    return time.perf_counter() - start, result


# ---------------------------------------------------------------- the project's paths

def resolve_paths(paths, device) -> list:
    """Path names with "default" replaced by the path main.py takes on `device`, without repeats."""
    args = parse_args(["--dataset", "cifar10"])
    resolve_defaults(args, DATASETS["cifar10"][0], device)
    default = f"compile-{args.compile_mode}" if args.compile else "eager"
    return list(dict.fromkeys(default if path == "default" else path for path in paths))


def project_run(flags, model_name, path, train, test, device):
    argv = ["--dataset", flags.dataset, "--model", model_name, "--width", str(flags.width),
            "--batch-size", str(flags.batch_size), "--epochs", str(flags.epochs + 2), "--no-progress",
            "--device", str(device), "--feature-epochs", "1", *PATH_FLAGS[path],
            # the NC pass and snapshot timed in float32, whose forward bench/report.py swaps for
            # another precision's measured one (auto's TF32 passes and float32 re-measures alike)
            "--eval-precision", "float32"]
    argv += ["--no-amp"] if flags.no_amp else []
    args = parse_args(argv)
    info = DATASETS[flags.dataset][0]
    resolve_defaults(args, info, device)
    configure_backends(args, device)  # cudnn autotuning, as main.py sets it (a global flag: the classic loop gets it too)
    return build_run(args, info, train, test, device, DistContext())


def images_per_epoch(run) -> int:
    batches = run.batches
    return len(batches) * batches.batch_size if batches.drop_last else len(batches.labels)


def time_training(run, flags, device):
    """(warm-up epoch seconds, timed epoch seconds): compilation and autotuning happen in the warm-up."""
    warmup_s, _ = timed(lambda: train_one_epoch(run, 0), device)
    times = [timed(lambda: train_one_epoch(run, epoch), device)[0] for epoch in range(1, flags.epochs + 1)]
    return warmup_s, times


def time_nc_pass(run, flags, device) -> dict:
    """The clean evaluation + NC pass as main.py runs it with a float32 forward, and its parts: the
    forward in bf16, in TF32 and in exact float32, and the metrics."""
    timed(lambda: measure(run, with_nc=True), device)  # warm-up of the inference shapes
    nc_s = statistics.median(timed(lambda: measure(run, with_nc=True), device)[0] for _ in range(NC_REPEATS))
    bf16 = lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    forward = {}
    for name, autocast in (("bf16", bf16), ("tf32", lambda: float32_products(tf32=True)), ("fp32", exact_float32)):
        eval_forward(run, autocast)  # warm-up (cudnn autotuning of this dtype)
        forward[name] = timed(lambda: eval_forward(run, autocast), device)[0]
    return {"nc_s": nc_s, "nc_images": sum(len(split) for split in run.eval_splits.values()),
            "eval_forward_bf16_s": forward["bf16"], "eval_forward_tf32_s": forward["tf32"],
            "eval_forward_fp32_s": forward["fp32"],
            "nc_metrics_s": time_nc_metrics(run, device)}


@torch.inference_mode()
def eval_forward(run, autocast) -> None:
    run.model.eval()
    for split in run.eval_splits.values():
        for x, _ in eval_batches(split.images, split.labels, run.cfg.eval_batch_size, run.normalize):
            with autocast():
                run.model.features(x)


def time_nc_metrics(run, device) -> float:
    """nc_statistics alone, on random float32 features of both splits' shapes (d = the model's)."""
    weight = run.model.classifier.weight.detach().double()
    bias = torch.zeros(weight.shape[0], dtype=torch.float64, device=device)
    generator = torch.Generator(device=device).manual_seed(0)
    def both_splits():
        means = None
        for split in run.eval_splits.values():
            H = torch.randn(len(split), run.model.feature_dim, device=device, generator=generator)
            result = nc_statistics(H, split.labels, weight, bias, run.num_classes, class_means=means)
            means = means if means is not None else result.class_means
    both_splits()
    return timed(both_splits, device)[0]


def time_run_extras(run, device) -> dict:
    """Seconds a run spends per feature snapshot and per checkpoint write (to a scratch folder)."""
    with tempfile.TemporaryDirectory(prefix="bench_run_") as folder:
        run.log = RunLog(folder, {"bench": "throughput"}, True)
        run.log.start()
        lr = run.optimizer.param_groups[0]["lr"]
        plain_s, _ = timed(lambda: measure_epoch(run, 2, lr), device)  # epoch 2: NC pass, no snapshot
        snapshot_s, _ = timed(lambda: measure_epoch(run, 1, lr), device)  # epoch 1 is the feature epoch
        checkpoint_s, _ = timed(lambda: run.log.write_checkpoint(capture_state(run, 1)), device)
        checkpoint_bytes = os.path.getsize(run.log.path(CHECKPOINT_FILE))
    return {"feature_snapshot_s": max(0.0, snapshot_s - plain_s), "checkpoint_s": checkpoint_s,
            "checkpoint_gb": checkpoint_bytes / 1e9}


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


# ---------------------------------------------------------------- attention and profiles

def has_attention(model) -> bool:
    return any(isinstance(m, torch.nn.MultiheadAttention) for m in model.modules())


def one_training_step(run) -> None:
    """Forward and backward of the bare model on one training batch (weights are not updated)."""
    x, y = next(iter(run.batches))
    run.model.train()
    with run.autocast():
        logits = run.model(x)
    F.cross_entropy(logits.float(), y).backward()
    run.model.zero_grad(set_to_none=True)


def attention_dispatch(run) -> dict:
    """Which scaled-dot-product kernels the training step calls, and whether flash attention can run it.

    nn.MultiheadAttention takes its fused fast path only in inference; in training
    F.multi_head_attention_forward calls F.scaled_dot_product_attention when need_weights
    is False (torchvision's ViT passes False), and SDPA picks flash, memory-efficient,
    cuDNN or the math fallback from dtype, head size, mask and device.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        one_training_step(run)
    kernels = sorted({e.name for e in prof.events() if re.match(r"aten::_(scaled_dot_product|flash|efficient)", e.name)})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                one_training_step(run)
            forced = "flash attention runs the training step"
        except RuntimeError as error:  # "No available kernel": the warnings say why flash was refused
            reasons = sorted({str(w.message).splitlines()[0] for w in caught if "lash" in str(w.message)})
            forced = f"flash attention refused: {'; '.join(reasons) or first_line(error)}"
    return {"sdpa_ops": kernels, "flash_forced": forced}


def profile_epoch(run, device, epoch: int) -> dict:
    """Top kernels (CUDA) or operators (CPU) of one training epoch by self time, with their shares."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        wall_s, _ = timed(lambda: train_one_epoch(run, epoch), device)
    if cuda:
        rows = [(e.key, e.self_device_time_total, e.count) for e in prof.key_averages()
                if e.device_type == DeviceType.CUDA and e.self_device_time_total > 0]
    else:
        rows = [(e.key, e.self_cpu_time_total, e.count) for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total_us = sum(us for _, us, _ in rows)
    rows.sort(key=lambda row: -row[1])
    matrix_us = sum(us for name, us, _ in rows if MATRIX_KERNEL.search(name))
    return {"kind": "kernels" if cuda else "operators", "wall_s": wall_s, "busy_s": total_us / 1e6,
            "matrix_share": matrix_us / total_us if total_us else None,
            "top": [{"name": name, "s": us / 1e6, "share": us / total_us, "calls": count}
                    for name, us, count in rows[:PROFILE_TOP]]}


def print_profile(model_name, path, profile) -> None:
    busy = profile["busy_s"] / profile["wall_s"] if profile["wall_s"] else 0.0
    matrix = profile["matrix_share"]
    print(f"  profile {model_name} {path}: one epoch {profile['wall_s']:.2f} s, {profile['kind']} busy "
          f"{profile['busy_s']:.2f} s ({100 * busy:.0f} % of wall)"
          + (f"; matrix/conv {profile['kind']} (by name) {100 * matrix:.0f} % of that" if matrix is not None else ""))
    for row in profile["top"]:
        print(f"    {100 * row['share']:5.1f} %  {row['s']:7.3f} s  {row['calls']:6d} x  {row['name'][:110]}")


# ---------------------------------------------------------------- the classic loop

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


def classic_epoch(model, optimizer, loader, device, max_steps=None):
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


def time_classic(flags, model_name, train, device) -> dict:
    info = DATASETS[flags.dataset][0]
    torch.manual_seed(0)
    model = build_model(model_name, info.channels, info.image_size, info.num_classes, flags.width).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    loader = classic_loader(train, flags, info.augment_by_default)
    reset_peak(device)
    warmup_s, _ = timed(lambda: classic_epoch(model, optimizer, loader, device, flags.classic_steps), device)
    runs = [timed(lambda: classic_epoch(model, optimizer, loader, device, flags.classic_steps), device)
            for _ in range(flags.epochs)]
    seconds, seen = statistics.median(s for s, _ in runs), runs[0][1]
    return {"warmup_s": warmup_s, "epoch_times_s": [s for s, _ in runs], "images_timed": seen,
            "img_s": seen / seconds, "full_epoch_s": TRAIN_SIZES[flags.dataset] * seconds / seen,
            "amp": False, "channels_last": False, "compile_mode": None, "compile_active": False,
            "peak_memory_gib": peak_memory_gib(device)}


# ---------------------------------------------------------------- one model, one path

def time_project_path(flags, model_name, path, train, test, device, extras: bool) -> tuple:
    """(record, run) of one project path; `extras` adds the NC pass, snapshot and checkpoint costs."""
    run = project_run(flags, model_name, path, train, test, device)
    reset_peak(device)
    warmup_s, times = time_training(run, flags, device)
    epoch_s, images = statistics.median(times), images_per_epoch(run)
    full_images = TRAIN_SIZES[flags.dataset] // flags.batch_size * flags.batch_size if run.batches.drop_last \
        else TRAIN_SIZES[flags.dataset]
    record = {"warmup_s": warmup_s, "epoch_times_s": times, "images_timed": images, "img_s": images / epoch_s,
              "full_epoch_s": full_images * epoch_s / images, "compile_s": max(0.0, warmup_s - epoch_s),
              "amp": run.cfg.amp, "channels_last": run.cfg.channels_last and run.model.convolutional,
              "compile_mode": run.cfg.compile_mode if run.cfg.compile else None,
              "compile_active": compiling(run.step_model) and run.step_model.active,
              "peak_memory_gib": peak_memory_gib(device)}
    if extras:
        nc = time_nc_pass(run, flags, device)
        full_nc_images = TRAIN_SIZES[flags.dataset] + TEST_SIZES[flags.dataset]
        scale = full_nc_images / nc["nc_images"]
        record.update(nc, full_nc_s=nc["nc_s"] * scale, full_eval_forward_bf16_s=nc["eval_forward_bf16_s"] * scale,
                      full_eval_forward_tf32_s=nc["eval_forward_tf32_s"] * scale,
                      full_eval_forward_fp32_s=nc["eval_forward_fp32_s"] * scale,
                      full_nc_metrics_s=nc["nc_metrics_s"] * scale, **time_run_extras(run, device))
    if flags.check_syncs and device.type == "cuda":
        syncs = count_host_syncs(run)
        record["host_syncs"] = len(syncs)
        record["first_sync"] = syncs[0] if syncs else None
    return record, run


def add_flops(record, flops_per_image, peak, device_is_cuda) -> None:
    record["flops_per_image"] = flops_per_image
    record["tflops"] = flops_per_image * record["img_s"] / 1e12
    record["mfu"] = mfu(flops_per_image, record["img_s"], peak[1]) if peak and record["amp"] and device_is_cuda else None


def path_line(model_name, path, record) -> str:
    mfu_text = f"MFU {100 * record['mfu']:4.1f} %" if record["mfu"] is not None else "MFU n/a"
    compile_text = ""
    if record["compile_mode"]:
        state = "" if record["compile_active"] else " FELL BACK TO EAGER"
        compile_text = f" | warm-up {record['warmup_s']:.1f} s (compile ~{record['compile_s']:.0f} s){state}"
    memory = f" | peak {record['peak_memory_gib']:.2f} GiB" if "peak_memory_gib" in record else ""
    return (f"{model_name:<10} {path:<36} {record['full_epoch_s']:7.2f} s/epoch {record['img_s']:9.0f} img/s "
            f"{record['flops_per_image'] / 1e9:7.3g} GFLOP/img {record['tflops']:7.1f} TFLOP/s {mfu_text}"
            f"{compile_text}{memory}")


def nc_lines(model_name, flags, record) -> list:
    full = TRAIN_SIZES[flags.dataset] + TEST_SIZES[flags.dataset]
    epoch_share = record["full_nc_s"] / (record["full_epoch_s"] + record["full_nc_s"])
    return [f"  {model_name} NC pass (train + test, {full} images, C = {DATASETS[flags.dataset][0].num_classes}): "
            f"{record['full_nc_s']:.2f} s ({100 * epoch_share:.0f} % of epoch + NC pass); its parts: eval forward "
            f"bf16 {record['full_eval_forward_bf16_s']:.2f} s, TF32 {record['full_eval_forward_tf32_s']:.2f} s, "
            f"exact fp32 {record['full_eval_forward_fp32_s']:.2f} s, "
            f"NC metrics alone {record['full_nc_metrics_s']:.2f} s",
            f"  {model_name} per feature snapshot {record['feature_snapshot_s']:.2f} s; per checkpoint write "
            f"{record['checkpoint_s']:.2f} s ({record['checkpoint_gb']:.2f} GB)"]


def bench_model(flags, model_name, paths, train, test, device, peak) -> list:
    info = DATASETS[flags.dataset][0]
    throwaway = build_model(model_name, info.channels, info.image_size, info.num_classes, flags.width)
    convolutional = throwaway.convolutional
    flops = training_flops_per_image(throwaway, (info.channels, info.image_size, info.image_size),
                                     info.num_classes, flags.batch_size)
    records, first = [], True
    for path in paths:
        if path == "eager-nchw" and not convolutional:
            print(f"{model_name:<10} {path:<36} skipped: the same as eager (channels_last applies to conv nets only)")
            continue
        if path == "classic":
            record, run = time_classic(flags, model_name, train, device), None
        else:
            # the NC pass and the run's other costs do not depend on the training path: measured once
            record, run = time_project_path(flags, model_name, path, train, test, device, first and not flags.no_nc)
        add_flops(record, flops, peak, device.type == "cuda")
        record.update(model=model_name, path=path, width=flags.width, dataset=flags.dataset,
                      batch_size=flags.batch_size, device=device_label(device), torch=str(torch.__version__))
        print(path_line(model_name, path, record), flush=True)
        write_record(flags.json, record)  # before the checks below: a crash there keeps the figures
        records.append(record)
        if run is not None:
            report_path_checks(flags, model_name, path, record, run, device, first)
            first = False
        run = None
        release(device)
    return records


def report_path_checks(flags, model_name, path, record, run, device, first: bool) -> None:
    """Print the NC costs and attention dispatch (first project path), host syncs and the profile of one path."""
    if "full_nc_s" in record:
        for line in nc_lines(model_name, flags, record):
            print(line, flush=True)
    if "host_syncs" in record:
        print(f"  host syncs inside a training epoch: {record['host_syncs']}"
              + (f" (first: {record['first_sync']})" if record["first_sync"] else ""), flush=True)
    if first and has_attention(run.model):
        attention = attention_dispatch(run)
        print(f"  {model_name} attention in training: ops {', '.join(attention['sdpa_ops']) or 'none'}; "
              f"{attention['flash_forced']}", flush=True)
    below = flags.profile_below is not None and (record["mfu"] is None or record["mfu"] < flags.profile_below)
    if below and (flags.profile_paths is None or path in flags.profile_paths):
        print_profile(model_name, path, profile_epoch(run, device, flags.epochs + 1))


def release(device) -> None:
    """Free the last path's compiled graphs and CUDA-graph pools (its run is no longer referenced)."""
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def write_record(path, record) -> None:
    if path:
        with open(path, "a") as handle:
            handle.write(json.dumps(record) + "\n")


def main(argv=None) -> int:
    flags = parse_flags(argv)
    try:
        device = resolve_device(flags.device)
    except UsageError as error:
        print(f"throughput.py: error: {error}", file=sys.stderr)
        return 2
    train, test, source = bench_data(flags)
    name = device_label(device)
    peak = peak_bf16_tflops(name) if device.type == "cuda" else None
    paths = resolve_paths(flags.paths, device)
    print(f"device: {name} | peak bf16 {f'{peak[1]:.0f} TFLOP/s ({peak[0]})' if peak else 'unknown (no MFU)'} | "
          f"torch {torch.__version__} | {flags.dataset}-shaped {source} data, {len(train)} train / {len(test)} test "
          f"images, s/epoch scaled to {TRAIN_SIZES[flags.dataset]} | batch {flags.batch_size} | width {flags.width} | "
          f"median of {flags.epochs} epochs after 1 warm-up", flush=True)
    records = []
    for model_name in flags.models:
        records += bench_model(flags, model_name, paths, train, test, device, peak)
    classic = [r for r in records if r["path"] == "classic"]
    project = [r for r in records if r["path"] != "classic"]
    if len(records) == 2 and len(classic) == 1:
        print(f"speedup: {project[0]['img_s'] / classic[0]['img_s']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
