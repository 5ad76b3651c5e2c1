"""The epoch loop: mixup training step, clean evaluation with the NC pass, logging.

Per epoch:
  1. train on mixed batches; loss and accuracy accumulate on the device and are
     read once, at the end (the epoch's only host sync);
  2. a clean pass over the test split (eval mode, inference mode, large
     batches), and at the NC epochs over the training split too, gives the
     features; from them, in float64, the logits (loss, accuracy, calibration)
     and the NC metrics. Under --eval-precision auto the pass runs in a fast
     precision, a fixed training sample estimates the floor its rounding puts
     under NC1, and a pass whose NC1 comes near that floor is redone in float32;
  3. the record is appended to metrics.pkl, and at the feature epochs the
     features pickle is written; a checkpoint follows every --checkpoint-every
     (epochs or wall time), and at a stop request the last finished epoch's.
"""
from __future__ import annotations

import math
import os
import signal
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from checkpoint import capture_state, detached_copy
from cli import checkpoint_policy
from collapse_metrics import nc1_floor, nc_statistics
from compilation import runs_compiled
from data import Split
from data.batches import Normalizer, TrainBatches, eval_batches
from distributed import DistContext
from feature_capture import FeatureCapture
from layers import INPUT, LayerStatistics, ManifoldMixer, read_stages
from mixup import (MixingDraws, cutmix_batch, mixes, mixup_batch, pair_permutation, sample_lambdas, sample_mixing,
                   soft_targets)
from models.base import FEATURES

ECE_BINS = 15
PROGRESS_REFRESH_S = 0.5  # how often the bar asks the device for running loss/accuracy
# --eval-precision auto: the fast measurement precision per device type. TF32 took 4.6 s where
# float32 took 25.4 s for WRN-40-10's pass on an H100. None on a CPU, where auto is float32:
# bf16 is slower there (446 s against 39 s for bench/throughput.py's ResNet-18 width-1/8 pass).
AUTO_FAST_PRECISION = {"cuda": "tf32"}
FLOOR_SAMPLE_PER_CLASS = 32  # training images per class forwarded in both precisions at every NC pass
# A fast pass whose NC1 is below this many times its rounding floor is redone in float32:
# the floor then biases NC1 by more than 1 %.
FLOOR_MARGIN = 100.0


def checkpoint_clock() -> float:
    """Seconds for the wall-time checkpoint schedule (a function, so that tests can drive it)."""
    return time.monotonic()


class Interrupted(Exception):
    """SIGINT or SIGTERM arrived; the epoch in progress is abandoned."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class Diverged(Exception):
    """The training loss became non-finite (and --allow-nonfinite was not given)."""

    def __init__(self, epoch: int):
        super().__init__(f"epoch {epoch}")
        self.epoch = epoch


class StopFlag:
    """Turns SIGINT/SIGTERM into a flag the loop checks between steps.

    A repeat of the signal within REPEAT_GRACE_S is ignored (a job scheduler
    and a sweep may both forward one); a later repeat exits at once, which
    loses nothing: every file in the run folder is replaced atomically.
    """
    REPEAT_GRACE_S = 1.0

    def __init__(self):
        self.signum: Optional[int] = None
        self._first_at = 0.0
        self._previous = {}

    def install(self) -> None:
        for signum in (signal.SIGINT, signal.SIGTERM):
            self._previous[signum] = signal.signal(signum, self._handle)

    def restore(self) -> None:
        """Give the handlers back (main.main may run inside a notebook or a test)."""
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        now = time.monotonic()
        if self.signum is None:
            self.signum, self._first_at = signum, now
        elif now - self._first_at > self.REPEAT_GRACE_S:
            os.write(2, f"main.py: second {signal.Signals(signum).name}: stopping now\n".encode())
            os._exit(128 + signum)

    @property
    def requested(self) -> bool:
        return self.signum is not None


@dataclass
class Generators:
    data: torch.Generator   # shuffling and crop/flip, on the device
    pairs: torch.Generator  # mixup partner permutations, on the device
    lam: np.random.Generator  # mixup weights, drawn per epoch on the host


@dataclass
class Run:
    """Everything the loop needs, built by main.py."""
    cfg: object
    num_classes: int
    model: torch.nn.Module        # the bare model: evaluation, features, state dicts
    step_model: torch.nn.Module   # what the training step calls (DDP / compiled wrapper or the model)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    loss_fn: Callable
    batches: TrainBatches
    eval_splits: Dict[str, Split]  # this process's shard of each clean split, on the device
    normalize: Normalizer
    generators: Generators
    device: torch.device
    autocast: Callable            # context of the training forward (bf16 under --amp)
    eval_autocast: Callable       # context of the measurement forward (--eval-precision, resolved)
    dist: DistContext
    capture: Optional[FeatureCapture]
    nc_epochs: set
    feature_epochs: set
    log: object                   # RunLog: writes the run folder (no-op on non-main processes)
    nc_layers: List[str] = field(default_factory=list)  # stages measured below the classifier (--nc-layers)
    layer_sample_rows: Optional[torch.Tensor] = None    # train rows whose stage vectors give the NCC accuracy
    mixup_layers: List[str] = field(default_factory=lambda: [INPUT])  # where mixing may happen (--mixup-layer)
    mixer: Optional[ManifoldMixer] = None                 # hooks that mix a stage's output (manifold mixup)
    eval_precision: str = "float32"  # what eval_autocast computes in: float32, tf32 or bf16
    floor_sample: Optional[Split] = None  # auto: the fixed training sample that measures the rounding floor
    stop: StopFlag = field(default_factory=StopFlag)
    history: List[dict] = field(default_factory=list)


def make_autocast(device: torch.device, enabled: bool) -> Callable:
    """bf16 autocast on the device when --amp, else a no-op context."""
    if not enabled:
        return nullcontext
    return lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)


@contextmanager
def float32_products(tf32: bool):
    """float32 convolutions and matrix products, with or without TF32 tensor-core arithmetic.

    PyTorch lets cuDNN use TF32 (10 mantissa bits) for float32 convolutions by
    default; like bf16, that rounding puts a floor under NC1 late in training,
    so exact float32 turns it off. (On a CPU both are plain float32.)
    """
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def exact_float32():
    return float32_products(tf32=False)


def make_eval_autocast(device: torch.device, precision: str) -> Callable:
    """The measurement forward's context: true float32 by default, bf16 autocast only on request.

    bf16 keeps 8 mantissa bits: its rounding alone puts a floor of roughly
    1e-6 (C-1) |h|^2 / |mu_c - mu_G|^2 under NC1, which late epochs reach.
    """
    if precision == "bf16":
        return make_autocast(device, True)
    if precision == "tf32":
        return lambda: float32_products(tf32=True)
    return exact_float32


class LaggedReadout:
    """Running loss/accuracy for the progress bar, copied off the device without waiting for it.

    On CUDA a non-blocking copy into pinned memory is started and read at a
    later refresh, once its event has completed; the training loop never blocks.
    """

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.host = torch.zeros(3, dtype=torch.float64, pin_memory=self.cuda)
        self.event = torch.cuda.Event() if self.cuda else None
        self.pending = False
        self.last: Optional[list] = None

    def poll(self, totals: torch.Tensor) -> Optional[list]:
        if not self.cuda:
            return totals.tolist()
        if self.pending and self.event.query():
            self.last, self.pending = self.host.tolist(), False
        if not self.pending:
            self.host.copy_(totals, non_blocking=True)
            self.event.record()
            self.pending = True
        return self.last


def train_one_epoch(run: Run, epoch: int) -> torch.Tensor:
    """One pass of mixup training; returns device totals (loss * n, weighted correct, n)."""
    cfg, model, device = run.cfg, run.step_model, run.device
    batches = run.batches
    model.train()
    lams = sample_lambdas(run.generators.lam, cfg.mixup_alpha, len(batches), batches.batch_size,
                          cfg.mixup_per_sample)
    # Drawn after the lambdas, so that input mixup keeps its streams; one stage name per step.
    places = [run.mixup_layers[0]] * len(batches) if len(run.mixup_layers) == 1 else \
        [run.mixup_layers[i] for i in run.generators.lam.integers(len(run.mixup_layers), size=len(batches))]
    # Then CutMix and the choice of rule, only when asked for (plain mixup draws nothing more).
    draws = sample_mixing(run.generators.lam, lams, cfg.mixup_alpha, cfg.cutmix_alpha, cfg.mix_prob,
                          cfg.switch_prob)
    lams = to_device(draws.lam, device)
    cutmix = CutMixSteps(draws, lams, device, cfg) if cfg.cutmix_alpha > 0 else None
    totals = torch.zeros(3, dtype=torch.float64, device=device)
    readout = LaggedReadout(device)
    bar = tqdm(total=len(batches), desc=f"epoch {epoch}/{cfg.epochs}", unit="batch", leave=False,
               disable=not (cfg.progress and run.dist.is_main), dynamic_ncols=True)
    start = last_refresh = time.perf_counter()
    seen = 0
    for step, (x, y) in enumerate(batches):
        if run.stop.requested and not run.dist.enabled:
            bar.close()
            raise Interrupted(run.stop.signum)
        if not mixes(cfg) or not (cfg.mixup_per_sample or draws.mixed[step]):  # a host bool: no sync
            targets = F.one_hot(y, run.num_classes).float()
        elif cutmix is not None and cutmix.applies(step):
            x, targets = cutmix.batch(run, x, y, step)
        else:
            x, targets = mixed_batch(run, x, y, lams[step, :y.shape[0]] if cfg.mixup_per_sample else lams[step],
                                     places[step])
        with run.autocast():
            logits = model(x)
        if run.mixer is not None:
            run.mixer.disarm()  # the step's mixing is done; measurement forwards must never mix
        loss = run.loss_fn(logits.float(), targets)
        run.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        run.optimizer.step()
        with torch.no_grad():
            # credit lam for predicting y_a and 1 - lam for y_b: the mixup analogue of accuracy
            credit = targets.gather(1, logits.argmax(dim=1, keepdim=True)).sum()
            # In-place adds of device values and a Python scalar: no host-to-device copy, so no sync.
            totals[0] += loss.detach().double() * y.shape[0]
            totals[1] += credit
            totals[2] += y.shape[0]
        seen += y.shape[0]
        bar.update(1)
        now = time.perf_counter()
        if bar.disable is False and now - last_refresh > PROGRESS_REFRESH_S:
            last_refresh = now
            values = readout.poll(totals)
            postfix = {"img/s": f"{seen / (now - start):.0f}"}
            if values and values[2]:
                postfix.update(loss=f"{values[0] / values[2]:.4f}", acc=f"{values[1] / values[2]:.3f}")
            bar.set_postfix(postfix, refresh=False)
    bar.close()
    return totals


def mixed_batch(run: Run, x: torch.Tensor, y: torch.Tensor, lam: torch.Tensor, place: str) -> tuple:
    """Inputs for the step and their soft targets: the images mixed, or a stage armed to mix (manifold mixup)."""
    if place == INPUT:
        return mixup_batch(x, y, lam, run.generators.pairs, run.num_classes)
    partner = pair_permutation(x.shape[0], run.generators.pairs, x.device)
    run.mixer.arm(place, lam, partner)
    return x, soft_targets(y, y[partner], lam, run.num_classes)


def to_device(values: np.ndarray, device: torch.device) -> torch.Tensor:
    """An epoch's draws as float32 on the device, in one copy that does not wait (pinned source on CUDA)."""
    values = torch.from_numpy(values).float()
    if device.type == "cuda":
        values = values.pin_memory()  # a pinned source makes the one copy of the epoch asynchronous
    return values.to(device, non_blocking=True)


class CutMixSteps:
    """An epoch's CutMix draws on the device; which steps cut is read from the host copy (no sync)."""

    def __init__(self, draws: MixingDraws, lam: torch.Tensor, device: torch.device, cfg):
        self.draws, self.lam, self.per_sample = draws, lam, cfg.mixup_per_sample
        self.centre = to_device(draws.centre, device)
        # per sample with both rules, each sample picks its own; otherwise every sample of a step shares it
        self.cut = to_device(draws.cut, device).bool() if self.per_sample and cfg.mixup_alpha > 0 else None

    def applies(self, step: int) -> bool:
        return self.per_sample or bool(self.draws.cut[step])

    def batch(self, run: Run, x: torch.Tensor, y: torch.Tensor, step: int) -> tuple:
        if self.per_sample:
            size = y.shape[0]
            lam, centre = self.lam[step, :size], self.centre[step, :size]
            cut = None if self.cut is None else self.cut[step, :size]
        else:  # one box for the whole batch
            lam, centre, cut = self.lam[step:step + 1], self.centre[step:step + 1], None
        return cutmix_batch(x, y, lam, centre, cut, run.generators.pairs, run.num_classes)


@torch.inference_mode()
def collect_features(model, split: Split, batch_size: int, normalize: Normalizer, autocast,
                     layers: Optional[LayerStatistics] = None) -> torch.Tensor:
    """Penultimate features (N, d) of a clean split, float32, in eval mode.

    With `layers`, the same forward also feeds each chosen stage's vectors to it.
    """
    model.eval()
    H = torch.empty(len(split), model.feature_dim, dtype=torch.float32, device=split.labels.device)
    start = 0
    with read_stages(model, layers.names if layers else ()) as stage_vectors:
        for x, y in eval_batches(split.images, split.labels, batch_size, normalize):
            rows = slice(start, start + x.shape[0])
            with autocast():
                H[rows] = model.features(x).float()
            if layers is not None:
                layers.add({**stage_vectors, FEATURES: H[rows]}, y, rows)
            start = rows.stop
    return H


def _calibration_sums(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-bin (count, sum of confidence, sum of correct) over ECE_BINS equal-width bins."""
    confidence, predicted = logits.softmax(dim=1).max(dim=1)
    bins = (confidence * ECE_BINS).ceil().long().clamp(1, ECE_BINS) - 1
    sums = torch.zeros(3, ECE_BINS, dtype=torch.float64, device=logits.device)
    sums[0].index_add_(0, bins, torch.ones_like(confidence))
    sums[1].index_add_(0, bins, confidence)
    sums[2].index_add_(0, bins, (predicted == labels).double())
    return sums


def calibration_record(sums: torch.Tensor) -> dict:
    """ECE and the reliability-diagram numbers from summed bins (NaN for empty bins)."""
    count, confidence, correct = sums.tolist()
    total = sum(count)
    mean = lambda values: [v / n if n else math.nan for v, n in zip(values, count)]
    ece = sum(abs(a - c) for a, c, n in zip(correct, confidence, count) if n) / total if total else math.nan
    return {"ece": ece, "bin_edges": np.linspace(0, 1, ECE_BINS + 1).tolist(), "bin_counts": [int(n) for n in count],
            "bin_confidence": mean(confidence), "bin_accuracy": mean(correct)}


@torch.inference_mode()
def measure(run: Run, with_nc: bool, autocast: Optional[Callable] = None) -> tuple:
    """Clean loss/accuracy and calibration of the test split; with NC, the training split's and the NC metrics.

    The forward runs under `autocast` (default: the run's measurement precision).
    Returns (record fields, training class means or None, {stage: training class means} of --nc-layers).
    Without NC the training split is not evaluated (its clean loss and accuracy are None): that
    forward is most of the cost of a measurement.
    """
    model, cfg, autocast = run.model, run.cfg, autocast or run.eval_autocast
    weight = model.classifier.weight.double()
    bias = model.classifier.bias
    bias = torch.zeros(weight.shape[0], dtype=torch.float64, device=run.device) if bias is None else bias.double()
    fields, nc, train_means, layer_means = {"nc_layers": None, "train_loss": None, "train_acc": None}, {}, None, {}
    for name in ("train", "test") if with_nc else ("test",):
        split = run.eval_splits[name]
        layers = (LayerStatistics(run.nc_layers, run.num_classes, run.layer_sample_rows)
                  if with_nc and name == "train" and run.nc_layers else None)
        H = collect_features(model, split, cfg.eval_batch_size, run.normalize, autocast, layers)
        if with_nc:
            result = nc_statistics(H, split.labels, weight, bias, run.num_classes, class_means=train_means,
                                   all_reduce=run.dist.all_reduce)
            logits, nc[name] = result.logits, result.metrics
            if name == "train":
                train_means = result.class_means
            if layers is not None:
                fields["nc_layers"], layer_means = layers.finish(run.dist.all_reduce, nc["train"], train_means)
        else:
            logits = H.double() @ weight.T + bias
        targets = F.one_hot(split.labels, run.num_classes).double()
        sums = torch.stack([run.loss_fn(logits, targets) * len(split),
                            (logits.argmax(dim=1) == split.labels).sum().double(),
                            torch.full((), float(len(split)), dtype=torch.float64, device=run.device)])
        run.dist.all_reduce(sums)
        loss_sum, correct, count = sums.tolist()
        fields[f"{name}_loss"], fields[f"{name}_acc"] = loss_sum / count, correct / count
        if name == "test":
            bins = _calibration_sums(logits, split.labels)
            run.dist.all_reduce(bins)
            calibration = calibration_record(bins)
            fields["test_ece"], fields["test_calibration"] = calibration.pop("ece"), calibration
    fields["nc"] = nc if with_nc else None
    return fields, train_means, layer_means


def rounding_floor(run: Run, class_means: torch.Tensor) -> float:
    """nc1_floor of the fast precision: the fixed sample forwarded in it and in float32, against these means."""
    sample, cfg = run.floor_sample, run.cfg
    fast = collect_features(run.model, sample, cfg.eval_batch_size, run.normalize, run.eval_autocast)
    exact = collect_features(run.model, sample, cfg.eval_batch_size, run.normalize, exact_float32)
    return nc1_floor(fast - exact, sample.labels, class_means, run.num_classes)


def near_floor(nc1: float, floor: float) -> bool:
    return math.isfinite(nc1) and math.isfinite(floor) and nc1 < FLOOR_MARGIN * floor


def measure_checked(run: Run, with_nc: bool) -> tuple:
    """measure() in the run's precision; under auto, an NC pass near its rounding floor is redone in float32.

    Returns (fields with eval_precision and nc1_floor, training class means, layer means).
    """
    fields, train_means, layer_means = measure(run, with_nc, run.eval_autocast)
    precision, floor = run.eval_precision, None
    if with_nc and run.floor_sample is not None:
        floor = rounding_floor(run, train_means)
        # one decision for all processes: a redo is a collective pass, and float rounding may differ between GPUs
        if run.dist.any(near_floor(fields["nc"]["train"]["nc1"], floor), run.device):
            fields, train_means, layer_means = measure(run, with_nc, exact_float32)
            precision = "float32"
    fields.update(eval_precision=precision, nc1_floor=floor)
    return fields, train_means, layer_means


def measure_epoch(run: Run, epoch: int, lr: float) -> dict:
    """The record of one epoch's measurement, plus the features pickle at feature epochs."""
    with_features = epoch in run.feature_epochs
    start = time.perf_counter()
    run.dist.broadcast_buffers(run.model)  # every shard, the pickles and the checkpoint: process 0's network
    fields, train_means, layer_means = measure_checked(run, with_nc=epoch in run.nc_epochs or with_features)
    if run.device.type == "cuda":
        torch.cuda.synchronize(run.device)
    record = {"epoch": epoch, "lr": lr, "nc_time_s": time.perf_counter() - start, **fields}
    if with_features and run.capture is not None:
        # the features pickle in the precision its NC pass settled on
        autocast = exact_float32 if fields["eval_precision"] == "float32" else run.eval_autocast
        payload, record["mixup_geometry"] = run.capture.capture(run.model, epoch, train_means, autocast, layer_means)
        run.log.write_features(epoch, payload)
    return record


def current_lr(run: Run) -> float:
    return run.optimizer.param_groups[0]["lr"]


class Checkpoints:
    """When to write checkpoint.pt: every K epochs, or after the first epoch that ends S seconds after the last.

    The state after an epoch that is not written is kept in host memory, so that
    a stop request can still save the last finished epoch.
    """

    def __init__(self, run: Run):
        self.run = run
        self.every_epochs, self.every_seconds = checkpoint_policy(run.cfg.checkpoint_every)
        self.last_write = checkpoint_clock()
        self.unsaved: Optional[dict] = None

    def after_epoch(self, epoch: int) -> None:
        run = self.run
        due = epoch == run.cfg.epochs or (
            epoch % self.every_epochs == 0 if self.every_epochs else
            checkpoint_clock() - self.last_write >= self.every_seconds)
        due = run.dist.any(due, run.device) if self.every_seconds else due  # processes' clocks may disagree
        if due:
            run.log.write_checkpoint(capture_state(run, epoch))
            self.last_write, self.unsaved = checkpoint_clock(), None
        else:  # a host copy: for WRN-40-10 about 0.45 GB, a fraction of a second, far less than a write
            self.unsaved = detached_copy(capture_state(run, epoch))

    def at_stop(self) -> None:
        """Save the last finished epoch, if the schedule has not (a stop request ends the run here)."""
        if self.unsaved is not None:
            self.run.log.write_checkpoint(self.unsaved)
            self.unsaved = None


def run_epochs(run: Run, start_epoch: int) -> str:
    """Train from `start_epoch` + 1 to cfg.epochs; returns the final status.

    Raises Interrupted or Diverged; the run folder then holds every finished epoch,
    and checkpoint.pt the last one.
    """
    checkpoints = Checkpoints(run)
    try:
        return _run_epochs(run, start_epoch, checkpoints)
    except Interrupted:
        checkpoints.at_stop()
        raise


def _run_epochs(run: Run, start_epoch: int, checkpoints: Checkpoints) -> str:
    cfg = run.cfg
    if start_epoch == 0 and not run.history:
        record = measure_epoch(run, 0, current_lr(run))
        record.update(time_s=0.0, mixup_loss=None, mixup_acc=None, compiled=None, status="ok")
        finish_epoch(run, record)
    for epoch in range(start_epoch + 1, cfg.epochs + 1):
        lr = current_lr(run)
        start = time.perf_counter()
        totals = train_one_epoch(run, epoch)
        run.scheduler.step()
        run.dist.all_reduce(totals)
        loss_sum, credit, count = totals.tolist()  # the epoch's one host sync
        time_s = time.perf_counter() - start
        if run.dist.any(run.stop.requested, run.device):
            raise Interrupted(run.stop.signum or signal.SIGTERM)
        diverged = not math.isfinite(loss_sum)
        record = measure_epoch(run, epoch, lr)
        record.update(time_s=time_s, mixup_loss=loss_sum / count, mixup_acc=credit / count,
                      compiled=runs_compiled(run.step_model),
                      status="diverged" if diverged else "ok")
        finish_epoch(run, record)
        if diverged and not cfg.allow_nonfinite:
            raise Diverged(epoch)
        checkpoints.after_epoch(epoch)
    return "complete"


def finish_epoch(run: Run, record: dict) -> None:
    run.history.append(record)
    run.log.write_metrics(run.history, "running")
    if run.dist.is_main:
        print(summary_line(record, run.cfg.epochs, mixup=mixes(run.cfg)), flush=True)


def summary_line(record: dict, epochs: int, mixup: bool) -> str:
    parts = [f"epoch {record['epoch']:>{len(str(epochs))}}/{epochs}", f"lr {record['lr']:.3g}"]
    if record.get("mixup_loss") is not None:  # the objective over the epoch's (mixed, if mixup) batches
        parts.append(f"{'mixup' if mixup else 'train-batch'} loss {record['mixup_loss']:.4f}")
    if record["train_loss"] is not None:  # None at an epoch without an NC pass
        parts.append(f"train loss {record['train_loss']:.4f} acc {record['train_acc']:.4f}")
    parts.append(f"test acc {record['test_acc']:.4f} ece {record['test_ece']:.3f}")
    if record["nc"]:
        parts.append(f"NC1 {record['nc']['train']['nc1']:.4g}")
    if record.get("nc1_floor") is not None:
        parts.append(f"floor {record['nc1_floor']:.2g} ({record['eval_precision']})")
    parts.append(f"{record['time_s']:.1f}s + {record['nc_time_s']:.1f}s eval")
    if record["status"] != "ok":
        parts.append(record["status"].upper())
    return " | ".join(parts)
