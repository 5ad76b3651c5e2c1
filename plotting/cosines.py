"""The cosine view of `representations`: how far the class means and the
classifier rows are from a simplex ETF, in all C dimensions at once.

A 2-D picture of C class means keeps only part of their geometry (ten means
span nine dimensions). Their Gram matrix keeps all of it: at collapse, the
cosine between any two centred class means mu_c - mu_G, and between any two
classifier rows w_c, is -1/(C-1), the value of a simplex equiangular tight
frame (Papyan, Han & Donoho 2020). Each panel shows one epoch's matrix, the
class means below the diagonal and the classifier rows above it, on a
diverging colour map whose neutral white is that ETF value; the last two
panels of a row show the histograms of the off-diagonal cosines, one line per
epoch, stacked, against the ETF value. The rows are taken as nc_metrics takes them:
the class means centred on their mean mu_G, the classifier rows as they are,
so the spread of these cosines is nc2_equiangle_h / _w.
"""
from __future__ import annotations

from typing import Dict, List, Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib.colors import TwoSlopeNorm, to_hex
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from .style import figure_legend

MATRIX_CMAP = "RdBu_r"
MISSING_COLOUR = "0.85"  # the diagonal, and classes absent from the split
EPOCH_CMAP, EPOCH_RANGE = "viridis", (0.0, 0.85)  # its light yellow end is invisible on white
HISTOGRAM_BINS = 40  # over [-1, 1]: bins 0.05 wide
NORM_STEP = 0.1  # the colour scale reaches this far from the ETF value, or a multiple of it
RIDGE_HEIGHT = 0.9  # the tallest bar of a panel, in units of the spacing between epochs
ETF_LINE = {"color": "0.15", "linestyle": "--", "linewidth": 1.0}
TICK_EVERY_CLASS_UP_TO = 20
HISTOGRAM_KINDS = ((r"$\mathbf{H}$: centred class means", "h"), (r"$\mathbf{W}$: classifier rows", "w"))


def etf_cosine(num_classes: int) -> float:
    """The cosine between any two vectors of a simplex ETF of `num_classes` vectors."""
    return -1.0 / (num_classes - 1)


def cosine_matrix(rows: np.ndarray) -> np.ndarray:
    """(C, C) cosines between the rows; NaN for a row that is zero or not finite."""
    rows = np.asarray(rows, dtype=np.float64)
    norms = np.linalg.norm(rows, axis=1)
    usable = np.isfinite(norms) & (norms > 0)
    unit = np.where(usable[:, None], rows / np.where(usable, norms, 1.0)[:, None], np.nan)
    return unit @ unit.T


def centred_means(class_means: np.ndarray) -> np.ndarray:
    """mu_c - mu_G, mu_G the mean of the finite class means (absent classes stay NaN)."""
    means = np.asarray(class_means, dtype=np.float64)
    finite = np.all(np.isfinite(means), axis=1)
    return means - means[finite].mean(axis=0)


def payload_cosines(payload: dict) -> Dict[str, np.ndarray]:
    """{'h': cosines of the centred class means, 'w': of the classifier rows} of a features pickle."""
    return {"h": cosine_matrix(centred_means(payload["class_means"])),
            "w": cosine_matrix(np.asarray(payload["W"], dtype=np.float64))}


def off_diagonal(matrix: np.ndarray) -> np.ndarray:
    """The finite cosines of distinct pairs c < c'."""
    upper = matrix[np.triu_indices(matrix.shape[0], k=1)]
    return upper[np.isfinite(upper)]


def split_matrix(h_cosines: np.ndarray, w_cosines: np.ndarray) -> np.ndarray:
    """Class means below the diagonal, classifier rows above, NaN on it."""
    lower = np.tril(np.ones(h_cosines.shape, dtype=bool), k=-1)
    upper = np.triu(np.ones(w_cosines.shape, dtype=bool), k=1)
    return np.where(lower, h_cosines, np.where(upper, w_cosines, np.nan))


def matrix_norm(matrices: Sequence[np.ndarray]) -> TwoSlopeNorm:
    """White at the ETF value, the same reach either side of it (within [-1, 1]), just covering every
    cosine of the matrices (rounded up to a tenth): one colour scale for all of them, zoomed to the data."""
    etf = etf_cosine(matrices[0].shape[0])
    deviations = [np.abs(m[np.isfinite(m)] - etf) for m in matrices]
    largest = max((float(d.max()) for d in deviations if d.size), default=0.0)
    reach = max(NORM_STEP, np.ceil(largest / NORM_STEP - 1e-9) * NORM_STEP)
    return TwoSlopeNorm(vmin=max(-1.0, etf - reach), vcenter=etf, vmax=min(1.0, etf + reach))


def norms_by_classes(matrices: Sequence[np.ndarray]) -> Dict[int, TwoSlopeNorm]:
    """One colour scale per number of classes, shared by all the matrices of that size."""
    by_classes: Dict[int, List[np.ndarray]] = {}
    for matrix in matrices:
        by_classes.setdefault(matrix.shape[0], []).append(matrix)
    return {count: matrix_norm(group) for count, group in by_classes.items()}


def epoch_colours(epochs: Sequence[int]) -> Dict[int, str]:
    ordered = sorted(set(epochs))
    shades = colormaps[EPOCH_CMAP](np.linspace(*EPOCH_RANGE, len(ordered)))
    return {epoch: to_hex(shade) for epoch, shade in zip(ordered, shades)}


def draw_matrix(ax, matrix: np.ndarray, norm: TwoSlopeNorm, epoch: int):
    """One epoch's split matrix; returns the image, for the colour bar."""
    num_classes = matrix.shape[0]
    cmap = colormaps[MATRIX_CMAP].with_extremes(bad=MISSING_COLOUR)
    image = ax.imshow(matrix, cmap=cmap, norm=norm, interpolation="nearest")
    ax.grid(False)
    if num_classes <= TICK_EVERY_CLASS_UP_TO:
        ax.set_xticks(range(num_classes))
        ax.set_yticks(range(num_classes))
    else:
        for axis in (ax.xaxis, ax.yaxis):
            axis.set_major_locator(MaxNLocator(integer=True))
    ax.tick_params(labelsize=7, length=2)
    corner = {"fontsize": 9, "fontweight": "bold", "transform": ax.transAxes}
    ax.text(0.04, 0.04, r"$\mathbf{H}$", ha="left", va="bottom", **corner)
    ax.text(0.96, 0.96, r"$\mathbf{W}$", ha="right", va="top", **corner)
    ax.set_title(f"epoch {epoch}")
    return image


def draw_histogram(ax, per_epoch: Sequence[tuple], kind: str, title: str, colours: Dict[int, str],
                   norm: TwoSlopeNorm) -> None:
    """Off-diagonal cosines of `kind` ('h' or 'w'): one histogram per epoch, stacked upwards in epoch order
    on one common count scale, and the ETF value; the cosine axis spans the matrices' colour scale."""
    bins = np.linspace(-1.0, 1.0, HISTOGRAM_BINS + 1)
    counts = [np.histogram(off_diagonal(cosines[kind]), bins=bins)[0] for _, cosines in per_epoch]
    tallest = max(int(c.max()) for c in counts) if counts else 0
    scale = RIDGE_HEIGHT / max(tallest, 1)
    for row, ((epoch, _), count) in enumerate(zip(per_epoch, counts)):
        colour = colours[epoch]
        ax.stairs(row + count * scale, bins, baseline=row, fill=True, color=colour, alpha=0.3, linewidth=0)
        ax.stairs(row + count * scale, bins, baseline=row, color=colour, linewidth=1.2)
    num_classes = per_epoch[0][1][kind].shape[0] if per_epoch else 2
    ax.axvline(etf_cosine(num_classes), **ETF_LINE)
    ax.set_yticks(range(len(per_epoch)), labels=[f"epoch {epoch}" for epoch, _ in per_epoch])
    pairs = num_classes * (num_classes - 1) // 2
    ax.set(xlim=(norm.vmin, norm.vmax), ylim=(-0.1, len(per_epoch)), xlabel="cosine of a pair of classes",
           title=f"{title}\n(tallest bar: {tallest} of {pairs} pairs)")
    ax.grid(False, axis="y")


def _etf_tick_label(num_classes: int) -> str:
    return f"$-1/{num_classes - 1}$"


def add_colour_bars(figure: Figure, images_by_classes: Dict[int, list], matrix_axes: Dict[int, list]) -> None:
    """One colour bar per number of classes, its middle (white) at the ETF value."""
    for num_classes, images in images_by_classes.items():
        norm = images[0].norm
        bar = figure.colorbar(images[0], ax=matrix_axes[num_classes], shrink=0.85, aspect=25, pad=0.02,
                              label=r"cosine ($\mathbf{H}$ below the diagonal, $\mathbf{W}$ above)")
        symmetric = np.isclose(norm.vcenter - norm.vmin, norm.vmax - norm.vcenter)
        ticks = np.linspace(norm.vmin, norm.vmax, 5) if symmetric else np.array([norm.vmin, norm.vcenter, norm.vmax])
        labels = [_etf_tick_label(num_classes) if np.isclose(t, norm.vcenter) else f"{t:.2f}" for t in ticks]
        bar.set_ticks(ticks, labels=labels)


def cosines_legend(figure: Figure, class_counts: List[int]) -> None:
    counts = sorted(set(class_counts))
    value = f" = {etf_cosine(counts[0]):.3f}" if len(counts) == 1 else ""
    figure_legend(figure, [Line2D([], [], label=f"simplex ETF: $-1/(C-1)${value}", **ETF_LINE)])
