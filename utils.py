"""Figures and tables over run folders written by main.py.

    python utils.py curves runs/digits_mlp_cross_entropy_a1.0_s0
    python utils.py nc runs/ --split test            # every run below runs/, seeds aggregated
    python utils.py compare 'runs/*' --by loss --metric nc1,test_acc --band std
    python utils.py calibration runs/x --epoch 50
    python utils.py summary 'runs/*' --csv summary.csv
    python utils.py representations runs/x --epochs 1,10,last --samples
    python utils.py representations runs/x --theory          # with the UFM optimum's curves
    python utils.py representations runs/x --layer hidden1   # at a stage below the classifier
    python utils.py representations runs/x --mix cutmix      # the CutMix points of the class triple
    python utils.py layers runs/x runs/y --epochs 0,10,last  # NC1, NCC error, non-linearity against depth
    python utils.py report runs/ --factor loss --out report/  # descriptors, CIs, tests: report.md + CSVs

A RUN is a run folder, a glob of run folders, or a parent folder (a sweep):
every run folder below it is used. Runs that differ only in --seed are
aggregated into one line with a band. Pickles are read by a restricted
unpickler (builtins and numpy arrays only); any problem with a run folder is
reported in one line with exit status 1 (2 for a bad flag).
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

from plotting.depth import layers_figure
from plotting.figures import calibration_figure, compare_figure, curves_figure, nc_figure
from plotting.groups import check_distinct_seeds, describe_mixing, group_runs
from plotting.loading import MIXED_POINTS, RunError, load_runs
from plotting.metrics import BANDS, SPLITS, check_layer_stages, errors_for_accuracies, parse_metric_list
from plotting.report import DEFAULT_REPORT_METRICS, build_study
from plotting.report_render import write_report
from plotting.representations import VIEWS, representations_figure
from plotting.style import DEFAULT_DPI, check_output_path, figure_style, save_figure
from plotting.summary import DEFAULT_SUMMARY_METRICS, format_table, summary_rows, write_csv
from plotting.triangle import FEATURES, TriangleOptions

PROG = "utils.py"
EXIT_ERROR, EXIT_USAGE = 1, 2
DEFAULT_COMPARE_METRICS = "test_err,train_err,nc1,nc2_etf_h,nc3,nc4"
REPORT_DPI = 100  # the figures are embedded in report.md: small files


class UsageError(Exception):
    """A bad flag; reported in one line with exit status 2."""


def positive_int(text: str) -> int:
    value = int(text) if text.strip().isdigit() else 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a usage error in one line instead of printing the usage block."""

    def __init__(self, *args, **kwargs):
        # A prefix of a flag is an error, not that flag: `--epoch 1` must not become `--epochs 1`.
        # Subparsers are made with this class too, so they inherit it.
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message):
        raise UsageError(message)


def _add_run_arguments(parser: argparse.ArgumentParser, default_out: str, grouped: bool = True) -> None:
    parser.add_argument("runs", nargs="+", metavar="RUN",
                        help="run folder, glob of run folders, or a parent folder holding run folders")
    parser.add_argument("--out", metavar="FILE", default=None,
                        help=f"image to write (.png, .pdf or .svg); default: {default_out} in the run folder, "
                             f"or in the folder the runs share")
    parser.add_argument("--dpi", metavar="N", type=positive_int, default=DEFAULT_DPI,
                        help=f"resolution of a .png (default: {DEFAULT_DPI})")
    if grouped:
        parser.add_argument("--by", metavar="KEY[,KEY]", default=None,
                            help="config keys that define the groups (e.g. loss, model, mixup_alpha); "
                                 "default: every key that differs between the runs, seed aside")
        parser.add_argument("--band", metavar="KIND", choices=BANDS, default="minmax",
                            help=f"spread shown around the mean of a group's runs: {', '.join(BANDS)} "
                                 f"(default: minmax)")


def _add_split(parser: argparse.ArgumentParser, help_text: str) -> None:
    parser.add_argument("--split", metavar="SPLIT", choices=SPLITS, default="train",
                        help=f"{help_text}: train or test (default: train)")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog=PROG, description=__doc__.split("\n\n")[0].strip())
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    curves = commands.add_parser("curves", help="train/test loss and accuracy (or error) against epoch")
    _add_run_arguments(curves, "curves.png")
    curves.add_argument("--error", action="store_true",
                        help="plot error (100 - accuracy) on a log scale instead of accuracy, "
                             "as in the terminal-phase plots")

    nc = commands.add_parser("nc", help="the NC1-NC4 panels of Papyan et al. 2020 against epoch")
    _add_run_arguments(nc, "nc_<split>.png")
    _add_split(nc, "split whose features are measured")

    calibration = commands.add_parser("calibration", help="reliability diagram and ECE on the test split")
    _add_run_arguments(calibration, "calibration.png", grouped=False)
    calibration.add_argument("--by", metavar="KEY[,KEY]", default=None,
                             help="config keys that name the runs in the panel titles (default: the keys "
                                  "that differ)")
    calibration.add_argument("--epoch", metavar="E", type=int, default=None,
                             help="epoch to show (default: the last one)")

    compare = commands.add_parser("compare", help="chosen metrics against epoch, runs grouped by config keys")
    _add_run_arguments(compare, "compare.png")
    compare.add_argument("--metric", metavar="M[,M]", default=DEFAULT_COMPARE_METRICS,
                         help=f"metrics, one panel each; NC keys may be prefixed train. or test.; an "
                              f"accuracy is drawn as its error on a log axis (default: {DEFAULT_COMPARE_METRICS})")
    _add_split(compare, "split of bare NC metric names")

    summary = commands.add_parser("summary", help="a table of final (or --epoch) metrics, one row per group")
    summary.add_argument("runs", nargs="+", metavar="RUN",
                         help="run folder, glob of run folders, or a parent folder holding run folders")
    summary.add_argument("--by", metavar="KEY[,KEY]", default=None,
                         help="config keys that define the groups (default: every key that differs, seed aside)")
    summary.add_argument("--epoch", metavar="E", type=int, default=None,
                         help="epoch to report (default: each run's last)")
    summary.add_argument("--metric", metavar="M[,M]", default=DEFAULT_SUMMARY_METRICS,
                         help=f"columns (default: {DEFAULT_SUMMARY_METRICS})")
    _add_split(summary, "split of bare NC metric names")
    summary.add_argument("--csv", metavar="FILE", default=None,
                         help="also write the table as CSV, with mean, sample std, min, max and n per metric")

    representations = commands.add_parser(
        "representations", help="mixup features of the class triple on the classifier-simplex plane "
                                "(Fisher et al. 2024, Fig. 1)")
    _add_run_arguments(representations, "representations.png", grouped=False)
    representations.add_argument("--by", metavar="KEY[,KEY]", default=None,
                                 help="config keys that name the runs in the panel titles "
                                      "(default: the keys that differ)")
    representations.add_argument("--epochs", metavar="E[,E]", default=None,
                                 help="feature epochs to show, one panel each; 'last' is the last "
                                      f"(default: up to 4 spread over the saved epochs)")
    representations.add_argument("--view", metavar="VIEW", choices=VIEWS, default="triangle",
                                 help="triangle: mixup points on the triple's classifier plane; means: all "
                                      "class means in 2-D PCA with the classifier rows; cosines: the cosines "
                                      "between class means and between classifier rows, against a simplex ETF "
                                      "(default: triangle)")
    representations.add_argument("--samples", action="store_true",
                                 help="also draw the clean training samples of the triple (triangle view; "
                                      "the features pickle keeps them for the last layer only)")
    representations.add_argument("--theory", action="store_true",
                                 help="triangle view: also draw the optimum of the unconstrained-features model "
                                      "fitted at each epoch (a dark curve over lambda per different-class pair "
                                      "type, a dark marker per same-class one) and its residual")
    representations.add_argument("--mix", metavar="RULE", choices=MIXED_POINTS, default="mixup",
                                 help="triangle view: whose class-triple points, mixup's (interpolated images) or "
                                      "cutmix's (a box of 1 - lambda of x_a's area from x_b; a run trained with "
                                      "CutMix or --feature-mix cutmix) (default: mixup)")
    representations.add_argument("--layer", metavar="STAGE", default=None,
                                 help="triangle view at a stage of the model (a run with --nc-layers): the mixup "
                                      "points' vectors there, on the plane where the triple's class means at "
                                      "that stage land on the triangle's vertices")

    layers = commands.add_parser("layers", help="NC1, nearest-class-mean error and mixup non-linearity against "
                                                "depth, one line per epoch (runs with --nc-layers)")
    _add_run_arguments(layers, "layers.png", grouped=False)
    layers.add_argument("--by", metavar="KEY[,KEY]", default=None,
                        help="config keys that name the runs in the row labels (default: the keys that differ)")
    layers.add_argument("--epochs", metavar="E[,E]", default=None,
                        help="epochs to draw, one line each; 'last' is the last measured (default: epoch 0 "
                             "and up to 4 spread over the feature epochs)")
    _add_report_parser(commands)
    return parser


def _add_report_parser(commands) -> None:
    report = commands.add_parser("report", help="per-run descriptors, seed statistics with 95 %% CIs and tests "
                                                "of one factor within strata: report.md, CSVs and figures")
    report.add_argument("runs", nargs="+", metavar="RUN",
                        help="run folder, glob of run folders, or a parent folder holding run folders")
    report.add_argument("--factor", metavar="KEY", required=True,
                        help="config key whose levels are compared (loss, mixup_alpha, model, dataset, ...)")
    report.add_argument("--metrics", metavar="D[,D]", default=DEFAULT_REPORT_METRICS,
                        help=f"descriptors to compare (every descriptor is tabulated) "
                             f"(default: {DEFAULT_REPORT_METRICS})")
    report.add_argument("--strata", metavar="KEY[,KEY]", default="",
                        help="further config keys to compare within (besides the design keys dataset, model, "
                             "width, loss, mixup_alpha, ...); runs differing in any other key are refused")
    report.add_argument("--out", metavar="DIR", required=True,
                        help="folder for report.md, descriptors.csv, comparisons.csv and figures/")
    report.add_argument("--dpi", metavar="N", type=positive_int, default=REPORT_DPI,
                        help=f"resolution of the figures (default: {REPORT_DPI})")
    report.add_argument("--no-figures", action="store_true",
                        help="write report.md and the CSVs without the figures (faster, e.g. for a second factor)")


def _key_list(text: str) -> List[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def default_output(folders: List[str], file_name: str) -> str:
    """The run folder for one run; else the folder the runs share (the sweep), or the working directory."""
    if len(folders) == 1:
        return os.path.join(folders[0], file_name)
    shared = os.path.commonpath([os.path.abspath(f) for f in folders])
    return os.path.join(shared, file_name) if shared != os.path.dirname(shared) else file_name


def _groups(args, averaged: bool = True):
    """The runs and their groups; `averaged` when the command draws a group as the mean of its runs."""
    runs = load_runs(args.runs)
    by = [key.strip() for key in args.by.split(",") if key.strip()] if args.by else None
    groups = group_runs(runs, by)
    if averaged:
        check_distinct_seeds(groups)
    for note in describe_mixing(groups):
        print(note, file=sys.stderr)
    return runs, groups


def _output_path(args, runs, file_name: str) -> str:
    """--out, or the default place; checked before any drawing starts."""
    path = args.out or default_output([run.folder for run in runs], file_name)
    check_output_path(path)
    return path


def _render(build, args, runs, file_name: str) -> None:
    path = _output_path(args, runs, file_name)
    with figure_style():
        save_figure(build(), path, args.dpi)
    print(f"wrote {path}")


def command_curves(args) -> None:
    runs, groups = _groups(args)
    _render(lambda: curves_figure(groups, args.band, args.error), args, runs, "curves.png")


def command_nc(args) -> None:
    runs, groups = _groups(args)
    _render(lambda: nc_figure(groups, args.split, args.band), args, runs, f"nc_{args.split}.png")


def command_calibration(args) -> None:
    runs, groups = _groups(args, averaged=False)  # one panel per run
    _render(lambda: calibration_figure(groups, args.epoch), args, runs, "calibration.png")


def command_compare(args) -> None:
    metrics, notes = errors_for_accuracies(parse_metric_list(args.metric, args.split))
    runs, groups = _groups(args)
    check_layer_stages(metrics, runs)
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    _render(lambda: compare_figure(groups, metrics, args.band), args, runs, "compare.png")


def command_summary(args) -> None:
    metrics = parse_metric_list(args.metric, args.split)
    runs, groups = _groups(args)
    check_layer_stages(metrics, runs)
    rows = summary_rows(groups, metrics, args.epoch)
    print(format_table(rows, metrics))
    if args.csv:
        write_csv(args.csv, rows, metrics)
        print(f"wrote {args.csv}")


def triangle_options(args) -> TriangleOptions:
    """The triangle view's options, with combinations that mean nothing refused as usage errors."""
    if args.view != "triangle" and (args.theory or args.layer):
        raise UsageError(f"--theory and --layer draw on the triangle view, not --view {args.view}")
    if args.theory and args.layer:
        raise UsageError("--theory draws on the classifier plane of the last layer; it cannot go with --layer")
    if args.samples and args.layer not in (None, FEATURES):
        raise UsageError(f"--samples: the features pickle keeps the clean samples' vectors of the last layer "
                         f"only, not of {args.layer}")
    if args.mix != "mixup" and (args.view != "triangle" or args.layer):
        raise UsageError(f"--mix {args.mix} draws the classifier plane of the triangle view (its points are "
                         f"measured at the last layer only)")
    return TriangleOptions(samples=args.samples, theory=args.theory, layer=args.layer, rule=args.mix)


def command_representations(args) -> None:
    options = triangle_options(args)
    runs, groups = _groups(args, averaged=False)  # one row per run
    if args.view != "triangle":
        name = f"representations_{args.view}.png"
    elif args.layer:
        name = f"representations_{args.layer}.png"
    else:
        name = "representations_theory.png" if args.theory else "representations.png"
    _render(lambda: representations_figure(groups, args.epochs, args.view, options), args, runs, name)


def command_layers(args) -> None:
    runs, groups = _groups(args, averaged=False)  # one row per run
    _render(lambda: layers_figure(groups, args.epochs), args, runs, "layers.png")


def command_report(args) -> None:
    metrics = _key_list(args.metrics)
    if not metrics:
        raise UsageError("--metrics needs at least one descriptor")
    result = build_study(args.runs, args.factor, metrics, _key_list(args.strata))
    for path in write_report(result, args.out, None if args.no_figures else args.dpi):
        print(f"wrote {path}")


COMMANDS = {"curves": command_curves, "nc": command_nc, "calibration": command_calibration,
            "compare": command_compare, "summary": command_summary, "representations": command_representations,
            "layers": command_layers, "report": command_report}


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    except UsageError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except SystemExit as stop:  # --help prints and exits 0
        return stop.code if isinstance(stop.code, int) else EXIT_USAGE
    try:
        COMMANDS[args.command](args)
    except UsageError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except RunError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return EXIT_ERROR
    return 0


if __name__ == "__main__":
    sys.exit(main())
