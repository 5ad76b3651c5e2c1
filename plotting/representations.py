"""The `representations` figures, one row per run and one panel per feature
epoch: the Figure 1 view of Fisher, Meng & Papyan 2024, mixup features of a
class triple on the plane of its classifier simplex, or of its class means at a
stage below the classifier, optionally with the optimum of the
unconstrained-features model (triangle.py); all class means in 2-D PCA with
the classifier rows; and the cosines between all class means and between all
classifier rows (cosines.py).
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib.colors import to_hex
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from .cosines import (HISTOGRAM_KINDS, add_colour_bars, cosines_legend, draw_histogram, draw_matrix, epoch_colours,
                      norms_by_classes, payload_cosines, split_matrix)
from .groups import Group, common_description
from .labels import PointLabel, layout_now, place_labels
from .loading import RunError, feature_epochs, load_features, named_epochs
from .style import characters_in, figure_legend, new_figure, set_title, wrap_label
from .triangle import (Panel, TriangleOptions, draw_triangle_view, mean_of_means, mixed_points, triangle_heading,
                       triangle_legend)

VIEWS = ("triangle", "means", "cosines")
DEFAULT_PANELS = 4  # epochs shown when --epochs is not given: spread over the feature epochs
PANEL_SIZE = 3.4
MEAN_MARKER_AREA = 40  # points^2
MEANS_MARGIN = 0.12  # of the data span, either side: room for the labels of the outer points
LABELLED_CLASSES_UP_TO = 20  # more class labels than this are unreadable on one panel
MATRIX_SIZE = 2.6
HISTOGRAM_WIDTH = 2.6
# Of a row's height, what its rotated row label may not use: the label is centred on its panel
# and must stay within it, clear of the rows above and below.
ROW_LABEL_MARGIN = 0.5
ROW_LABEL_SIZE = 10  # axes.labelsize of the shared style


def pca_basis(class_means: np.ndarray):
    """(2, d) top principal directions of the centred class means, and their share of the variance."""
    finite = np.all(np.isfinite(class_means), axis=1)
    centred = class_means[finite] - class_means[finite].mean(axis=0)
    _, singular, vt = np.linalg.svd(centred, full_matrices=False)
    share = (singular[:2] ** 2).sum() / max((singular ** 2).sum(), np.finfo(float).tiny)
    return vt[:2], float(share)


def parse_epochs(text: Optional[str], available: Sequence[int], folder: str) -> List[int]:
    """Epochs named by --epochs ('1,10,last'), checked against the features on disk."""
    if not available:
        raise RunError(f"{folder}: no features/epoch_*.pkl (pass --feature-epochs to main.py)")
    if text is None:
        picks = np.unique(np.linspace(0, len(available) - 1, min(DEFAULT_PANELS, len(available))).round())
        return [available[int(i)] for i in picks]
    return named_epochs(text, available, lambda epoch, listing: (
        f"{folder}: no features at epoch {epoch} (features exist for epochs {listing})"))


def class_colours(num_classes: int) -> List[str]:
    """One distinct colour per class: tab10 or tab20, else evenly spaced along a cyclic map."""
    for name, size in (("tab10", 10), ("tab20", 20)):
        if num_classes <= size:
            return [to_hex(c) for c in colormaps[name].colors[:num_classes]]
    return [to_hex(c) for c in colormaps["twilight"](np.linspace(0, 1, num_classes, endpoint=False))]


def _classifier_lines(ax, W: np.ndarray, basis: np.ndarray, mean_norm: float, colours) -> np.ndarray:
    """Centred classifier rows on the PCA plane, all scaled by one factor (mean row norm -> mean_norm),
    so the drawn lengths still show how much of each row lies in the plane. Returns the tips."""
    centred = W - W.mean(axis=0)
    scale = mean_norm / max(np.linalg.norm(centred, axis=1).mean(), np.finfo(float).tiny)
    tips = centred @ basis.T * scale
    for tip, colour in zip(tips, colours):
        ax.plot([0, tip[0]], [0, tip[1]], color=colour, linewidth=1.1, alpha=0.8, linestyle="--")
    return tips


def square_limits(ax, points: np.ndarray, margin: float) -> None:
    """Equal axes on a square around the finite points, fixed now: the spots chosen for the labels
    stay valid whatever resolution or format the figure is saved in."""
    finite = points[np.all(np.isfinite(points), axis=1)]
    low, high = finite.min(axis=0), finite.max(axis=0)
    centre, half = (low + high) / 2, max(float((high - low).max()) / 2, np.finfo(float).tiny) * (1 + 2 * margin)
    ax.set(xlim=(centre[0] - half, centre[0] + half), ylim=(centre[1] - half, centre[1] + half))
    ax.set_aspect("equal", adjustable="box")


def draw_means_view(ax, panel: Panel) -> List[PointLabel]:
    """Class means and classifier rows in the class colours; returns the labels to place once laid out."""
    payload = panel.payload
    means = np.asarray(payload["class_means"], dtype=np.float64)
    basis, share = pca_basis(means)
    centre = mean_of_means(means)
    points = (means - centre) @ basis.T
    colours = class_colours(len(means))
    mean_norm = float(np.nanmean(np.linalg.norm(means - centre, axis=1)))
    tips = _classifier_lines(ax, np.asarray(payload["W"], dtype=np.float64), basis, mean_norm, colours)
    ax.scatter(points[:, 0], points[:, 1], s=MEAN_MARKER_AREA, c=colours, edgecolors="white", linewidths=0.8,
               zorder=3)
    square_limits(ax, np.concatenate([points, tips, np.zeros((1, 2))]), MEANS_MARGIN)
    ax.set_title(f"epoch {panel.epoch}\nPC 1+2 hold {100 * share:.0f}% of the variance")
    if len(means) > LABELLED_CLASSES_UP_TO:
        return []
    return [PointLabel(x, y, str(c), colours[c], np.sqrt(MEAN_MARKER_AREA)) for c, (x, y) in enumerate(points)]


def _panels(groups: Sequence[Group], epochs_text: Optional[str]) -> List[List[Panel]]:
    rows = []
    several = sum(len(group.runs) for group in groups) > 1
    for group in groups:
        for run in group.runs:
            label = group.label + (f", seed {run.seed}" if len(group.runs) > 1 else "") if several else ""
            epochs = parse_epochs(epochs_text, feature_epochs(run.folder), run.folder)
            rows.append([Panel(run, label, e, load_features(run.folder, e)) for e in epochs])
    return rows


def _means_legend(figure: Figure) -> None:
    handles = [Line2D([], [], marker="o", linestyle="", color="0.35", markersize=6,
                      label=r"class mean $\mu_c - \mu_G$ (labelled with its class)"),
               Line2D([], [], color="0.35", linestyle="--", label=r"classifier row $w_c$ in its class colour "
                                                                    r"(common scale)")]
    figure_legend(figure, handles)


def _draw_point_views(figure: Figure, axes, rows: List[List[Panel]], view: str, options: TriangleOptions) -> list:
    """The triangle or means panels; returns (axes, labels) of the means panels, to place once laid out."""
    pending = []
    for row_axes, row in zip(axes, rows):
        for ax, panel in zip(row_axes, row):
            if view == "triangle":
                draw_triangle_view(ax, panel, options)
            else:
                pending.append((ax, draw_means_view(ax, panel)))
        for ax in row_axes[len(row):]:
            ax.set_visible(False)
    _label_axes(axes, view, [row[0].label for row in rows])
    if view == "triangle":
        triangle_legend(figure, axes, options)
    else:
        _means_legend(figure)
    return pending


def _point_views_figure(rows: List[List[Panel]], view: str, options: TriangleOptions):
    """The figure and its pending point labels."""
    columns = max(len(row) for row in rows)
    extra_width = 1.6 if view == "triangle" else 0.2
    figure = new_figure(PANEL_SIZE * columns + extra_width, (PANEL_SIZE + 0.5) * len(rows) + 0.9)
    axes = figure.subplots(len(rows), columns, squeeze=False)
    return figure, _draw_point_views(figure, axes, rows, view, options)


def _cosines_figure(rows: List[List[Panel]]) -> Figure:
    """Per run: one split cosine matrix per epoch, then the histograms of H's and W's off-diagonal cosines."""
    columns = max(len(row) for row in rows)
    figure = new_figure(MATRIX_SIZE * columns + HISTOGRAM_WIDTH * 2 + 1.4, (MATRIX_SIZE + 0.5) * len(rows) + 1.2)
    axes = figure.subplots(len(rows), columns + 2, squeeze=False,
                           gridspec_kw={"width_ratios": [MATRIX_SIZE] * columns + [HISTOGRAM_WIDTH] * 2})
    colours = epoch_colours([panel.epoch for row in rows for panel in row])
    per_row = [[(panel.epoch, payload_cosines(panel.payload)) for panel in row] for row in rows]
    matrices = [[split_matrix(c["h"], c["w"]) for _, c in row] for row in per_row]
    norms = norms_by_classes([matrix for row in matrices for matrix in row])
    images, matrix_axes = {}, {}
    for row_axes, row, per_epoch, row_matrices in zip(axes, rows, per_row, matrices):
        count = row_matrices[0].shape[0]
        for ax, (epoch, _), matrix in zip(row_axes, per_epoch, row_matrices):
            images.setdefault(count, []).append(draw_matrix(ax, matrix, norms[count], epoch))
            matrix_axes.setdefault(count, []).append(ax)
        for ax in row_axes[len(row):columns]:
            ax.set_visible(False)
        for ax, (title, kind) in zip(row_axes[columns:], HISTOGRAM_KINDS):
            draw_histogram(ax, per_epoch, kind, title, colours, norms[count])
        row_axes[0].set_ylabel(row_label(row[0].label, "class", MATRIX_SIZE))
    for ax in axes[-1, :columns]:
        ax.set_xlabel("class")
    add_colour_bars(figure, images, matrix_axes)
    cosines_legend(figure, list(norms))
    return figure


HEADINGS = {
    "means": "Class means in 2-D PCA (dots) and classifier rows on the same plane (dashed, common scale)",
    "cosines": r"Cosines between centred class means ($\mathbf{H}$) and between classifier rows ($\mathbf{W}$); "
               r"a simplex ETF has $-1/(C-1)$ off the diagonal",
}


def representations_figure(groups: Sequence[Group], epochs_text: Optional[str], view: str,
                           options: TriangleOptions = TriangleOptions()) -> Figure:
    """One row per run, one panel per chosen epoch; `options` apply to the triangle view."""
    rows = _panels(groups, epochs_text)
    pending = []
    if view == "cosines":
        figure = _cosines_figure(rows)
    else:
        figure, pending = _point_views_figure(rows, view, options)
    if view == "triangle":
        rule = "mixup" if options.layer is not None else options.rule  # stages hold the mixup points only
        heading = triangle_heading({tuple(mixed_points(row[0], rule)["triple"]) for row in rows}, options)
    else:
        heading = HEADINGS[view]
    runs = [run for group in groups for run in group.runs]
    set_title(figure, heading, common_description(runs, [key for key, _ in groups[0].key]))
    if pending:  # last: the labels are placed on the figure as it will be laid out
        layout_now(figure)
        for ax, labels in pending:
            place_labels(ax, labels)
    return figure


def _label_axes(axes, view: str, row_labels: Sequence[str]) -> None:
    """Axis names on the outer panels; with several runs, each row names its run above the y label."""
    names = ("plane coordinate 1", "plane coordinate 2") if view == "triangle" else ("PC 1", "PC 2")
    for ax in axes[-1]:
        ax.set_xlabel(names[0])
    for ax, label in zip(axes[:, 0], row_labels):
        ax.set_ylabel(row_label(label, names[1], PANEL_SIZE))


def row_label(label: str, axis_name: str, row_height: float) -> str:
    """A run's name above its row's y-axis name, wrapped to the height of the row."""
    if not label:
        return axis_name
    return f"{wrap_label(label, characters_in(row_height - ROW_LABEL_MARGIN, ROW_LABEL_SIZE))}\n{axis_name}"
