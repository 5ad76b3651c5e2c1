"""The `layers` figure: neural collapse and mixup geometry against depth.

One row per run, three panels whose x axis is the run's measured stages
(--nc-layers), input to output: NC1 of the clean training split (log scale);
the error of the nearest-class-mean classifier at each stage (log scale: He &
Su 2023's "law of data separation" is a geometric decay with depth, a straight
line on this axis, and 98.9 % against 99.9 % accuracy would be one point on a
linear one); and the mixup non-linearity of the triple's different-class points
against that stage's class means (feature epochs only). One line per chosen
epoch, its colour the epoch's place in the chosen epochs (a sequential map).
Where manifold mixup mixed a stage, a dotted vertical line marks it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence

import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from .cosines import epoch_colours
from .groups import Group, common_description
from .loading import Run, RunError, named_epochs
from .metrics import GEOMETRY_METRICS, LAYER_PREFIX, NC_METRICS, layer_metric, value_at
from .style import figure_legend, finish_log_axis, mark_zero_level, new_figure, panel_title, set_title

DEFAULT_FEATURE_EPOCHS = 4  # spread over the feature epochs, after epoch 0
PANEL_WIDTH = 3.6
PANEL_HEIGHT = 2.9
LEGEND_HEIGHT = 0.7
TITLE_HEIGHT = 0.5
ROW_LABEL_HEIGHT = 0.3
ROW_LABEL_SIZE = 10
ROTATE_TICKS_ABOVE = 5  # more stage names than this are written at an angle
MIXING_LINE = {"color": "0.45", "linestyle": ":", "linewidth": 1.4}
INPUT = "input"  # main.py's --mixup-layer name for plain (input) mixup
# (per-layer metric key, panel title, y label, log scale); the keys are those of `layer.<stage>.<key>`.
PANELS = (
    ("nc1", "NC1 of the clean training split", NC_METRICS["nc1"][1], True),
    ("ncc_err", "nearest-class-mean error", "error (%)", True),
    ("diff_class_nonlinearity", "mixup non-linearity (feature epochs)", GEOMETRY_METRICS["diff_class_nonlinearity"][1],
     False),
    # against each pair's own clean ends: the bending alone, without the scatter around the class means
    ("diff_class_chord_nonlinearity", "chord non-linearity (feature epochs)",
     GEOMETRY_METRICS["diff_class_chord_nonlinearity"][1], False),
)


def per_layer_epochs(run: Run) -> List[int]:
    """Epochs whose record holds per-layer NC, ascending."""
    return sorted(r["epoch"] for r in run.records if r.get("nc_layers"))


def layer_geometry_epochs(run: Run) -> List[int]:
    """Feature epochs whose record holds the per-layer mixup non-linearity, ascending."""
    return sorted(r["epoch"] for r in run.records if (r.get("mixup_geometry") or {}).get("layers"))


def _spread(epochs: Sequence[int], count: int) -> List[int]:
    picks = np.unique(np.linspace(0, len(epochs) - 1, min(count, len(epochs))).round())
    return [epochs[int(i)] for i in picks]


def choose_epochs(text: Optional[str], run: Run) -> List[int]:
    """--epochs ('0,7,last') checked against the per-layer records; by default epoch 0 (when measured: the
    network before training) and up to DEFAULT_FEATURE_EPOCHS spread over the feature epochs, the only
    epochs with a non-linearity, so that its panel shows every line but epoch 0's."""
    available = per_layer_epochs(run)
    if not available:
        raise RunError(f"{run.folder}: no per-layer measurements (train the run with --nc-layers all "
                       f"or --nc-layers STAGE,...)")
    if text is None:
        features = [e for e in layer_geometry_epochs(run) if e in available] or available
        picks = _spread(features, DEFAULT_FEATURE_EPOCHS)
        return sorted({available[0], *picks}) if available[0] == 0 else picks
    return sorted(set(named_epochs(text, available, lambda epoch, listing: (
        f"{run.folder}: no per-layer measurements at epoch {epoch} (measured at epochs {listing})"))))


def measured_stages(run: Run) -> List[str]:
    """The stages with per-layer numbers, in the model's order (input to output)."""
    present = {stage for r in run.records for stage in (r.get("nc_layers") or {})}
    order = list(run.config.get("layer_names") or run.config.get("nc_layers") or sorted(present))
    return [stage for stage in order if stage in present]


def mixed_stages(run: Run, stages: Sequence[str]) -> List[str]:
    """The measured stages that manifold mixup mixed (none for input mixup)."""
    mixed = run.config.get("mixup_layers") or []
    return [stage for stage in stages if stage in mixed and stage != INPUT]


@dataclass
class Row:
    run: Run
    label: str
    stages: List[str]
    epochs: List[int]


def stage_values(record: dict, stages: Sequence[str], key: str, config: dict) -> tuple:
    """(the per-layer metric `key` at each stage in display units, the level of exact zeros or None).

    The numbers come from the registry's `layer.<stage>.<key>` metrics, as compare draws them: on a log
    axis an exact zero sits at the metric's zero floor (half of one sample's share for an error).
    """
    values, floors = [], []
    for stage in stages:
        metric = layer_metric(f"{LAYER_PREFIX}{stage}.{key}")
        value = value_at(record, metric)
        if metric.log and value == 0.0 and metric.zero_floor is not None:
            floor = metric.zero_floor(record, config)
            value = math.nan if floor is None else floor
            if floor is not None:
                floors.append(floor * metric.scale)
        values.append(value * metric.scale)
    return np.array(values), (min(floors) if floors else None)


def _plot(ax, values: np.ndarray, colour: str, log: bool) -> None:
    shown = np.where(values > 0, values, np.nan) if log else values  # a log axis cannot hold 0 or less
    if np.isfinite(shown).any():
        ax.plot(np.arange(len(values)), shown, color=colour, marker="o", markersize=3.5)


def _draw_row(axes, row: Row, colours: dict) -> None:
    levels = [[] for _ in PANELS]
    for epoch in row.epochs:
        record = row.run.record_at(epoch)
        for ax, panel_levels, (key, _, _, log) in zip(axes, levels, PANELS):
            values, level = stage_values(record, row.stages, key, row.run.config)
            _plot(ax, values, colours[epoch], log)
            panel_levels.append(level)
    for ax, panel_levels in zip(axes, levels):
        mark_zero_level(ax, panel_levels)
    for ax in axes:
        for stage in mixed_stages(row.run, row.stages):
            ax.axvline(row.stages.index(stage), **MIXING_LINE)


def _has_data(ax) -> bool:
    """Whether the panel holds a data line (solid), not only the dotted marks of mixing and zero."""
    return any(line.get_linestyle() == "-" for line in ax.get_lines())


def _finish_axes(axes, rows: Sequence[Row]) -> None:
    for row_axes, row in zip(axes, rows):
        rotate = len(row.stages) > ROTATE_TICKS_ABOVE
        for ax, (_, title, label, _) in zip(row_axes, PANELS):
            ax.set_xticks(range(len(row.stages)), labels=row.stages, rotation=45 if rotate else 0,
                          ha="right" if rotate else "center")
            ax.set_xlim(-0.3, len(row.stages) - 0.7)
            ax.set_ylabel(label)
            panel_title(ax, title, PANEL_WIDTH)
            if not _has_data(ax):
                ax.text(0.5, 0.5, "not measured at these epochs", transform=ax.transAxes, ha="center",
                        va="center", color="0.5")
    for column, (_, _, _, log) in enumerate(PANELS):
        if log and any(_has_data(ax) for ax in axes[:, column]):
            for ax in axes[:, column]:
                ax.set_yscale("log")
            finish_log_axis(axes[0, column])  # the column shares its y axis
    for ax in axes[-1]:
        ax.set_xlabel("stage (input → output)")


def _rows(groups: Sequence[Group], epochs_text: Optional[str]) -> List[Row]:
    rows = []
    several = sum(len(group.runs) for group in groups) > 1
    for group in groups:
        for run in group.runs:
            label = group.label + (f", seed {run.seed}" if len(group.runs) > 1 else "") if several else ""
            epochs = choose_epochs(epochs_text, run)
            rows.append(Row(run, label, measured_stages(run), epochs))
    return rows


def _legend(figure: Figure, colours: dict, rows: Sequence[Row]) -> None:
    handles = [Line2D([], [], color=colour, marker="o", markersize=3.5, label=f"epoch {epoch}")
               for epoch, colour in sorted(colours.items())]
    if any(mixed_stages(row.run, row.stages) for row in rows):
        handles.append(Line2D([], [], label="stage mixed by manifold mixup", **MIXING_LINE))
    figure_legend(figure, handles)


def _row_axes(figure: Figure, rows: Sequence[Row]) -> np.ndarray:
    """(rows, panels) axes, each row in a subfigure headed by its run's label (a label beside the
    y axis would run into the next row's); each panel kind shares its y axis down the rows."""
    subfigures = figure.subfigures(len(rows), 1, squeeze=False)[:, 0]
    axes = np.array([subfigure.subplots(1, len(PANELS)) for subfigure in subfigures]).reshape(len(rows), len(PANELS))
    for subfigure, row in zip(subfigures, rows):
        if row.label:
            subfigure.suptitle(row.label, fontsize=ROW_LABEL_SIZE, fontweight="bold")
    for column in range(len(PANELS)):
        for ax in axes[1:, column]:
            ax.sharey(axes[0, column])
    return axes


def layers_figure(groups: Sequence[Group], epochs_text: Optional[str]) -> Figure:
    """One row of panels per run; the y axis of each panel kind is shared by all rows."""
    rows = _rows(groups, epochs_text)
    row_height = PANEL_HEIGHT + (ROW_LABEL_HEIGHT if any(row.label for row in rows) else 0.0)
    figure = new_figure(PANEL_WIDTH * len(PANELS), row_height * len(rows) + LEGEND_HEIGHT + TITLE_HEIGHT)
    axes = _row_axes(figure, rows)
    colours = epoch_colours([epoch for row in rows for epoch in row.epochs])
    for row_axes, row in zip(axes, rows):
        _draw_row(row_axes, row, colours)
    _finish_axes(axes, rows)
    _legend(figure, colours, rows)
    runs = [row.run for row in rows]
    set_title(figure, "Neural collapse and mixup geometry against depth",
              common_description(runs, [key for key, _ in groups[0].key]))
    return figure
