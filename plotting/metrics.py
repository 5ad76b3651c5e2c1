"""Named metrics of the epoch records, their axis labels and scales, and seed aggregation.

A metric name is what a user types after --metric: a record field
(`test_acc`), a derived one (`train_err`), an NC metric of a split
(`train.nc1`, or bare `nc1` for the split chosen by --split), a mixup
geometry number (`same_class_alignment`), a number of the UFM fit to the
mixup points (`ufm_residual`), the same two of the CutMix points
(`cutmix.diff_class_nonlinearity`, `cutmix.ufm_residual`), or a per-layer number of a run measured with
--nc-layers (`layer.hidden1.nc1`, `layer.hidden1.ncc_err`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .loading import Run, RunError

SPLITS = ("train", "test")
PERCENT = 100.0
# An exact zero (no errors, no NCC mismatches) cannot sit on a log axis; it is
# drawn at half of one sample's share instead, the smallest non-zero value that
# could have been measured, halved, and the axes mark that level as "zero".
ZERO_FLOOR_SAMPLES = 0.5
BANDS = ("minmax", "std", "none")

# NC metric keys: (panel title, y-axis label, log scale). Names follow Papyan et al. 2020 and Zhu et al. 2021.
NC_METRICS = {
    "nc1": ("NC1: within-class variability", r"Tr$(\Sigma_W\Sigma_B^{+})/C$", True),
    "nc1_cdnv": ("NC1: class-distance normalised variance", "CDNV", True),
    "tr_sigma_w": ("within-class variance", r"Tr$(\Sigma_W)$", True),
    "tr_sigma_b": ("between-class variance", r"Tr$(\Sigma_B)$", True),
    "nc2_equinorm_h": ("NC2: equinorm of H", "std / mean of norms", False),
    "nc2_equinorm_w": ("NC2: equinorm of W", "std / mean of norms", False),
    "nc2_equiangle_h": ("NC2: equiangularity of H", "std of pairwise cosines", False),
    "nc2_equiangle_w": ("NC2: equiangularity of W", "std of pairwise cosines", False),
    "nc2_maxangle_h": ("NC2: maximal angle of H", r"mean $|\cos + 1/(C-1)|$", False),
    "nc2_maxangle_w": ("NC2: maximal angle of W", r"mean $|\cos + 1/(C-1)|$", False),
    "nc2_etf_h": ("NC2: distance of H to a simplex ETF", r"$\|G/\|G\|_F - \mathrm{ETF}\|_F$", False),
    "nc2_etf_w": ("NC2: distance of W to a simplex ETF", r"$\|G/\|G\|_F - \mathrm{ETF}\|_F$", False),
    "nc3": ("NC3: self-duality", r"$\|W/\|W\|_F - M/\|M\|_F\|_F^2$", False),
    "nc4": ("NC4: nearest class-centre mismatch", "fraction of samples", True),
    "nc4_train_means": ("NC4: mismatch with train class means", "fraction of samples", True),
}
GEOMETRY_METRICS = {
    "same_class_alignment": ("mixup: same-class alignment", r"mean cos$(h - \mu_G, w_y)$"),
    "diff_class_nonlinearity": ("mixup: different-class departure from linearity",
                                r"$\|h - (\lambda\mu_a + (1-\lambda)\mu_b)\| / \|\mu_a - \mu_b\|$"),
    # against each pair's own clean ends: bending alone, without the scatter around the class means
    "diff_class_chord_nonlinearity": ("mixup: different-class departure from each pair's chord",
                                      r"$\|h - (\lambda h_a + (1-\lambda) h_b)\| / \|h_a - h_b\|$"),
}

# The UFM fit of the triple's mixup points (mixup_geometry["ufm"], see ufm.fit), feature epochs only:
# name -> (key in the fit, title, y label, log scale). `ufm_etf_*`: the same fit against the simplex ETF
# nearest to W with no bias (mixup_geometry["ufm_etf"]), the benchmark of Fisher et al. 2024.
UFM_METRICS = {
    "ufm_residual": ("residual", "UFM fit: relative residual, all mixup points",
                     r"$\|PH - sH^*\|_F\,/\,\|PH\|_F$", False),
    "ufm_shape_residual": ("shape_residual", "UFM fit: residual of the per-target means (distance to the optimum)",
                           r"$\|M - sH^*\|\,/\,\|M\|$ (per-target means $M$)", False),
    "ufm_scatter_floor": ("scatter_floor", "UFM fit: floor set by the scatter within targets",
                          "relative residual", False),
    "ufm_residual_same_class": ("residual_same_class", "UFM fit: relative residual, same-class points",
                                "relative residual", False),
    "ufm_residual_diff_class": ("residual_diff_class", "UFM fit: relative residual, different-class points",
                                "relative residual", False),
    "ufm_outside_share": ("outside_share", "share of the mixup features outside the row space of W",
                          r"$\|(I-P)H\|^2 / \|H\|^2$", False),
    "ufm_gamma": ("gamma", "UFM fit: feature penalty gamma (identifiable fits only)", r"$\gamma$", True),
    "ufm_etf_residual": ("etf:residual", "UFM fit against the nearest simplex ETF: relative residual",
                         r"$\|PH - sH^*_{\mathrm{ETF}}\|_F\,/\,\|PH\|_F$", False),
    "ufm_etf_shape_residual": ("etf:shape_residual", "UFM fit against the nearest simplex ETF: residual of the "
                               "per-target means", "relative residual", False),
}
UFM_FITS = {"": "ufm", "etf:": "ufm_etf"}  # key prefix -> the fit's entry in mixup_geometry
CUTMIX_PREFIX = "cutmix."  # the geometry and UFM numbers of the CutMix points
# Per-layer numbers, `layer.<stage>.<key>`: the keys of nc_layers (collapse_metrics.LAYER_METRIC_KEYS),
# the nearest-class-mean accuracy or error there, and the mixup non-linearity at that stage.
LAYER_PREFIX = "layer."
LAYER_NC_KEYS = ("nc1", "nc1_cdnv", "tr_sigma_w", "tr_sigma_b", "nc2_equinorm_h", "nc2_equiangle_h",
                 "nc2_maxangle_h", "nc2_etf_h")
LAYER_OTHER_KEYS = ("ncc_accuracy", "ncc_err", "diff_class_nonlinearity", "diff_class_chord_nonlinearity")


@dataclass(frozen=True)
class Metric:
    name: str
    title: str  # what it is, for a panel title
    label: str  # the quantity and its unit, for the y axis
    log: bool
    read: Callable[[dict], Optional[float]]
    scale: float = 1.0
    # Where an exact zero is drawn on a log axis, from (record, config); None drops zeros.
    zero_floor: Optional[Callable[[dict, dict], Optional[float]]] = None
    stage: Optional[str] = None  # the model stage of a per-layer metric


def _field(key: str) -> Callable[[dict], Optional[float]]:
    return lambda record: record.get(key)


def _error(split: str) -> Callable[[dict], Optional[float]]:
    def read(record: dict) -> Optional[float]:
        accuracy = record.get(f"{split}_acc")
        return None if accuracy is None else 1.0 - accuracy
    return read


def _nc(split: str, key: str) -> Callable[[dict], Optional[float]]:
    def read(record: dict) -> Optional[float]:
        nc = record.get("nc") or {}
        return (nc.get(split) or {}).get(key)
    return read


def _geometry(key: str) -> Callable[[dict], Optional[float]]:
    return lambda record: (record.get("mixup_geometry") or {}).get(key)


def _ufm(key: str) -> Callable[[dict], Optional[float]]:
    prefix, _, name = key.rpartition(":")
    entry = UFM_FITS[f"{prefix}:" if prefix else ""]
    return lambda record: ((record.get("mixup_geometry") or {}).get(entry) or {}).get(name)


def _cutmix(read: Callable[[dict], Optional[float]]) -> Callable[[dict], Optional[float]]:
    """`read` applied to the CutMix points' geometry (mixup_geometry["cutmix"]), laid out like mixup's."""
    return lambda record: read({"mixup_geometry": (record.get("mixup_geometry") or {}).get("cutmix")})


def _layer_nc(stage: str, key: str) -> Callable[[dict], Optional[float]]:
    return lambda record: ((record.get("nc_layers") or {}).get(stage) or {}).get(key)


def _layer_ncc_error(stage: str) -> Callable[[dict], Optional[float]]:
    def read(record: dict) -> Optional[float]:
        accuracy = _layer_nc(stage, "ncc_accuracy")(record)
        return None if accuracy is None else 1.0 - accuracy
    return read


def _layer_geometry(stage: str, key: str) -> Callable[[dict], Optional[float]]:
    return lambda record: (((record.get("mixup_geometry") or {}).get("layers") or {}).get(stage) or {}).get(key)


def _floor_from_ncc_samples(stage: str):
    def floor(record: dict, config: dict) -> Optional[float]:
        count = _layer_nc(stage, "ncc_samples")(record)
        return ZERO_FLOOR_SAMPLES / count if count else None
    return floor


def _floor_from_config(count_key: str):
    def floor(record: dict, config: dict) -> Optional[float]:
        count = config.get(count_key)
        return ZERO_FLOOR_SAMPLES / count if count else None
    return floor


def _floor_from_nc(split: str):
    def floor(record: dict, config: dict) -> Optional[float]:
        count = _nc(split, "num_samples")(record)
        return ZERO_FLOOR_SAMPLES / count if count else None
    return floor


def _build_registry() -> Dict[str, Metric]:
    metrics = [
        Metric("train_loss", "train loss (clean inputs)", "loss", True, _field("train_loss")),
        Metric("test_loss", "test loss", "loss", True, _field("test_loss")),
        Metric("mixup_loss", "mixup training loss (the objective)", "loss", True, _field("mixup_loss")),
        Metric("train_acc", "train accuracy (clean inputs)", "accuracy (%)", False, _field("train_acc"), PERCENT),
        Metric("test_acc", "test accuracy", "accuracy (%)", False, _field("test_acc"), PERCENT),
        Metric("mixup_acc", "mixup training accuracy (lambda-weighted)", "accuracy (%)", False,
               _field("mixup_acc"), PERCENT),
        Metric("train_err", "train error (clean inputs)", "error (%)", True, _error("train"), PERCENT,
               _floor_from_config("num_train")),
        Metric("test_err", "test error", "error (%)", True, _error("test"), PERCENT, _floor_from_config("num_test")),
        Metric("mixup_err", "mixup training error (1 - lambda-weighted accuracy)", "error (%)", True,
               _error("mixup"), PERCENT, _floor_from_config("num_train")),
        Metric("test_ece", "test expected calibration error", "ECE (15 bins)", False, _field("test_ece")),
        Metric("lr", "learning rate", "learning rate", True, _field("lr")),
        Metric("time_s", "training time per epoch", "time (s)", False, _field("time_s")),
    ]
    for split in SPLITS:
        for key, (title, label, log) in NC_METRICS.items():
            floor = _floor_from_nc(split) if key.startswith("nc4") else None
            metrics.append(Metric(f"{split}.{key}", f"{title} ({split})", label, log, _nc(split, key), 1.0, floor))
    for key, (title, label) in GEOMETRY_METRICS.items():
        metrics.append(Metric(key, title, label, False, _geometry(key)))
    for name, (key, title, label, log) in UFM_METRICS.items():
        metrics.append(Metric(name, title, label, log, _ufm(key)))
    # the same numbers of the CutMix points (--feature-mix cutmix): cutmix.<name>
    for metric in [m for m in metrics if m.name in GEOMETRY_METRICS or m.name in UFM_METRICS]:
        metrics.append(Metric(f"{CUTMIX_PREFIX}{metric.name}", f"{metric.title} (CutMix points)".replace("mixup: ", ""),
                              metric.label, metric.log, _cutmix(metric.read)))
    return {metric.name: metric for metric in metrics}


def layer_metric(name: str) -> Metric:
    """The metric `layer.<stage>.<key>`; whether a run measured that stage is checked against the runs."""
    stage, _, key = name[len(LAYER_PREFIX):].rpartition(".")
    if not stage or key not in LAYER_NC_KEYS + LAYER_OTHER_KEYS:
        raise RunError(f"unknown per-layer metric {name!r}; write layer.STAGE.KEY with KEY one of "
                       f"{', '.join(LAYER_NC_KEYS + LAYER_OTHER_KEYS)}")
    where = f" at {stage}"
    if key in LAYER_NC_KEYS:
        title, label, log = NC_METRICS[key]
        return Metric(name, f"{title}{where} (train)", label, log, _layer_nc(stage, key), stage=stage)
    if key == "ncc_accuracy":
        return Metric(name, f"nearest-class-mean accuracy{where}", "accuracy (%)", False,
                      _layer_nc(stage, key), PERCENT, stage=stage)
    if key == "ncc_err":
        return Metric(name, f"nearest-class-mean error{where}", "error (%)", True, _layer_ncc_error(stage),
                      PERCENT, _floor_from_ncc_samples(stage), stage=stage)
    title, label = GEOMETRY_METRICS[key]
    return Metric(name, f"{title}{where}", label, False, _layer_geometry(stage, key), stage=stage)


def check_layer_stages(metrics: Sequence[Metric], runs: Sequence[Run]) -> None:
    """Refuse a per-layer metric whose stage no run measured (a typo would draw an empty panel)."""
    measured = {stage for run in runs for stage in (run.config.get("nc_layers") or [])}
    for metric in metrics:
        if metric.stage is not None and metric.stage not in measured:
            stages = ", ".join(sorted(measured)) or "none (train with --nc-layers all)"
            raise RunError(f"{metric.name}: no run measured stage {metric.stage!r} (measured stages: {stages})")


METRICS = _build_registry()


def resolve_metric(name: str, split: str = "train") -> Metric:
    """The metric called `name`; a bare NC key takes the split given by --split."""
    if name in NC_METRICS:
        name = f"{split}.{name}"
    if name.startswith(LAYER_PREFIX):
        return layer_metric(name)
    if name not in METRICS:
        bare = sorted(n for n in METRICS if "." not in n) + sorted(NC_METRICS)
        raise RunError(f"unknown metric {name!r}; choose from {', '.join(bare)} "
                       f"(NC keys may be prefixed train. or test.; geometry and ufm_ ones {CUTMIX_PREFIX} for the "
                       f"CutMix points; per-layer ones are layer.STAGE.KEY)")
    return METRICS[name]


# An accuracy drawn as its error on a log axis: on a linear 0-100 axis, 98.7 % and 99.2 % make one line.
ERROR_OF_ACCURACY = {"train_acc": "train_err", "test_acc": "test_err", "mixup_acc": "mixup_err"}


def errors_for_accuracies(metrics: Sequence[Metric]) -> Tuple[List[Metric], List[str]]:
    """The metrics with every accuracy replaced by its error, and a note per replacement."""
    replaced, notes = [], []
    for metric in metrics:
        error = ERROR_OF_ACCURACY.get(metric.name)
        if metric.stage is not None and metric.name.endswith(".ncc_accuracy"):
            error = metric.name[:-len("ncc_accuracy")] + "ncc_err"
        replaced.append(resolve_metric(error) if error else metric)
        if error:
            notes.append(f"{metric.name} is drawn as {error} (100 - accuracy, log axis)")
    return replaced, notes


def parse_metric_list(text: str, split: str) -> List[Metric]:
    names = [item.strip() for item in text.split(",") if item.strip()]
    if not names:
        raise RunError("--metric needs at least one metric name")
    return [resolve_metric(name, split) for name in names]


def value_at(record: Optional[dict], metric: Metric) -> float:
    """The metric in one record as a float in its own units (NaN when absent)."""
    if record is None:
        return math.nan
    value = metric.read(record)
    return math.nan if value is None else float(value)


def series(run: Run, metric: Metric, on_log_axis: bool) -> Tuple[np.ndarray, np.ndarray, Optional[float]]:
    """(epochs, values in display units, zero level or None) of the finite measurements of one run.

    On a log axis, zeros are moved to the run's zero floor (or dropped when it has none).
    """
    epochs, values, floors = [], [], []
    for record in run.records:
        value = value_at(record, metric)
        if not math.isfinite(value):
            continue  # not measured this epoch, NaN by definition, or a diverged epoch
        if on_log_axis and value <= 0:
            floor = metric.zero_floor(record, run.config) if metric.zero_floor else None
            if floor is None:
                continue
            value = floor
            floors.append(floor * metric.scale)
        epochs.append(record["epoch"])
        values.append(value * metric.scale)
    zero_level = min(floors) if floors else None
    return np.asarray(epochs, dtype=float), np.asarray(values, dtype=float), zero_level


@dataclass
class Aggregate:
    epochs: np.ndarray
    centre: np.ndarray
    low: Optional[np.ndarray]
    high: Optional[np.ndarray]
    zero_level: Optional[float]


def aggregate(runs: Sequence[Run], metric: Metric, band: str, on_log_axis: bool) -> Aggregate:
    """The mean over runs at every epoch measured by any of them, with a min-max or +-std band.

    On a log axis the mean and std are taken of log10 values (a geometric mean),
    so that the band stays positive and symmetric on the axis as drawn.
    """
    per_run = [series(run, metric, on_log_axis) for run in runs]
    zero_levels = [level for _, _, level in per_run if level is not None]
    epochs = np.unique(np.concatenate([e for e, _, _ in per_run])) if per_run else np.array([])
    table = np.full((len(per_run), epochs.size), np.nan)
    for row, (run_epochs, values, _) in enumerate(per_run):
        table[row, np.searchsorted(epochs, run_epochs)] = values
    if on_log_axis:
        table = np.log10(table)
    count = np.sum(np.isfinite(table), axis=0)
    centre = np.nanmean(table, axis=0) if epochs.size else np.array([])
    low = high = None
    if band == "minmax" and len(runs) > 1:
        low, high = np.nanmin(table, axis=0), np.nanmax(table, axis=0)
    elif band == "std" and len(runs) > 1:
        spread = np.nanstd(table, axis=0)
        low, high = centre - spread, centre + spread
    if low is not None:
        single = count < 2  # one run at this epoch: no spread to show
        low, high = np.where(single, np.nan, low), np.where(single, np.nan, high)
    if on_log_axis:
        centre, low, high = (None if a is None else 10.0 ** a for a in (centre, low, high))
    return Aggregate(epochs, centre, low, high, min(zero_levels) if zero_levels else None)
