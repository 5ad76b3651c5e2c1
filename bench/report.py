"""The speed table and the paper grid's GPU-hours, from bench/throughput.py's --json records.

    python bench/report.py results.jsonl [more.jsonl ...]
    python bench/report.py results.jsonl --eval-precision tf32     # the grid with another measurement forward

The last section prints the grid at main.py's new defaults, term by term beside the old ones:
NC passes at the --nc-epochs log schedule in TF32 (--eval-precision auto), each with its
rounding-floor sample forwarded in TF32 and float32, float32 re-measures assumed for every pass
from REMEASURE_FROM of the run on (where NC1 may come within 100x of the TF32 floor; the floor
itself has not been measured on a GPU), the test split alone in TF32 at the other epochs, and a
checkpoint every 10 minutes of the run's wall time plus the final one. It is derived from the
measured terms, not measured as a whole.

Table: one row per model and path. Grid: for every path measured on both of the grid's
architectures, the GPU-hours of the 180-run grid (docs/grid.md),
with the arithmetic. A run of E epochs costs
    E x (training epoch + NC pass) + NC pass (epoch 0) + F x feature snapshot + E x checkpoint write
(main.py measures NC every epoch, snapshots features at F log-spaced epochs and writes a
checkpoint every epoch by default). The NC pass, snapshot and checkpoint are measured once
per model, on its first path. Records of CIFAR-shaped data stand for cifar10, cifar100 and
fashionmnist alike, scaled by image count (60,000 + 10,000 fashionmnist images against
50,000 + 10,000 CIFAR ones): an upper bound for fashionmnist, whose 28x28x1 images cost less.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Dict, List

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cli import (DEFAULT_CUDA_CHECKPOINT_EVERY, PAPER_RECIPE, default_feature_epochs, duration_seconds,  # noqa: E402
                 nc_epoch_schedule)
from train import FLOOR_SAMPLE_PER_CLASS  # noqa: E402

GRID_MODELS = ("wrn40_10", "vit_b_4")
GRID_DATASETS = {"cifar10": (50000, 10000), "cifar100": (50000, 10000), "fashionmnist": (60000, 10000)}
GRID_CLASSES = {"cifar10": 10, "cifar100": 100, "fashionmnist": 10}
# The new defaults' assumption: every NC pass from this fraction of the run on (the second
# learning-rate drop of the 0.3, 0.5, 0.9 schedule, where the terminal phase sets in) is redone
# in float32. 8 of the 54 passes of a 350-epoch run.
REMEASURE_FROM = 0.5
# Not measured: the host copy of the state after each epoch whose checkpoint is not written
# (kept for a stop request), assumed at this many GB/s (pageable device-to-host copies).
HOST_COPY_GB_S = 10.0
RUNS_PER_CELL = 30  # 5 losses x 2 mixup settings x 3 seeds, per architecture and dataset
EXTRA_KEYS = ("full_nc_s", "feature_snapshot_s", "checkpoint_s")
FORWARD_KEYS = {"float32": "full_eval_forward_fp32_s", "tf32": "full_eval_forward_tf32_s",
                "bf16": "full_eval_forward_bf16_s"}  # the measured parts of the NC pass, per --eval-precision


def load_records(paths: List[str]) -> List[dict]:
    records = []
    for path in paths:
        with open(path) as handle:
            records += [json.loads(line) for line in handle if line.strip()]
    return records


def with_model_extras(records: List[dict], eval_precision: str = "float32") -> List[dict]:
    """Each record with its model's NC pass, snapshot and checkpoint costs (measured on one path per model).

    The NC pass is measured with main.py's default float32 forward; for another --eval-precision
    its forward is swapped for that precision's measured one (the snapshot keeps its float32
    forward: an upper bound).
    """
    extras: Dict[str, dict] = {}
    for record in records:
        if "full_nc_s" in record:
            nc_s = record["full_nc_s"] - record[FORWARD_KEYS["float32"]] + record[FORWARD_KEYS[eval_precision]]
            measured = {key: record[key] for key in (*EXTRA_KEYS, *FORWARD_KEYS.values()) if key in record}
            measured["checkpoint_gb"] = record.get("checkpoint_gb", 0.0)
            extras.setdefault(record["model"], {**measured, "full_nc_s": nc_s, "full_nc_float32_s": record["full_nc_s"]})
    return [{**record, **extras.get(record["model"], {})} for record in records]


def _mfu(record) -> str:
    return f"{100 * record['mfu']:.1f} %" if record.get("mfu") is not None else "n/a"


def _compile(record) -> str:
    if not record.get("compile_mode"):
        return ""
    return f"{record['compile_s']:.0f} s" + ("" if record.get("compile_active") else " (fell back to eager)")


def table(records: List[dict]) -> List[str]:
    lines = ["| model | path | s / epoch | img/s | GFLOP/img (train) | TFLOP/s | MFU | compile | NC pass | device |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in records:
        nc = f"{r['full_nc_s']:.2f} s" if "full_nc_s" in r else ""  # measured once per model
        lines.append(f"| {r['model']} | {r['path']} | {r['full_epoch_s']:.2f} | {r['img_s']:,.0f} | "
                     f"{r['flops_per_image'] / 1e9:.3g} | {r['tflops']:.1f} | {_mfu(r)} | {_compile(r)} | {nc} | "
                     f"{r['device']} |")
    return lines


def run_seconds(record: dict, dataset: str, epochs: int, feature_epochs: int) -> tuple:
    """(seconds of one run, the arithmetic as text), scaling the CIFAR-shaped record to `dataset`'s size."""
    train_images, test_images = GRID_DATASETS[dataset]
    base_train, base_test = GRID_DATASETS["cifar10"]
    train_s = record["full_epoch_s"] * train_images / base_train
    nc_s = record["full_nc_s"] * (train_images + test_images) / (base_train + base_test)
    total = epochs * (train_s + nc_s) + nc_s + feature_epochs * record["feature_snapshot_s"] \
        + epochs * record["checkpoint_s"]
    text = (f"{epochs} x ({train_s:.2f} + {nc_s:.2f}) + {nc_s:.2f} + {feature_epochs} x "
            f"{record['feature_snapshot_s']:.2f} + {epochs} x {record['checkpoint_s']:.2f} = {total:,.0f} s")
    return total, text


def grid_estimate(records: List[dict], epochs: int = PAPER_RECIPE["epochs"], eval_precision: str = "float32") -> List[str]:
    feature_epochs = len(default_feature_epochs(epochs))
    complete = [r for r in with_model_extras(records, eval_precision) if all(key in r for key in EXTRA_KEYS)]
    paths = [p for p in dict.fromkeys(r["path"] for r in complete)
             if all(any(r["model"] == m and r["path"] == p for r in complete) for m in GRID_MODELS)]
    lines = []
    for path in paths:
        lines.append(f"grid on the {path} path, {eval_precision} measurement ({epochs} epochs, {feature_epochs} "
                     f"feature snapshots, a checkpoint every epoch, {RUNS_PER_CELL} runs per architecture and dataset):")
        total_hours = 0.0
        for model in GRID_MODELS:
            record = next(r for r in complete if r["model"] == model and r["path"] == path)
            for dataset in GRID_DATASETS:
                seconds, text = run_seconds(record, dataset, epochs, feature_epochs)
                hours = seconds * RUNS_PER_CELL / 3600
                total_hours += hours
                lines.append(f"  {model:<9} {dataset:<13} {text} per run; x {RUNS_PER_CELL} / 3600 = {hours:.1f} h")
        lines.append(f"  all 180 runs: {total_hours:.0f} GPU-hours on {complete[0]['device']}")
    return lines


def new_default_terms(record: dict, dataset: str, epochs: int) -> List[tuple]:
    """(term, count, seconds each) of one run at the new defaults, from the float32-path record."""
    train_images, test_images = GRID_DATASETS[dataset]
    base_train, base_test = GRID_DATASETS["cifar10"]
    scale = (train_images + test_images) / (base_train + base_test)
    tf32, fp32 = record[FORWARD_KEYS["tf32"]], record[FORWARD_KEYS["float32"]]
    tf32_pass = (record["full_nc_float32_s"] - fp32 + tf32) * scale
    sample_share = FLOOR_SAMPLE_PER_CLASS * GRID_CLASSES[dataset] / (base_train + base_test)
    features = default_feature_epochs(epochs)
    schedule = nc_epoch_schedule("log", epochs, features)
    remeasured = [e for e in schedule if e >= REMEASURE_FROM * epochs]
    terms = [("training epochs", epochs, record["full_epoch_s"] * train_images / base_train),
             ("NC passes, tf32", len(schedule), tf32_pass),
             ("floor samples, tf32 + float32", len(schedule), (tf32 + fp32) * sample_share),
             (f"float32 re-measures (passes at epochs >= {REMEASURE_FROM:g} E, assumed)", len(remeasured),
              record["full_nc_float32_s"] * scale),
             ("test split alone, tf32 (epochs without NC)", epochs + 1 - len(schedule),
              tf32 * test_images / (base_train + base_test)),
             ("feature snapshots", len(features), record["feature_snapshot_s"])]
    before_checkpoints = sum(count * each for _, count, each in terms)
    writes = math.ceil(before_checkpoints / duration_seconds(DEFAULT_CUDA_CHECKPOINT_EVERY)) + 1  # + the final one
    return terms + [(f"checkpoints ({DEFAULT_CUDA_CHECKPOINT_EVERY} of wall time, and the last)", writes,
                     record["checkpoint_s"]),
                    (f"host copies of unwritten states ({HOST_COPY_GB_S:g} GB/s, assumed)", epochs - writes,
                     record["checkpoint_gb"] / HOST_COPY_GB_S)]


def old_default_terms(record: dict, dataset: str, epochs: int) -> List[tuple]:
    """(term, count, seconds each) of one run at the old defaults: float32 NC every epoch, a checkpoint per epoch."""
    train_images, test_images = GRID_DATASETS[dataset]
    base_train, base_test = GRID_DATASETS["cifar10"]
    scale = (train_images + test_images) / (base_train + base_test)
    return [("training epochs", epochs, record["full_epoch_s"] * train_images / base_train),
            ("NC passes, float32", epochs + 1, record["full_nc_float32_s"] * scale),
            ("feature snapshots", len(default_feature_epochs(epochs)), record["feature_snapshot_s"]),
            ("checkpoints (every epoch)", epochs, record["checkpoint_s"])]


def _terms_text(terms: List[tuple]) -> List[str]:
    return [f"      {name}: {count} x {each:.2f} s = {count * each:,.0f} s" for name, count, each in terms]


def defaults_comparison(records: List[dict], path: str = "compile-reduce-overhead",
                        epochs: int = PAPER_RECIPE["epochs"]) -> List[str]:
    """The grid before (float32 NC every epoch, a checkpoint per epoch) and after (main.py's new defaults)."""
    complete = [r for r in with_model_extras(records) if all(key in r for key in EXTRA_KEYS) and r["path"] == path]
    if {r["model"] for r in complete} < set(GRID_MODELS):
        return [f"no {path} records of both {', '.join(GRID_MODELS)}: no comparison of defaults"]
    lines = [f"grid at the old and the new defaults ({path} training, {epochs} epochs, {RUNS_PER_CELL} runs per "
             f"cell; derived from the measured terms, not measured as a whole):"]
    totals = {"old": 0.0, "new": 0.0}
    by_term = {"old": {}, "new": {}}  # GPU-hours of each term over the whole grid
    for model in GRID_MODELS:
        record = next(r for r in complete if r["model"] == model)
        for dataset in GRID_DATASETS:
            for label, terms in (("old", old_default_terms(record, dataset, epochs)),
                                 ("new", new_default_terms(record, dataset, epochs))):
                seconds = sum(count * each for _, count, each in terms)
                hours = seconds * RUNS_PER_CELL / 3600
                totals[label] += hours
                for name, count, each in terms:
                    by_term[label][name] = by_term[label].get(name, 0.0) + count * each * RUNS_PER_CELL / 3600
                lines.append(f"  {model} {dataset}, {label} defaults: {seconds:,.0f} s per run; "
                             f"x {RUNS_PER_CELL} / 3600 = {hours:.1f} h")
                lines += _terms_text(terms)
    for label in ("old", "new"):
        lines.append(f"  the grid by term, {label} defaults:")
        lines += [f"      {name}: {hours:.1f} h" for name, hours in by_term[label].items()]
    lines.append(f"  all 180 runs: {totals['old']:.0f} GPU-hours at the old defaults, {totals['new']:.0f} at the "
                 f"new ones, on {complete[0]['device']}")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="report.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="+", metavar="RESULTS.jsonl", help="bench/throughput.py --json records")
    parser.add_argument("--eval-precision", choices=sorted(FORWARD_KEYS), default="float32", metavar="P",
                        help="measurement forward of the grid estimate: float32 (main.py's default), tf32 or bf16")
    args = parser.parse_args(argv)
    try:
        records = load_records(args.results)
    except (OSError, ValueError) as error:
        print(f"report.py: error: {error}", file=sys.stderr)
        return 1
    lines = table(records) + [""] + grid_estimate(records, eval_precision=args.eval_precision)
    for line in lines + [""] + defaults_comparison(records):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
