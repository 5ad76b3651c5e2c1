"""The figures over epoch records: training curves, the NC panels of Papyan et
al. 2020, comparisons of chosen metrics, and reliability diagrams.

Each function takes groups of runs (see groups.py) and returns a Figure; the
caller saves it. Colours come from the groups, line styles name what differs
inside a panel (train/test split, features H vs classifier W).
"""
from __future__ import annotations

import math
from dataclasses import replace
from typing import List, Optional, Sequence, Tuple

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from .groups import Group, common_description
from .loading import Run, RunError
from .metrics import Metric, aggregate, resolve_metric
from .style import (band_note, draw_aggregate, figure_legend, finish_log_axis, group_handles, integer_epochs,
                    mark_zero_level, new_figure, panel_title, set_title, style_handles)

PANEL_WIDTH = 3.6
PANEL_HEIGHT = 2.8
LEGEND_HEIGHT = 0.7
TITLE_HEIGHT = 0.4
MAX_COLUMNS = 3
CLEAN_SPLIT_STYLES = (("train (clean inputs)", "-"), ("test", "--"))
BATCHES_LINESTYLE = ":"
HW_STYLES = ((r"$\mathbf{H}$: class means", "-"), (r"$\mathbf{W}$: classifier rows", "--"))
GAP_COLOUR = "#D62728"
DIAGONAL_COLOUR = "0.4"
CALIBRATION_MIN_WIDTH = 5.0
EPOCH_MARGIN = 0.03  # of the epoch span, either side

# The panels of `nc`: (title, metric keys); a second key (the classifier W) is dashed.
# Bare NC keys take --split; the y label is the first metric's.
NC_PANELS = (
    ("NC1: within-class variability", ("nc1",)),
    ("NC1: class-distance normalised variance", ("nc1_cdnv",)),
    ("NC2: equinorm", ("nc2_equinorm_h", "nc2_equinorm_w")),
    ("NC2: equiangularity", ("nc2_equiangle_h", "nc2_equiangle_w")),
    ("NC2: maximal angle", ("nc2_maxangle_h", "nc2_maxangle_w")),
    ("NC2: distance to a simplex ETF", ("nc2_etf_h", "nc2_etf_w")),
    ("NC3: self-duality", ("nc3",)),
    ("NC4: nearest class-centre mismatch", ("nc4",)),
)
# The last panel marks the terminal phase: the error of the split whose features are measured.
NC_ERROR_PANELS = {"train": ("training error (clean inputs)", ("train_err",)), "test": ("test error", ("test_err",))}
H_W_LINESTYLES = ("-", "--")


def _title(figure: Figure, heading: str, runs: Sequence[Run], groups: Sequence[Group], band: str,
           exclude: Sequence[str]) -> None:
    set_title(figure, heading, common_description(runs, exclude), band_note(band, groups))


def _grouping_keys(groups: Sequence[Group]) -> List[str]:
    return [key for key, _ in groups[0].key] if groups else []


def _all_runs(groups: Sequence[Group]) -> List[Run]:
    return [run for group in groups for run in group.runs]


def _plot_metric(ax, groups: Sequence[Group], metric: Metric, band: str, linestyle: str = "-") -> list:
    """Every group's aggregate of `metric` on `ax`; returns the zero levels used on a log axis."""
    levels = []
    for group in groups:
        data = aggregate(group.runs, metric, band, on_log_axis=metric.log)
        draw_aggregate(ax, data, group.colour, linestyle)
        levels.append(data.zero_level)
    return levels


def _finish_axis(ax, ylabel: str, log: bool, levels=()) -> None:
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    integer_epochs(ax)
    if log and ax.has_data():
        ax.set_yscale("log")
        mark_zero_level(ax, levels)
        finish_log_axis(ax)
    if not ax.has_data():
        ax.text(0.5, 0.5, "not measured", transform=ax.transAxes, ha="center", va="center", color="0.5")


def _span_all_epochs(axes, groups: Sequence[Group]) -> None:
    """Every panel spans the epochs of all runs, so panels line up and one point is not a zoomed axis."""
    epochs = [record["epoch"] for run in _all_runs(groups) for record in run.records]
    if not epochs:
        return
    first, last = min(epochs), max(epochs)
    margin = EPOCH_MARGIN * max(last - first, 1)
    for ax in axes:
        ax.set_xlim(first - margin, last + margin)


def _log_epoch_axes(axes, groups: Sequence[Group]) -> bool:
    """A log epoch axis (linear below epoch 1, so epoch 0 shows) when every run measured NC on the log schedule.

    Papyan et al. read every NC figure on a log epoch axis; their log-spaced points are even there.
    """
    runs = _all_runs(groups)
    if not runs or any(run.config.get("nc_epochs") != "log" for run in runs):
        return False
    last = max(record["epoch"] for run in runs for record in run.records)
    for ax in axes:
        ax.set_xscale("symlog", linthresh=1.0, linscale=0.5)
        ax.set_xlim(0, last * (1 + EPOCH_MARGIN))
    return True


def _grid(count: int):
    """A figure with `count` panels in rows of at most MAX_COLUMNS, room for a title and a legend."""
    columns = min(MAX_COLUMNS, count)
    rows = math.ceil(count / columns)
    figure = new_figure(PANEL_WIDTH * columns, PANEL_HEIGHT * rows + LEGEND_HEIGHT + TITLE_HEIGHT)
    axes = figure.subplots(rows, columns, squeeze=False).flatten()
    for ax in axes[count:]:
        ax.set_visible(False)
    return figure, axes[:count]


def _uses_mixup(run: Run) -> bool:
    return float(run.config.get("mixup_alpha") or 0.0) > 0.0


def batches_label(runs: Sequence[Run]) -> str:
    """What the dotted line shows: the training objective over the batches the model was trained on."""
    with_mixup = {_uses_mixup(run) for run in runs}
    if with_mixup == {False}:
        return "training batches"
    if with_mixup == {True}:
        return "mixup training batches"
    return "training batches (mixed where mixup_alpha > 0)"


def split_styles(runs: Sequence[Run]) -> Tuple[Tuple[str, str], ...]:
    return CLEAN_SPLIT_STYLES + ((batches_label(runs), BATCHES_LINESTYLE),)


def loss_panels(groups: Sequence[Group]) -> List[Tuple[str, List[Group]]]:
    """One (loss name, groups restricted to that loss's runs) per loss: losses have their own scales."""
    losses = sorted({str(run.config.get("loss")) for run in _all_runs(groups)})
    panels = []
    for loss in losses:
        subset = [replace(group, runs=[run for run in group.runs if str(run.config.get("loss")) == loss])
                  for group in groups]
        panels.append((loss, [group for group in subset if group.runs]))
    return panels


def curves_figure(groups: Sequence[Group], band: str, show_error: bool) -> Figure:
    """One loss panel (log) per loss, then accuracy, or error on a log scale as in the terminal-phase plots."""
    losses = loss_panels(groups)
    figure, axes = _grid(len(losses) + 1)
    styles = split_styles(_all_runs(groups))
    for ax, (loss, loss_groups) in zip(axes, losses):
        levels = []
        for (_, linestyle), source in zip(styles, ("train", "test", "mixup")):
            levels += _plot_metric(ax, loss_groups, resolve_metric(f"{source}_loss"), band, linestyle)
        _finish_axis(ax, f"{loss} loss", True, levels)
        panel_title(ax, f"{loss} loss" if len(losses) > 1 else "loss", PANEL_WIDTH)
    acc_ax, kind = axes[-1], "err" if show_error else "acc"
    levels = []
    for (_, linestyle), source in zip(styles, ("train", "test", "mixup")):
        if show_error and source == "mixup":
            continue  # mixup batches have a lambda-weighted accuracy, but no count of errors
        levels += _plot_metric(acc_ax, groups, resolve_metric(f"{source}_{kind}"), band, linestyle)
    _finish_axis(acc_ax, "error (%)" if show_error else "accuracy (%)", show_error, levels)
    panel_title(acc_ax, "error" if show_error else "accuracy", PANEL_WIDTH)
    _span_all_epochs(axes, groups)
    # the loss panels always show all three sources; the error panel has no dotted line, so say where it is
    if show_error:
        styles = styles[:2] + ((f"{styles[2][0]} (loss panels only)", styles[2][1]),)
    figure_legend(figure, group_handles(groups) + style_handles(styles))
    _title(figure, "Training curves", _all_runs(groups), groups, band, _grouping_keys(groups))
    return figure


def nc_figure(groups: Sequence[Group], split: str, band: str) -> Figure:
    """The Papyan et al. 2020 panels against epoch, for one split."""
    panels = NC_PANELS + (NC_ERROR_PANELS[split],)
    figure, axes = _grid(len(panels))
    for ax, (title, keys) in zip(axes, panels):
        metrics = [resolve_metric(key, split) for key in keys]
        levels = []
        for metric, linestyle in zip(metrics, H_W_LINESTYLES):
            levels += _plot_metric(ax, groups, metric, band, linestyle)
        _finish_axis(ax, metrics[0].label, metrics[0].log, levels)
        panel_title(ax, title, PANEL_WIDTH)
    if not _log_epoch_axes(axes, groups):
        _span_all_epochs(axes, groups)
    figure_legend(figure, group_handles(groups) + style_handles(HW_STYLES))
    _title(figure, f"Neural collapse, {split} split", _all_runs(groups), groups, band, _grouping_keys(groups))
    return figure


def compare_figure(groups: Sequence[Group], metrics: Sequence[Metric], band: str) -> Figure:
    """One panel per metric, one line (and band) per group."""
    figure, axes = _grid(len(metrics))
    for ax, metric in zip(axes, metrics):
        levels = _plot_metric(ax, groups, metric, band)
        _finish_axis(ax, metric.label, metric.log, levels)
        panel_title(ax, metric.title, PANEL_WIDTH)
    _span_all_epochs(axes, groups)
    figure_legend(figure, group_handles(groups))
    by = ", ".join(_grouping_keys(groups)) or "config"
    _title(figure, f"Runs compared by {by}", _all_runs(groups), groups, band, _grouping_keys(groups))
    return figure


def calibration_record(run: Run, epoch: Optional[int]) -> dict:
    """The record of `epoch` (None: the last one) that carries test_calibration."""
    candidates = [r for r in run.records if isinstance(r.get("test_calibration"), dict)]
    if not candidates:
        raise RunError(f"{run.folder}: no epoch record has test_calibration")
    if epoch is None:
        return candidates[-1]
    for record in candidates:
        if record["epoch"] == epoch:
            return record
    available = [r["epoch"] for r in candidates]
    raise RunError(f"{run.folder}: no calibration at epoch {epoch} (epochs {available[0]}-{available[-1]} "
                   f"have it)")


def _calibration_arrays(record: dict):
    calibration = record["test_calibration"]
    return tuple(np.asarray(calibration[key], dtype=float)
                 for key in ("bin_edges", "bin_counts", "bin_confidence", "bin_accuracy"))


def _reliability(ax, record: dict, colour: str) -> None:
    """Accuracy per confidence bin, its gap to the bin's mean confidence, the diagonal and the ECE."""
    edges, counts, confidence, accuracy = _calibration_arrays(record)
    filled = counts > 0  # empty bins have NaN confidence and accuracy
    left, width = edges[:-1][filled], np.diff(edges)[filled]
    ax.bar(left, accuracy[filled], width=width, align="edge", color=colour, edgecolor="white", linewidth=0.6)
    ax.bar(left, confidence[filled] - accuracy[filled], bottom=accuracy[filled], width=width, align="edge",
           facecolor="none", edgecolor=GAP_COLOUR, hatch="///", linewidth=0.8)
    ax.plot([0, 1], [0, 1], linestyle="--", color=DIAGONAL_COLOUR, linewidth=1.0)
    ax.set(xlim=(0, 1), ylim=(0, 1), ylabel="accuracy in bin")
    ece = record.get("test_ece")
    if ece is not None and math.isfinite(ece):
        ax.text(0.04, 0.95, f"ECE = {100 * ece:.1f}%", transform=ax.transAxes, va="top",
                bbox={"facecolor": "white", "edgecolor": "0.7", "boxstyle": "round,pad=0.3"})


def _confidence_histogram(ax, record: dict, colour: str) -> None:
    edges, counts, _, _ = _calibration_arrays(record)
    share = 100 * counts / counts.sum() if counts.sum() else counts
    ax.bar(edges[:-1], share, width=np.diff(edges), align="edge", color=colour, edgecolor="white", linewidth=0.6)
    ax.set(xlim=(0, 1), xlabel="confidence (max softmax probability)", ylabel="test samples (%)")


def calibration_figure(groups: Sequence[Group], epoch: Optional[int]) -> Figure:
    """A reliability diagram (Guo et al. 2017 style) per run, with its confidence histogram."""
    runs = [(group, run) for group in groups for run in group.runs]
    figure = new_figure(max(CALIBRATION_MIN_WIDTH, PANEL_WIDTH * len(runs) + 0.2), 5.4)
    grid = figure.add_gridspec(2, len(runs), height_ratios=(3, 1))
    first_count_ax = None
    for column, (group, run) in enumerate(runs):
        record = calibration_record(run, epoch)
        ax = figure.add_subplot(grid[0, column])
        # one scale for every run's share of samples: the histograms are compared side by side
        count_ax = figure.add_subplot(grid[1, column], sharex=ax, sharey=first_count_ax)
        first_count_ax = first_count_ax or count_ax
        _reliability(ax, record, group.colour)
        _confidence_histogram(count_ax, record, group.colour)
        seed = f", seed {run.seed}" if run.seed is not None else ""
        heading = group.label if len(groups) > 1 else run.name
        panel_title(ax, f"{heading}{seed}\nepoch {record['epoch']}", PANEL_WIDTH)
    bar_colour = groups[0].colour if len(groups) == 1 else "0.35"
    handles = [Patch(color=bar_colour, label="accuracy in bin"),
               Patch(facecolor="none", hatch="///", edgecolor=GAP_COLOUR, label="gap to mean confidence"),
               style_handles((("perfect calibration", "--"),))[0]]
    figure_legend(figure, handles)
    shared = common_description([run for _, run in runs], _grouping_keys(groups))
    set_title(figure, "Reliability on the test split", shared)
    return figure
