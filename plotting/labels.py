"""Point labels that never overlap: each label goes to the first free spot around its point.

The search runs in display space, on the figure as it will be saved: the
figure is laid out first (constrained layout, equal aspect), then every label
is tried at offsets of growing distance, the direction away from the panel's
centre first. A spot is free when the label's box stays inside the axes and
touches no label placed before it and no point marker. Labels that had to go
further than a short hop get a thin leader line to their point. The labels are
left out of the layout, so saving the figure lays it out exactly as measured.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.transforms import Bbox

# Distances from the point to the nearest edge of its label, in points, tried in this order.
OFFSETS_PT = (3.0, 7.0, 12.0, 18.0, 26.0, 36.0, 50.0, 68.0, 90.0)
DIRECTIONS = 16  # around the point, the outward direction first, then alternating either side of it
LEADER_FROM_PT = 10.0  # labels further than this from their point get a leader line
PAD_PX = 1.0  # empty margin kept around every label box
FRAME_INSET_PX = 3.0  # labels keep this far inside the axes: a later layout may move the frame by a pixel


@dataclass
class PointLabel:
    x: float  # data coordinates of the point
    y: float
    text: str
    colour: str
    marker_pt: float  # diameter of the point's marker, in points


def layout_now(figure) -> None:
    """Lay the figure out (constrained layout, aspect) so display coordinates are final."""
    if not isinstance(figure.canvas, FigureCanvasAgg):
        FigureCanvasAgg(figure)
    figure.draw_without_rendering()


def _directions(outward: np.ndarray) -> List[np.ndarray]:
    start = np.arctan2(outward[1], outward[0])
    steps = [0] + [sign * k for k in range(1, DIRECTIONS // 2) for sign in (1, -1)] + [DIRECTIONS // 2]
    angles = start + 2 * np.pi * np.asarray(steps) / DIRECTIONS
    return [np.array([np.cos(a), np.sin(a)]) for a in angles]


def _box_at(anchor: np.ndarray, direction: np.ndarray, gap_px: float, size: np.ndarray) -> Bbox:
    """The label box whose nearest edge lies `gap_px` from `anchor` along `direction`."""
    reach = 0.5 * (size[0] * abs(direction[0]) + size[1] * abs(direction[1]))
    centre = anchor + direction * (gap_px + reach)
    return Bbox.from_extents(*(centre - size / 2 - PAD_PX), *(centre + size / 2 + PAD_PX))


def _overlap(box: Bbox, others: Sequence[Bbox]) -> float:
    total = 0.0
    for other in others:
        width = min(box.x1, other.x1) - max(box.x0, other.x0)
        height = min(box.y1, other.y1) - max(box.y0, other.y0)
        if width > 0 and height > 0:
            total += width * height
    return total


def _inside(box: Bbox, frame: Bbox) -> bool:
    return frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1


def _marker_boxes(points: np.ndarray, diameters_px: Sequence[float]) -> List[Bbox]:
    return [Bbox.from_extents(x - d / 2, y - d / 2, x + d / 2, y + d / 2) for (x, y), d in zip(points, diameters_px)]


def _best_box(anchor, outward, size, px_per_pt, taken, frame):
    """The first free box in search order, else the one overlapping least (still inside the axes if possible)."""
    fallback, fallback_cost = None, np.inf
    for offset in OFFSETS_PT:
        for direction in _directions(outward):
            box = _box_at(anchor, direction, offset * px_per_pt, size)
            cost = _overlap(box, taken) + (0.0 if _inside(box, frame) else 1e9)
            if cost == 0.0:
                return box, offset
            if cost < fallback_cost:
                fallback, fallback_cost = (box, offset), cost
    return fallback


def place_labels(ax, labels: Sequence[PointLabel], centre=(0.0, 0.0), fontsize: float = 8) -> list:
    """Annotate every finite point of `labels` without overlap; returns the text artists.

    The figure must already hold everything else it will show, and be laid out
    by `layout_now` after that.
    """
    figure = ax.figure
    renderer = figure.canvas.get_renderer()
    px_per_pt = figure.dpi / 72.0
    finite = [label for label in labels if np.isfinite(label.x) and np.isfinite(label.y)]
    points = ax.transData.transform([(label.x, label.y) for label in finite]) if finite else np.empty((0, 2))
    origin = ax.transData.transform([centre])[0]
    taken = _marker_boxes(points, [label.marker_pt * px_per_pt for label in finite])
    frame = ax.get_window_extent(renderer).padded(-FRAME_INSET_PX)
    artists = []
    for label, anchor in zip(finite, points):
        probe = ax.text(0, 0, label.text, fontsize=fontsize)
        extent = probe.get_window_extent(renderer)
        probe.remove()
        outward = anchor - origin if np.linalg.norm(anchor - origin) > 1e-9 else np.array([1.0, 1.0])
        box, offset = _best_box(anchor, outward, np.array([extent.width, extent.height]), px_per_pt, taken, frame)
        taken.append(box)
        shift_pt = (np.array([box.x0 + box.x1, box.y0 + box.y1]) / 2 - anchor) / px_per_pt
        leader = {"arrowstyle": "-", "color": label.colour, "linewidth": 0.6, "shrinkA": 0, "shrinkB": 2}
        artist = ax.annotate(label.text, (label.x, label.y), xytext=tuple(shift_pt), textcoords="offset points",
                             ha="center", va="center", fontsize=fontsize, color=label.colour,
                             arrowprops=leader if offset > LEADER_FROM_PT else None)
        artist.set_in_layout(False)
        artists.append(artist)
    return artists
