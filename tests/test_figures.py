"""What a reviewer checks on the figures, read from the matplotlib Figure objects that
utils.py saves: no text leaves the canvas, labels do not overlap, an axis scale that
separates close accuracies, one panel per loss, the legend's words, colours that
mean one setting value in every figure, the cosine view's numbers, and vector output.

Five tiny digits runs (cross-entropy and MSE with mixup, two seeds each, and one MSE
run without mixup) are trained once per module by main.main in-process. Every figure
is made by utils.main as a user would; `save_figure` is wrapped to keep the Figure.
"""
import colorsys
import itertools
import pickle
import shutil
import xml.etree.ElementTree as ElementTree

import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import to_hex, to_rgb
from matplotlib.image import AxesImage
from matplotlib.lines import Line2D
from matplotlib.patches import StepPatch
from matplotlib.text import Annotation, Text

from helpers import train_runs
import utils
from plotting.groups import GROUP_PALETTE
from plotting.loading import load_run

EPOCHS = 2
TINY_RUN_FLAGS = ["--epochs", str(EPOCHS), "--width", "0.1", "--samples-per-class", "30", "--batch-size", "64",
                  "--lr", "0.02", "--feature-epochs", f"0,{EPOCHS}", "--feature-samples-per-class", "10",
                  "--feature-pairs", "3", "--feature-lambdas", "5", "--no-progress"]
RUNS = {"cross_entropy_s0": ["--loss", "cross_entropy", "--seed", "0"],
        "cross_entropy_s1": ["--loss", "cross_entropy", "--seed", "1"],
        "mse_s0": ["--loss", "mse", "--seed", "0"],
        "mse_s1": ["--loss", "mse", "--seed", "1"],
        "mse_a0_s0": ["--loss", "mse", "--seed", "0", "--mixup-alpha", "0"]}
MIXUP_RUNS = [name for name in RUNS if "_a0_" not in name]
CANVAS_TOLERANCE_PX = 0.5


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    root = tmp_path_factory.mktemp("figures_sweep")
    train_runs(root, RUNS, TINY_RUN_FLAGS)
    return root


@pytest.fixture
def mixup_sweep(sweep, tmp_path):
    """The four mixup runs alone, in a sweep folder of their own."""
    root = tmp_path / "mixup_sweep"
    for name in MIXUP_RUNS:
        shutil.copytree(sweep / name, root / name)
    return root


class Made:
    """utils.main with save_figure wrapped: the figures it saved, its exit code and its stderr."""

    def __init__(self, monkeypatch, capsys):
        self.figures, self.capsys = [], capsys
        save = utils.save_figure

        def keep(figure, path, dpi):
            self.figures.append(figure)
            save(figure, path, dpi)
        monkeypatch.setattr(utils, "save_figure", keep)

    def __call__(self, argv):
        code = utils.main([str(a) for a in argv])
        _, self.err = self.capsys.readouterr()
        return code

    def figure(self, argv):
        assert self(argv) == 0, self.err
        return self.figures[-1]


@pytest.fixture
def make(monkeypatch, capsys):
    return Made(monkeypatch, capsys)


def drawn(figure):
    """Draw the figure as saving does; returns the renderer."""
    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    return canvas.get_renderer()


def tick_labels(figure) -> set:
    labels = set()
    for ax in figure.axes:
        for axis in (ax.xaxis, ax.yaxis):
            for tick in axis.get_major_ticks() + axis.get_minor_ticks():
                labels.update((id(tick.label1), id(tick.label2)))
    return labels


def visible_texts(figure):
    """Every drawn text but tick labels (their drawn extent is covered by the axes' tight box)."""
    ticks = tick_labels(figure)
    return [t for t in figure.findobj(Text) if t.get_visible() and t.get_text().strip() and id(t) not in ticks
            and (t.axes is None or t.axes.get_visible())]


def outside(box, frame) -> bool:
    tol = CANVAS_TOLERANCE_PX
    return box.x0 < frame.x0 - tol or box.y0 < frame.y0 - tol or box.x1 > frame.x1 + tol or box.y1 > frame.y1 + tol


def assert_inside_canvas(figure):
    renderer = drawn(figure)
    frame = figure.bbox
    for text in visible_texts(figure):
        box = text.get_window_extent(renderer)
        assert not outside(box, frame), f"text {text.get_text()!r} at {box.extents} leaves the canvas {frame.extents}"
    for ax in figure.axes:
        if ax.get_visible():
            box = ax.get_tightbbox(renderer)
            assert not outside(box, frame), f"panel {ax.get_title()!r} (tick labels) leaves the canvas"


def legend_entries(figure):
    """{legend text: handle colour as hex} of the figure's legend."""
    legend = figure.legends[0]
    return {t.get_text(): to_hex(h.get_color()) for t, h in zip(legend.get_texts(), legend.legend_handles)}


def hue(colour) -> float:
    return colorsys.rgb_to_hsv(*to_rgb(colour))[0]


def visible_axes(figure):
    return [ax for ax in figure.axes if ax.get_visible()]


def records(sweep, name):
    return load_run(str(sweep / name)).records


def geometric_mean(rows):
    return 10 ** np.mean(np.log10(np.asarray(rows, dtype=float)), axis=0)


# ---------------------------------------------------------------- no text leaves the canvas

CANVAS_CASES = {
    "curves": ["curves", "{sweep}"],
    "curves --error": ["curves", "{sweep}", "--error"],
    "nc": ["nc", "{sweep}"],
    "nc --split test": ["nc", "{sweep}", "--split", "test", "--band", "std"],
    # long titles in the last column: these ran off the right edge
    "compare": ["compare", "{sweep}", "--metric", "nc1,test_acc,mixup_acc,nc2_maxangle_w,same_class_alignment,"
                                                  "diff_class_nonlinearity"],
    "calibration": ["calibration", "{sweep}/cross_entropy_s0", "{sweep}/mse_a0_s0"],
    "representations": ["representations", "{sweep}/cross_entropy_s0", "{sweep}/mse_s1", "--samples"],
    "representations means": ["representations", "{sweep}/cross_entropy_s0", "{sweep}/mse_s1", "--view", "means"],
    "representations cosines": ["representations", "{sweep}/cross_entropy_s0", "{sweep}/mse_s1", "--view",
                                "cosines"],
}


@pytest.mark.parametrize("case", CANVAS_CASES)
def test_no_text_leaves_the_canvas(sweep, tmp_path, make, case):
    argv = [a.format(sweep=sweep) for a in CANVAS_CASES[case]]
    figure = make.figure(argv + ["--out", tmp_path / "figure.png", "--dpi", 40])
    assert_inside_canvas(figure)


# ---------------------------------------------------------------- vector formats

VECTOR_CASES = [case for case in CANVAS_CASES if case not in ("curves --error", "nc --split test")]  # one per kind


@pytest.mark.parametrize("case", VECTOR_CASES)
@pytest.mark.parametrize("suffix", [".pdf", ".svg"])
def test_every_figure_saves_as_a_vector_file(sweep, tmp_path, make, case, suffix):
    out = tmp_path / f"figure{suffix}"
    assert make([a.format(sweep=sweep) for a in CANVAS_CASES[case]] + ["--out", out]) == 0, make.err
    data = out.read_bytes()
    if suffix == ".pdf":
        assert data.startswith(b"%PDF-") and data.rstrip().endswith(b"%%EOF")
    else:
        assert ElementTree.parse(out).getroot().tag == "{http://www.w3.org/2000/svg}svg"


# ---------------------------------------------------------------- compare, nc, curves

def test_compare_draws_accuracy_as_error_on_a_log_axis(mixup_sweep, tmp_path, make):
    figure = make.figure(["compare", mixup_sweep, "--by", "loss", "--metric", "test_acc", "--out",
                          tmp_path / "c.png", "--dpi", 40])
    assert "note: test_acc is drawn as test_err (100 - accuracy, log axis)" in make.err
    ax = visible_axes(figure)[0]
    assert ax.get_yscale() == "log" and ax.get_ylabel() == "error (%)"
    line = ax.get_lines()[0]  # the cross-entropy group: the mean over its seeds, geometric on a log axis
    errors = [[100 * (1 - r["test_acc"]) for r in records(mixup_sweep, f"cross_entropy_s{s}")] for s in (0, 1)]
    np.testing.assert_allclose(line.get_ydata(), geometric_mean(errors), rtol=1e-12)


def test_nc_on_the_test_split_shows_the_test_error(sweep, tmp_path, make):
    figure = make.figure(["nc", sweep / "mse_s0", "--split", "test", "--out", tmp_path / "n.png", "--dpi", 40])
    last = visible_axes(figure)[-1]
    assert last.get_title() == "test error"
    expected = [100 * (1 - r["test_acc"]) for r in records(sweep, "mse_s0")]
    np.testing.assert_allclose(last.get_lines()[0].get_ydata(), expected, rtol=1e-12)


def test_curves_give_each_loss_its_own_panel(mixup_sweep, tmp_path, make):
    figure = make.figure(["curves", mixup_sweep, "--out", tmp_path / "c.png", "--dpi", 40])
    panels = visible_axes(figure)
    assert [ax.get_title() for ax in panels] == ["cross_entropy loss", "mse loss", "accuracy"]
    for ax, loss in zip(panels, ("cross_entropy", "mse")):
        assert ax.get_yscale() == "log" and ax.get_ylabel() == f"{loss} loss"
        solid = [line for line in ax.get_lines() if line.get_linestyle() == "-"]
        assert len(solid) == 1  # only this loss's group: its clean training loss
        losses = [[r["train_loss"] for r in records(mixup_sweep, f"{loss}_s{s}")] for s in (0, 1)]
        np.testing.assert_allclose(solid[0].get_ydata(), geometric_mean(losses), rtol=1e-12)


@pytest.mark.parametrize("names, expected", [
    (["mse_a0_s0"], "training batches"),
    (["mse_s0"], "mixup training batches"),
    (["mse_s0", "mse_a0_s0"], "training batches (mixed where mixup_alpha > 0)"),
])
def test_the_training_batches_line_says_mixup_only_with_mixup(sweep, tmp_path, make, names, expected):
    figure = make.figure(["curves", *[sweep / n for n in names], "--out", tmp_path / "c.png", "--dpi", 40])
    texts = list(legend_entries(figure))
    assert texts[-3:] == ["train (clean inputs)", "test", expected]


# ---------------------------------------------------------------- colours

def test_a_setting_value_keeps_its_colour_across_figures(sweep, tmp_path, make):
    out = ["--out", tmp_path / "f.png", "--dpi", 40]
    by_loss = legend_entries(make.figure(["compare", sweep, "--by", "loss", *out]))
    by_both = legend_entries(make.figure(["curves", sweep, "--by", "loss,mixup_alpha", *out]))
    two_runs = make.figure(["calibration", sweep / "cross_entropy_s1", sweep / "mse_s0", *out])
    # the palette in the sorted order of the compared values
    assert by_loss["loss=cross_entropy (2 seeds)"] == GROUP_PALETTE[0]
    assert by_loss["loss=mse (3 runs)"] == GROUP_PALETTE[1]
    # adding a key keeps each loss's hue; its first value keeps the very colour
    assert by_both["loss=mse, mixup_alpha=0"] == GROUP_PALETTE[1]
    assert hue(by_both["loss=mse, mixup_alpha=1 (2 seeds)"]) == pytest.approx(hue(GROUP_PALETTE[1]), abs=5e-3)
    assert hue(by_both["loss=cross_entropy, mixup_alpha=1 (2 seeds)"]) == pytest.approx(hue(GROUP_PALETTE[0]),
                                                                                        abs=5e-3)
    bars = [to_hex(ax.patches[0].get_facecolor()) for ax in two_runs.axes[::2]]  # reliability panels
    assert bars == [GROUP_PALETTE[0], GROUP_PALETTE[1]]


# ---------------------------------------------------------------- a seed is never averaged with itself

@pytest.mark.parametrize("command", ["summary", "compare", "curves", "nc"])
def test_a_repeated_seed_is_refused(mixup_sweep, tmp_path, make, command):
    shutil.copytree(mixup_sweep / "mse_s0", mixup_sweep / "mse_s0_again")
    argv = [command, mixup_sweep] + ([] if command == "summary" else ["--out", tmp_path / "f.png"])
    assert make(argv) == utils.EXIT_ERROR
    lines = make.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("utils.py: error: runs repeat a setting and its seed")
    assert f"loss=mse seed 0 in {mixup_sweep / 'mse_s0'}, {mixup_sweep / 'mse_s0_again'}" in lines[0]
    assert not (tmp_path / "f.png").exists()


def test_per_run_figures_accept_a_repeated_seed(mixup_sweep, tmp_path, make):
    shutil.copytree(mixup_sweep / "mse_s0", mixup_sweep / "mse_s0_again")
    figure = make.figure(["calibration", mixup_sweep / "mse_s0", mixup_sweep / "mse_s0_again",
                          "--out", tmp_path / "f.png", "--dpi", 40])
    assert len([ax for ax in figure.axes if ax.get_title()]) == 2


# ---------------------------------------------------------------- representations: means view

def crowd_class_means(folder, epoch):
    """Rewrite a features pickle so that classes 9 and 2, and 5, 3 and 8, sit (almost) on one spot."""
    path = folder / "features" / f"epoch_{epoch:04d}.pkl"
    with open(path, "rb") as handle:
        payload = pickle.load(handle)
    means = payload["class_means"]
    spread = np.linalg.norm(means - means.mean(axis=0), axis=1).mean()
    direction = np.random.default_rng(0).normal(size=means.shape[1])
    means[9] = means[2] + 1e-3 * spread * direction / np.linalg.norm(direction)
    means[5] = means[3]
    means[8] = means[3] + 2e-3 * spread * direction / np.linalg.norm(direction)
    with open(path, "wb") as handle:
        pickle.dump(payload, handle)
    return payload


def label_artists(ax):
    return [t for t in ax.texts if isinstance(t, Annotation) and t.get_text().isdigit()]


def test_means_view_labels_do_not_overlap_and_colours_match(sweep, tmp_path, make):
    folder = tmp_path / "crowded"
    shutil.copytree(sweep / "cross_entropy_s0", folder)
    payload = crowd_class_means(folder, EPOCHS)
    figure = make.figure(["representations", folder, "--view", "means", "--epochs", f"0,{EPOCHS}",
                          "--out", tmp_path / "m.png", "--dpi", 40])
    renderer = drawn(figure)
    crowded = visible_axes(figure)[1]
    for ax in visible_axes(figure):
        labels = label_artists(ax)
        assert sorted(int(t.get_text()) for t in labels) == list(range(10))
        boxes = [t.get_window_extent(renderer) for t in labels]
        for (a, box_a), (b, box_b) in itertools.combinations(zip(labels, boxes), 2):
            assert not box_a.overlaps(box_b), f"{ax.get_title()!r}: labels {a.get_text()} and {b.get_text()} overlap"
    for ax in visible_axes(figure):
        assert all(not outside(t.get_window_extent(renderer), ax.get_window_extent(renderer))
                   for t in label_artists(ax)), "a label leaves its panel"
    # every class: its dot, its dashed classifier row and its label share one colour
    dots = crowded.collections[0]
    dot_colours = [to_hex(c) for c in dots.get_facecolors()]
    row_colours = [to_hex(line.get_color()) for line in crowded.get_lines() if line.get_linestyle() == "--"]
    label_colours = {int(t.get_text()): to_hex(t.get_color()) for t in label_artists(crowded)}
    assert len(set(dot_colours)) == 10
    assert row_colours == dot_colours == [label_colours[c] for c in range(10)]
    # the dots sit where the class means project: the coincident means share a spot
    offsets = dots.get_offsets()
    np.testing.assert_allclose(offsets[5], offsets[3], atol=1e-9)
    assert len(payload["class_means"]) == 10
    assert [t.get_text() for t in figure.legends[0].get_texts()] == [
        r"class mean $\mu_c - \mu_G$ (labelled with its class)",
        r"classifier row $w_c$ in its class colour (common scale)"]


# ---------------------------------------------------------------- representations: cosines view

def direct_cosines(rows):
    unit = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    return unit @ unit.T


def test_cosine_view_shows_the_cosines_against_the_etf_value(sweep, tmp_path, make):
    figure = make.figure(["representations", sweep / "mse_s0", "--view", "cosines", "--epochs", f"0,{EPOCHS}",
                          "--out", tmp_path / "c.png", "--dpi", 40])
    with open(sweep / "mse_s0" / "features" / f"epoch_{EPOCHS:04d}.pkl", "rb") as handle:
        payload = pickle.load(handle)
    means = np.asarray(payload["class_means"], dtype=np.float64)
    h = direct_cosines(means - means.mean(axis=0))
    w = direct_cosines(np.asarray(payload["W"], dtype=np.float64))
    etf = -1.0 / 9
    images = [image for ax in figure.axes for image in ax.get_images() if isinstance(image, AxesImage)]
    assert len(images) == 2  # epochs 0 and EPOCHS
    shown = np.ma.filled(images[1].get_array().astype(float), np.nan)
    lower, upper = np.tril_indices(10, -1), np.triu_indices(10, 1)
    np.testing.assert_allclose(shown[lower], h[lower], rtol=1e-10)
    np.testing.assert_allclose(shown[upper], w[upper], rtol=1e-10)
    assert np.all(np.isnan(np.diag(shown)))
    # white at the ETF value, as far either side (within [-1, 1]), every cosine of both epochs inside the scale
    norm = images[1].norm
    assert images[0].norm is norm and norm.vcenter == pytest.approx(etf)
    reach = max(norm.vcenter - norm.vmin, norm.vmax - norm.vcenter)
    assert (norm.vmin, norm.vmax) == pytest.approx((max(-1.0, etf - reach), min(1.0, etf + reach)))
    shown_both = np.concatenate([np.ma.filled(image.get_array().astype(float), np.nan).ravel() for image in images])
    assert norm.vmin <= np.nanmin(shown_both) and np.nanmax(shown_both) <= norm.vmax
    # their spread is the logged equiangularity of the training class means
    nc = records(sweep, "mse_s0")[-1]["nc"]["train"]
    assert np.std(h[np.triu_indices(10, 1)]) == pytest.approx(nc["nc2_equiangle_h"], rel=1e-5)
    assert np.std(w[np.triu_indices(10, 1)]) == pytest.approx(nc["nc2_equiangle_w"], rel=1e-5)
    # the histograms: each epoch's counts of the off-diagonal cosines, one scale per panel, and the ETF line
    for ax, cosines in zip([ax for ax in figure.axes if ax.patches], (h, w)):
        steps = [p for p in ax.patches if isinstance(p, StepPatch) and not p.get_fill()]
        heights, edges, baseline = steps[-1].get_data()
        counts, _ = np.histogram(cosines[np.triu_indices(10, 1)], bins=edges)
        scale = (heights - baseline)[counts > 0] / counts[counts > 0]
        np.testing.assert_allclose(scale, scale[0], rtol=1e-12)
        np.testing.assert_allclose((heights - baseline)[counts == 0], 0.0)
        assert any(isinstance(line, Line2D) and np.allclose(line.get_xdata(), etf) for line in ax.get_lines())
