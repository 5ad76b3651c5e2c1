"""The triangle view of `representations` (Fisher, Meng & Papyan 2024, Fig. 1):
mixup points of a class triple mapped linearly onto a plane where three
reference vectors land on the vertices of an equilateral triangle.

On the classifier plane (the default), the references are the triple's
classifier rows. With W3 their (3, d) rows and V the (3, 2) vertices of an
equilateral triangle centred at the origin,

    P = V^T (W3 W3^T)^{-1} W3        (2, d)

maps w_a, w_b, w_c exactly onto the vertices (P W3^T = V^T), whatever their
norms and angles. A feature is first centred on the global mean mu_G of the
training class means; its image is then the triangle combination of its
coordinates in the basis of the three classifier rows. When the three rows
already form an equiangular, equinorm simplex, P is (up to scale) the
orthogonal projection onto their plane.

`--theory` adds the optimum of the unconstrained-features model (ufm/) on
the same plane: the rows of P lie in the row space of W, so P annihilates
what the projection onto that row space removes, and the theory's curves,
which model P_W (H - mu_G), are mapped by P directly (they are centred
already).

At a stage below the classifier (`--layer STAGE`) no classifier exists; the
references are the triple's class means at that stage, centred on the mean
of all of that stage's class means. The class means then sit on the
vertices, and the triangle's edges are the straight interpolations
lam mu_a + (1 - lam) mu_b that the non-linearity measures the distance to.
"""
from __future__ import annotations

import textwrap
from dataclasses import dataclass
from typing import List, Optional, Sequence

import numpy as np
from matplotlib import colormaps, patheffects
from matplotlib.cm import ScalarMappable
from matplotlib.collections import PathCollection
from matplotlib.colors import LinearSegmentedColormap, Normalize
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.markers import MarkerStyle
from matplotlib.transforms import IdentityTransform

from .loading import Run, RunError, features_path
from .style import figure_legend

FEATURES = "features"  # the last stage of every model: the penultimate layer
VERTEX_ANGLES_DEG = (90.0, 210.0, 330.0)
# The triple's classes, by position a, b, c; chosen away from the blue and orange of the mixup points.
TRIPLE_COLOURS = ("#009E73", "#CC79A7", "#8C564B")
CMAP_RANGE = (0.3, 1.0)  # the pale end of a sequential map is invisible on white
SAME_CLASS_CMAP = "Blues"
DIFF_CLASS_CMAP = "Oranges"
POINT_SIZE = 6
SAMPLE_SIZE = 10
ARROW_REACH_QUANTILE = 0.95  # the classifier arrows reach this quantile of the points' radii
ARROW_MARGIN = 1.15
SINGULAR_RTOL = 1e-10
TRIANGLE_TOLERANCE = 1e-6
THEORY_COLOUR = "0.1"
THEORY_LINE_WIDTH = 1.0
THEORY_MARKER_AREA = 30  # points^2
THEORY_MARKER = MarkerStyle("D")
MEAN_MARKER_AREA = 45
EDGE_STYLE = {"color": "0.15", "linestyle": "--", "linewidth": 1.0}
# Over the points: a white outline keeps a label readable on a dense cloud.
OUTLINED = [patheffects.withStroke(linewidth=2.5, foreground="white")]
# The classifier view's two title lines fit on one line each; a longer line (a fit's failure
# reason) wraps at this many characters, about the width of a panel.
TITLE_CHARACTERS = 40


@dataclass
class Panel:
    run: Run
    label: str
    epoch: int
    payload: dict


@dataclass(frozen=True)
class TriangleOptions:
    samples: bool = False   # also the clean training samples of the triple
    theory: bool = False    # the UFM optimum's curves (classifier plane)
    layer: Optional[str] = None  # a stage's class-mean plane instead of the classifier plane
    rule: str = "mixup"     # whose mixed points: mixup's (interpolated) or cutmix's (a pasted box)


def triangle_vertices() -> np.ndarray:
    """(3, 2) vertices of an equilateral triangle of circumradius 1, centred at the origin."""
    angles = np.deg2rad(VERTEX_ANGLES_DEG)
    return np.stack([np.cos(angles), np.sin(angles)], axis=1)


def triangle_projection(rows3: np.ndarray, what: str = "classifier rows") -> np.ndarray:
    """(2, d) linear map sending the three rows to the vertices of an equilateral triangle.

    The least-squares map V^T (rows^T)^+ is exact whenever such a map exists: for
    independent rows, and for rows with r_a + r_b + r_c = 0 (a 3-class simplex).
    """
    rows3 = np.asarray(rows3, dtype=np.float64)
    singular = np.linalg.svd(rows3, compute_uv=False)
    if singular.size < 2 or singular[1] <= SINGULAR_RTOL * max(singular[0], np.finfo(float).tiny):
        raise RunError(f"the three {what} span less than a plane: no triangle to project onto")
    return triangle_vertices().T @ np.linalg.pinv(rows3.T, rcond=SINGULAR_RTOL)


def triangle_error(rows3: np.ndarray, projection: np.ndarray) -> float:
    """How far the projected rows are from the triangle's vertices (0 when the map is exact)."""
    return float(np.abs(np.asarray(rows3, dtype=np.float64) @ projection.T - triangle_vertices()).max())


def mean_of_means(class_means: np.ndarray) -> np.ndarray:
    """The global mean of the finite class means (a class absent from the split has NaN means)."""
    means = np.asarray(class_means, dtype=np.float64)
    finite = np.all(np.isfinite(means), axis=1)
    return means[finite].mean(axis=0)


def _truncated(name: str) -> LinearSegmentedColormap:
    base = colormaps[name]
    return LinearSegmentedColormap.from_list(f"{name}_truncated", base(np.linspace(*CMAP_RANGE, 256)))


def _geometry(run: Run, epoch: int) -> dict:
    return (run.record_at(epoch) or {}).get("mixup_geometry") or {}


def mixed_points(panel: Panel, rule: str) -> dict:
    """The payload's class-triple points of a mixing rule; refuses a run that did not measure them."""
    if rule not in panel.payload:
        raise RunError(f"{features_path(panel.run.folder, panel.epoch)}: no {rule} points in this features pickle "
                       f"(train the run with --feature-mix {rule})")
    return panel.payload[rule]


def _geometry_note(run: Run, epoch: int, rule: str = "mixup") -> str:
    geometry = _geometry(run, epoch)
    if rule != "mixup":  # the other rules' numbers sit under their name
        geometry = geometry.get(rule) or {}
    align, nonlin = geometry.get("same_class_alignment"), geometry.get("diff_class_nonlinearity")
    if align is None or nonlin is None:
        return ""
    chord = geometry.get("diff_class_chord_nonlinearity")
    chord_note = "" if chord is None else f" (chord {chord:.2f})"
    return f"\nalignment {align:.2f} · non-linearity {nonlin:.2f}{chord_note}"


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


# ---------------------------------------------------------------- the UFM optimum

def _ufm_fit(panel: Panel, rule: str = "mixup") -> tuple:
    """(fit numbers, theory curves or None) of the panel's pickle; refuses a pickle from before the fit."""
    mixup = mixed_points(panel, rule)
    if not isinstance(mixup.get("ufm"), dict) or "ufm_curves" not in mixup:
        raise RunError(f"{features_path(panel.run.folder, panel.epoch)}: no UFM fit in this features pickle "
                       f"(written before the fit existed); train the run again to draw --theory")
    return mixup["ufm"], mixup["ufm_curves"]


def theory_note(fit: dict) -> str:
    """The panel-title line of the fit: its residual, or why there is none."""
    if fit.get("nan_reason"):
        return f"\nno UFM curve: {fit['nan_reason']}"
    gamma = "" if fit.get("identifiable") else ", γ not identifiable"
    shape = fit.get("shape_residual")  # absent from pickles written before issue 20
    parts = "" if shape is None else f" (shape {shape:.2f}, floor {fit['scatter_floor']:.2f})"
    return f"\nUFM residual {fit['residual']:.2f}{parts}{gamma}"


def draw_theory(ax, curves: dict, projection: np.ndarray, centre: np.ndarray) -> List[np.ndarray]:
    """Each pair type's optimum over lambda, centred and projected as the features are (the curves model
    the uncentred features); a same-class optimum does not depend on lambda and is one marker. Returns the points.

    The panel's limits are the data's: a fitted curve that reaches far past the learned points (early in
    training, or at an end of the gamma range) is cut at the panel's edge instead of shrinking the data."""
    drawn = []
    for pair, curve in zip(curves["pairs"], np.asarray(curves["H"], dtype=np.float64)):
        points = (curve - centre) @ projection.T
        if pair[0] == pair[1]:
            _theory_marker(ax, points[0])
        else:  # add_artist, not plot: it leaves the data limits alone
            ax.add_artist(Line2D(points[:, 0], points[:, 1], color=THEORY_COLOUR, linewidth=THEORY_LINE_WIDTH,
                                 zorder=3))
        drawn.append(points)
    return drawn


def _theory_marker(ax, point: np.ndarray) -> None:
    """The diamond of a same-class optimum, drawn as ax.scatter draws it but without widening the data limits."""
    path = THEORY_MARKER.get_path().transformed(THEORY_MARKER.get_transform())
    marker = PathCollection([path], sizes=[THEORY_MARKER_AREA], offsets=point[None, :],
                            offset_transform=ax.transData, facecolors=THEORY_COLOUR, edgecolors="white",
                            linewidths=0.6, zorder=4)
    marker.set_transform(IdentityTransform())  # sizes are in points, as in ax.scatter
    ax.add_collection(marker, autolim=False)


# ---------------------------------------------------------------- the classifier plane

def classifier_view(ax, panel: Panel, options: TriangleOptions) -> None:
    payload, mixup = panel.payload, mixed_points(panel, options.rule)
    triple = [int(c) for c in mixup["triple"]]
    W3 = np.asarray(payload["W"], dtype=np.float64)[triple]
    projection, centre = triangle_projection(W3), mean_of_means(payload["class_means"])

    def project(H) -> np.ndarray:
        return (np.asarray(H, dtype=np.float64) - centre) @ projection.T

    drawn = [project(mixup["H"])]
    _draw_mixup_points(ax, drawn[0], mixup)
    note = ""
    if options.theory:
        fit, curves = _ufm_fit(panel, options.rule)
        note = theory_note(fit)
        if curves is not None and not fit.get("nan_reason"):
            draw_theory(ax, curves, projection, centre)
    if options.samples:  # on top: they are the reference the mixup points are read against
        drawn += _draw_clean_samples(ax, payload, triple, project)
    _draw_arrows(ax, triangle_vertices(), _reach(np.concatenate(drawn)), [f"$w_{{{c}}}$" for c in triple],
                 TRIPLE_COLOURS)
    ax.set_aspect("equal", adjustable="datalim")
    # rows dependent in another way than a 3-class simplex's admit no exact map: say so
    exact = triangle_error(W3, projection) <= TRIANGLE_TOLERANCE
    caveat = "" if exact else "\n(dependent classifier rows: triangle approximate)"
    _title(ax, f"epoch {panel.epoch}{_geometry_note(panel.run, panel.epoch, options.rule)}{note}{caveat}")


# ---------------------------------------------------------------- a stage's class-mean plane

def stage_arrays(panel: Panel, stage: str) -> tuple:
    """(mixup points' vectors, training class means) at `stage`; the last layer's also without --nc-layers."""
    payload = panel.payload
    layers = payload.get("layers") or {}
    if stage in layers:
        return np.asarray(layers[stage]["H"], dtype=np.float64), np.asarray(layers[stage]["class_means"],
                                                                             dtype=np.float64)
    if stage == FEATURES:
        return np.asarray(payload["mixup"]["H"], dtype=np.float64), np.asarray(payload["class_means"],
                                                                                dtype=np.float64)
    path = features_path(panel.run.folder, panel.epoch)
    if not layers:
        raise RunError(f"{path}: no per-layer vectors (train the run with --nc-layers all or --nc-layers {stage})")
    raise RunError(f"{path}: no stage {stage!r} here (stages: {', '.join(layers)})")


def stage_projection(class_means: np.ndarray, triple: Sequence[int], stage: str) -> tuple:
    """((2, d) map sending the triple's centred class means to the vertices, the centre it subtracts)."""
    centre = mean_of_means(class_means)
    means3 = np.asarray(class_means, dtype=np.float64)[list(triple)] - centre
    if not np.all(np.isfinite(means3)):
        raise RunError(f"a class of the triple {', '.join(map(str, triple))} has no training samples at {stage}")
    return triangle_projection(means3, f"class means at {stage}"), centre


def _stage_nonlinearity(panel: Panel, stage: str) -> str:
    geometry = _geometry(panel.run, panel.epoch)
    value = ((geometry.get("layers") or {}).get(stage) or {}).get("diff_class_nonlinearity")
    if value is None and stage == FEATURES:
        value = geometry.get("diff_class_nonlinearity")
    return "" if value is None else f"\nnon-linearity at {stage}: {value:.2f}"


def _title(ax, text: str) -> None:
    ax.set_title("\n".join(textwrap.fill(line, TITLE_CHARACTERS) for line in text.split("\n")))


def _draw_vertices(ax, triple: Sequence[int]) -> None:
    """The class means (on the vertices) and the straight interpolations between them (the edges)."""
    vertices = triangle_vertices()
    closed = np.vstack([vertices, vertices[:1]])
    ax.plot(closed[:, 0], closed[:, 1], zorder=3, **EDGE_STYLE)
    ax.scatter(vertices[:, 0], vertices[:, 1], s=MEAN_MARKER_AREA, c=list(TRIPLE_COLOURS), edgecolors="white",
               linewidths=0.8, zorder=4)
    for vertex, cls, colour in zip(vertices, triple, TRIPLE_COLOURS):
        ax.annotate(f"$\\mu_{{{cls}}}$", xy=vertex, xytext=vertex * 12, textcoords="offset points", ha="center",
                    va="center", fontsize=10, color=colour, fontweight="bold", annotation_clip=False, zorder=5,
                    path_effects=OUTLINED)
    ax.update_datalim(vertices * ARROW_MARGIN)


def stage_view(ax, panel: Panel, options: TriangleOptions) -> None:
    mixup, stage = mixed_points(panel, "mixup"), options.layer
    triple = [int(c) for c in mixup["triple"]]
    H, class_means = stage_arrays(panel, stage)
    projection, centre = stage_projection(class_means, triple, stage)
    points = (H - centre) @ projection.T
    _draw_mixup_points(ax, points, mixup)
    if options.samples:  # only the last layer's clean samples are pickled (checked by the caller)
        _draw_clean_samples(ax, panel.payload, triple, lambda X: (np.asarray(X, np.float64) - centre) @ projection.T)
    _draw_vertices(ax, triple)
    ax.set_aspect("equal", adjustable="datalim")
    _title(ax, f"epoch {panel.epoch}{_stage_nonlinearity(panel, stage)}")


def draw_triangle_view(ax, panel: Panel, options: TriangleOptions) -> None:
    if options.layer is None:
        classifier_view(ax, panel, options)
    else:
        stage_view(ax, panel, options)


def triangle_heading(triples: Sequence[tuple], options: TriangleOptions) -> str:
    classes = " / ".join(",".join(map(str, t)) for t in sorted(triples))
    if options.layer is not None:
        return f"Mixup features at stage {options.layer} on the plane of the class means of classes {classes}"
    theory = ", with the optimum of the unconstrained-features model" if options.theory else ""
    points = "CutMix features (x_a with a box of 1 - lambda of its area from x_b)" if options.rule == "cutmix" \
        else "Mixup features"
    return f"{points} on the classifier-simplex plane of classes {classes}{theory}"


def triangle_legend(figure: Figure, axes, options: TriangleOptions) -> None:
    handles = [Line2D([], [], marker="o", linestyle="", color=colormaps[SAME_CLASS_CMAP](0.7), label="same-class pair"),
               Line2D([], [], marker="o", linestyle="", color=colormaps[DIFF_CLASS_CMAP](0.7),
                      label="different-class pair")]
    if options.layer is None:
        handles.append(Line2D([], [], color="0.3", marker=">", label="classifier row $w_c$ (direction)"))
    else:
        handles += [Line2D([], [], marker="o", linestyle="", color="0.3", label=r"class mean $\mu_c$ at the stage"),
                    Line2D([], [], label=r"$\lambda\mu_a + (1-\lambda)\mu_b$ (straight)", **EDGE_STYLE)]
    if options.theory:
        handles += [Line2D([], [], color=THEORY_COLOUR, linewidth=THEORY_LINE_WIDTH,
                           label="UFM optimum over $\\lambda$, different-class pair"),
                    Line2D([], [], color=THEORY_COLOUR, marker="D", linestyle="",
                           label="UFM optimum, same-class pair (any $\\lambda$)")]
    if options.samples:
        handles.append(Line2D([], [], marker="s", linestyle="", color="0.3", alpha=0.6,
                              label="clean training sample (class colour)"))
    figure_legend(figure, handles)
    norm = Normalize(0, 1)
    for cmap, what in ((SAME_CLASS_CMAP, "same-class"), (DIFF_CLASS_CMAP, "different-class")):
        figure.colorbar(ScalarMappable(norm, _truncated(cmap)), ax=axes, shrink=0.7, aspect=30, pad=0.01,
                        label=rf"$\lambda$ (weight of $x_a$), {what} pairs")
