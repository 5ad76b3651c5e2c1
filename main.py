"""Train a classifier with mixup and measure neural collapse after every epoch.

    python main.py                      # quick offline run on the bundled digits
    python main.py --dataset cifar10 --model resnet18 --loss cross_entropy --mixup-alpha 1 --epochs 500 --download

Exit status: 0 complete, 1 data or file error, 2 bad flags, 3 diverged,
128 + signal number when interrupted (130 SIGINT, 143 SIGTERM).
"""
from __future__ import annotations

import importlib.metadata
import json
import math
import os
import platform
import shlex
import shutil
import subprocess
import sys
from typing import List, Optional

import numpy as np
import torch

from checkpoint import restore_state, saved_device_type
from cli import (DEFAULT_CUDA_CHECKPOINT_EVERY, RESUMABLE_CHANGES, UsageError, build_parser, default_feature_epochs,
                 nc_epoch_schedule, parse_args)
from collapse_metrics import simplex_etf
from compilation import compile_with_fallback, compiling
from data import DATASETS, DataError, DatasetInfo, Split, balanced_subset, load_dataset
from data.batches import Normalizer, TrainBatches, channel_stats
from distributed import DistContext, init_from_environment, shard_indices, shutdown
from feature_capture import FeatureCapture, first_per_class
from layers import INPUT, RANDOM, ManifoldMixer, manifold_mixup_choices, resolve_layers
from losses import build_loss
from mixup import feature_rules, rule_name
from models import build_model
from run_io import CHECKPOINT_FILE, CONFIG_FILE, METRICS_FILE, RunIOError, RunLog, lock_run_folder, read_checkpoint
from train import (AUTO_FAST_PRECISION, FLOOR_SAMPLE_PER_CLASS, Diverged, Generators, Interrupted, Run,
                   make_autocast, make_eval_autocast, run_epochs)

EXIT_ERROR, EXIT_USAGE, EXIT_DIVERGED = 1, 2, 3
PROJECT_DIR = os.path.dirname(os.path.abspath(__file__))


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = parse_args(argv)
        return execute(args, argv)
    except UsageError as error:
        return fail(error, EXIT_USAGE)
    except (DataError, RunIOError) as error:
        return fail(error, EXIT_ERROR)


def fail(error: Exception, code: int) -> int:
    print(f"main.py: error: {error}", file=sys.stderr)
    return code


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name!r} is not a device (use auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: no CUDA GPU is visible to PyTorch")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UsageError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) visible")
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {name}: only cpu and cuda are supported")
    return device


def configure_backends(args, device: torch.device) -> None:
    if args.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input shapes: autotuning pays off after a few steps


def seeded_generators(seed: int, rank: int, device: torch.device) -> Generators:
    """Independent streams per purpose and per process, all derived from --seed."""
    streams = np.random.SeedSequence([seed, rank]).generate_state(3, dtype=np.uint64)
    data = torch.Generator(device=device)
    data.manual_seed(int(streams[0]))
    pairs = torch.Generator(device=device)
    pairs.manual_seed(int(streams[1]))
    return Generators(data, pairs, np.random.default_rng(int(streams[2])))


def load_data(args, info: DatasetInfo):
    _, train, test = load_dataset(args.dataset, args.data_dir, args.download)
    if args.samples_per_class:
        train = balanced_subset(train, args.samples_per_class, info.num_classes)
    return train, test


def check_against_data(args, train: Split, dist: DistContext, device: torch.device) -> None:
    if args.batch_size % dist.world:
        raise UsageError(f"--batch-size {args.batch_size} is not divisible by the {dist.world} processes")
    if args.batch_size // dist.world < 2:
        raise UsageError(f"--batch-size {args.batch_size} gives each process fewer than 2 samples per step "
                         f"(batch norm and mixup need at least 2)")
    if args.sync_bn and dist.enabled and device.type != "cuda":
        raise UsageError("--sync-bn needs CUDA (torch's SyncBatchNorm does not run on the CPU)")
    if args.sync_bn and dist.enabled and args.feature_mode == "train":
        # the features pickle is made by process 0 alone, and a train-mode SyncBatchNorm would wait for the others
        raise UsageError("--feature-mode train cannot be combined with --sync-bn under torchrun")
    if args.batch_size > len(train):
        raise UsageError(f"--batch-size {args.batch_size} is larger than the training set ({len(train)} samples)")


def build_classifier_model(args, info: DatasetInfo, device: torch.device):
    try:
        model = build_model(args.model, info.channels, info.image_size, info.num_classes, args.width)
    except ValueError as error:  # e.g. a ViT patch size that does not divide the image
        raise UsageError(f"--model {args.model}: {error}") from None
    if args.etf_classifier:
        try:
            etf = simplex_etf(info.num_classes, model.feature_dim, torch.Generator().manual_seed(args.seed))
        except ValueError as error:
            raise UsageError(f"--etf-classifier: {error}") from None
        model.classifier = torch.nn.Linear(model.feature_dim, info.num_classes, bias=False)
        model.classifier.weight.data.copy_(etf)
        model.classifier.weight.requires_grad_(False)
    model.to(device)
    if args.channels_last and model.convolutional:
        model.to(memory_format=torch.channels_last)
    return model


def build_optimizer(args, model, device: torch.device) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    # fused kernels on CUDA: one launch per step instead of one per parameter
    fast = {"fused": True} if device.type == "cuda" else {"foreach": True}
    if args.optimizer == "sgd":
        return torch.optim.SGD(params, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay, **fast)
    cls = torch.optim.Adam if args.optimizer == "adam" else torch.optim.AdamW
    return cls(params, lr=args.lr, weight_decay=args.weight_decay, **fast)


def milestone_epochs(milestones, epochs: int) -> List[int]:
    """The epochs after which the multistep schedule multiplies the rate by --gamma.

    Each fraction rounds to an epoch, never before the first; one that rounds
    onto an earlier milestone moves to the next free epoch, so the rate never
    drops by gamma^2 at once (at 5 epochs, 0.3, 0.5, 0.9 give 2, 3, 4 rather than
    2, 2, 4). With fewer epochs than milestones the last ones fall past the end.
    """
    steps: List[int] = []
    for fraction in milestones:
        steps.append(max(round(fraction * epochs), steps[-1] + 1 if steps else 1))
    return steps


def lr_factor(args):
    """Multiplier of --lr after `epoch` epochs, as a function of --epochs (so a resume may extend it)."""
    epochs = args.epochs
    if args.scheduler == "constant":
        return lambda epoch: 1.0
    if args.scheduler == "cosine":
        return lambda epoch: 0.5 * (1.0 + math.cos(math.pi * min(epoch, epochs) / epochs))
    steps = milestone_epochs(args.milestones, epochs)
    return lambda epoch: args.gamma ** sum(epoch >= step for step in steps)


def stage_choices(args, model) -> tuple:
    """(stages measured by --nc-layers, places --mixup-layer may mix at), checked against the model's stages."""
    try:
        nc_layers = resolve_layers(model, args.nc_layers)
    except ValueError as error:
        raise UsageError(f"--nc-layers {args.nc_layers}: {error}") from None
    if args.mixup_layer == INPUT:
        return nc_layers, [INPUT]
    if args.mixup_alpha == 0:
        raise UsageError(f"--mixup-layer {args.mixup_layer} needs mixup (--mixup-alpha > 0)")
    if args.mixup_layer == RANDOM:
        return nc_layers, manifold_mixup_choices(model)
    try:
        places = resolve_layers(model, args.mixup_layer)
    except ValueError as error:
        raise UsageError(f"--mixup-layer {args.mixup_layer}: {error} (or input, random)") from None
    if len(places) != 1:
        raise UsageError(f"--mixup-layer takes one stage (or input, random), got {args.mixup_layer}")
    return nc_layers, places


def layer_sample_rows(train: Split, args, num_classes: int, dist: DistContext, device) -> torch.Tensor:
    """Which rows of this process's clean training shard keep their stage vectors for the NCC accuracy.

    The features pickle's per-class sample (--feature-samples-per-class, 0 = all), so both describe one set.
    """
    rows = torch.zeros(len(train), dtype=torch.bool)
    rows[first_per_class(train.labels, args.feature_samples_per_class, num_classes)] = True
    return (rows[shard_indices(len(train), dist, pad=False)] if dist.enabled else rows).to(device)


def shard(split: Split, dist: DistContext, pad: bool) -> Split:
    if not dist.enabled:
        return split
    index = shard_indices(len(split), dist, pad)
    return Split(split.images[index], split.labels[index])


def build_run(args, info: DatasetInfo, train: Split, test: Split, device, dist: DistContext) -> Run:
    torch.manual_seed(args.seed)  # identical initial weights on every process
    model = build_classifier_model(args, info, device)
    nc_layers, mixup_layers = stage_choices(args, model)
    step_model = model
    if args.sync_bn and dist.enabled:
        step_model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if dist.enabled:
        step_model = torch.nn.parallel.DistributedDataParallel(
            step_model, device_ids=[device.index] if device.type == "cuda" else None)
    if args.compile:
        step_model = compile_with_fallback(step_model, args.compile_mode)
    optimizer = build_optimizer(args, model, device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(args))
    mean, std = channel_stats(train.images)
    normalize = Normalizer(mean, std, device, args.channels_last and model.convolutional)
    generators = seeded_generators(args.seed, dist.rank, device)
    local_train = shard(train, dist, pad=True).to(device)
    batches = TrainBatches(local_train.images, local_train.labels, args.batch_size // dist.world, normalize,
                           generators.data, args.augment, drop_last=compiling(step_model))
    eval_splits = {"train": shard(train, dist, pad=False).to(device) if dist.enabled else local_train,
                   "test": shard(test, dist, pad=False).to(device)}
    feature_epochs = set(args.feature_epochs)
    nc_epochs = set(nc_epoch_schedule(args.nc_epochs, args.epochs, feature_epochs))
    precision = eval_precision(args, device)
    capture = FeatureCapture(train, info.num_classes, args, normalize, device) if dist.is_main else None
    loss_fn = build_loss(args.loss, label_smoothing=args.label_smoothing, mse_scale=args.mse_scale,
                         focal_gamma=args.focal_gamma)
    return Run(cfg=args, num_classes=info.num_classes, model=model, step_model=step_model, optimizer=optimizer,
               scheduler=scheduler, loss_fn=loss_fn, batches=batches, eval_splits=eval_splits,
               normalize=normalize, generators=generators, device=device,
               autocast=make_autocast(device, args.amp), eval_autocast=make_eval_autocast(device, precision),
               eval_precision=precision, floor_sample=floor_sample(train, info.num_classes, device)
               if args.eval_precision == "auto" and precision != "float32" else None,
               dist=dist, capture=capture, nc_epochs=nc_epochs,
               feature_epochs=feature_epochs, log=None, nc_layers=nc_layers,
               layer_sample_rows=layer_sample_rows(train, args, info.num_classes, dist, device) if nc_layers else None,
               mixup_layers=mixup_layers,
               mixer=ManifoldMixer(model, mixup_layers) if mixup_layers != [INPUT] else None)


def eval_precision(args, device: torch.device) -> str:
    """The precision of the measurement forward: --eval-precision, with auto resolved for the device."""
    if args.eval_precision == "auto":
        return AUTO_FAST_PRECISION.get(device.type, "float32")
    return args.eval_precision


def floor_sample(train: Split, num_classes: int, device: torch.device) -> Split:
    """The fixed training images whose two forwards estimate the rounding floor: the first of every class.

    The whole sample on every process (it is small), so each computes the same floor.
    """
    rows = first_per_class(train.labels, FLOOR_SAMPLE_PER_CLASS, num_classes)
    return Split(train.images[rows], train.labels[rows]).to(device)


def git_commit() -> Optional[str]:
    """The project's commit, if it is a git checkout with git installed (else None: not an error)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=PROJECT_DIR, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def package_version(name: str) -> Optional[str]:
    """Installed version without importing the package (torchvision takes seconds to import)."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def resolved_config(args, flags: dict, argv, info: DatasetInfo, run: Run, train: Split, test: Split) -> dict:
    config = dict(vars(args))
    config.update(
        flags=flags, command=shlex.join(["python", "main.py", *argv]),
        feature_epochs=sorted(run.feature_epochs), nc_epoch_list=sorted(run.nc_epochs),
        eval_precision_resolved=run.eval_precision, nc1_floor_checked=run.floor_sample is not None,
        feature_classes=run.capture.triple if run.capture else args.feature_classes,
        num_classes=info.num_classes, channels=info.channels, image_size=info.image_size,
        num_train=len(train), num_test=len(test), feature_dim=run.model.feature_dim,
        layer_names=list(run.model.stages), nc_layers=run.nc_layers, mixup_layers=run.mixup_layers,
        mix_rule=rule_name(args), feature_mix=feature_rules(args),
        num_parameters=sum(p.numel() for p in run.model.parameters()),
        device=str(run.device), world_size=run.dist.world,
        device_name=torch.cuda.get_device_name(run.device) if run.device.type == "cuda" else platform.processor() or "cpu",
        # str(): torch.__version__ is a TorchVersion object, and pickles hold builtins only
        torch_version=str(torch.__version__), torchvision_version=package_version("torchvision"),
        python_version=platform.python_version(), git_commit=git_commit(),
    )
    return config


def resolve_defaults(args, info: DatasetInfo, device: torch.device) -> dict:
    """Fill in the device-dependent defaults; returns the flags as given, for --resume checks."""
    flags = dict(vars(args))
    if args.augment is None:
        args.augment = info.augment_by_default
    if args.amp is None:
        args.amp = device.type == "cuda"
    if args.channels_last is None:
        # Tensor cores want NHWC. On the CPU it brings little, and PyTorch 2.14's CPU
        # backward crashes on it for ResNet-18 at width 1/16 (4-channel stages).
        args.channels_last = device.type == "cuda"
    if args.feature_epochs is None:
        args.feature_epochs = default_feature_epochs(args.epochs)
    if args.compile is None:
        args.compile = device.type == "cuda"  # CUDA graphs and fused kernels; CPU runs are conv-bound
    if args.checkpoint_every is None:
        # a 0.45 GB WRN-40-10 checkpoint after each 7 s epoch is wasted; a CPU epoch writes a small one
        args.checkpoint_every = DEFAULT_CUDA_CHECKPOINT_EVERY if device.type == "cuda" else 1
    return flags


def open_run_folder(args, folder: str, dist: DistContext):
    """Decide between a fresh run, a resume and a refusal; returns the checkpoint to resume from, if any."""
    exists = os.path.isdir(folder) and bool(os.listdir(folder))
    if exists and dist.is_main:
        # Before anything else: a folder another job is writing takes neither --resume nor --overwrite.
        lock_run_folder(folder).close()
    if exists and not (args.resume or args.overwrite):
        raise UsageError(f"run folder {folder} already exists; pass --resume to continue it "
                         f"or --overwrite to replace it")
    if not args.resume:
        if exists and dist.is_main:
            shutil.rmtree(folder)
        return None
    if not exists:
        raise UsageError(f"--resume: nothing to resume at {folder}")
    checkpoint = os.path.join(folder, CHECKPOINT_FILE)
    if not os.path.isfile(checkpoint):
        if os.path.isfile(os.path.join(folder, METRICS_FILE)):
            print(f"{folder} has no checkpoint yet; starting it again from epoch 0", flush=True)
        return None
    try:
        return read_checkpoint(checkpoint)
    except (OSError, RuntimeError, EOFError) as error:
        raise RunIOError(f"cannot read {checkpoint}: {error}") from None


def check_resume_flags(saved_flags: dict, flags: dict) -> None:
    # a flag added after the run was saved (--cutmix-alpha, ...) trained at its default, whatever it is now
    defaults = json.loads(json.dumps(vars(build_parser().parse_args([]))))
    changed = [key for key in sorted(set(saved_flags) | set(flags))
               if key not in RESUMABLE_CHANGES and saved_flags.get(key, defaults.get(key)) != flags.get(key)]
    if changed:
        listing = ", ".join(f"--{k.replace('_', '-')} {flags.get(k)!r} (saved {saved_flags.get(k)!r})" for k in changed)
        raise UsageError(f"--resume: flags differ from the saved run: {listing}")


def execute(args, argv) -> int:
    if args.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS reads it at first use
    device = resolve_device(args.device)
    dist = init_from_environment(device.type == "cuda")
    try:
        if dist.enabled and device.type == "cuda":
            device = torch.device("cuda", dist.local_rank)
        return train_in_folder(args, argv, device, dist)
    finally:
        shutdown(dist)


def train_in_folder(args, argv, device, dist: DistContext) -> int:
    info = DATASETS[args.dataset][0]
    flags = resolve_defaults(args, info, device)
    configure_backends(args, device)
    train, test = load_data(args, info)
    check_against_data(args, train, dist, device)
    run = build_run(args, info, train, test, device, dist)
    folder = os.path.join(args.out_dir, args.run_name)
    state = open_run_folder(args, folder, dist)
    if state is not None:
        check_resume(args, flags, folder, state, dist, device)
    run.log = RunLog(folder, resolved_config(args, flags, argv, info, run, train, test), dist.is_main)
    dist.barrier()  # the main process has cleared an --overwrite folder before anyone writes
    run.log.start()
    start_epoch = restore_state(run, state) if state is not None else 0
    if start_epoch == args.epochs:
        run.log.write_metrics(run.history, "complete")
        print(f"{folder} is already complete at epoch {args.epochs}")
        return 0
    return train_and_report(run, folder, start_epoch, argv)


def check_resume(args, flags: dict, folder: str, state: dict, dist: DistContext, device: torch.device) -> None:
    try:
        with open(os.path.join(folder, CONFIG_FILE)) as handle:
            saved_flags = json.load(handle)["flags"]
    except (OSError, ValueError, KeyError) as error:
        raise RunIOError(f"--resume: cannot read the saved flags in {folder}/{CONFIG_FILE}: {error}") from None
    check_resume_flags(saved_flags, json.loads(json.dumps(flags)))  # compare as JSON would store them
    if state["world_size"] != dist.world:
        raise UsageError(f"--resume: the checkpoint was written by {state['world_size']} processes, "
                         f"this job has {dist.world}")
    if state["epoch"] > args.epochs:
        raise UsageError(f"--resume: the checkpoint is at epoch {state['epoch']}, beyond --epochs {args.epochs}")
    saved_device = saved_device_type(state)
    if saved_device != device.type:
        # A CUDA generator's state (seed and offset) and a CPU one's (Mersenne Twister) do not convert.
        raise UsageError(f"--resume: the checkpoint was written on {saved_device} and this run is on {device.type}; "
                         f"its random streams continue only on {saved_device} (pass --device {saved_device})")


def resume_command(argv) -> str:
    kept = [a for a in argv if a not in ("--overwrite", "--resume")]
    return shlex.join(["python", "main.py", *kept, "--resume"])


def train_and_report(run: Run, folder: str, start_epoch: int, argv) -> int:
    """Run the epochs; turn each way of stopping into a final status, one line and an exit code."""
    main_process = run.dist.is_main
    run.stop.install()
    if main_process:
        print(f"run folder: {folder}" + (f" (resuming after epoch {start_epoch})" if start_epoch else ""), flush=True)
    try:
        status = run_epochs(run, start_epoch)
    except Interrupted as stop:
        run.stop.restore()
        run.log.write_metrics(run.history, "interrupted")
        last = run.history[-1]["epoch"] if run.history else 0
        if main_process:
            print(f"main.py: interrupted by {stop} after epoch {last}; resume with: {resume_command(argv)}",
                  file=sys.stderr)
        return 128 + stop.signum
    except Diverged as diverged:
        run.stop.restore()
        run.log.write_metrics(run.history, "diverged")
        if main_process:
            print(f"main.py: training loss became non-finite in epoch {diverged.epoch}; {METRICS_FILE} keeps "
                  f"epochs 0-{diverged.epoch} (lower --lr, or pass --allow-nonfinite to continue)", file=sys.stderr)
        return EXIT_DIVERGED
    run.stop.restore()
    run.log.write_metrics(run.history, status)
    if main_process:
        print(f"done: {folder}\nplot it: python utils.py curves {folder} && python utils.py nc {folder}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
