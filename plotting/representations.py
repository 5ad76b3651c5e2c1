"""The Figure 1 view of Fisher, Meng & Papyan 2024: last-layer features of
mixup points of a class triple, projected onto the plane of the triple's
classifier simplex; a second view of all class means in 2-D PCA; and a third
of the cosines between all class means and between all classifier rows
(cosines.py).

The projection. With W3 the (3, d) classifier rows of the triple and V the
(3, 2) vertices of an equilateral triangle centred at the origin,

    P = V^T (W3 W3^T)^{-1} W3        (2, d)

maps w_a, w_b, w_c exactly onto the vertices (P W3^T = V^T), whatever their
norms and angles. A feature is first centred on the global mean mu_G of the
training class means; its image is then the triangle combination of its
coordinates in the basis of the three classifier rows. When the three rows
already form an equiangular, equinorm simplex, P is (up to scale) the
orthogonal projection onto their plane.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib.cm import ScalarMappable
from matplotlib.colors import LinearSegmentedColormap, Normalize, to_hex
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from .cosines import (HISTOGRAM_KINDS, add_colour_bars, cosines_legend, draw_histogram, draw_matrix, epoch_colours,
                      norms_by_classes, payload_cosines, split_matrix)
from .groups import Group, common_description
from .labels import PointLabel, layout_now, place_labels
from .loading import Run, RunError, feature_epochs, load_features
from .style import figure_legend, new_figure, set_title

VIEWS = ("triangle", "means", "cosines")
DEFAULT_PANELS = 4  # epochs shown when --epochs is not given: spread over the feature epochs
PANEL_SIZE = 3.4
VERTEX_ANGLES_DEG = (90.0, 210.0, 330.0)
# The triple's classes, by position a, b, c; chosen away from the blue and orange of the mixup points.
TRIPLE_COLOURS = ("#009E73", "#CC79A7", "#8C564B")
MEAN_MARKER_AREA = 40  # points^2
MEANS_MARGIN = 0.12  # of the data span, either side: room for the labels of the outer points
LABELLED_CLASSES_UP_TO = 20  # more class labels than this are unreadable on one panel
MATRIX_SIZE = 2.6
HISTOGRAM_WIDTH = 2.6
CMAP_RANGE = (0.3, 1.0)  # the pale end of a sequential map is invisible on white
SAME_CLASS_CMAP = "Blues"
DIFF_CLASS_CMAP = "Oranges"
POINT_SIZE = 6
SAMPLE_SIZE = 10
ARROW_REACH_QUANTILE = 0.95  # the classifier arrows reach this quantile of the points' radii
ARROW_MARGIN = 1.15
SINGULAR_RTOL = 1e-10
TRIANGLE_TOLERANCE = 1e-6


def triangle_vertices() -> np.ndarray:
    """(3, 2) vertices of an equilateral triangle of circumradius 1, centred at the origin."""
    angles = np.deg2rad(VERTEX_ANGLES_DEG)
    return np.stack([np.cos(angles), np.sin(angles)], axis=1)


def triangle_projection(W3: np.ndarray) -> np.ndarray:
    """(2, d) linear map sending the three rows of W3 to the vertices of an equilateral triangle.

    The least-squares map V^T (W3^T)^+ is exact whenever such a map exists: for
    independent rows, and for rows with w_a + w_b + w_c = 0 (a 3-class simplex).
    """
    W3 = np.asarray(W3, dtype=np.float64)
    singular = np.linalg.svd(W3, compute_uv=False)
    if singular.size < 2 or singular[1] <= SINGULAR_RTOL * max(singular[0], np.finfo(float).tiny):
        raise RunError("the three classifier rows span less than a plane: no triangle to project onto")
    return triangle_vertices().T @ np.linalg.pinv(W3.T, rcond=SINGULAR_RTOL)


def triangle_error(W3: np.ndarray, projection: np.ndarray) -> float:
    """How far the projected rows are from the triangle's vertices (0 when the map is exact)."""
    return float(np.abs(np.asarray(W3, dtype=np.float64) @ projection.T - triangle_vertices()).max())


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
    epochs = []
    for token in (t.strip() for t in text.split(",") if t.strip()):
        if token == "last":
            epoch = available[-1]
        elif token.lstrip("-").isdigit():
            epoch = int(token)
        else:
            raise RunError(f"--epochs: {token!r} is not an epoch number or 'last'")
        if epoch not in available:
            raise RunError(f"{folder}: no features at epoch {epoch} (features exist for epochs "
                           f"{', '.join(map(str, available))})")
        epochs.append(epoch)
    if not epochs:
        raise RunError("--epochs needs at least one epoch")
    return epochs


@dataclass
class Panel:
    run: Run
    label: str
    epoch: int
    payload: dict


def _centre(payload: dict) -> np.ndarray:
    means = np.asarray(payload["class_means"], dtype=np.float64)
    finite = np.all(np.isfinite(means), axis=1)
    return means[finite].mean(axis=0)


def _truncated(name: str) -> LinearSegmentedColormap:
    base = colormaps[name]
    return LinearSegmentedColormap.from_list(f"{name}_truncated", base(np.linspace(*CMAP_RANGE, 256)))


def _geometry_note(run: Run, epoch: int) -> str:
    record = run.record_at(epoch) or {}
    geometry = record.get("mixup_geometry") or {}
    align, nonlin = geometry.get("same_class_alignment"), geometry.get("diff_class_nonlinearity")
    if align is None or nonlin is None:
        return ""
    return f"\nalignment {align:.2f} · non-linearity {nonlin:.2f}"


def _draw_arrows(ax, directions: np.ndarray, length: float, labels: Sequence[str], colours) -> None:
    for direction, label, colour in zip(directions, labels, colours):
        tip = direction / max(np.linalg.norm(direction), np.finfo(float).tiny) * length
        # annotations do not widen the axes, so the tips are added to the data limits by hand
        ax.update_datalim([tip * ARROW_MARGIN])
        ax.annotate("", xy=tip, xytext=(0, 0), annotation_clip=False,
                    arrowprops={"arrowstyle": "-|>", "color": colour, "linewidth": 1.6, "shrinkA": 0, "shrinkB": 0})
        ax.annotate(label, xy=tip, xytext=(tip / length) * 10, textcoords="offset points", ha="center",
                    va="center", fontsize=9, color=colour, fontweight="bold", annotation_clip=False)


def _reach(points: np.ndarray) -> float:
    radii = np.linalg.norm(points, axis=1)
    radii = radii[np.isfinite(radii)]
    return float(np.quantile(radii, ARROW_REACH_QUANTILE)) * ARROW_MARGIN if radii.size else 1.0


def _draw_mixup_points(ax, points: np.ndarray, mixup: dict) -> None:
    """Different-class pairs under same-class ones, each shaded by lambda on its own colour map."""
    same = np.asarray(mixup["y_a"]) == np.asarray(mixup["y_b"])
    lam = np.asarray(mixup["lam"], dtype=float)
    for mask, cmap in ((~same, DIFF_CLASS_CMAP), (same, SAME_CLASS_CMAP)):
        ax.scatter(points[mask, 0], points[mask, 1], c=lam[mask], cmap=_truncated(cmap), vmin=0, vmax=1,
                   s=POINT_SIZE, linewidths=0, alpha=0.85, rasterized=True)


def _draw_clean_samples(ax, payload: dict, triple: Sequence[int], project) -> List[np.ndarray]:
    """The triple's clean training samples in their class colours; returns the projected points."""
    H, y = np.asarray(payload["H"]), np.asarray(payload["y"])
    drawn = []
    for position, cls in enumerate(triple):
        points = project(H[y == cls])
        ax.scatter(points[:, 0], points[:, 1], s=SAMPLE_SIZE, color=TRIPLE_COLOURS[position], alpha=0.8,
                   edgecolors="white", linewidths=0.3, marker="s", rasterized=True)
        drawn.append(points)
    return drawn


def draw_triangle_view(ax, panel: Panel, with_samples: bool) -> None:
    payload, mixup = panel.payload, panel.payload["mixup"]
    triple = [int(c) for c in mixup["triple"]]
    W3 = np.asarray(payload["W"], dtype=np.float64)[triple]
    projection, centre = triangle_projection(W3), _centre(payload)

    def project(H) -> np.ndarray:
        return (np.asarray(H, dtype=np.float64) - centre) @ projection.T

    drawn = [project(mixup["H"])]
    _draw_mixup_points(ax, drawn[0], mixup)
    if with_samples:  # on top: they are the reference the mixup points are read against
        drawn += _draw_clean_samples(ax, payload, triple, project)
    _draw_arrows(ax, triangle_vertices(), _reach(np.concatenate(drawn)), [f"$w_{{{c}}}$" for c in triple],
                 TRIPLE_COLOURS)
    ax.set_aspect("equal", adjustable="datalim")
    # rows dependent in another way than a 3-class simplex's admit no exact map: say so
    exact = triangle_error(W3, projection) <= TRIANGLE_TOLERANCE
    caveat = "" if exact else "\n(dependent classifier rows: triangle approximate)"
    ax.set_title(f"epoch {panel.epoch}{_geometry_note(panel.run, panel.epoch)}{caveat}")


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
    centre = _centre(payload)
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


def _triangle_legend(figure: Figure, axes, with_samples: bool) -> None:
    handles = [Line2D([], [], marker="o", linestyle="", color=colormaps[SAME_CLASS_CMAP](0.7), label="same-class pair"),
               Line2D([], [], marker="o", linestyle="", color=colormaps[DIFF_CLASS_CMAP](0.7),
                      label="different-class pair"),
               Line2D([], [], color="0.3", marker=">", label="classifier row $w_c$ (direction)")]
    if with_samples:
        handles.append(Line2D([], [], marker="s", linestyle="", color="0.3", alpha=0.6,
                              label="clean training sample (class colour)"))
    figure_legend(figure, handles)
    norm = Normalize(0, 1)
    for cmap, what in ((SAME_CLASS_CMAP, "same-class"), (DIFF_CLASS_CMAP, "different-class")):
        figure.colorbar(ScalarMappable(norm, _truncated(cmap)), ax=axes, shrink=0.7, aspect=30, pad=0.01,
                        label=rf"$\lambda$ (weight of $x_a$), {what} pairs")


def _means_legend(figure: Figure) -> None:
    handles = [Line2D([], [], marker="o", linestyle="", color="0.35", markersize=6,
                      label=r"class mean $\mu_c - \mu_G$ (labelled with its class)"),
               Line2D([], [], color="0.35", linestyle="--", label=r"classifier row $w_c$ in its class colour "
                                                                    r"(common scale)")]
    figure_legend(figure, handles)


def _draw_point_views(figure: Figure, axes, rows: List[List[Panel]], view: str, with_samples: bool) -> list:
    """The triangle or means panels; returns (axes, labels) of the means panels, to place once laid out."""
    pending = []
    for row_axes, row in zip(axes, rows):
        for ax, panel in zip(row_axes, row):
            if view == "triangle":
                draw_triangle_view(ax, panel, with_samples)
            else:
                pending.append((ax, draw_means_view(ax, panel)))
        for ax in row_axes[len(row):]:
            ax.set_visible(False)
    _label_axes(axes, view, [row[0].label for row in rows])
    if view == "triangle":
        _triangle_legend(figure, axes, with_samples)
    else:
        _means_legend(figure)
    return pending


def _point_views_figure(rows: List[List[Panel]], view: str, with_samples: bool):
    """The figure and its pending point labels."""
    columns = max(len(row) for row in rows)
    extra_width = 1.6 if view == "triangle" else 0.2
    figure = new_figure(PANEL_SIZE * columns + extra_width, (PANEL_SIZE + 0.5) * len(rows) + 0.9)
    axes = figure.subplots(len(rows), columns, squeeze=False)
    return figure, _draw_point_views(figure, axes, rows, view, with_samples)


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
        row_axes[0].set_ylabel(f"{row[0].label}\nclass" if row[0].label else "class")
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
                           with_samples: bool) -> Figure:
    """One row per run, one panel per chosen epoch."""
    rows = _panels(groups, epochs_text)
    pending = []
    if view == "cosines":
        figure = _cosines_figure(rows)
    else:
        figure, pending = _point_views_figure(rows, view, with_samples)
    if view == "triangle":
        triples = {tuple(row[0].payload["mixup"]["triple"]) for row in rows}
        heading = "Mixup features on the classifier-simplex plane of classes " + \
                  " / ".join(",".join(map(str, t)) for t in sorted(triples))
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
    for ax, row_label in zip(axes[:, 0], row_labels):
        ax.set_ylabel(f"{row_label}\n{names[1]}" if row_label else names[1])
