"""Per-run descriptors of the collapse dynamics, seed statistics and comparisons (utils.py report's core).

Pure: functions of epoch records and numbers, no argparse, no files, no printing.

A run's descriptors (its records are those of metrics.pkl; records without an "nc"
entry were not measured and are skipped where NC is read):

- final accuracies and test ECE: the last record's train_acc, test_acc, test_ece;
- final NC (last NC-measured record): nc1_train, nc1_test (Tr(Sigma_W Sigma_B^+)/C), nc1_cdnv,
  nc2_etf_h (ETF error of the class means), nc3, nc4, all of the train split unless named test;
- tpt_epoch: the first epoch >= 1 with clean train accuracy 1 (NaN if never); nc1_at_tpt: train
  NC1 at the first NC-measured epoch at or after it;
- collapse_rate: the least-squares slope b of log10 NC1 = a + b log10 epoch over the NC-measured
  epochs from tpt_epoch to the last (from the middle epoch, ceil(last / 2), when there is no TPT),
  with collapse_from, collapse_to and collapse_points (the epochs it used);
- where the run has them, at the last feature epoch: ufm_residual (the UFM fit's whole residual),
  ufm_shape_residual (its per-target means' part, the distance to the optimum: docs/ufm.md),
  mixup_nonlinearity (against the class means) and mixup_chord_nonlinearity (against each pair's
  chord); and layer.STAGE.nc1 at the last record that measured stages (--nc-layers).

Seed statistics use the sample standard deviation (ddof 1) and a 95 % t-interval;
positive scale-free descriptors (LOG_DESCRIPTORS) are summarised on the log10 scale and
reported as a geometric mean with its interval. Comparisons: Welch's t-test and its
interval (a ratio on the log scale), Holm's correction over a family of tests, the
probability of improvement P(X > Y) of Agarwal et al. 2021 (rliable), and a test of whether
per-seed mixup effects differ between levels (Welch for two, a permutation test for more).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import numpy as np
from scipy import stats

CONFIDENCE = 0.95
PERMUTATIONS = 9999
PERMUTATION_SEED = 0  # a report is a function of its runs: the same p-values on every rerun
TPT_ACCURACY = 1.0

# Positive, scale-free quantities: averaged as log10 values (geometric means, ratios between levels).
UFM_DESCRIPTORS = ("ufm_residual", "ufm_shape_residual", "mixup_nonlinearity", "mixup_chord_nonlinearity")
LOG_DESCRIPTORS = ("nc1_train", "nc1_test", "nc1_cdnv", "nc2_etf_h", "nc3", "nc1_at_tpt", *UFM_DESCRIPTORS)
LINEAR_DESCRIPTORS = ("train_acc", "test_acc", "test_ece", "nc4", "tpt_epoch", "collapse_rate")
# The NC keys of the last record, by descriptor name: (split, key in collapse_metrics.nc_metrics).
FINAL_NC = {"nc1_train": ("train", "nc1"), "nc1_test": ("test", "nc1"), "nc1_cdnv": ("train", "nc1_cdnv"),
            "nc2_etf_h": ("train", "nc2_etf_h"), "nc3": ("train", "nc3"), "nc4": ("train", "nc4")}
# Every descriptor a run can have, in the order of the tables (layer.STAGE.nc1 ones follow).
DESCRIPTOR_ORDER = ("train_acc", "test_acc", "test_ece", *FINAL_NC, "tpt_epoch", "nc1_at_tpt", "collapse_rate",
                    *UFM_DESCRIPTORS)
# Epochs the collapse rate used: reported with each run, never averaged.
BOOKKEEPING_DESCRIPTORS = ("collapse_from", "collapse_to", "collapse_points")
LAYER_PREFIX = "layer."


def is_log_scale(name: str) -> bool:
    return name in LOG_DESCRIPTORS or name.startswith(LAYER_PREFIX)


# ---------------------------------------------------------------- per-run descriptors

def _number(value) -> float:
    return math.nan if value is None else float(value)


def nc_value(record: dict, split: str, key: str) -> float:
    return _number(((record.get("nc") or {}).get(split) or {}).get(key))


def nc_records(records: Sequence[dict]) -> List[dict]:
    """The records that measured NC (a run may measure it only every few epochs)."""
    return [record for record in records if isinstance(record.get("nc"), dict)]


def tpt_onset(records: Sequence[dict]) -> Optional[int]:
    """The first epoch (>= 1) whose clean training accuracy is 100 %; None if the run never gets there."""
    for record in records:
        if record.get("epoch", 0) >= 1 and _number(record.get("train_acc")) >= TPT_ACCURACY:
            return int(record["epoch"])
    return None


def power_law_slope(epochs: Sequence[float], values: Sequence[float]) -> float:
    """Least-squares slope of log10 value against log10 epoch; NaN with fewer than two usable points."""
    x, y = np.asarray(epochs, dtype=float), np.asarray(values, dtype=float)
    keep = (x > 0) & np.isfinite(y) & (y > 0)
    if keep.sum() < 2 or np.unique(x[keep]).size < 2:
        return math.nan
    return float(stats.linregress(np.log10(x[keep]), np.log10(y[keep])).slope)


def collapse_rate(records: Sequence[dict], onset: Optional[int]) -> Dict[str, float]:
    """The slope of log10 train NC1 against log10 epoch from the TPT onset (or the middle epoch) to the end."""
    measured = [r for r in nc_records(records) if r["epoch"] >= 1]
    if not measured:
        return {"collapse_rate": math.nan, "collapse_from": math.nan, "collapse_to": math.nan,
                "collapse_points": 0}
    last = measured[-1]["epoch"]
    start = onset if onset is not None else math.ceil(last / 2)
    used = [r for r in measured if r["epoch"] >= start and nc_value(r, "train", "nc1") > 0]
    epochs = [r["epoch"] for r in used]
    return {"collapse_rate": power_law_slope(epochs, [nc_value(r, "train", "nc1") for r in used]),
            "collapse_from": float(epochs[0]) if epochs else math.nan,
            "collapse_to": float(epochs[-1]) if epochs else math.nan, "collapse_points": len(epochs)}


def ufm_numbers(record: dict) -> Dict[str, float]:
    """The UFM fit's residuals and the mixup non-linearities of one record's mixup geometry.

    The one place that knows where train.py logs them (record["mixup_geometry"], see
    feature_capture.FeatureCapture.capture); a change of those keys is adjusted here.
    """
    geometry = record.get("mixup_geometry") or {}
    fit = geometry.get("ufm") or {}
    return {"ufm_residual": _number(fit.get("residual")), "ufm_shape_residual": _number(fit.get("shape_residual")),
            "mixup_nonlinearity": _number(geometry.get("diff_class_nonlinearity")),
            "mixup_chord_nonlinearity": _number(geometry.get("diff_class_chord_nonlinearity"))}


def _last_with(records: Sequence[dict], key: str) -> Optional[dict]:
    found = [record for record in records if isinstance(record.get(key), dict)]
    return found[-1] if found else None


def layer_nc1(records: Sequence[dict]) -> Dict[str, float]:
    """layer.STAGE.nc1 at the last record that measured the model's stages (--nc-layers)."""
    record = _last_with(records, "nc_layers")
    if record is None:
        return {}
    return {f"{LAYER_PREFIX}{stage}.nc1": _number((values or {}).get("nc1"))
            for stage, values in record["nc_layers"].items()}


def descriptors(records: Sequence[dict]) -> Dict[str, float]:
    """Every descriptor of one run (see the module docstring); NaN where the run has no such number."""
    if not records:
        raise ValueError("a run without epoch records has no descriptors")
    last = records[-1]
    out = {key: _number(last.get(key)) for key in ("train_acc", "test_acc", "test_ece")}
    measured = nc_records(records)
    for name, (split, key) in FINAL_NC.items():
        out[name] = nc_value(measured[-1], split, key) if measured else math.nan
    onset = tpt_onset(records)
    out["tpt_epoch"] = math.nan if onset is None else float(onset)
    after = [r for r in measured if onset is not None and r["epoch"] >= onset]
    out["nc1_at_tpt"] = nc_value(after[0], "train", "nc1") if after else math.nan
    out.update(collapse_rate(records, onset))
    featured = _last_with(records, "mixup_geometry")
    out.update(ufm_numbers(featured) if featured else dict.fromkeys(UFM_DESCRIPTORS, math.nan))
    out.update(layer_nc1(records))
    return out


# ---------------------------------------------------------------- seed statistics

@dataclass
class SeedStats:
    """n, mean, sample sd (ddof 1) and 95 % t-interval; on the log scale, of log10 values,
    with `centre`, `low`, `high` back in the descriptor's units (the geometric mean and its interval)."""
    n: int
    mean: float
    sd: float
    low_t: float
    high_t: float
    log: bool

    def _back(self, value: float) -> float:
        return 10.0 ** value if self.log else value

    @property
    def centre(self) -> float:
        return self._back(self.mean)

    @property
    def low(self) -> float:
        return self._back(self.low_t)

    @property
    def high(self) -> float:
        return self._back(self.high_t)


def usable(values: Sequence[float], log: bool) -> np.ndarray:
    """Finite values (positive ones, as log10, on the log scale)."""
    array = np.asarray(values, dtype=float)
    array = array[np.isfinite(array)]
    return np.log10(array[array > 0]) if log else array


def t_interval(values: np.ndarray) -> tuple:
    """The 95 % t-interval of the mean; NaN below two values, the mean itself when they are all equal."""
    if values.size < 2:
        return math.nan, math.nan
    if np.ptp(values) == 0:
        return float(values[0]), float(values[0])
    interval = stats.ttest_1samp(values, 0.0).confidence_interval(CONFIDENCE)
    return float(interval.low), float(interval.high)


def seed_stats(values: Sequence[float], log: bool = False) -> SeedStats:
    data = usable(values, log)
    mean = float(data.mean()) if data.size else math.nan
    sd = float(data.std(ddof=1)) if data.size > 1 else math.nan
    low, high = t_interval(data)
    return SeedStats(int(data.size), mean, sd, low, high, log)


# ---------------------------------------------------------------- comparisons

@dataclass
class Comparison:
    """One test: an estimate (a difference, or a ratio on the log scale) with its 95 % CI and p-value."""
    kind: str  # "pair", "mixup effect", "mixup effect differs"
    metric: str
    stratum: str
    levels: str  # what is compared, e.g. "mse vs cross_entropy"
    n: str  # the seeds behind each side, e.g. "3, 3"
    log: bool
    estimate: float = math.nan
    low: float = math.nan
    high: float = math.nan
    p: float = math.nan
    p_holm: float = math.nan
    prob_improvement: float = math.nan  # P(X > Y) over seeds (pairs only)
    note: str = ""  # why there is no test ("n < 2"), or the test used

    def back(self, value: float) -> float:
        return 10.0 ** value if self.log else value

    @property
    def tested(self) -> bool:
        return math.isfinite(self.p)


def probability_of_improvement(x: Sequence[float], y: Sequence[float]) -> float:
    """P(X > Y) + P(X = Y)/2 for a random seed of each: the Mann-Whitney U of x over n_x n_y (rliable)."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    return float(stats.mannwhitneyu(x, y).statistic / (x.size * y.size))


def welch(x: np.ndarray, y: np.ndarray) -> tuple:
    """(mean x - mean y, CI low, CI high, p) of Welch's t-test; an exact answer when neither side varies."""
    difference = float(x.mean() - y.mean())
    if np.ptp(x) == 0 and np.ptp(y) == 0:
        # no spread at all: the difference is known exactly, and is either nothing or certain
        return difference, difference, difference, (1.0 if difference == 0 else 0.0)
    result = stats.ttest_ind(x, y, equal_var=False)
    interval = result.confidence_interval(CONFIDENCE)
    return difference, float(interval.low), float(interval.high), float(result.pvalue)


def compare_pair(x_values, y_values, metric: str, stratum: str, names: tuple) -> Comparison:
    """Level X against level Y: Welch's difference (ratio X/Y on the log scale), CI, p and P(X > Y)."""
    log = is_log_scale(metric)
    x, y = usable(x_values, log), usable(y_values, log)
    row = Comparison("pair", metric, stratum, f"{names[0]} vs {names[1]}", f"{x.size}, {y.size}", log)
    if x.size < 2 or y.size < 2:
        row.note = "n < 2"
        return row
    row.estimate, row.low, row.high, row.p = welch(x, y)
    row.prob_improvement = probability_of_improvement(x, y)
    row.note = "Welch t"
    return row


def mixup_effect(log_ratios: Sequence[float], metric: str, stratum: str, level: str) -> Comparison:
    """The mean per-seed log10 ratio with/without mixup at one level, its t-interval and one-sample p."""
    data = np.asarray([v for v in log_ratios if math.isfinite(v)], dtype=float)
    row = Comparison("mixup effect", metric, stratum, level, str(data.size), True)
    if data.size < 2:
        row.note = "n < 2"
        return row
    row.estimate = float(data.mean())
    row.low, row.high = t_interval(data)
    row.p = 1.0 if np.ptp(data) == 0 and data[0] == 0 else (
        0.0 if np.ptp(data) == 0 else float(stats.ttest_1samp(data, 0.0).pvalue))
    row.note = "paired seeds, t"
    return row


def _between_levels(*samples, axis=-1):
    """Sum over levels of n_l (mean_l - grand mean)^2: with the data fixed, F is increasing in it."""
    data = np.concatenate(samples, axis=axis)
    grand = data.mean(axis=axis, keepdims=True)
    return sum(s.shape[axis] * (s.mean(axis=axis, keepdims=True) - grand) ** 2 for s in samples).squeeze(axis)


def effects_differ(samples: Dict[str, Sequence[float]], metric: str, stratum: str) -> Comparison:
    """Whether the per-seed log ratios differ between levels (those with >= 2 seeds).

    Two levels: Welch's t-test (Welch's ANOVA for two groups). An exact permutation test there is
    floored: 3 + 3 seeds have 20 arrangements, so its p never falls below 0.1. Three or more levels:
    a permutation test of the between-level sum of squares (scipy has no Welch ANOVA), whose floor
    is already low (0.0036 for 3 x 3 seeds)."""
    kept = {level: np.asarray(v, dtype=float) for level, v in samples.items()}
    kept = {level: v[np.isfinite(v)] for level, v in kept.items()}
    kept = {level: v for level, v in kept.items() if v.size >= 2}
    row = Comparison("mixup effect differs", metric, stratum, " / ".join(kept) or "-",
                     ", ".join(str(v.size) for v in kept.values()) or "0", True)
    if len(kept) < 2:
        row.note = "n < 2"
        return row
    if len(kept) == 2:
        row.p = welch(*kept.values())[3]
        row.note = "Welch t"
        return row
    result = stats.permutation_test(list(kept.values()), _between_levels, permutation_type="independent",
                                    vectorized=True, n_resamples=PERMUTATIONS, alternative="greater",
                                    random_state=PERMUTATION_SEED)
    row.p = float(result.pvalue)
    row.note = "permutation test"
    return row


def holm(p_values: Sequence[float]) -> List[float]:
    """Holm's step-down adjustment: the i-th smallest of m p-values times (m - i + 1), made monotone
    and capped at 1; NaN entries (no test) stay NaN and do not count towards m."""
    p = np.asarray(p_values, dtype=float)
    adjusted = np.full(p.shape, np.nan)
    tested = np.flatnonzero(np.isfinite(p))
    order = tested[np.argsort(p[tested], kind="stable")]
    m = order.size
    running = 0.0
    for rank, index in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[index]))
        adjusted[index] = running
    return adjusted.tolist()


def apply_holm(rows: Sequence[Comparison]) -> None:
    for row, adjusted in zip(rows, holm([row.p for row in rows])):
        row.p_holm = adjusted
