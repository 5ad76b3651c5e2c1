"""Figures of runs that differ in several settings at once, as a new user's folder does.

Five tiny digits runs: the default, `--etf-classifier`, `--loss mse`, `--label-smoothing 0.1
--loss focal` and `--mixup-alpha 0.5`; all but the default also measure every stage
(`--nc-layers all`), so `layers` and `--layer` have runs to draw. Their groups differ in four
settings (etf_classifier, label_smoothing, loss, mixup_alpha), which makes long group names.
Every utils.py subcommand is drawn on them and read back from the Figure: no text leaves the
canvas, no two texts overlap, and no two groups get colours a reader could mistake.
"""
import itertools
import pickle
import shutil

import numpy as np
import pytest
from matplotlib.colors import to_hex

from helpers import run_main, train_runs
from test_figures import Made, drawn, hue, outside, visible_axes, visible_texts
import utils
from plotting.groups import (GROUP_PALETTE, MIN_COLOUR_DISTANCE, Group, assign_colours, cielab,
                             min_colour_distance)

EPOCHS = 1
FLAGS = ["--epochs", str(EPOCHS), "--width", "0.1", "--samples-per-class", "10", "--batch-size", "50",
         "--lr", "0.02", "--feature-epochs", f"0,{EPOCHS}", "--feature-samples-per-class", "3",
         "--feature-pairs", "2", "--feature-lambdas", "3", "--no-progress"]
LAYERED = ["--nc-layers", "all"]
RUNS = {"default": [],
        "etf": ["--etf-classifier", *LAYERED],
        "mse": ["--loss", "mse", *LAYERED],
        "focal_smoothed": ["--label-smoothing", "0.1", "--loss", "focal", *LAYERED],
        "alpha_half": ["--mixup-alpha", "0.5", *LAYERED]}
LAYERED_RUNS = ["{sweep}/etf", "{sweep}/mse", "{sweep}/focal_smoothed", "{sweep}/alpha_half"]
LAST = ["--epochs", str(EPOCHS)]  # one panel per run: the rows and their names are what is tested
# Every subcommand that draws (summary prints a table); the variants with the longest texts.
CASES = {
    "curves --error": ["curves", "{sweep}", "--error"],
    "nc": ["nc", "{sweep}"],
    "compare": ["compare", "{sweep}", "--metric", "test_err,nc1,same_class_alignment"],
    "calibration": ["calibration", "{sweep}"],
    "representations --theory --samples": ["representations", "{sweep}", "--theory", "--samples", *LAST],
    "representations means": ["representations", "{sweep}", "--view", "means", *LAST],
    "representations cosines": ["representations", "{sweep}", "--view", "cosines", *LAST],
    "representations --layer": ["representations", *LAYERED_RUNS, "--layer", "hidden1", *LAST],
    "layers": ["layers", *LAYERED_RUNS],
}
GROUP_LEGENDS = ("curves --error", "nc", "compare")  # the figures whose legend names the groups


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    root = tmp_path_factory.mktemp("many_settings")
    train_runs(root, RUNS, FLAGS)
    return root


@pytest.fixture(scope="module")
def figures(sweep, tmp_path_factory):
    """Each case's Figure, made once by utils.main as a user would and kept instead of saved (saving
    is tested in test_figures.py; here it would only draw every figure a second time)."""
    out = tmp_path_factory.mktemp("many_settings_figures") / "figure.png"
    made = {}
    with pytest.MonkeyPatch.context() as patch:
        kept = []
        patch.setattr(utils, "save_figure", lambda figure, path, dpi: kept.append(figure))
        for case, argv in CASES.items():
            assert utils.main([a.format(sweep=sweep) for a in argv] + ["--out", str(out), "--dpi", "40"]) == 0
            made[case] = kept[-1]
    return made


@pytest.fixture
def make(monkeypatch, capsys):
    return Made(monkeypatch, capsys)


def text_problems(figure):
    """Texts that leave the canvas, and pairs of texts that overlap, after one draw."""
    renderer = drawn(figure)
    boxes = [(text.get_text(), text.get_window_extent(renderer)) for text in visible_texts(figure)]
    problems = [f"{text!r} leaves the canvas" for text, box in boxes if outside(box, figure.bbox)]
    problems += [f"{text!r}: tick labels leave the canvas" for text, box in
                 ((ax.get_title(), ax.get_tightbbox(renderer)) for ax in visible_axes(figure))
                 if outside(box, figure.bbox)]
    problems += [f"{a!r} overlaps {b!r}" for (a, box_a), (b, box_b) in itertools.combinations(boxes, 2)
                 if box_a.overlaps(box_b)]
    return problems


def legend_colours(figure):
    """Colours of the legend's group entries (the black style entries left out)."""
    legend = figure.legends[0]
    colours = [to_hex(handle.get_color()) for handle in legend.legend_handles]
    return [colour for colour in colours if colour != "#000000"]


@pytest.mark.parametrize("case", CASES)
def test_no_text_leaves_the_canvas_or_overlaps(figures, case):
    assert text_problems(figures[case]) == []


def test_the_summary_has_one_row_per_group(sweep, capsys):
    assert utils.main(["summary", str(sweep)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    # the header, then one group per run (each differs in a setting), in the groups' sorted order
    assert len(lines) == 1 + len(RUNS)
    assert lines[1].startswith("etf_classifier=False, label_smoothing=0, loss=cross_entropy, mixup_alpha=0.5")


@pytest.mark.parametrize("case", GROUP_LEGENDS)
def test_groups_get_colours_a_reader_can_tell_apart(figures, case):
    colours = legend_colours(figures[case])
    assert len(colours) == len(RUNS)
    assert min_colour_distance(colours) >= MIN_COLOUR_DISTANCE


def test_the_hue_follows_the_setting_with_the_most_values(figures):
    figure = figures["compare"]
    legend = figure.legends[0]
    by_label = {text.get_text().replace("\n", " "): to_hex(handle.get_color())
                for text, handle in zip(legend.get_texts(), legend.legend_handles)}
    # loss has three values (cross_entropy, focal, mse), every other setting two: loss names the hue,
    # its values in sorted order take the palette's first three
    for label, colour in by_label.items():
        loss = label.split("loss=")[1].split(",")[0]
        expected = GROUP_PALETTE[["cross_entropy", "focal", "mse"].index(loss)]
        assert hue(colour) == pytest.approx(hue(expected), abs=5e-3), label
    bars = [to_hex(ax.patches[0].get_facecolor()) for ax in figures["calibration"].axes[::2]]
    assert min_colour_distance(bars) >= MIN_COLOUR_DISTANCE


def test_shades_too_close_to_tell_apart_give_every_group_its_own_colour():
    # two values of the first key, four of the second: four shades of one hue would be 11 units apart
    groups = [Group(key=(("a", first), ("b", second)), label="", runs=[])
              for first in (0, 1) for second in range(4)]
    assign_colours(groups, hue_key=0)
    assert [group.colour for group in groups] == list(GROUP_PALETTE)
    # two shades of one hue are far enough apart: the hue then still names the first key
    pairs = [Group(key=(("a", first), ("b", second)), label="", runs=[]) for first in (0, 1) for second in (0, 1)]
    assign_colours(pairs, hue_key=0)
    assert [pairs[0].colour, pairs[2].colour] == list(GROUP_PALETTE[:2])
    assert hue(pairs[1].colour) == pytest.approx(hue(GROUP_PALETTE[0]), abs=5e-3)


def test_cielab_of_known_colours():
    np.testing.assert_allclose(cielab("#ffffff"), [100.0, 0.0, 0.0], atol=1e-3)
    np.testing.assert_allclose(cielab("#000000"), [0.0, 0.0, 0.0], atol=1e-9)
    np.testing.assert_allclose(cielab("#ff0000"), [53.24, 80.09, 67.20], atol=0.05)  # sRGB red, D65
    assert min_colour_distance(["#ffffff", "#000000"]) == pytest.approx(100.0, abs=0.01)
    assert min_colour_distance(["#ffffff"]) == float("inf")


def test_every_dotted_legend_entry_of_curves_error_is_a_drawn_line(figures):
    figure = figures["curves --error"]
    legend = figure.legends[0]
    styles = {text.get_text(): handle.get_linestyle() for text, handle in zip(legend.get_texts(),
                                                                              legend.legend_handles)}
    assert styles["mixup training batches (loss panels only)"] == ":"
    panels = visible_axes(figure)
    dotted = [ax.get_title() for ax in panels if any(line.get_linestyle() == ":" for line in ax.get_lines())]
    assert dotted == ["cross_entropy loss", "focal loss", "mse loss"]  # and not the error panel


def test_calibration_histograms_share_one_scale(figures):
    figure = figures["calibration"]
    histograms = figure.axes[1::2]
    assert len(histograms) == len(RUNS)
    assert len({ax.get_ylim() for ax in histograms}) == 1
    tallest = max(patch.get_height() for ax in histograms for patch in ax.patches)
    assert histograms[0].get_ylim()[1] >= tallest


def plant_far_theory(folder, factor):
    """Move every theory curve of the last features pickle `factor` times further from the centre the
    figure subtracts (the mean of the class means: the curves are uncentred, as the features)."""
    path = folder / "features" / f"epoch_{EPOCHS:04d}.pkl"
    with open(path, "rb") as handle:
        payload = pickle.load(handle)
    curves = payload["mixup"]["ufm_curves"]
    centre = np.asarray(payload["class_means"], dtype=np.float64).mean(axis=0)
    curves["H"] = centre + (np.asarray(curves["H"]) - centre) * factor
    with open(path, "wb") as handle:
        pickle.dump(payload, handle)


def test_a_far_theory_curve_does_not_set_the_panel_limits(sweep, tmp_path, make):
    folder = tmp_path / "far"
    shutil.copytree(sweep / "default", folder)
    plant_far_theory(folder, 1000.0)
    out = ["--epochs", str(EPOCHS), "--out", tmp_path / "t.png", "--dpi", 40]
    plain = visible_axes(make.figure(["representations", folder, *out]))[0]
    theory = visible_axes(make.figure(["representations", folder, "--theory", *out]))[0]
    # the data limits (which the view then fits to the panel's shape) are the learned points' alone
    np.testing.assert_allclose(theory.dataLim.get_points(), plain.dataLim.get_points(), rtol=1e-12)
    span = np.ptp(plain.dataLim.get_points(), axis=0).max()
    curve_reach = max(np.abs(line.get_xydata()).max() for line in theory.get_lines())
    assert curve_reach > 5 * span  # the planted curves run far past the panel, cut at its edge
    assert len(theory.get_lines()) == 3 and len(theory.collections) == 2 + 3  # all drawn: 3 curves, 3 diamonds


@pytest.mark.parametrize("argv", [["--epoch", "1"], ["--seed", "0", "--epoch", "1"]])
def test_main_refuses_an_abbreviated_flag(capsys, argv):
    assert run_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["main.py: error: unrecognized arguments: --epoch 1"]


@pytest.mark.parametrize("argv, fragment", [
    (["representations", "runs", "--epoch", "1"], "unrecognized arguments: --epoch 1"),
    (["calibration", "runs", "--epochs", "1"], "unrecognized arguments: --epochs 1"),
    (["summary", "runs", "--metr", "nc1"], "unrecognized arguments: --metr nc1"),
    (["curv", "runs"], "invalid choice: 'curv'"),
])
def test_utils_refuses_an_abbreviated_flag_or_command(capsys, argv, fragment):
    assert utils.main(argv) == utils.EXIT_USAGE
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("utils.py: error: ") and fragment in err[0]
