"""One run on several processes: torchrun with the gloo backend on the CPU."""
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from collapse_metrics import LAYER_METRIC_KEYS, METRIC_KEYS
from distributed import DistContext, shard_indices
from helpers import CHILD_ENV, ROOT, TINY, load, rebuild_run
from train import measure

EPOCHS = 3  # batch-norm buffers of the processes drift apart only once training has run
RUN = [*TINY, "--epochs", str(EPOCHS), "--batch-size", "64", "--feature-epochs", str(EPOCHS)]
NC_TOLERANCE = 1e-6  # relative; the bar for sums taken in another order


def _torchrun(processes, out, name, *extra):
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}", "--standalone",
               os.path.join(ROOT, "main.py"), *RUN, *extra, "--out-dir", str(out), "--run-name", name]
    return subprocess.run(command, cwd=ROOT, env=CHILD_ENV, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    for processes, name, extra in ((1, "one", ()), (2, "two", ()), (2, "manifold", ("--mixup-layer", "random", "--nc-layers", "all"))):
        done = _torchrun(processes, out, name, *extra)
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
    assert document["status"] == "complete" and [r["epoch"] for r in document["epochs"]] == list(range(EPOCHS + 1))
    assert document["config"]["world_size"] == 2
    assert os.listdir(runs / "two" / "features") == [f"epoch_{EPOCHS:04d}.pkl"]


@pytest.mark.parametrize("name", ["two", "manifold"])
def test_every_logged_number_of_two_processes_is_the_checkpointed_network(runs, name):
    """After training, each process's batch-norm buffers differ; the log must still describe process 0's network."""
    folder = runs / name
    logged = load(folder / "metrics.pkl")["epochs"][-1]
    run = rebuild_run(folder)
    fields, train_means, _ = measure(run, with_nc=True)
    for key in ("train_loss", "train_acc", "test_loss", "test_acc", "test_ece"):
        assert math.isclose(fields[key], logged[key], rel_tol=NC_TOLERANCE), key
    for split in ("train", "test"):
        for key in METRIC_KEYS:
            assert math.isclose(fields["nc"][split][key], logged["nc"][split][key], rel_tol=NC_TOLERANCE), (split, key)
    for stage, metrics in (logged["nc_layers"] or {}).items():  # per-layer statistics summed over the shards
        for key in (*LAYER_METRIC_KEYS, "ncc_accuracy", "ncc_samples"):
            assert math.isclose(fields["nc_layers"][stage][key], metrics[key], rel_tol=NC_TOLERANCE), (stage, key)
    assert (logged["nc_layers"] is None) == (name == "two")
    # The features pickle and the mixup geometry come from that same network.
    pickled = load(folder / "features" / f"epoch_{EPOCHS:04d}.pkl")
    payload, geometry = run.capture.capture(run.model, EPOCHS, train_means, run.eval_autocast)
    for got, want in ((payload["H"], pickled["H"]), (payload["mixup"]["H"], pickled["mixup"]["H"]),
                      (payload["class_means"], pickled["class_means"])):
        np.testing.assert_allclose(got, want, rtol=NC_TOLERANCE, atol=1e-9)
    for key in ("same_class_alignment", "diff_class_nonlinearity"):
        assert math.isclose(geometry[key], logged["mixup_geometry"][key], rel_tol=NC_TOLERANCE), key


@pytest.mark.parametrize("n,world", [(10, 3), (9, 3), (1347, 2)])
def test_shards_partition_the_split_or_pad_it_evenly(n, world):
    exact = [shard_indices(n, DistContext(rank, world), pad=False) for rank in range(world)]
    assert sorted(torch.cat(exact).tolist()) == list(range(n))
    padded = [shard_indices(n, DistContext(rank, world), pad=True) for rank in range(world)]
    assert len({len(s) for s in padded}) == 1 and set(torch.cat(padded).tolist()) == set(range(n))
