"""Helpers shared by the end-to-end tests: tiny runs of main.py, in process or as a child."""
import contextlib
import math
import os
import pickle
import shlex
import subprocess
import sys

import torch

import main
from cli import parse_args
from data import DATASETS
from distributed import DistContext
from run_io import read_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A digits run that finishes in about a second: a 26-unit MLP.
TINY = ["--dataset", "digits", "--width", "0.1", "--no-progress"]
TIMING_KEYS = ("time_s", "nc_time_s")
# One thread: results bit-identical whatever else the machine runs.
CHILD_ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def run_main(argv):
    """main.main(argv) as an exit code, including argparse's own exits."""
    try:
        return main.main(list(argv))
    except SystemExit as stop:
        return stop.code


@contextlib.contextmanager
def one_torch_thread():
    """One torch thread inside, the caller's count restored after: tiny tensors gain nothing from
    intra-op threads, which only add synchronisation (and wait for cores on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def train_runs(root, runs: dict, common_flags) -> None:
    """main.py once per {run name: flags} into root, on one torch thread."""
    with one_torch_thread():
        for name, flags in runs.items():
            assert main.main(["--out-dir", str(root), "--run-name", name, *flags, *common_flags]) == 0


def spawn_main(argv, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, os.path.join(ROOT, "main.py"), *argv], cwd=ROOT, env=CHILD_ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def load(path):
    with open(path, "rb") as handle:
        return pickle.load(handle)


def without_timings(value):
    """A record tree with timings dropped and NaN made comparable (NaN != NaN)."""
    if isinstance(value, dict):
        return {k: without_timings(v) for k, v in value.items() if k not in TIMING_KEYS}
    if isinstance(value, list):
        return [without_timings(v) for v in value]
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    return value


def rebuild_run(folder):
    """A finished run rebuilt in this one process from its command, with the network its checkpoint saved."""
    argv = shlex.split(load(os.path.join(folder, "metrics.pkl"))["config"]["command"])[2:]
    args = parse_args(argv)
    info = DATASETS[args.dataset][0]
    device = torch.device("cpu")
    main.resolve_defaults(args, info, device)
    train, test = main.load_data(args, info)
    run = main.build_run(args, info, train, test, device, DistContext())
    run.model.load_state_dict(read_checkpoint(os.path.join(folder, "checkpoint.pt"))["model"])
    return run
