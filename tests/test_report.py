"""utils.py report: descriptors on planted records, the statistics against scipy and hand-worked
numbers, and the report on tiny real runs (it renders, counts seeds per cell, refuses a mixed
protocol, lists a failed run and leaves it out of every statistic)."""
import csv
import math
import pickle
import shutil

import numpy as np
import pytest
from scipy import stats

import study
import utils
from plotting.loading import Run
from plotting.report import build_study, design
from plotting.report_render import render_markdown
from helpers import TINY, train_runs

# ---------------------------------------------------------------- descriptors on planted records

SLOPE, SCALE, ONSET, LAST = -1.5, 3.0, 7, 40


def planted_records(onset=ONSET, every=1):
    """NC1 = SCALE * epoch^SLOPE, train accuracy 1 from `onset` on, NC measured every `every` epochs."""
    records = []
    for epoch in range(0, LAST + 1):
        record = {"epoch": epoch, "train_acc": 1.0 if onset is not None and epoch >= onset else 0.9,
                  "test_acc": 0.8, "test_ece": 0.05}
        if epoch % every == 0 or epoch == LAST:
            nc1 = SCALE * max(epoch, 1) ** SLOPE
            record["nc"] = {"train": {"nc1": nc1, "nc1_cdnv": 2 * nc1, "nc2_etf_h": 0.3, "nc3": 0.2, "nc4": 0.0},
                            "test": {"nc1": 4 * nc1}}
        records.append(record)
    return records


def test_a_planted_power_law_gives_its_slope_and_the_tpt_onset():
    out = study.descriptors(planted_records())
    assert out["collapse_rate"] == pytest.approx(SLOPE, abs=1e-12)
    assert out["tpt_epoch"] == ONSET
    assert out["nc1_at_tpt"] == pytest.approx(SCALE * ONSET ** SLOPE)
    assert (out["collapse_from"], out["collapse_to"], out["collapse_points"]) == (ONSET, LAST, LAST - ONSET + 1)
    assert out["nc1_train"] == pytest.approx(SCALE * LAST ** SLOPE)
    assert out["nc1_test"] == pytest.approx(4 * SCALE * LAST ** SLOPE)
    assert (out["train_acc"], out["test_acc"], out["test_ece"], out["nc4"]) == (1.0, 0.8, 0.05, 0.0)


def test_sparse_nc_records_are_skipped_and_the_onset_is_read_where_nc_was_measured():
    out = study.descriptors(planted_records(every=5))  # epochs 0, 5, 10, ..., 40 carry "nc"
    assert out["tpt_epoch"] == ONSET
    assert out["nc1_at_tpt"] == pytest.approx(SCALE * 10 ** SLOPE)  # first measured epoch >= 7
    assert out["collapse_points"] == 7 and out["collapse_from"] == 10  # 10, 15, ..., 40
    assert out["collapse_rate"] == pytest.approx(SLOPE, abs=1e-12)


def test_without_tpt_the_rate_runs_from_the_middle_epoch():
    out = study.descriptors(planted_records(onset=None))
    assert math.isnan(out["tpt_epoch"]) and math.isnan(out["nc1_at_tpt"])
    assert out["collapse_from"] == LAST // 2 and out["collapse_points"] == LAST - LAST // 2 + 1
    assert out["collapse_rate"] == pytest.approx(SLOPE, abs=1e-12)


def test_accuracy_one_at_epoch_zero_is_not_the_terminal_phase():
    records = planted_records()
    records[0]["train_acc"] = 1.0
    assert study.tpt_onset(records) == ONSET


def test_ufm_and_layer_numbers_come_from_the_last_record_that_has_them():
    records = planted_records()
    records[10]["mixup_geometry"] = {"diff_class_nonlinearity": 0.9, "ufm": {"residual": 0.7}}
    records[30]["mixup_geometry"] = {"diff_class_nonlinearity": 0.4, "diff_class_chord_nonlinearity": 0.3,
                                     "ufm": {"residual": 0.2, "shape_residual": 0.1}}
    records[30]["nc_layers"] = {"hidden1": {"nc1": 5.0}, "features": {"nc1": 0.5}}
    out = study.descriptors(records)
    assert (out["ufm_residual"], out["mixup_nonlinearity"]) == (0.2, 0.4)
    assert (out["ufm_shape_residual"], out["mixup_chord_nonlinearity"]) == (0.1, 0.3)
    assert (out["layer.hidden1.nc1"], out["layer.features.nc1"]) == (5.0, 0.5)
    assert study.is_log_scale("layer.hidden1.nc1") and not study.is_log_scale("collapse_rate")


# ---------------------------------------------------------------- statistics

def test_seed_stats_match_a_hand_worked_t_interval():
    summary = study.seed_stats([1.0, 2.0, 3.0, 4.0])
    half = 3.182446305284263 * math.sqrt(5 / 3) / 2  # t(0.975, 3) * s / sqrt(n), s^2 = 5/3
    assert (summary.n, summary.mean, summary.sd) == (4, 2.5, pytest.approx(math.sqrt(5 / 3)))
    assert (summary.low, summary.high) == (pytest.approx(2.5 - half), pytest.approx(2.5 + half))


def test_log_scale_stats_are_a_geometric_mean_with_its_interval():
    summary = study.seed_stats([1.0, 10.0, 100.0, math.nan], log=True)
    half = stats.t.ppf(0.975, 2) * 1.0 / math.sqrt(3)  # log10 values 0, 1, 2: sd 1
    assert summary.n == 3 and summary.centre == pytest.approx(10.0)
    assert summary.low == pytest.approx(10 ** (1 - half)) and summary.high == pytest.approx(10 ** (1 + half))
    assert study.seed_stats([5.0]).n == 1 and math.isnan(study.seed_stats([5.0]).low)


def test_welch_difference_interval_and_p_by_hand_and_against_scipy():
    x, y = [4.0, 6.0, 8.0], [1.0, 2.0, 3.0]
    row = study.compare_pair(x, y, "test_acc", "", ("b", "a"))
    se, df = math.sqrt(4 / 3 + 1 / 3), 50 / 17  # Welch-Satterthwaite: (5/3)^2 / ((4/3)^2/2 + (1/3)^2/2)
    t = 4 / se
    assert row.estimate == 4.0
    assert row.p == pytest.approx(2 * stats.t.sf(t, df))
    assert row.p == pytest.approx(stats.ttest_ind(x, y, equal_var=False).pvalue)
    half = stats.t.ppf(0.975, df) * se
    assert (row.low, row.high) == (pytest.approx(4 - half), pytest.approx(4 + half))
    assert row.prob_improvement == 1.0


def test_a_log_scale_pair_is_a_ratio_of_geometric_means():
    row = study.compare_pair([10.0, 100.0], [1.0, 10.0], "nc1_train", "", ("x", "y"))
    assert row.back(row.estimate) == pytest.approx(10.0)
    assert row.p == pytest.approx(stats.ttest_ind([1, 2], [0, 1], equal_var=False).pvalue)
    assert study.compare_pair([1.0], [1.0, 2.0], "nc1_train", "", ("x", "y")).note == "n < 2"


def test_holm_by_hand_leaves_untested_entries_out():
    # sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1: 0.02, 0.03, 0.06, 0.04 -> monotone 0.02, 0.03, 0.06, 0.06
    adjusted = study.holm([0.01, 0.04, math.nan, 0.03, 0.005])
    assert adjusted[:2] + adjusted[3:] == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert math.isnan(adjusted[2])
    assert study.holm([0.5, 0.9]) == [1.0, 1.0]


def test_probability_of_improvement_by_hand():
    # pairs (x, y): 1>0, 1<3, 3>0, 3=3 (half), 5>0, 5>3: 4.5 of 6
    assert study.probability_of_improvement([1, 3, 5], [0, 3]) == pytest.approx(0.75)


def test_whether_mixup_effects_differ_is_an_exact_permutation_test_for_three_levels():
    samples = {"a": [0.0, 0.1, 0.05], "b": [1.0, 1.1, 1.05], "c": [2.0, 2.1, 2.05]}
    row = study.effects_differ(samples, "nc1_train", "")
    # 9!/(3!)^3 = 1680 ways to deal nine values into three threes; the observed split and its 3! relabellings
    # are the most extreme
    assert row.p == pytest.approx(6 / 1680) and row.note == "permutation test"
    two = study.effects_differ({"a": [0.0, 0.1, 0.05], "b": [1.0, 1.3, 1.05]}, "nc1_train", "")
    assert two.p == pytest.approx(stats.ttest_ind([0.0, 0.1, 0.05], [1.0, 1.3, 1.05], equal_var=False).pvalue)
    effect = study.mixup_effect([0.1, 0.3, 0.2], "nc1_train", "", "loss=mse")
    assert effect.back(effect.estimate) == pytest.approx(10 ** 0.2)
    assert effect.p == pytest.approx(stats.ttest_1samp([0.1, 0.3, 0.2], 0).pvalue)


# ---------------------------------------------------------------- the report on tiny real runs

FLAGS = [*TINY, "--epochs", "3", "--samples-per-class", "20", "--batch-size", "64", "--feature-epochs", "3",
         "--feature-samples-per-class", "5", "--feature-pairs", "2", "--feature-lambdas", "3"]
LOSSES, ALPHAS, SEEDS = ("cross_entropy", "mse"), ("0", "1"), (0, 1)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    runs = {f"{loss}_a{alpha}_s{seed}": ["--loss", loss, "--mixup-alpha", alpha, "--seed", str(seed)]
            for loss in LOSSES for alpha in ALPHAS for seed in SEEDS}
    train_runs(root, runs, FLAGS)
    return root


def edit_metrics(folder, change):
    path = folder / "metrics.pkl"
    with open(path, "rb") as handle:
        document = pickle.load(handle)
    change(document)
    with open(path, "wb") as handle:
        pickle.dump(document, handle)


def report(argv, capsys):
    code = utils.main(["report", *[str(a) for a in argv]])
    out, err = capsys.readouterr()
    return code, out, err


def read_csv(path):
    with open(path) as handle:
        return list(csv.DictReader(handle))


def test_the_report_renders_with_its_counts_and_lists_what_it_left_out(sweep, tmp_path, capsys):
    broken = tmp_path / "runs"
    shutil.copytree(sweep, broken)
    (broken / "crashed").mkdir()
    (broken / "crashed" / "config.json").write_text("{}")  # failed before its first epoch
    shutil.copytree(broken / "mse_a0_s1", broken / "mse_a0_s2")
    edit_metrics(broken / "mse_a0_s2", lambda d: d.update(status="interrupted", epochs=d["epochs"][:2]))
    code, out, err = report([broken, "--factor", "loss", "--out", tmp_path / "rep", "--dpi", 40], capsys)
    assert code == 0, err
    text = (tmp_path / "rep" / "report.md").read_text()
    assert "| descriptor | loss=cross_entropy | loss=mse |" in text
    assert text.count("| n (seeds) | 2 | 2 |") == 2  # one table per mixup_alpha stratum
    assert text.count("| tpt_epoch | never (2 runs) | never (2 runs) |") == 2  # 3 tiny epochs: no TPT
    left_out = text.split("## Left out")[1]
    assert "crashed`: " in left_out and "mse_a0_s2`: status interrupted at epoch 1" in left_out
    for name in ("nc_all_runs.png", "nc1_loglog_all_runs.png", "representations_all_runs.png"):
        assert f"](figures/{name})" in text and (tmp_path / "rep" / "figures" / name).stat().st_size > 5000
    rows = read_csv(tmp_path / "rep" / "descriptors.csv")
    assert len(rows) == 8 and not any("s2" in row["folder"] for row in rows)
    # the cell's mean is the mean of its runs' descriptors (the interrupted seed 2 is not in it)
    def mean_acc(loss):
        return np.mean([float(r["test_acc"]) for r in rows if r["loss"] == loss and r["mixup_alpha"] == "0"])
    assert f"| test_acc | {mean_acc('cross_entropy'):.3g} [" in text and f"| {mean_acc('mse'):.3g} [" in text


def test_the_comparisons_are_one_family_with_holm(sweep):
    result = build_study([str(sweep)], "loss", ["test_acc", "nc1_train"])
    kinds = [row.kind for row in result.comparisons]
    # 2 strata x 1 pair x 2 metrics; per loss the nc1 mixup ratio (2) and whether it differs (1)
    assert kinds.count("pair") == 4 and kinds.count("mixup effect") == 2 and kinds.count("mixup effect differs") == 1
    p = [row.p for row in result.comparisons]
    assert [row.p_holm for row in result.comparisons] == pytest.approx(study.holm(p), nan_ok=True)
    cells = {(dict(stratum)["mixup_alpha"], level): cell for (stratum, level), cell in result.cells.items()}
    pair = next(r for r in result.comparisons if r.kind == "pair" and r.metric == "test_acc"
                and r.stratum == "mixup_alpha=0")
    assert pair.levels == "mse vs cross_entropy"
    mse, ce = cells[(0.0, "mse")].values("test_acc"), cells[(0.0, "cross_entropy")].values("test_acc")
    assert pair.p == pytest.approx(stats.ttest_ind(mse, ce, equal_var=False).pvalue)
    effect = next(r for r in result.comparisons if r.kind == "mixup effect" and r.levels == "loss=mse")
    ratios = np.log10(cells[(1.0, "mse")].values("nc1_train")) - np.log10(cells[(0.0, "mse")].values("nc1_train"))
    assert effect.estimate == pytest.approx(ratios.mean())  # seeds 0 and 1 in the same order in both cells


def test_a_cell_with_one_seed_gets_no_test(sweep):
    folders = [str(p) for p in sweep.iterdir() if p.name != "mse_a0_s1"]
    result = build_study(folders, "loss", ["test_acc"])
    text = render_markdown(result, [])
    assert "| n (seeds) | 2 | 1 |" in text and "(n < 2)" in text
    pair = next(r for r in result.comparisons if r.stratum == "mixup_alpha=0")
    assert pair.note == "n < 2" and math.isnan(pair.p) and math.isnan(pair.p_holm)


def assert_refused(code, err, *fragments):
    lines = err.strip().splitlines()
    assert code == utils.EXIT_ERROR and len(lines) == 1 and lines[0].startswith("utils.py: error: ")
    for fragment in fragments:
        assert fragment in lines[0]


def test_runs_of_another_protocol_are_refused(sweep, tmp_path, capsys):
    mixed = tmp_path / "runs"
    shutil.copytree(sweep, mixed)
    edit_metrics(mixed / "mse_a1_s1", lambda d: d["config"].update(epochs=5))
    code, _, err = report([mixed, "--factor", "loss", "--out", tmp_path / "rep"], capsys)
    assert_refused(code, err, "runs differ in epochs (3, 5)", "--strata epochs")
    assert not (tmp_path / "rep").exists()


def test_a_seed_repeated_in_a_cell_is_refused(sweep, tmp_path, capsys):
    copied = tmp_path / "runs"
    shutil.copytree(sweep, copied)
    shutil.copytree(copied / "mse_a1_s1", copied / "mse_a1_s1_copy")
    code, _, err = report([copied, "--factor", "loss", "--out", tmp_path / "rep"], capsys)
    assert_refused(code, err, "runs repeat a setting and its seed", "loss=mse seed 1 in")
    assert not (tmp_path / "rep").exists()


@pytest.mark.parametrize("argv, fragment", [
    (["--factor", "loss", "--metrics", "nc9"], "--metrics: unknown descriptor 'nc9'"),
    (["--factor", "optimizer"], "--factor optimizer does not vary: every complete run has optimizer=sgd"),
    (["--factor", "no_such_key"], "--factor no_such_key: no run has this config key"),
])
def test_bad_requests_get_one_line(sweep, tmp_path, capsys, argv, fragment):
    code, _, err = report([sweep, *argv, "--out", tmp_path / "rep"], capsys)
    assert_refused(code, err, fragment)


def test_an_empty_folder_is_refused(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code, _, err = report([tmp_path / "empty", "--factor", "loss", "--out", tmp_path / "rep"], capsys)
    assert_refused(code, err, "no metrics.pkl here or in any folder below it")


def test_a_key_with_one_value_per_level_goes_with_the_factor_instead_of_stratifying():
    def run(model, width, loss):
        return Run(f"{model}_{loss}", {"model": model, "width": width, "loss": loss, "seed": 0}, [], "complete")
    runs = [run(model, width, loss) for model, width in (("mlp", 1.0), ("resnet18", 0.125))
            for loss in ("mse", "focal")]
    assert design(runs, "model", ()) == (["loss"], ["width"])
    assert design(runs, "loss", ()) == (["model", "width"], [])
