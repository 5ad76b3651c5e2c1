"""The GPU training path's pieces, exercised on the CPU: bf16 autocast, channels_last, the benchmark."""
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from helpers import CHILD_ENV, ROOT, TINY, load, run_main


@pytest.mark.parametrize("model", ["resnet18", "vit_tiny_4"])
def test_bf16_autocast_and_channels_last_train_on_cpu(tmp_path, model):
    argv = [*TINY, "--model", model, "--width", "0.125", "--epochs", "1", "--amp", "--channels-last",
            "--samples-per-class", "20", "--batch-size", "50", "--out-dir", str(tmp_path), "--run-name", "r"]
    assert run_main(argv) == 0
    document = load(os.path.join(tmp_path, "r", "metrics.pkl"))
    assert document["config"]["amp"] is True and document["config"]["channels_last"] is True
    last = document["epochs"][-1]
    assert np.isfinite(last["mixup_loss"]) and np.isfinite(last["nc"]["train"]["nc1"])


def test_fixed_batch_shape_drops_only_the_ragged_batch(tmp_path):
    # --compile needs a fixed shape; without torch.compile itself this checks the batching it relies on.
    from data.batches import Normalizer, TrainBatches
    import torch

    images = torch.zeros(10, 1, 4, 4, dtype=torch.uint8)
    normalize = Normalizer(torch.zeros(1), torch.ones(1), "cpu", channels_last=False)
    batches = TrainBatches(images, torch.arange(10), 4, normalize, torch.Generator().manual_seed(0),
                           augment=False, drop_last=True)
    assert [len(y) for _, y in batches] == [4, 4]


def test_throughput_bench_prints_its_figures():
    command = [sys.executable, os.path.join(ROOT, "bench", "throughput.py"), "--model", "resnet18", "--width",
               "0.0625", "--num-train", "256", "--batch-size", "64", "--epochs", "1", "--classic-steps", "2",
               "--workers", "0", "--device", "cpu", "--data-dir", os.path.join(ROOT, "no-such-dir")]
    done = subprocess.run(command, cwd=ROOT, env=CHILD_ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert "synthetic data" in lines[0]
    assert any(line.startswith("project NC pass:") for line in lines)
    speedup = re.fullmatch(r"speedup: ([0-9.]+)", lines[-1])
    assert speedup and float(speedup.group(1)) > 0
