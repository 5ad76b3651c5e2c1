"""utils.py on real run folders: every subcommand renders a real figure, seeds
aggregate into groups, the summary has one row per group, and every bad input
is refused in one line without running code from a pickle.

Four tiny digits runs (two losses x two seeds) are trained once per module by
main.main in-process; everything else reads them through the real loading code.
"""
import csv
import io
import os
import pickle
import shutil

import matplotlib.image
import numpy as np
import pytest
import torch

import main as train_main
import utils
from plotting.figures import compare_figure, curves_figure
from plotting.groups import GROUP_PALETTE, group_runs
from plotting.loading import RestrictedUnpickler, Run, RunError, load_run, load_runs
from plotting.metrics import aggregate, resolve_metric, series
from plotting.representations import parse_epochs
from plotting.triangle import triangle_projection, triangle_vertices

LOSSES = ("cross_entropy", "mse")
SEEDS = (0, 1)
EPOCHS = 2
TINY_RUN_FLAGS = ["--epochs", str(EPOCHS), "--width", "0.1", "--samples-per-class", "30", "--batch-size", "64",
                  "--lr", "0.02", "--feature-epochs", f"0,{EPOCHS}", "--feature-samples-per-class", "10",
                  "--feature-pairs", "3", "--feature-lambdas", "5", "--no-progress"]
MIN_DISTINCT_COLOURS = 50     # a blank or single-colour image has a handful
MIN_INK_FRACTION = 0.02       # share of pixels that are not white


def train(argv):
    """main.main in-process, leaving the test process's thread count as it found it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # these tensors are tiny: extra threads only add synchronisation
    try:
        return train_main.main(argv)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """A sweep folder holding <loss>_s<seed> run folders."""
    root = tmp_path_factory.mktemp("sweep")
    for loss in LOSSES:
        for seed in SEEDS:
            assert train(["--out-dir", str(root), "--run-name", f"{loss}_s{seed}", "--loss", loss,
                          "--seed", str(seed), *TINY_RUN_FLAGS]) == 0
    return root


@pytest.fixture(scope="module")
def diverged(tmp_path_factory):
    """A run whose loss became NaN in epoch 1 (main.py stops it with status 'diverged')."""
    root = tmp_path_factory.mktemp("diverged")
    code = train(["--out-dir", str(root), "--run-name", "huge_lr", *TINY_RUN_FLAGS, "--lr", "1e8",
                  "--feature-epochs", "0"])
    assert code == train_main.EXIT_DIVERGED
    return root / "huge_lr"


@pytest.fixture
def run_copy(sweep, tmp_path):
    """A private copy of one run folder, to damage."""
    target = tmp_path / "victim"
    shutil.copytree(sweep / "cross_entropy_s0", target)
    return target


def assert_real_image(path):
    assert os.path.isfile(path)
    pixels = matplotlib.image.imread(str(path))[..., :3]
    colours = np.unique((pixels.reshape(-1, 3) * 255).round().astype(np.uint8), axis=0)
    ink = np.mean(np.any(pixels < 0.97, axis=-1))
    assert len(colours) >= MIN_DISTINCT_COLOURS, f"{path}: only {len(colours)} colours"
    assert ink >= MIN_INK_FRACTION, f"{path}: {ink:.3%} of the pixels are not white"


def run_utils(argv, capsys):
    code = utils.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_refusal(code, err, *fragments):
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("utils.py: error: ")
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0]


# ---------------------------------------------------------------- every subcommand renders

@pytest.mark.parametrize("command, extra", [
    ("curves", ["--error"]), ("nc", ["--split", "test", "--band", "std"]),
    ("compare", ["--by", "loss", "--metric", "test_acc,nc1,test.nc4,mixup_loss"]),
])
def test_line_figures_render_from_the_sweep(sweep, tmp_path, capsys, command, extra):
    out = tmp_path / f"{command}.png"
    code, stdout, _ = run_utils([command, sweep, "--out", out, "--dpi", 60, *extra], capsys)
    assert code == 0
    assert stdout.strip() == f"wrote {out}"
    assert_real_image(out)


def test_calibration_renders_one_run_at_a_chosen_epoch(sweep, tmp_path, capsys):
    out = tmp_path / "calibration.png"
    code, _, _ = run_utils(["calibration", sweep / "mse_s1", "--epoch", 1, "--out", out, "--dpi", 60], capsys)
    assert code == 0
    assert_real_image(out)


@pytest.mark.parametrize("extra", [[], ["--samples", "--epochs", "0,last"], ["--view", "means"],
                                   ["--view", "cosines"]])
def test_representations_renders(sweep, tmp_path, capsys, extra):
    out = tmp_path / "representations.png"
    code, _, _ = run_utils(["representations", sweep / "cross_entropy_s0", "--out", out, "--dpi", 60, *extra],
                           capsys)
    assert code == 0
    assert_real_image(out)


def test_default_output_lands_in_the_run_folder(sweep, tmp_path, capsys):
    folder = tmp_path / "run"
    shutil.copytree(sweep / "mse_s0", folder)
    code, stdout, _ = run_utils(["curves", folder, "--dpi", 40], capsys)
    assert code == 0
    assert stdout.strip() == f"wrote {folder / 'curves.png'}"
    assert_real_image(folder / "curves.png")


# ---------------------------------------------------------------- grouping and aggregation

def test_compare_two_seeds_of_two_losses_gives_two_groups(sweep):
    groups = group_runs(load_runs([str(sweep)]), ["loss"])
    assert [g.label for g in groups] == ["loss=cross_entropy", "loss=mse"]
    assert [g.seeds for g in groups] == [[0, 1], [0, 1]]
    assert all(g.colour in GROUP_PALETTE for g in groups) and groups[0].colour != groups[1].colour
    figure = compare_figure(groups, [resolve_metric("test_acc")], "minmax")
    legend = figure.legends[0]
    assert [t.get_text() for t in legend.get_texts()] == ["loss=cross_entropy (2 seeds)", "loss=mse (2 seeds)"]
    assert [h.get_color() for h in legend.legend_handles] == [g.colour for g in groups]


def test_groups_keep_their_colour_across_subcommands(sweep):
    runs = load_runs([str(sweep)])
    automatic = group_runs(runs)  # the runs differ in loss and seed only: the same groups
    by_loss = group_runs(list(reversed(runs)), ["loss"])
    assert [(g.label, g.colour) for g in automatic] == [(g.label, g.colour) for g in by_loss]
    curves = curves_figure(automatic, "minmax", show_error=False)
    curve_colours = {t.get_text(): h.get_color() for t, h in zip(curves.legends[0].get_texts(),
                                                                   curves.legends[0].legend_handles)}
    assert curve_colours["loss=mse (2 seeds)"] == by_loss[1].colour


def test_a_glob_picks_run_folders(sweep):
    runs = load_runs([str(sweep / "*_s0")])
    assert sorted(run.name for run in runs) == ["cross_entropy_s0", "mse_s0"]


def test_seed_aggregate_is_the_mean_and_range_of_the_runs(sweep):
    runs = [load_run(str(sweep / f"mse_s{seed}")) for seed in SEEDS]
    metric = resolve_metric("test_acc")
    data = aggregate(runs, metric, "minmax", on_log_axis=False)
    per_run = np.array([[100 * r["test_acc"] for r in run.records] for run in runs])
    assert data.epochs.tolist() == list(range(EPOCHS + 1))
    np.testing.assert_allclose(data.centre, per_run.mean(axis=0))
    np.testing.assert_allclose(data.low, per_run.min(axis=0))
    np.testing.assert_allclose(data.high, per_run.max(axis=0))
    nc1 = aggregate(runs, resolve_metric("nc1"), "std", on_log_axis=True)
    values = np.array([[r["nc"]["train"]["nc1"] for r in run.records] for run in runs])
    np.testing.assert_allclose(nc1.centre, np.exp(np.log(values).mean(axis=0)))  # geometric mean on a log axis


def test_missing_and_nonfinite_values_are_skipped():
    records = [{"epoch": 0, "mixup_loss": None, "nc": None, "train_acc": 0.5},
               {"epoch": 1, "mixup_loss": float("nan"), "nc": {"train": {"nc1": 0.4}}, "train_acc": 1.0},
               {"epoch": 2, "mixup_loss": 0.7, "nc": {"train": {"nc1": float("inf")}}, "train_acc": 1.0}]
    run = Run(folder="x", config={"num_train": 100}, records=records, status="complete")
    epochs, values, _ = series(run, resolve_metric("mixup_loss"), on_log_axis=True)
    assert epochs.tolist() == [2] and values.tolist() == [0.7]
    epochs, values, _ = series(run, resolve_metric("nc1"), on_log_axis=True)
    assert epochs.tolist() == [1] and values.tolist() == [0.4]
    # zero training error sits at half a sample (in %) on a log axis, and the level is reported
    epochs, values, zero = series(run, resolve_metric("train_err"), on_log_axis=True)
    assert values.tolist() == [50.0, 0.5, 0.5] and zero == 0.5


def test_a_diverged_run_is_drawn_and_marked(diverged, tmp_path, capsys):
    run = load_run(str(diverged))
    assert run.status == "diverged" and np.isnan(run.records[-1]["train_loss"])
    figure = curves_figure(group_runs([run]), "minmax", show_error=True)
    assert figure.legends[0].get_texts()[0].get_text().endswith("[1 diverged]")
    out = tmp_path / "nc.png"
    code, _, _ = run_utils(["nc", diverged, "--out", out, "--dpi", 50], capsys)
    assert code == 0
    assert_real_image(out)
    code, table, _ = run_utils(["summary", diverged, "--metric", "train_loss,test_acc"], capsys)
    assert code == 0
    # status, then train_loss (NaN in the last record: no finite value) and test_acc
    assert table.splitlines()[1].split()[-3:] == ["diverged", "n/a", f"{run.records[-1]['test_acc']:.4g}"]


# ---------------------------------------------------------------- summary

def test_summary_prints_one_row_per_group_with_the_mean_over_seeds(sweep, tmp_path, capsys):
    table = tmp_path / "summary.csv"
    code, out, _ = run_utils(["summary", sweep, "--metric", "test_acc,nc1", "--csv", table], capsys)
    assert code == 0
    lines = out.strip().splitlines()
    assert len(lines) == 1 + len(LOSSES) + 1  # header, one row per group, the CSV note
    assert lines[0].split()[:5] == ["group", "runs", "seeds", "epoch", "status"]
    assert lines[0].endswith("(cells: mean ± sample std, ddof 1)")
    assert [line.split()[0] for line in lines[1:3]] == ["loss=cross_entropy", "loss=mse"]
    assert lines[3] == f"wrote {table}"
    with open(table) as handle:
        rows = list(csv.DictReader(handle))
    assert [row["group"] for row in rows] == ["loss=cross_entropy", "loss=mse"]
    for row, loss in zip(rows, LOSSES):
        finals = []
        for seed in SEEDS:
            with open(sweep / f"{loss}_s{seed}" / "metrics.pkl", "rb") as handle:
                finals.append(pickle.load(handle)["epochs"][-1]["test_acc"])
        assert row["runs"] == "2" and row["seeds"] == "0,1" and row["epoch"] == str(EPOCHS)
        assert float(row["test_acc_mean"]) == pytest.approx(np.mean(finals))
        assert float(row["test_acc_max"]) == pytest.approx(max(finals))
        assert float(row["test_acc_std"]) == pytest.approx(np.std(finals, ddof=1))  # seeds are a sample
        assert row["train.nc1_n"] == "2"


def test_summary_at_an_epoch(sweep, capsys):
    code, out, _ = run_utils(["summary", sweep / "mse_s0", "--epoch", 0, "--metric", "train_acc"], capsys)
    assert code == 0
    record = load_run(str(sweep / "mse_s0")).records[0]
    assert out.strip().splitlines()[1].split()[-1] == f"{record['train_acc']:.4g}"


# ---------------------------------------------------------------- the representations projection

def test_projection_maps_the_classifier_rows_to_an_equilateral_triangle():
    W3 = np.random.default_rng(0).normal(size=(3, 7)) * [[1.0], [3.0], [0.2]]
    corners = W3 @ triangle_projection(W3).T
    np.testing.assert_allclose(corners, triangle_vertices(), atol=1e-12)
    sides = [np.linalg.norm(corners[i] - corners[j]) for i, j in ((0, 1), (0, 2), (1, 2))]
    np.testing.assert_allclose(sides, [np.sqrt(3)] * 3)


def simplex_etf_rows(num_classes, dim, seed):
    """Rows of a simplex ETF: centred one-hot vectors, rotated into R^dim."""
    centred = np.eye(num_classes) - 1.0 / num_classes
    rotation = np.linalg.qr(np.random.default_rng(seed).normal(size=(dim, num_classes)))[0]
    return centred @ rotation.T


@pytest.mark.parametrize("num_classes", [3, 10])  # with 3 classes the rows sum to zero: rank 2
def test_projection_of_simplex_rows_is_an_orthogonal_projection_up_to_scale(num_classes):
    W3 = 2.5 * simplex_etf_rows(num_classes, 12, seed=1)[[0, 1, 2]]
    P = triangle_projection(W3)
    np.testing.assert_allclose(W3 @ P.T, triangle_vertices(), atol=1e-10)
    np.testing.assert_allclose(P @ P.T, np.eye(2) * (P @ P.T)[0, 0], atol=1e-10)


def test_rows_spanning_less_than_a_plane_are_refused():
    W3 = np.array([[1.0, 0.0, 0.0], [2.0, 0.0, 0.0], [-1.0, 0.0, 0.0]])
    with pytest.raises(RunError, match="less than a plane"):
        triangle_projection(W3)


def test_epochs_option_checks_against_saved_features():
    assert parse_epochs("0,last", [0, 3, 7], "run") == [0, 7]
    assert parse_epochs(None, list(range(10)), "run") == [0, 3, 6, 9]
    with pytest.raises(RunError, match="features exist for epochs 0, 3, 7"):
        parse_epochs("5", [0, 3, 7], "run")


# ---------------------------------------------------------------- safe loading and refusals

@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_restricted_unpickler_reads_numpy_arrays_and_scalars(protocol):
    document = {"arrays": [np.arange(4).astype(dtype) for dtype in ("float32", "float64", "int64", "bool", "uint8")],
                "scalars": [np.float64(1.5), np.int64(3)], "dtype": np.dtype("float32"),
                "plain": (1, 2.0, "x", b"y", None, True, {1, 2}, frozenset({3}), complex(1, 2))}
    loaded = RestrictedUnpickler(io.BytesIO(pickle.dumps(document, protocol=protocol))).load()
    for original, copy in zip(document["arrays"], loaded["arrays"]):
        assert copy.dtype == original.dtype and np.array_equal(copy, original)
    assert loaded["scalars"] == document["scalars"] and loaded["dtype"] == document["dtype"]
    assert loaded["plain"] == document["plain"]


def test_codecs_encode_is_limited_to_latin1():
    document = b"c_codecs\nencode\n(X\x03\x00\x00\x00abcX\x0a\x00\x00\x00zlib_codectR."
    with pytest.raises(pickle.UnpicklingError, match="zlib_codec"):
        RestrictedUnpickler(io.BytesIO(document)).load()


OS_SYSTEM_PICKLE = b"cos\nsystem\n(S'touch PWNED'\ntR."  # protocol 0, names os.system explicitly


def test_a_pickle_naming_os_system_is_refused_and_not_run(run_copy, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    (run_copy / "metrics.pkl").write_bytes(OS_SYSTEM_PICKLE)
    code, _, err = run_utils(["curves", run_copy], capsys)
    assert_one_line_refusal(code, err, "metrics.pkl: refused to load global os.system")
    assert not (tmp_path / "PWNED").exists()


def test_a_reduce_payload_is_refused(run_copy, capsys):
    class Payload:
        def __reduce__(self):
            return (os.system, ("true",))
    (run_copy / "metrics.pkl").write_bytes(pickle.dumps({"schema_version": 1, "x": Payload()}))
    code, _, err = run_utils(["summary", run_copy], capsys)
    assert_one_line_refusal(code, err, f"refused to load global {os.system.__module__}.system")


def test_a_features_pickle_carrying_code_is_refused(run_copy, capsys, tmp_path):
    (run_copy / "features" / f"epoch_{EPOCHS:04d}.pkl").write_bytes(OS_SYSTEM_PICKLE)
    code, _, err = run_utils(["representations", run_copy, "--epochs", "last", "--out", tmp_path / "r.png"], capsys)
    assert_one_line_refusal(code, err, "refused to load global os.system")


def test_a_truncated_pickle_is_refused(run_copy, capsys):
    path = run_copy / "metrics.pkl"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    code, _, err = run_utils(["nc", run_copy], capsys)
    assert_one_line_refusal(code, err, "metrics.pkl: truncated or damaged pickle")


def test_a_missing_metrics_file_is_refused(run_copy, capsys):
    (run_copy / "metrics.pkl").unlink()
    code, _, err = run_utils(["curves", run_copy], capsys)
    assert_one_line_refusal(code, err, "missing metrics.pkl")


def test_an_unknown_schema_version_is_refused(run_copy, capsys):
    path = run_copy / "metrics.pkl"
    document = load_run(str(run_copy))
    path.write_bytes(pickle.dumps({"schema_version": 99, "config": {}, "epochs": document.records}))
    code, _, err = run_utils(["compare", run_copy], capsys)
    assert_one_line_refusal(code, err, "unknown schema_version 99")


def test_a_missing_run_folder_is_refused(tmp_path, capsys):
    code, _, err = run_utils(["summary", tmp_path / "no_such_run"], capsys)
    assert_one_line_refusal(code, err, "does not exist")


def test_a_glob_that_matches_nothing_is_refused(tmp_path, capsys):
    code, _, err = run_utils(["curves", tmp_path / "nothing_*"], capsys)
    assert_one_line_refusal(code, err, "no run folder matches")


@pytest.mark.parametrize("argv, fragment", [
    (["compare", "{sweep}", "--metric", "nc9"], "unknown metric 'nc9'"),
    (["compare", "{sweep}", "--by", "colour"], "--by colour: no run has this config key"),
    (["calibration", "{sweep}/mse_s0", "--epoch", "40"], "no calibration at epoch 40"),
    (["representations", "{sweep}/mse_s0", "--epochs", "1"], "no features at epoch 1"),
    (["curves", "{sweep}/mse_s0", "--out", "{tmp}/curves.jpg"], "unknown image format 'jpg'"),
    (["curves", "{sweep}/mse_s0", "--out", "{tmp}/missing/curves.png"], "does not exist"),
])
def test_bad_requests_get_one_line(sweep, tmp_path, capsys, argv, fragment):
    argv = [a.format(sweep=sweep, tmp=tmp_path) for a in argv]
    code, _, err = run_utils(argv, capsys)
    assert code == utils.EXIT_ERROR
    assert_one_line_refusal(code, err, fragment)


def test_a_bad_flag_is_a_usage_error(capsys):
    code, _, err = run_utils(["nc", "runs", "--split", "validation"], capsys)
    assert code == utils.EXIT_USAGE
    assert_one_line_refusal(code, err, "--split")
