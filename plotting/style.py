"""One look for every figure, and the drawing helpers the figures share.

Figures are made with matplotlib's object API (`Figure`, never pyplot), so no
display, no global figure registry and no backend choice are involved: saving
goes through the Agg, PDF or SVG canvas named by the file's extension.
"""
from __future__ import annotations

import contextlib
import os
import textwrap
from typing import Iterator, List, Optional, Sequence

import matplotlib
import numpy as np
from PIL import Image
from matplotlib.figure import Figure
from matplotlib.font_manager import FontProperties
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

from .loading import RunError
from .metrics import Aggregate

OUTPUT_FORMATS = ("png", "pdf", "svg")
DEFAULT_DPI = 150
BAND_ALPHA = 0.2
MARKERS_UP_TO_POINTS = 15  # short series get markers, so a 3-epoch run is still visible
ZERO_LEVEL_COLOUR = "0.55"
TITLE_SIZE = 11
LEGEND_CHAR_INCHES = 0.075  # legend text width per character at legend.fontsize 9
LEGEND_HANDLE_INCHES = 0.8  # line sample, padding and column gap
TITLE_SEPARATOR = " · "
CHAR_WIDTH_EM = 0.55  # average glyph width of the sans-serif font, in font sizes, for wrapping titles
# Inches of a panel's width beside its axes (y label, tick labels): a panel title must fit the
# axes' own width, since constrained layout reserves no width for titles.
PANEL_TITLE_MARGIN = 0.9
# A log axis spanning fewer decades than this gets plain labels at 1, 2 and 5 times each power of ten.
FEW_DECADES = 2.5
LOG_LABELLED_SUBS = (1.0, 2.0, 5.0)

STYLE = {
    "font.size": 10,
    "axes.titlesize": 10,
    "axes.labelsize": 10,
    "legend.fontsize": 9,
    "xtick.labelsize": 9,
    "ytick.labelsize": 9,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "grid.linewidth": 0.6,
    "lines.linewidth": 1.6,
    "legend.frameon": False,
    "figure.constrained_layout.use": True,
    "savefig.facecolor": "white",
    "pdf.fonttype": 42,  # TrueType in PDFs: editable text in a paper's figure
    "svg.fonttype": "none",
}


@contextlib.contextmanager
def figure_style() -> Iterator[None]:
    """The shared style, applied only while a figure is being built."""
    with matplotlib.rc_context(STYLE):
        yield


def new_figure(width: float, height: float) -> Figure:
    return Figure(figsize=(width, height), layout="constrained")


def set_title(figure: Figure, heading: str, description: str = "", note: str = "") -> None:
    """Heading, then the shared config wrapped at its ' · ' separators to the figure's width, then a note."""
    width_chars = characters_in(figure.get_figwidth(), TITLE_SIZE)
    lines, current = textwrap.wrap(heading, width_chars) or [""], ""
    for part in (p for p in description.split(TITLE_SEPARATOR) if p):
        candidate = f"{current}{TITLE_SEPARATOR}{part}" if current else part
        if current and len(candidate) > width_chars:
            lines.append(current)
            candidate = part
        current = candidate
    lines += [line for line in (current, note) if line]
    figure.suptitle("\n".join(lines), fontsize=TITLE_SIZE)


def characters_in(width_inches: float, fontsize: float) -> int:
    """About how many characters of the sans-serif font at `fontsize` fit in `width_inches`."""
    return max(1, int(width_inches * 72 / (fontsize * CHAR_WIDTH_EM)))


def panel_title(ax, text: str, panel_width: float) -> None:
    """A panel title wrapped to the panel, so that no title runs past its panel or off the canvas."""
    size = FontProperties(size=matplotlib.rcParams["axes.titlesize"]).get_size_in_points()
    lines = [textwrap.fill(line, characters_in(panel_width - PANEL_TITLE_MARGIN, size)) for line in text.split("\n")]
    ax.set_title("\n".join(lines))


def _plain_number(value: float, _position=None) -> str:
    return f"{value:g}"


def finish_log_axis(ax) -> None:
    """Plain numbers (0.5, 1, 2) on a log axis of few decades, powers of ten on a wide one."""
    low, high = ax.get_ylim()
    if low > 0 and np.log10(high / low) < FEW_DECADES:
        ax.yaxis.set_major_locator(LogLocator(subs=LOG_LABELLED_SUBS))
        ax.yaxis.set_major_formatter(FuncFormatter(_plain_number))
        ax.yaxis.set_minor_formatter(NullFormatter())


def integer_epochs(ax) -> None:
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def check_output_path(path: str) -> None:
    extension = os.path.splitext(path)[1].lower().lstrip(".")
    if extension not in OUTPUT_FORMATS:
        raise RunError(f"--out {path}: unknown image format {extension or '(none)'!r}; "
                       f"use one of {', '.join('.' + f for f in OUTPUT_FORMATS)}")
    folder = os.path.dirname(path) or "."
    if not os.path.isdir(folder):
        raise RunError(f"--out {path}: folder {folder} does not exist")


def save_figure(figure: Figure, path: str, dpi: int) -> None:
    try:
        figure.savefig(path, dpi=dpi)
    except OSError as error:
        raise RunError(f"cannot write {path}: {error.strerror or error}") from None


def draw_aggregate(ax, data: Aggregate, colour: str, linestyle: str = "-", label: Optional[str] = None) -> None:
    """A mean line with its band; nothing when the metric was never measured."""
    if data.epochs.size == 0:
        return
    # markers on short series, and at the measured epochs of a sparse one (--nc-epochs log, every:K)
    sparse = bool(np.any(np.diff(data.epochs) > 1))
    marker = "o" if data.epochs.size <= MARKERS_UP_TO_POINTS or sparse else None
    ax.plot(data.epochs, data.centre, color=colour, linestyle=linestyle, marker=marker, markersize=3, label=label)
    if data.low is not None:
        ax.fill_between(data.epochs, data.low, data.high, color=colour, alpha=BAND_ALPHA, linewidth=0)


def mark_zero_level(ax, levels: Sequence[Optional[float]]) -> None:
    """A dotted line where exact zeros are drawn on a log axis, so a floor is not mistaken for data."""
    present = [level for level in levels if level is not None]
    if not present:
        return
    level = min(present)
    ax.axhline(level, color=ZERO_LEVEL_COLOUR, linestyle=":", linewidth=1.0)
    ax.annotate("0", xy=(1.0, level), xycoords=("axes fraction", "data"), xytext=(3, 0),
                textcoords="offset points", va="center", ha="left", fontsize=8, color=ZERO_LEVEL_COLOUR)


def style_handles(styles: Sequence[tuple]) -> List[Line2D]:
    """Legend entries for line styles alone: [(label, linestyle), ...] in black."""
    return [Line2D([], [], color="black", linestyle=linestyle, label=label) for label, linestyle in styles]


def group_handles(groups) -> List[Line2D]:
    return [Line2D([], [], color=group.colour, linewidth=2.5, label=group.legend_label) for group in groups]


def wrap_label(text: str, width_chars: int) -> str:
    """A legend or row label broken at spaces into lines of `width_chars`; mathtext is left whole, since
    a line break inside $...$ would not render."""
    if "$" in text or len(text) <= width_chars:
        return text
    return "\n".join(textwrap.wrap(text, width_chars, break_on_hyphens=False))


def figure_legend(figure: Figure, handles: Sequence[Line2D]) -> None:
    """One legend for all panels, under them, in as many columns as the figure's width holds."""
    if not handles:
        return
    fits = max(1, int((figure.get_figwidth() - LEGEND_HANDLE_INCHES) / LEGEND_CHAR_INCHES))
    for handle in handles:
        handle.set_label(wrap_label(handle.get_label(), fits))
    longest = max(len(line) for handle in handles for line in handle.get_label().split("\n"))
    entry_inches = longest * LEGEND_CHAR_INCHES + LEGEND_HANDLE_INCHES
    columns = max(1, min(len(handles), int(figure.get_figwidth() // entry_inches)))
    figure.legend(handles=list(handles), loc="outside lower center", ncols=columns)


def band_note(band: str, groups) -> str:
    if all(len(group.runs) == 1 for group in groups) or band == "none":
        return ""
    return {"minmax": "lines: mean over runs (geometric on log axes); bands: min-max",
            "std": "lines: mean over runs (geometric on log axes); bands: ±1 std (of log10 on log axes)"}[band]


def shrink_png(path: str) -> None:
    """Reduce a PNG to a 256-colour palette in place, no dithering (flat colours stay flat): figures that
    travel in git (docs/, a report's folder) become a third of their size or less. Pillow comes with
    matplotlib."""
    with Image.open(path) as image:
        reduced = image.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT,
                                                dither=Image.Dither.NONE)
    reduced.save(path, optimize=True)
