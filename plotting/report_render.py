"""What utils.py report writes: report.md (GitHub markdown), descriptors.csv, comparisons.csv and figures."""
from __future__ import annotations

import csv
import math
import os
from dataclasses import replace
from typing import Callable, List, Optional, Sequence

from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

import study
from .figures import compare_figure, nc_figure
from .groups import common_description, format_value, group_runs
from .loading import RunError
from .metrics import resolve_metric
from .report import MIXUP_KEY, Study, stratum_label
from .representations import representations_figure
from .style import figure_style, save_figure, shrink_png

ALPHA = 0.05
TPT = "tpt_epoch"
FIGURE_DIR = "figures"
LEGEND_ROW_INCHES = 0.2  # the height of one legend entry in a single-column legend
BAND = "std"  # seed bands: mean +-1 std of the runs, as `utils.py compare --band std` draws them
# What each descriptor is, for the tables (the formulas are in study.py and docs/report.md).
DESCRIPTIONS = {
    "train_acc": "train accuracy (clean), last epoch", "test_acc": "test accuracy, last epoch",
    "test_ece": "test ECE, last epoch", "nc1_train": "NC1 train, last", "nc1_test": "NC1 test, last",
    "nc1_cdnv": "CDNV train, last", "nc2_etf_h": "ETF error of class means, last", "nc3": "NC3, last",
    "nc4": "NC4 train, last", "tpt_epoch": "first epoch at 100 % clean train accuracy (TPT onset)",
    "nc1_at_tpt": "NC1 train at TPT onset", "collapse_rate": "slope of log NC1 vs log epoch from TPT onset",
    "ufm_residual": "UFM residual, last feature epoch",
    "ufm_shape_residual": "UFM shape residual (distance to the optimum), last feature epoch",
    "mixup_nonlinearity": "mixup non-linearity, last feature epoch",
    "mixup_chord_nonlinearity": "mixup chord non-linearity, last feature epoch",
}


def number(value: float) -> str:
    return "n/a" if not math.isfinite(value) else f"{value:.3g}"


def interval(low: float, high: float) -> str:
    return f"[{number(low)}, {number(high)}]" if math.isfinite(low) else ""


def p_text(value: float) -> str:
    if not math.isfinite(value):
        return ""
    return "< 0.001" if value < 0.001 else f"{value:.3f}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> List[str]:
    def line(cells):
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"
    return [line(header), line(["---"] * len(header))] + [line(row) for row in rows] + [""]


# ---------------------------------------------------------------- descriptor tables

def stats_cell(values: Sequence[float], log: bool, cell_n: int) -> str:
    """mean [95 % CI] (a geometric mean on the log scale); 'n < 2' marks a single value."""
    summary = study.seed_stats(values, log)
    if summary.n == 0:
        return "n/a"
    text = number(summary.centre)
    text += f" {interval(summary.low, summary.high)}" if summary.n >= 2 else " (n < 2)"
    return text + (f" (n={summary.n})" if summary.n not in (cell_n, 1) else "")


def descriptor_table(result: Study, stratum) -> List[str]:
    levels = [level for level in result.levels if (stratum, level) in result.cells]
    cells = [result.cells[(stratum, level)] for level in levels]
    header = ["descriptor"] + [f"{result.factor}={format_value(level)}" for level in levels]
    rows = [["n (seeds)"] + [str(len(cell.runs)) for cell in cells]]
    for name in result.descriptor_names:
        log = study.is_log_scale(name)
        label = f"{name}{' (geo. mean)' if log else ''}"
        row = [label] + [stats_cell(cell.values(name), log, len(cell.runs)) for cell in cells]
        if name == TPT:  # a run that never reaches 100 % is no missing value: say how many did
            row = [label] + [_reached(entry, cell.values(name)) for entry, cell in zip(row[1:], cells)]
        if any(entry != "n/a" for entry in row[1:]):
            rows.append(row)
    return markdown_table(header, rows)


def descriptor_legend(result: Study) -> str:
    named = [f"`{name}` {DESCRIPTIONS[name]}" for name in result.descriptor_names if name in DESCRIPTIONS]
    return "Mean [95 % CI] over seeds. " + "; ".join(named) + "; `layer.STAGE.nc1` NC1 at a stage, last."


def _reached(entry: str, values: Sequence[float]) -> str:
    reached = sum(math.isfinite(v) for v in values)
    if not reached:
        return f"never ({len(values)} runs)"
    return f"{entry.split(' (n=')[0]} ({reached}/{len(values)} reached)"


# ---------------------------------------------------------------- comparison tables

def estimate_text(row: study.Comparison) -> str:
    if not math.isfinite(row.estimate):
        return row.note
    kind = "ratio" if row.log else "diff"
    return f"{kind} {number(row.back(row.estimate))} {interval(row.back(row.low), row.back(row.high))}".strip()


def comparison_table(rows: Sequence[study.Comparison]) -> List[str]:
    header = ["descriptor", "compared", "n", "estimate [95 % CI]", "p", "p (Holm)", "P(X > Y)"]
    body = [[row.metric, row.levels, row.n, estimate_text(row), p_text(row.p), p_text(row.p_holm),
             number(row.prob_improvement) if math.isfinite(row.prob_improvement) else ""] for row in rows]
    return markdown_table(header, body)


def effects_table(rows: Sequence[study.Comparison]) -> List[str]:
    header = ["descriptor", "level or test", "n", "with / without mixup [95 % CI]", "p", "p (Holm)"]
    body = [[row.metric, row.levels if row.kind == "mixup effect" else f"differs between {row.levels}",
             row.n, estimate_text(row) if row.kind == "mixup effect" else row.note, p_text(row.p),
             p_text(row.p_holm)] for row in rows]
    return markdown_table(header, body)


# ---------------------------------------------------------------- plain-language summary

def _finding(row: study.Comparison) -> str:
    where = f"{row.stratum}: " if row.stratum else ""
    if row.kind == "mixup effect differs":
        return f"{where}the mixup effect on {row.metric} differs between {row.levels} (Holm p {p_text(row.p_holm)})"
    what = "ratio" if row.log else "difference"
    subject = f"{row.levels} with/without mixup" if row.kind == "mixup effect" else row.levels
    return (f"{where}{row.metric}, {subject}: {what} {number(row.back(row.estimate))} "
            f"{interval(row.back(row.low), row.back(row.high))} (Holm p {p_text(row.p_holm)})")


def summary_lines(result: Study) -> List[str]:
    """What the numbers say, and no more: the Holm-significant tests and the CIs that exclude no effect."""
    tested = [row for row in result.comparisons if row.tested]
    untested = len(result.comparisons) - len(tested)
    significant = [row for row in tested if row.p_holm < ALPHA]
    lines = [f"- {len(tested)} tests form the family that Holm's correction covers"
             + (f"; {untested} comparisons had a cell with n < 2 and no test" if untested else "") + "."]
    if significant:
        lines.append(f"- {len(significant)} of them have a Holm-corrected p < {ALPHA}:")
        lines += [f"  - {_finding(row)}" for row in significant]
    else:
        lines.append(f"- None has a Holm-corrected p < {ALPHA}: at these seeds the data show no difference "
                     f"that survives the correction (which is not evidence that there is none).")
    excluding = [row for row in tested if row.kind != "mixup effect differs" and row.p_holm >= ALPHA
                 and not (row.low <= 0.0 <= row.high)]
    effects = [row for row in excluding if row.kind == "mixup effect"]
    if effects:
        lines.append(f"- Mixup effects whose uncorrected 95 % CI excludes 1 but that do not survive Holm's "
                     f"correction (leads, not findings):")
        lines += [f"  - {_finding(row)}" for row in effects]
    if len(excluding) > len(effects):
        lines.append(f"- {len(excluding) - len(effects)} pairwise comparisons have an uncorrected 95 % CI that "
                     f"excludes 1 (ratio) or 0 (difference) but do not survive Holm's correction; see the tables.")
    return lines + [""]


# ---------------------------------------------------------------- figures

def _slug(text: str) -> str:
    kept = "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in text)
    return kept.strip("_") or "all"


def loglog_nc1_figure(groups):
    """NC1 (train and test) against epoch on log-log axes, where a power law is a straight line."""
    figure = compare_figure(groups, [resolve_metric("train.nc1"), resolve_metric("test.nc1")], BAND)
    # one row of two panels leaves the legend (one entry per group here) no room: grow the figure for it
    width, height = figure.get_size_inches()
    figure.set_size_inches(width, height + LEGEND_ROW_INCHES * len(groups))
    last = max(record["epoch"] for group in groups for run in group.runs for record in run.records)
    for ax in figure.axes:
        if ax.has_data() and ax.get_visible() and ax.get_yscale() == "log":
            ax.set_xscale("log")
            ax.set_xlim(1, last * 1.1)
            # epochs as plain numbers (1, 2, 5, 10, 20, 50), not powers of ten
            ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
            ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
            ax.xaxis.set_minor_formatter(NullFormatter())
    return figure


def _one_seed_each(groups):
    """Each group's run of the smallest seed, of the groups trained with mixup when there are such (the view
    of Fisher et al. 2024): one triangle row per level keeps the figure readable."""
    mixed = [group for group in groups if float(dict(group.key).get(MIXUP_KEY, 0) or 0) > 0]
    return [replace(group, runs=[min(group.runs, key=lambda run: str(run.seed))]) for group in mixed or groups]


FIGURES = (("nc", "Neural-collapse panels (train split), mean and ±1 std over seeds",
            lambda groups: nc_figure(groups, "train", BAND)),
           ("nc1_loglog", "NC1 of the train split (left) and the test split (right) against epoch, log-log axes",
            loglog_nc1_figure),
           ("representations", "Mixup features on the classifier-simplex plane at the last feature epoch "
                               "(smallest seed of each level; the runs trained with mixup where there are some)",
            lambda groups: representations_figure(_one_seed_each(groups), "last", "triangle")))


def figure_groups(result: Study):
    """(label, groups) per figure: strata without mixup_alpha, with the factor (and alpha) as the groups."""
    by = [result.factor] + ([MIXUP_KEY] if MIXUP_KEY in result.strata_keys else [])
    outer_keys = [key for key in result.strata_keys if key != MIXUP_KEY]
    runs = result.runs()
    outer = sorted({tuple((k, format_value(run.config.get(k))) for k in outer_keys) for run in runs})
    for stratum in outer:
        members = [run for run in runs if tuple((k, format_value(run.config.get(k))) for k in outer_keys) == stratum]
        yield stratum_label(stratum), group_runs(members, by)


def write_figures(result: Study, out_dir: str, dpi: int) -> List[str]:
    """Every figure, each embedded with a heading; a figure the runs cannot give is named with the reason."""
    lines = []
    os.makedirs(os.path.join(out_dir, FIGURE_DIR), exist_ok=True)
    for label, groups in figure_groups(result):
        lines += [f"### {label}", ""]
        for name, caption, build in FIGURES:
            path = os.path.join(FIGURE_DIR, f"{name}_{_slug(label)}.png")
            lines += [_render(build, groups, os.path.join(out_dir, path), dpi, caption, path), ""]
    return lines


def _render(build: Callable, groups, full_path: str, dpi: int, caption: str, path: str) -> str:
    try:
        with figure_style():
            save_figure(build(groups), full_path, dpi)
    except RunError as error:  # e.g. runs without features pickles have no representations
        return f"*{caption}: not drawn ({error}).*"
    shrink_png(full_path)
    return f"{caption}:\n\n![{caption}]({path})"


# ---------------------------------------------------------------- report.md and the CSVs

def header_lines(result: Study) -> List[str]:
    tests = sum(row.tested for row in result.comparisons)
    shared = common_description(result.runs(), [result.factor] + result.strata_keys)
    levels = ", ".join(format_value(level) for level in result.levels)
    strata = ", ".join(result.strata_keys) or "none (every other key is shared)"
    attached = "".join(f"\n- **Goes with the factor**: {key} ({_attached_values(result, key)}), one value per level."
                       for key in result.attached_keys)
    return [f"# Report: {result.factor} compared", "",
            f"- **Factor**: `{result.factor}` with levels {levels}.",
            f"- **Strata** (compared within each combination): {strata}.{attached}",
            f"- **Shared settings**: {shared or 'see descriptors.csv'}.",
            f"- **Runs**: {len(result.runs())} complete runs used, {len(result.excluded)} left out "
            f"(see [Left out](#left-out)).",
            f"- **Statistics**: cells are the mean over seeds with its 95 % t-interval (sample std, ddof 1); "
            f"descriptors marked *geo. mean* are averaged as log10 values and compared as ratios. Pairs: Welch's "
            f"t-test; mixup effects: per-seed log ratios (paired by seed), t-interval, and whether they differ "
            f"between levels (Welch's t for two levels, a permutation test for more); p (Holm) corrects over "
            f"all {tests} "
            f"tests of this report; P(X > Y) is the probability of improvement over seeds (rliable). "
            f"Formulas: docs/report.md.", ""]


def _attached_values(result: Study, key: str) -> str:
    pairs = {(format_value(run.config.get(result.factor)), format_value(run.config.get(key))) for run in result.runs()}
    return ", ".join(f"{key}={value} with {level}" for level, value in sorted(pairs))


def headline_tables(result: Study) -> List[str]:
    """Per log-scale descriptor compared: the mixup ratio of every level (rows) in every stratum (columns),
    and whether it differs between levels; the study's question in one table each."""
    effects = [row for row in result.comparisons if row.kind != "pair"]
    lines = []
    for metric in dict.fromkeys(row.metric for row in effects):
        mine = [row for row in effects if row.metric == metric]
        columns = list(dict.fromkeys(row.stratum for row in mine))
        levels = list(dict.fromkeys(row.levels for row in mine if row.kind == "mixup effect"))
        cell = {(row.stratum, row.levels): row for row in mine}
        body = [[level] + [_effect_cell(cell.get((column, level))) for column in columns] for level in levels]
        differ = {row.stratum: row for row in mine if row.kind == "mixup effect differs"}
        body.append([f"differs between levels? (p; Holm p)"] +
                    [f"{p_text(differ[c].p)}; {p_text(differ[c].p_holm)}" if c in differ and differ[c].tested
                     else "n < 2" for c in columns])
        lines += [f"**{metric}: with / without mixup** (geometric mean of per-seed ratios [95 % CI], n seeds)", ""]
        lines += markdown_table([result.factor] + columns, body)
    return lines


def _effect_cell(row) -> str:
    if row is None:
        return ""
    if not row.tested:
        return f"n < 2 (n={row.n})"
    mark = " *" if row.p_holm < ALPHA else ""
    return f"{number(row.back(row.estimate))} {interval(row.back(row.low), row.back(row.high))}, n={row.n}{mark}"


def render_markdown(result: Study, figure_lines: Sequence[str]) -> str:
    lines = header_lines(result) + ["## Summary", ""] + summary_lines(result)
    headline = headline_tables(result)
    if headline:
        lines += ["## Headline: the mixup effect per level", "", f"\\* marks a Holm-corrected p < {ALPHA}.", ""]
        lines += headline
    lines += ["## Descriptors per stratum", "", descriptor_legend(result), ""]
    for stratum in result.strata:
        lines += [f"### {stratum_label(stratum)}", ""] + descriptor_table(result, stratum)
    effects = [row for row in result.comparisons if row.kind != "pair"]
    if effects:
        lines += ["## Mixup effect per level", "", "Ratios of each log-scale descriptor with mixup over "
                  "without, from seeds run both ways.", ""]
        for label in dict.fromkeys(row.stratum for row in effects):
            lines += [f"### {label}", ""] + effects_table([row for row in effects if row.stratum == label])
    lines += ["## Pairwise comparisons", "", f"X vs Y: the ratio X / Y (geometric means) or the difference "
              f"X - Y, Welch's 95 % CI and p.", ""]
    pairs = [row for row in result.comparisons if row.kind == "pair"]
    for label in dict.fromkeys(row.stratum for row in pairs):
        lines += [f"<details><summary>{label}</summary>", ""]
        lines += comparison_table([row for row in pairs if row.stratum == label]) + ["</details>", ""]
    lines += ["## Figures", ""] + list(figure_lines)
    lines += ["## Left out", ""] + left_out_lines(result)
    return "\n".join(lines).rstrip() + "\n"


def left_out_lines(result: Study) -> List[str]:
    if not result.excluded:
        return ["No run was left out.", ""]
    return ["Not in any statistic:", ""] + [f"- `{e.folder}`: {e.reason}" for e in result.excluded] + [""]


def _write_rows(path: str, fields: Sequence[str], rows: Sequence[dict]) -> None:
    try:
        with open(path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(fields), extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
    except OSError as error:
        raise RunError(f"cannot write {path}: {error.strerror or error}") from None


def write_descriptors_csv(result: Study, path: str) -> None:
    keys = ["folder", "seed", result.factor] + result.strata_keys
    names = result.descriptor_names + list(study.BOOKKEEPING_DESCRIPTORS)
    rows = []
    for cell in result.cells.values():
        for run, row in zip(cell.runs, cell.rows):
            entry = {key: format_value(run.config.get(key)) for key in keys[1:]}
            entry.update(folder=run.folder, **{name: row.get(name, math.nan) for name in names})
            rows.append(entry)
    _write_rows(path, keys + names, sorted(rows, key=lambda r: r["folder"]))


COMPARISON_FIELDS = ("kind", "stratum", "descriptor", "compared", "n", "scale", "estimate", "ci_low", "ci_high",
                     "p", "p_holm", "prob_improvement", "test")


def write_comparisons_csv(result: Study, path: str) -> None:
    """One row per comparison; estimates in the descriptor's units (a ratio on the log scale)."""
    rows = [{"kind": row.kind, "stratum": row.stratum, "descriptor": row.metric, "compared": row.levels,
             "n": row.n, "scale": "log (ratio)" if row.log else "linear (difference)",
             "estimate": row.back(row.estimate), "ci_low": row.back(row.low), "ci_high": row.back(row.high),
             "p": row.p, "p_holm": row.p_holm, "prob_improvement": row.prob_improvement, "test": row.note}
            for row in result.comparisons]
    _write_rows(path, COMPARISON_FIELDS, rows)


def write_report(result: Study, out_dir: str, dpi: Optional[int]) -> List[str]:
    """report.md, descriptors.csv, comparisons.csv and figures/ (at dpi; None: no figures) in out_dir;
    returns the paths written."""
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as error:
        raise RunError(f"--out {out_dir}: cannot create the folder: {error.strerror or error}") from None
    paths = [os.path.join(out_dir, name) for name in ("descriptors.csv", "comparisons.csv", "report.md")]
    write_descriptors_csv(result, paths[0])
    write_comparisons_csv(result, paths[1])
    figure_lines = write_figures(result, out_dir, dpi) if dpi else ["No figures (--no-figures).", ""]
    try:
        with open(paths[2], "w") as handle:
            handle.write(render_markdown(result, figure_lines))
    except OSError as error:
        raise RunError(f"cannot write {paths[2]}: {error.strerror or error}") from None
    return paths
