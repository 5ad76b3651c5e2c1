"""utils.py report: a sweep's runs turned into descriptors, seed statistics and comparisons of one factor.

This module decides which runs count and how they are laid out (factor levels within
strata); study.py computes the numbers; report_render.py writes them out.
"""
from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import study
from .groups import SEED_KEY, Group, _sortable, check_distinct_seeds, differing_keys, format_value, freeze
from .loading import Run, RunError, find_run_folders, load_run

COMPLETE = "complete"
MIXUP_KEY = "mixup_alpha"
# Keys that define what is studied: when they vary, they stratify the comparison. Any other key
# that varies (epochs, lr, weight decay, ...) is a difference of protocol, refused unless named
# by --strata, so that no comparison mixes protocols silently.
DESIGN_KEYS = ("dataset", "model", "width", "loss", "mixup_alpha", "mixup_layer", "mixup_per_sample",
               "etf_classifier", "label_smoothing", "focal_gamma", "mse_scale")
DEFAULT_REPORT_METRICS = "test_acc,test_ece,nc1_train,nc1_test,nc1_cdnv,nc2_etf_h,nc3,collapse_rate"

Stratum = Tuple[Tuple[str, object], ...]


@dataclass
class Excluded:
    folder: str
    reason: str


@dataclass
class Cell:
    """The runs of one factor level within one stratum, with each run's descriptors."""
    stratum: Stratum
    level: object
    runs: List[Run] = field(default_factory=list)
    rows: List[Dict[str, float]] = field(default_factory=list)

    def values(self, metric: str) -> List[float]:
        return [row.get(metric, math.nan) for row in self.rows]


@dataclass
class Study:
    factor: str
    strata_keys: List[str]
    levels: List[object]
    cells: Dict[Tuple[Stratum, object], Cell]
    excluded: List[Excluded]
    metrics: List[str]
    descriptor_names: List[str]
    attached_keys: List[str] = field(default_factory=list)  # keys with one value per level (see attached_keys)
    comparisons: List[study.Comparison] = field(default_factory=list)

    @property
    def strata(self) -> List[Stratum]:
        return sorted({stratum for stratum, _ in self.cells}, key=_stratum_order)

    def runs(self) -> List[Run]:
        return [run for cell in self.cells.values() for run in cell.runs]


def _stratum_order(stratum: Stratum) -> tuple:
    return tuple(_sortable(value) for _, value in stratum)


def stratum_label(stratum: Stratum) -> str:
    return ", ".join(f"{key}={format_value(value)}" for key, value in stratum) or "all runs"


# ---------------------------------------------------------------- which runs count

def _exclusion(run: Run) -> Optional[str]:
    """Why a loaded run is left out of every statistic, or None."""
    if not run.records:
        return "no epoch records"
    if run.status != COMPLETE:
        return f"status {run.status} at epoch {run.last_epoch()}"
    losses = [record.get("train_loss") for record in run.records]
    if any(value is not None and not math.isfinite(float(value)) for value in losses):
        return "non-finite training loss (diverged)"
    return None


def load_study_runs(arguments: Sequence[str]) -> Tuple[List[Run], List[Excluded]]:
    """The usable runs below the arguments, and the folders left out with the reason (failed, unfinished)."""
    runs, excluded = [], []
    for folder in find_run_folders(arguments):
        try:
            run = load_run(folder)
        except RunError as error:  # a run that failed before its first epoch, or a damaged file
            excluded.append(Excluded(folder, str(error)))
            continue
        reason = _exclusion(run)
        if reason:
            excluded.append(Excluded(folder, reason))
        else:
            runs.append(run)
    if not runs:
        raise RunError(f"no complete run to report on ({len(excluded)} left out: "
                       f"{'; '.join(f'{e.folder}: {e.reason}' for e in excluded[:3])})")
    return runs, excluded


def _values_of(runs: Sequence[Run], key: str) -> List[str]:
    return sorted({format_value(freeze(run.config.get(key))) for run in runs})


def attached_keys(runs: Sequence[Run], factor: str, keys: Sequence[str]) -> List[str]:
    """Keys with one value per level of the factor (width with model: mlp at 1, resnet18 at 0.125):
    they are part of what a level is, so they cannot stratify it."""
    attached = []
    for key in keys:
        values = defaultdict(set)
        for run in runs:
            values[freeze(run.config.get(factor))].add(freeze(run.config.get(key)))
        if all(len(found) == 1 for found in values.values()):
            attached.append(key)
    return attached


def design(runs: Sequence[Run], factor: str, extra_strata: Sequence[str]) -> Tuple[List[str], List[str]]:
    """(stratum keys, keys attached to the factor); refuses a factor that does not vary and runs that
    differ in any other key."""
    if factor == SEED_KEY:
        raise RunError("--factor seed: seeds are what every statistic averages over; choose a config key")
    if all(factor not in run.config for run in runs):
        raise RunError(f"--factor {factor}: no run has this config key")
    varying = differing_keys(runs)
    if factor not in varying:
        raise RunError(f"--factor {factor} does not vary: every complete run has {factor}="
                       f"{', '.join(_values_of(runs, factor))}")
    designed = [key for key in varying if key != factor and (key in DESIGN_KEYS or key in extra_strata)]
    for key in varying:
        if key != factor and key not in designed:
            raise RunError(f"runs differ in {key} ({', '.join(_values_of(runs, key))}), which is neither the "
                           f"factor nor a stratum key; report runs of one protocol, or add --strata {key}")
    attached = attached_keys(runs, factor, designed)
    return [key for key in designed if key not in attached], attached


def _cells(runs: Sequence[Run], factor: str, strata_keys: Sequence[str]) -> Dict[tuple, Cell]:
    cells: Dict[tuple, Cell] = {}
    for run in runs:
        stratum = tuple((key, freeze(run.config.get(key))) for key in strata_keys)
        level = freeze(run.config.get(factor))
        cell = cells.setdefault((stratum, level), Cell(stratum, level))
        cell.runs.append(run)
        cell.rows.append(study.descriptors(run.records))
    return cells


def check_seeds(cells: Dict[tuple, Cell], factor: str) -> None:
    """Refuse a cell that holds a seed twice (a copied run folder): it would count that seed twice.
    Within a cell only the seed varies (design refuses other keys), so summary's check applies as it is."""
    check_distinct_seeds([Group((*cell.stratum, (factor, cell.level)),
                                f"{stratum_label(cell.stratum)}, {factor}={format_value(cell.level)}", cell.runs)
                          for cell in cells.values()])


def descriptor_names(cells: Dict[tuple, Cell]) -> List[str]:
    names = list(study.DESCRIPTOR_ORDER)
    layers = sorted({name for cell in cells.values() for row in cell.rows for name in row
                     if name.startswith(study.LAYER_PREFIX)})
    return names + layers


def check_metrics(metrics: Sequence[str], names: Sequence[str]) -> None:
    for metric in metrics:
        if metric not in names:
            raise RunError(f"--metrics: unknown descriptor {metric!r}; choose from {', '.join(names)}")


def build_study(arguments: Sequence[str], factor: str, metrics: Sequence[str],
                extra_strata: Sequence[str] = ()) -> Study:
    """Load, check and lay out the runs, and compute every comparison (see study.py)."""
    runs, excluded = load_study_runs(arguments)
    strata_keys, attached = design(runs, factor, extra_strata)
    cells = _cells(runs, factor, strata_keys)
    check_seeds(cells, factor)
    names = descriptor_names(cells)
    check_metrics(metrics, names)
    levels = sorted({level for _, level in cells}, key=_sortable)
    result = Study(factor, strata_keys, levels, cells, excluded, list(metrics), names, attached)
    result.comparisons = pair_comparisons(result) + mixup_comparisons(result)
    study.apply_holm(result.comparisons)
    return result


# ---------------------------------------------------------------- comparisons

def pair_comparisons(result: Study) -> List[study.Comparison]:
    """Every pair of levels within every stratum, for every chosen metric: later level vs earlier."""
    rows = []
    for stratum in result.strata:
        present = [level for level in result.levels if (stratum, level) in result.cells]
        for i, first in enumerate(present):
            for second in present[i + 1:]:
                x, y = result.cells[(stratum, second)], result.cells[(stratum, first)]
                names = (format_value(second), format_value(first))
                rows += [study.compare_pair(x.values(m), y.values(m), m, stratum_label(stratum), names)
                         for m in result.metrics]
    return rows


def _without_mixup_key(stratum: Stratum) -> Stratum:
    return tuple((key, value) for key, value in stratum if key != MIXUP_KEY)


def _alpha(stratum: Stratum) -> float:
    return float(dict(stratum)[MIXUP_KEY] or 0.0)


def per_seed_log_ratios(with_cell: Cell, without_cell: Cell, metric: str) -> List[float]:
    """log10(with / without) of `metric` for every seed that both cells hold (same seed, same other keys)."""
    without = {freeze(run.seed): row.get(metric, math.nan) for run, row in zip(without_cell.runs, without_cell.rows)}
    ratios = []
    for run, row in zip(with_cell.runs, with_cell.rows):
        base, value = without.get(freeze(run.seed), math.nan), row.get(metric, math.nan)
        if base > 0 and value > 0:
            ratios.append(math.log10(value) - math.log10(base))
    return ratios


def mixup_comparisons(result: Study) -> List[study.Comparison]:
    """Per level of the factor: each log-scale metric with mixup over without (paired by seed), and whether
    that effect differs between levels. Needs mixup_alpha among the stratum keys, with 0 among its values."""
    if MIXUP_KEY not in result.strata_keys:
        return []
    rows = []
    outer = sorted({_without_mixup_key(s) for s in result.strata}, key=_stratum_order)
    for base in outer:
        mine = [s for s in result.strata if _without_mixup_key(s) == base]
        off = [s for s in mine if _alpha(s) == 0.0]
        for on in (s for s in mine if _alpha(s) > 0.0 and off):
            label = stratum_label(base + ((MIXUP_KEY, f"{format_value(dict(on)[MIXUP_KEY])} vs 0"),))
            rows += _effects(result, on, off[0], label)
    return rows


def _effects(result: Study, on: Stratum, off: Stratum, label: str) -> List[study.Comparison]:
    rows = []
    for metric in (m for m in result.metrics if study.is_log_scale(m)):
        samples = {}
        for level in result.levels:
            if (on, level) in result.cells and (off, level) in result.cells:
                ratios = per_seed_log_ratios(result.cells[(on, level)], result.cells[(off, level)], metric)
                samples[format_value(level)] = ratios
                rows.append(study.mixup_effect(ratios, metric, label, f"{result.factor}={format_value(level)}"))
        if len(samples) > 1:
            rows.append(study.effects_differ(samples, metric, label))
    return rows
