"""One run on several processes: torchrun with the gloo backend on the CPU."""
import math
import os
import subprocess
import sys

import pytest
import torch

from collapse_metrics import METRIC_KEYS
from distributed import DistContext, shard_indices
from helpers import CHILD_ENV, ROOT, TINY, load

RUN = [*TINY, "--epochs", "2", "--batch-size", "64", "--feature-epochs", "2"]
NC_TOLERANCE = 1e-6  # relative; the bar for sums taken in another order


def _torchrun(processes, out, name):
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}", "--standalone",
               os.path.join(ROOT, "main.py"), *RUN, "--out-dir", str(out), "--run-name", name]
    return subprocess.run(command, cwd=ROOT, env=CHILD_ENV, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    for processes, name in ((1, "one"), (2, "two")):
        done = _torchrun(processes, out, name)
        assert done.returncode == 0, done.stderr
    return out


def test_two_processes_measure_the_same_epoch_zero_nc(runs):
    one = load(runs / "one" / "metrics.pkl")["epochs"][0]["nc"]
    two = load(runs / "two" / "metrics.pkl")["epochs"][0]["nc"]
    for split in ("train", "test"):
        assert one[split]["num_samples"] == two[split]["num_samples"]  # the shards add up to the split
        for key in METRIC_KEYS:
            assert math.isclose(one[split][key], two[split][key], rel_tol=NC_TOLERANCE, abs_tol=1e-12), key


def test_only_the_main_process_writes_and_the_run_completes(runs):
    written = [os.path.join(root, f) for root, _, files in os.walk(runs / "two") for f in files]
    assert sum(f.endswith("metrics.pkl") for f in written) == 1
    document = load(runs / "two" / "metrics.pkl")
    assert document["status"] == "complete" and [r["epoch"] for r in document["epochs"]] == [0, 1, 2]
    assert document["config"]["world_size"] == 2
    assert os.listdir(runs / "two" / "features") == ["epoch_0002.pkl"]


@pytest.mark.parametrize("n,world", [(10, 3), (9, 3), (1347, 2)])
def test_shards_partition_the_split_or_pad_it_evenly(n, world):
    exact = [shard_indices(n, DistContext(rank, world), pad=False) for rank in range(world)]
    assert sorted(torch.cat(exact).tolist()) == list(range(n))
    padded = [shard_indices(n, DistContext(rank, world), pad=True) for rank in range(world)]
    assert len({len(s) for s in padded}) == 1 and set(torch.cat(padded).tolist()) == set(range(n))
