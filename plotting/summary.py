"""The summary table: one row per group, final (or --epoch) metrics with seeds aggregated."""
from __future__ import annotations

import csv
import math
from collections import Counter
from typing import List, Optional, Sequence

import numpy as np

from .groups import Group
from .loading import Run, RunError
from .metrics import Metric, value_at

DEFAULT_SUMMARY_METRICS = "train_acc,test_acc,test_ece,nc1,nc1_cdnv,nc2_etf_h,nc3,nc4"
COLUMN_GAP = "  "
MISSING = "n/a"
# Ends the header line: which spread the cells show (the runs are a sample of seeds, hence ddof 1).
SPREAD_NOTE = "(cells: mean ± sample std, ddof 1)"


def _record(run: Run, epoch: Optional[int]) -> dict:
    if not run.records:
        raise RunError(f"{run.folder}: metrics.pkl has no epoch records yet")
    if epoch is None:
        return run.records[-1]
    record = run.record_at(epoch)
    if record is None:
        raise RunError(f"{run.folder}: no record of epoch {epoch} (it has epochs "
                       f"{run.records[0]['epoch']}-{run.last_epoch()})")
    return record


def _statistics(values: List[float]) -> dict:
    finite = np.asarray([v for v in values if math.isfinite(v)], dtype=float)
    if finite.size == 0:
        return {"mean": math.nan, "std": math.nan, "min": math.nan, "max": math.nan, "n": 0}
    std = float(finite.std(ddof=1)) if finite.size > 1 else math.nan  # sample std: the runs are a sample of seeds
    return {"mean": float(finite.mean()), "std": std, "min": float(finite.min()),
            "max": float(finite.max()), "n": int(finite.size)}


def _span(values: Sequence[int]) -> str:
    low, high = min(values), max(values)
    return str(low) if low == high else f"{low}-{high}"


def summary_rows(groups: Sequence[Group], metrics: Sequence[Metric], epoch: Optional[int]) -> List[dict]:
    """Per group: label, run count, seeds, epoch(s), statuses, and mean/std/min/max/n of each metric."""
    rows = []
    for group in groups:
        records = [_record(run, epoch) for run in group.runs]
        statuses = Counter(run.status for run in group.runs)
        row = {"group": group.label, "runs": len(group.runs),
               "seeds": ",".join(str(s) for s in group.seeds),
               "epoch": _span([r["epoch"] for r in records]),
               "status": ", ".join(s if n == len(group.runs) else f"{s} {n}" for s, n in sorted(statuses.items()))}
        for metric in metrics:
            row[metric.name] = _statistics([value_at(record, metric) for record in records])
        rows.append(row)
    return rows


def _cell(stats: dict) -> str:
    if stats["n"] == 0:
        return MISSING
    if stats["n"] == 1:
        return f"{stats['mean']:.4g}"
    return f"{stats['mean']:.4g} ± {stats['std']:.2g}"


def format_table(rows: Sequence[dict], metrics: Sequence[Metric]) -> str:
    """A plain-text table, columns padded to their widest cell; the cells show mean ± sample std over runs."""
    header = ["group", "runs", "seeds", "epoch", "status"] + [m.name for m in metrics]
    body = [[str(row[key]) for key in header[:5]] + [_cell(row[m.name]) for m in metrics] for row in rows]
    widths = [max(len(line[i]) for line in [header] + body) for i in range(len(header))]
    lines = [COLUMN_GAP.join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip()
             for line in [header] + body]
    lines[0] += COLUMN_GAP + SPREAD_NOTE
    return "\n".join(lines)


def write_csv(path: str, rows: Sequence[dict], metrics: Sequence[Metric]) -> None:
    """The same numbers as the table, one column per statistic, full precision."""
    fields = ["group", "runs", "seeds", "epoch", "status"]
    fields += [f"{m.name}_{stat}" for m in metrics for stat in ("mean", "std", "min", "max", "n")]
    try:
        with open(path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=fields)
            writer.writeheader()
            for row in rows:
                flat = {key: row[key] for key in fields[:5]}
                for metric in metrics:
                    flat.update({f"{metric.name}_{stat}": value for stat, value in row[metric.name].items()})
                writer.writerow(flat)
    except OSError as error:
        raise RunError(f"cannot write {path}: {error.strerror or error}") from None
