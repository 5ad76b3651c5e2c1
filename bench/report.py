"""The speed table and the paper grid's GPU-hours, from bench/throughput.py's --json records.

    python bench/report.py results.jsonl [more.jsonl ...]
    python bench/report.py results.jsonl --eval-precision tf32     # the grid with another measurement forward

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
import os
import sys
from typing import Dict, List

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cli import PAPER_RECIPE, default_feature_epochs  # noqa: E402

GRID_MODELS = ("wrn40_10", "vit_b_4")
GRID_DATASETS = {"cifar10": (50000, 10000), "cifar100": (50000, 10000), "fashionmnist": (60000, 10000)}
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
            extras.setdefault(record["model"], {**{key: record[key] for key in EXTRA_KEYS}, "full_nc_s": nc_s})
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
    for line in table(records) + [""] + grid_estimate(records, eval_precision=args.eval_precision):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
