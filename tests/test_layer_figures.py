"""The figures of issues 13 and 14, read from the Figure objects utils.py saves: `layers`
(NC1, nearest-class-mean error and mixup non-linearity against depth), `representations
--layer` (a stage's class-mean plane), `representations --theory` (the UFM optimum on the
classifier plane), and the UFM and per-layer metrics of compare and summary.

Planted run folders written here check the projections against formulas computed in the
test; three tiny digits runs (cross-entropy with --nc-layers all, MSE with manifold mixup
and --nc-layers all, cross-entropy without per-layer measurements), trained once per module,
check the figures against the numbers the runs logged.
"""
import pickle

import numpy as np
import pytest
from matplotlib.colors import to_hex

from helpers import train_runs
import utils
from plotting.cosines import epoch_colours
from plotting.depth import choose_epochs
from plotting.loading import Run, RunError, load_run
from test_figures import Made, assert_inside_canvas, visible_axes

EPOCHS = 2
STAGES = ["hidden1", "hidden2", "features"]
# Six lambdas (0, 0.2, ..., 1) lie on the 51-point grid of the theory curves (step 0.02).
TINY_RUN_FLAGS = ["--epochs", str(EPOCHS), "--width", "0.1", "--samples-per-class", "30", "--batch-size", "64",
                  "--lr", "0.02", "--feature-epochs", f"0,{EPOCHS}", "--feature-samples-per-class", "10",
                  "--feature-pairs", "2", "--feature-lambdas", "6", "--no-progress"]
RUNS = {"ce": ["--loss", "cross_entropy", "--nc-layers", "all"],
        "mse_manifold": ["--loss", "mse", "--nc-layers", "all", "--mixup-layer", "random"],
        "plain": ["--loss", "cross_entropy"]}
THEORY_GREY = 0.1  # triangle.THEORY_COLOUR, as an RGB level


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("layer_runs")
    train_runs(root, RUNS, TINY_RUN_FLAGS)
    return root


@pytest.fixture
def make(monkeypatch, capsys):
    return Made(monkeypatch, capsys)


def load(path):
    with open(path, "rb") as handle:
        return pickle.load(handle)


def features(folder, epoch):
    return load(folder / "features" / f"epoch_{epoch:04d}.pkl")


def vertices():
    """The triangle's vertices, written out: circumradius 1, at 90, 210 and 330 degrees."""
    return np.array([[0.0, 1.0], [-np.sqrt(3) / 2, -0.5], [np.sqrt(3) / 2, -0.5]])


def plane_map(rows3):
    """V^T (R R^T)^{-1} R: the linear map sending the three rows R to the vertices."""
    return vertices().T @ np.linalg.inv(rows3 @ rows3.T) @ rows3


def one_line_error(make, argv, code=utils.EXIT_ERROR):
    assert make([str(a) for a in argv]) == code
    lines = make.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("utils.py: error: ") and "Traceback" not in make.err, make.err
    return lines[0]


# ---------------------------------------------------------------- planted run folders

def write_run(folder, config, records, payloads):
    (folder / "features").mkdir(parents=True)
    base = {"dataset": "planted", "model": "mlp", "loss": "cross_entropy", "seed": 0, "mixup_layer": "input",
            "mixup_layers": ["input"]}
    with open(folder / "metrics.pkl", "wb") as handle:
        pickle.dump({"schema_version": 1, "status": "complete", "config": {**base, **config}, "epochs": records},
                    handle)
    for epoch, payload in payloads.items():
        with open(folder / "features" / f"epoch_{epoch:04d}.pkl", "wb") as handle:
            pickle.dump(payload, handle)


def planted_mixup(triple, lambdas):
    """Every pair type of the triple at every lambda, one pair each: labels and lambdas."""
    a, b, c = triple
    pairs = [(a, a), (b, b), (c, c), (a, b), (a, c), (b, c)]
    y_a = np.array([p[0] for p in pairs for _ in lambdas])
    y_b = np.array([p[1] for p in pairs for _ in lambdas])
    lam = np.tile(np.asarray(lambdas, dtype=float), len(pairs))
    return y_a, y_b, lam


TRIPLE = (0, 2, 3)
NUM_CLASSES, DIM = 4, 6


def planted_payload(rng, H, y_a, y_b, lam, class_means, layers=None, W=None, mixup_extra=None):
    W = rng.normal(size=(NUM_CLASSES, DIM)) if W is None else W
    payload = {"epoch": 1, "H": rng.normal(size=(8, DIM)), "y": np.repeat(np.arange(NUM_CLASSES), 2),
               "class_means": class_means, "W": W, "b": np.zeros(NUM_CLASSES),
               "mixup": {"H": H, "y_a": y_a, "y_b": y_b, "lam": lam, "triple": list(TRIPLE), **(mixup_extra or {})}}
    if layers is not None:
        payload["layers"] = layers
    return payload


@pytest.fixture
def planted_stage(tmp_path):
    """A run whose stage `hidden1` holds straight interpolations of its class means (different-class
    pairs) and scattered points (same-class pairs), far from the origin."""
    rng = np.random.default_rng(3)
    means = rng.normal(size=(NUM_CLASSES, DIM)) + 40.0
    y_a, y_b, lam = planted_mixup(TRIPLE, np.linspace(0, 1, 5))
    H = lam[:, None] * means[y_a] + (1 - lam[:, None]) * means[y_b]
    same = y_a == y_b
    H[same] += rng.normal(size=(same.sum(), DIM))
    layers = {"hidden1": {"H": H, "class_means": means}}
    payload = planted_payload(rng, rng.normal(size=H.shape), y_a, y_b, lam, rng.normal(size=(NUM_CLASSES, DIM)),
                              layers)
    record = {"epoch": 1, "nc_layers": None,
              "mixup_geometry": {"layers": {"hidden1": {"diff_class_nonlinearity": 0.1234}}}}
    folder = tmp_path / "planted_stage"
    write_run(folder, {"layer_names": ["hidden1", "features"], "nc_layers": ["hidden1", "features"]}, [record],
              {1: payload})
    return folder, H, means, y_a, y_b, lam


def test_stage_view_puts_the_class_means_on_the_vertices_and_their_interpolations_on_the_edges(planted_stage,
                                                                                                tmp_path, make):
    folder, H, means, y_a, y_b, lam = planted_stage
    figure = make.figure(["representations", folder, "--layer", "hidden1", "--out", tmp_path / "s.png", "--dpi", 40])
    ax = visible_axes(figure)[0]
    different, same = ax.collections[0].get_offsets(), ax.collections[1].get_offsets()
    diff = y_a != y_b
    position = {cls: i for i, cls in enumerate(TRIPLE)}
    pa = np.array([position[c] for c in y_a[diff]])
    pb = np.array([position[c] for c in y_b[diff]])
    expected = lam[diff, None] * vertices()[pa] + (1 - lam[diff, None]) * vertices()[pb]
    np.testing.assert_allclose(different, expected, atol=1e-9)
    # any vector: (h - mean of the stage's class means) through the map computed here
    centre = means.mean(axis=0)
    direct = (H[~diff] - centre) @ plane_map(means[list(TRIPLE)] - centre).T
    np.testing.assert_allclose(same, direct, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(ax.collections[2].get_offsets(), vertices(), atol=1e-12)  # the class-mean markers
    assert ax.get_title() == "epoch 1\nnon-linearity at hidden1: 0.12"
    assert "at stage hidden1 on the plane of the class means of classes 0,2,3" in " ".join(figure.get_suptitle().split())


def test_theory_curves_are_centred_and_projected_as_the_features_are(tmp_path, make):
    """The curves model the features as the network computes them (ufm's one convention, uncentred): the
    figure subtracts the same centre, the mean of the class means, from both (issue 20)."""
    rng = np.random.default_rng(5)
    W = rng.normal(size=(NUM_CLASSES, DIM))
    means = rng.normal(size=(NUM_CLASSES, DIM)) + 50.0  # a curve left uncentred would sit far off
    y_a, y_b, lam = planted_mixup(TRIPLE, np.linspace(0, 1, 3))
    curves = {"lambdas": np.linspace(0, 1, 51), "pairs": [[0, 0], [2, 2], [3, 3], [0, 2], [0, 3], [2, 3]],
              "H": rng.normal(size=(6, 51, DIM)).astype(np.float32)}
    fit = {"residual": 0.4567, "identifiable": True, "nan_reason": None, "gamma": 0.3}
    payload = planted_payload(rng, rng.normal(size=(len(lam), DIM)) + 50.0, y_a, y_b, lam, means, W=W,
                              mixup_extra={"ufm": fit, "ufm_curves": curves})
    folder = tmp_path / "planted_theory"
    write_run(folder, {}, [{"epoch": 1}], {1: payload})
    figure = make.figure(["representations", folder, "--theory", "--out", tmp_path / "t.png", "--dpi", 40])
    ax = visible_axes(figure)[0]
    projection = plane_map(W[list(TRIPLE)])
    projected = (curves["H"].astype(np.float64) - means.mean(axis=0)) @ projection.T  # (6, 51, 2)
    lines = ax.get_lines()
    assert len(lines) == 3 and all(to_hex(line.get_color()) == to_hex((THEORY_GREY,) * 3) for line in lines)
    for line, curve in zip(lines, projected[3:]):  # different-class pair types: a curve over lambda
        np.testing.assert_allclose(line.get_xydata(), curve, rtol=1e-9, atol=1e-9)
    markers = ax.collections[2:5]  # same-class pair types: one point each
    for marker, curve in zip(markers, projected[:3]):
        np.testing.assert_allclose(marker.get_offsets(), curve[:1], rtol=1e-9, atol=1e-9)
    assert ax.get_title().splitlines()[-1] == "UFM residual 0.46"
    assert "with the optimum of the unconstrained-features model" in " ".join(figure.get_suptitle().split())
    legend = [t.get_text() for t in figure.legends[0].get_texts()]
    assert "UFM optimum over $\\lambda$, different-class pair" in legend


def theory_folder(tmp_path, fit, curves, name):
    rng = np.random.default_rng(6)
    y_a, y_b, lam = planted_mixup(TRIPLE, np.linspace(0, 1, 3))
    extra = {"ufm": fit} if fit is not None else {}
    if curves != "absent":
        extra["ufm_curves"] = curves
    payload = planted_payload(rng, rng.normal(size=(len(lam), DIM)), y_a, y_b, lam,
                              rng.normal(size=(NUM_CLASSES, DIM)), mixup_extra=extra)
    folder = tmp_path / name
    write_run(folder, {}, [{"epoch": 1}], {1: payload})
    return folder


def test_a_fit_without_curves_says_why_in_the_title_and_draws_nothing(tmp_path, make):
    fit = {"residual": float("nan"), "identifiable": False,
           "nan_reason": "the features have no component in the row space of W"}
    folder = theory_folder(tmp_path, fit, None, "no_fit")
    figure = make.figure(["representations", folder, "--theory", "--out", tmp_path / "t.png", "--dpi", 40])
    ax = visible_axes(figure)[0]
    assert ax.get_lines() == [] and len(ax.collections) == 2  # the learned points only
    title = " ".join(ax.get_title().split())  # the reason wraps to the panel
    assert title.endswith("no UFM curve: the features have no component in the row space of W")


def test_an_unidentifiable_gamma_is_named_in_the_title(tmp_path, make):
    curves = {"lambdas": np.linspace(0, 1, 51), "pairs": [[0, 0], [2, 2], [3, 3], [0, 2], [0, 3], [2, 3]],
              "H": np.ones((6, 51, DIM))}
    folder = theory_folder(tmp_path, {"residual": 0.25, "identifiable": False, "nan_reason": None}, curves, "flat")
    figure = make.figure(["representations", folder, "--theory", "--out", tmp_path / "t.png", "--dpi", 40])
    assert visible_axes(figure)[0].get_title().splitlines()[-1] == "UFM residual 0.25, γ not identifiable"


def test_a_pickle_from_before_the_fit_is_refused_for_theory(tmp_path, make):
    folder = theory_folder(tmp_path, None, "absent", "old")
    line = one_line_error(make, ["representations", folder, "--theory", "--out", tmp_path / "t.png"])
    assert "no UFM fit in this features pickle" in line and "epoch_0001.pkl" in line


# ---------------------------------------------------------------- representations on real runs

def test_layer_features_is_the_class_means_projection_of_the_last_layer(runs, tmp_path, make):
    payload = features(runs / "plain", EPOCHS)  # no --nc-layers: the last layer's arrays serve
    means, mixup = payload["class_means"].astype(np.float64), payload["mixup"]
    triple = list(mixup["triple"])
    centre = means.mean(axis=0)
    direct = (mixup["H"].astype(np.float64) - centre) @ plane_map(means[triple] - centre).T
    same = mixup["y_a"] == mixup["y_b"]
    for run in ("plain", "ce"):
        figure = make.figure(["representations", runs / run, "--layer", "features", "--epochs", EPOCHS,
                              "--out", tmp_path / "f.png", "--dpi", 40])
        ax = visible_axes(figure)[0]
        if run == "plain":
            np.testing.assert_allclose(ax.collections[0].get_offsets(), direct[~same], rtol=1e-6, atol=1e-6)
            np.testing.assert_allclose(ax.collections[1].get_offsets(), direct[same], rtol=1e-6, atol=1e-6)
        geometry = load_run(str(runs / run)).record_at(EPOCHS)["mixup_geometry"]
        assert ax.get_title() == f"epoch {EPOCHS}\nnon-linearity at features: " \
                                 f"{geometry['diff_class_nonlinearity']:.2f}"


def test_theory_curves_pass_through_the_fitted_points(runs, tmp_path, make):
    """The run's s H* of a mixup point is the curve of its pair type at its lambda: both model the
    uncentred features, so the figure centres and maps both as it does the features."""
    payload = features(runs / "ce", EPOCHS)
    mixup = payload["mixup"]
    curves = mixup["ufm_curves"]
    figure = make.figure(["representations", runs / "ce", "--theory", "--epochs", EPOCHS,
                          "--out", tmp_path / "t.png", "--dpi", 40])
    ax = visible_axes(figure)[0]
    triple = list(mixup["triple"])
    projection = plane_map(payload["W"].astype(np.float64)[triple])
    centre = payload["class_means"].astype(np.float64).mean(axis=0)
    lines = ax.get_lines()
    for line, pair, curve in zip(lines, curves["pairs"][3:], curves["H"][3:]):
        np.testing.assert_allclose(line.get_xydata(), (curve.astype(np.float64) - centre) @ projection.T,
                                   rtol=1e-6, atol=1e-6)
        rows = np.flatnonzero((mixup["y_a"] == pair[0]) & (mixup["y_b"] == pair[1]))
        on_grid = np.rint(mixup["lam"][rows] * 50).astype(int)
        fitted = (mixup["H_ufm"][rows].astype(np.float64) - centre) @ projection.T
        np.testing.assert_allclose(line.get_xydata()[on_grid], fitted, rtol=1e-4, atol=1e-4 * np.abs(fitted).max())
    fit = load_run(str(runs / "ce")).record_at(EPOCHS)["mixup_geometry"]["ufm"]
    assert f"UFM residual {fit['residual']:.2f}" in ax.get_title()


@pytest.mark.parametrize("argv, fragment", [
    (["{runs}/plain", "--layer", "hidden1"], "no per-layer vectors (train the run with --nc-layers all"),
    (["{runs}/ce", "--layer", "hidden7"], "no stage 'hidden7' here (stages: hidden1, hidden2, features)"),
])
def test_stage_view_refuses_missing_stages_in_one_line(runs, tmp_path, make, argv, fragment):
    line = one_line_error(make, ["representations", *[a.format(runs=runs) for a in argv],
                                 "--out", tmp_path / "r.png"])
    assert fragment in line
    assert not (tmp_path / "r.png").exists()


@pytest.mark.parametrize("extra, fragment", [
    (["--theory", "--layer", "hidden1"], "cannot go with --layer"),
    (["--layer", "hidden1", "--samples"], "--samples: the features pickle keeps the clean samples' vectors of the "
                                          "last layer only"),
    (["--theory", "--view", "means"], "draw on the triangle view, not --view means"),
])
def test_meaningless_option_combinations_are_usage_errors(runs, tmp_path, make, extra, fragment):
    line = one_line_error(make, ["representations", runs / "ce", *extra, "--out", tmp_path / "r.png"],
                          code=utils.EXIT_USAGE)
    assert fragment in line


# ---------------------------------------------------------------- layers

def nc_layers(run, epoch, key):
    return [run.record_at(epoch)["nc_layers"][stage][key] for stage in STAGES]


def test_layers_draws_one_line_per_epoch_against_the_stages(runs, tmp_path, make):
    figure = make.figure(["layers", runs / "ce", runs / "mse_manifold", "--epochs", f"0,{EPOCHS}",
                          "--out", tmp_path / "l.png", "--dpi", 40])
    axes = np.array(visible_axes(figure)).reshape(2, 4)
    colours = epoch_colours([0, EPOCHS])
    for row_axes, name in zip(axes, ("ce", "mse_manifold")):
        run = load_run(str(runs / name))
        for ax in row_axes:
            assert [t.get_text() for t in ax.get_xticklabels()] == STAGES
        nc1_ax, ncc_ax, nonlinearity_ax, chord_ax = row_axes
        assert nc1_ax.get_yscale() == "log" and ncc_ax.get_yscale() == "log"
        assert nonlinearity_ax.get_yscale() == "linear" and chord_ax.get_yscale() == "linear"
        solid = [[line for line in ax.get_lines() if line.get_linestyle() == "-"] for ax in row_axes]
        for epoch, line in zip((0, EPOCHS), solid[0]):
            assert to_hex(line.get_color()) == colours[epoch]
            np.testing.assert_allclose(line.get_xdata(), [0, 1, 2])
            nc1 = nc_layers(run, epoch, "nc1")
            np.testing.assert_allclose(line.get_ydata(), nc1, rtol=1e-12)
            assert nc1[-1] == pytest.approx(run.record_at(epoch)["nc"]["train"]["nc1"], rel=1e-12)
        for epoch, line in zip((0, EPOCHS), solid[1]):
            samples = run.record_at(epoch)["nc_layers"]["features"]["ncc_samples"]
            errors = [100 * (1 - a) or 100 * 0.5 / samples for a in nc_layers(run, epoch, "ncc_accuracy")]
            np.testing.assert_allclose(line.get_ydata(), errors, rtol=1e-12)
        for epoch, line in zip((0, EPOCHS), solid[2]):  # both are feature epochs
            geometry = run.record_at(epoch)["mixup_geometry"]["layers"]
            np.testing.assert_allclose(line.get_ydata(), [geometry[s]["diff_class_nonlinearity"] for s in STAGES],
                                       rtol=1e-12)
        for epoch, line in zip((0, EPOCHS), solid[3]):  # the chord measure at each stage
            geometry = run.record_at(epoch)["mixup_geometry"]["layers"]
            chord = [geometry[s]["diff_class_chord_nonlinearity"] for s in STAGES]
            np.testing.assert_allclose(line.get_ydata(), chord, rtol=1e-12)
    # manifold mixup (random: input, hidden1, hidden2) marks its two stages in every panel of its row
    for ax, row in zip(axes.flatten(), [0] * 4 + [1] * 4):
        dotted = [line.get_xdata()[0] for line in ax.get_lines() if line.get_linestyle() == ":"
                  and np.ptp(line.get_xdata()) == 0]
        assert dotted == ([] if row == 0 else [0, 1])
    legend = [t.get_text() for t in figure.legends[0].get_texts()]
    assert legend == ["epoch 0", f"epoch {EPOCHS}", "stage mixed by manifold mixup"]
    assert_inside_canvas(figure)


def test_layers_refuses_a_run_without_per_layer_measurements(runs, tmp_path, make):
    line = one_line_error(make, ["layers", runs / "ce", runs / "plain", "--out", tmp_path / "l.png"])
    assert f"{runs / 'plain'}: no per-layer measurements (train the run with --nc-layers all" in line
    line = one_line_error(make, ["layers", runs / "ce", "--epochs", "7", "--out", tmp_path / "l.png"])
    assert "no per-layer measurements at epoch 7 (measured at epochs 0, 1, 2)" in line
    assert not (tmp_path / "l.png").exists()


def synthetic_run(nc_epochs, feature_epochs):
    records = [{"epoch": e, "nc_layers": {"features": {"nc1": 1.0}},
                "mixup_geometry": {"layers": {"features": {}}} if e in feature_epochs else None} for e in nc_epochs]
    return Run(folder="synthetic", config={}, records=records, status="complete")


def test_default_epochs_are_epoch_zero_and_four_spread_over_the_feature_epochs():
    run = synthetic_run(range(11), [1, 2, 4, 7, 10])
    # indices 0, 1.33, 2.67, 4 of the feature epochs round to 0, 1, 3, 4
    assert choose_epochs(None, run) == [0, 1, 2, 7, 10]
    assert choose_epochs(None, synthetic_run(range(1, 11), [])) == [1, 4, 7, 10]  # no feature epochs
    assert choose_epochs("last,3", run) == [3, 10]
    with pytest.raises(RunError, match="is not an epoch number"):
        choose_epochs("one", run)


# ---------------------------------------------------------------- compare and summary

def test_compare_draws_the_ufm_residuals_at_the_feature_epochs(runs, tmp_path, make):
    figure = make.figure(["compare", runs / "ce", "--metric", "ufm_residual,ufm_outside_share,layer.hidden1.nc1",
                          "--out", tmp_path / "c.png", "--dpi", 40])
    records = load_run(str(runs / "ce")).records
    fits = [(r["epoch"], r["mixup_geometry"]["ufm"]) for r in records if r.get("mixup_geometry")]
    residual_ax, outside_ax, layer_ax = visible_axes(figure)
    for ax, key in ((residual_ax, "residual"), (outside_ax, "outside_share")):
        line = ax.get_lines()[0]
        np.testing.assert_allclose(line.get_xdata(), [epoch for epoch, _ in fits])
        np.testing.assert_allclose(line.get_ydata(), [fit[key] for _, fit in fits], rtol=1e-12)
    np.testing.assert_allclose(layer_ax.get_lines()[0].get_ydata(),
                               [r["nc_layers"]["hidden1"]["nc1"] for r in records], rtol=1e-12)
    assert layer_ax.get_yscale() == "log"


def test_summary_reports_ufm_and_per_layer_numbers(runs, capsys):
    code = utils.main(["summary", str(runs / "ce"), "--metric",
                       "ufm_residual_same_class,ufm_residual_diff_class,layer.hidden2.ncc_accuracy,"
                       "layer.hidden1.diff_class_nonlinearity"])
    out = capsys.readouterr().out
    assert code == 0
    last = load_run(str(runs / "ce")).records[-1]
    fit, layers = last["mixup_geometry"]["ufm"], last["mixup_geometry"]["layers"]
    expected = [fit["residual_same_class"], fit["residual_diff_class"], last["nc_layers"]["hidden2"]["ncc_accuracy"],
                layers["hidden1"]["diff_class_nonlinearity"]]
    assert out.strip().splitlines()[1].split()[-4:] == [f"{value:.4g}" for value in expected]


def test_compare_draws_a_layer_accuracy_as_its_error(runs, tmp_path, make):
    figure = make.figure(["compare", runs / "ce", "--metric", "layer.hidden1.ncc_accuracy",
                          "--out", tmp_path / "c.png", "--dpi", 40])
    assert "layer.hidden1.ncc_accuracy is drawn as layer.hidden1.ncc_err" in make.err
    ax = visible_axes(figure)[0]
    records = load_run(str(runs / "ce")).records
    expected = [100 * (1 - r["nc_layers"]["hidden1"]["ncc_accuracy"]) for r in records]
    np.testing.assert_allclose(ax.get_lines()[0].get_ydata(), expected, rtol=1e-12)
    assert ax.get_yscale() == "log" and ax.get_ylabel() == "error (%)"


@pytest.mark.parametrize("metric, fragment", [
    ("layer.hidden9.nc1", "layer.hidden9.nc1: no run measured stage 'hidden9' (measured stages: features, "
                          "hidden1, hidden2)"),
    ("layer.hidden1.nc3", "unknown per-layer metric 'layer.hidden1.nc3'"),
])
def test_bad_per_layer_metrics_get_one_line(runs, make, metric, fragment):
    assert fragment in one_line_error(make, ["summary", runs / "ce", "--metric", metric])


# ---------------------------------------------------------------- no text leaves the canvas

@pytest.mark.parametrize("argv", [
    ["representations", "{runs}/ce", "{runs}/mse_manifold", "--theory"],
    ["representations", "{runs}/ce", "{runs}/mse_manifold", "--layer", "hidden1"],
    ["layers", "{runs}/ce"],
])
def test_no_text_leaves_the_canvas(runs, tmp_path, make, argv):
    figure = make.figure([a.format(runs=runs) for a in argv] + ["--out", tmp_path / "f.pdf"])
    assert_inside_canvas(figure)


def test_per_layer_measurement_does_not_make_another_setting(runs, make):
    """--nc-layers adds measurements, not training: a run with it and one without, same seed, are one setting,
    and a mean over both would count that seed twice."""
    line = one_line_error(make, ["summary", runs / "ce", runs / "plain"])
    assert "runs repeat a setting and its seed" in line
    assert f"seed 0 in {runs / 'ce'}, {runs / 'plain'}" in line
