"""End to end: a short digits run writes the run folder that DESIGN.md describes."""
import json
import os
import pickle
import signal

import numpy as np
import pytest

from collapse_metrics import METRIC_KEYS
from helpers import TINY, load, run_main
from plotting.loading import load_pickle

RECORD_KEYS = {"epoch", "lr", "time_s", "nc_time_s", "train_loss", "train_acc", "test_loss", "test_acc",
               "test_ece", "test_calibration", "nc", "mixup_loss", "mixup_acc", "status"}
FEATURE_KEYS = {"epoch", "H", "y", "class_means", "W", "b", "mixup"}
MIXUP_KEYS = {"H", "y_a", "y_b", "lam"}
EPOCHS = 3
DIGITS_TRAIN = 1347  # the fixed 75 % training split of the 1797 digits


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    code = run_main([*TINY, "--epochs", str(EPOCHS), "--out-dir", str(out), "--run-name", "r",
                     "--feature-epochs", "0,3", "--feature-samples-per-class", "0"])
    assert code == 0
    return os.path.join(out, "r")


def test_metrics_pickle_is_schema_complete(run_folder):
    document = load(os.path.join(run_folder, "metrics.pkl"))
    assert document["schema_version"] == 1 and document["status"] == "complete"
    assert [r["epoch"] for r in document["epochs"]] == list(range(EPOCHS + 1))
    for record in document["epochs"]:
        assert RECORD_KEYS <= set(record)
        assert 0 <= record["train_acc"] <= 1 and 0 <= record["test_acc"] <= 1
        for split in ("train", "test"):
            metrics = record["nc"][split]
            assert set(METRIC_KEYS) <= set(metrics)
            assert all(np.isfinite(metrics[key]) for key in METRIC_KEYS)
        assert "nc4_train_means" in record["nc"]["test"]
    assert document["epochs"][0]["mixup_loss"] is None
    assert document["epochs"][-1]["train_acc"] > 0.5  # it learned something in three epochs


def test_config_holds_resolved_flags_and_environment(run_folder):
    config = load(os.path.join(run_folder, "metrics.pkl"))["config"]
    for key in ("dataset", "model", "loss", "mixup_alpha", "seed", "lr", "weight_decay", "epochs",
                "torch_version", "device_name", "feature_classes", "flags", "command"):
        assert key in config, key
    assert config["model"] == "mlp" and config["weight_decay"] == 1e-2  # the digits recipe
    assert isinstance(config["torch_version"], str)
    with open(os.path.join(run_folder, "config.json")) as handle:
        assert json.load(handle)["dataset"] == "digits"


def test_features_pickles_hold_the_documented_arrays(run_folder):
    names = sorted(os.listdir(os.path.join(run_folder, "features")))
    assert names == ["epoch_0000.pkl", "epoch_0003.pkl"]
    payload = load(os.path.join(run_folder, "features", names[-1]))
    assert FEATURE_KEYS <= set(payload) and MIXUP_KEYS <= set(payload["mixup"])
    assert payload["H"].shape == (DIGITS_TRAIN, payload["W"].shape[1])  # 0 = every training sample
    assert payload["class_means"].shape == payload["W"].shape == (10, payload["H"].shape[1])
    assert np.bincount(payload["y"], minlength=10).sum() == DIGITS_TRAIN


def test_pickles_hold_only_builtins_and_numpy(run_folder):
    # The restricted unpickler refuses every other global (it is tested in test_utils).
    for path in [os.path.join(run_folder, "metrics.pkl"),
                 *[os.path.join(run_folder, "features", n) for n in os.listdir(os.path.join(run_folder, "features"))]]:
        assert load_pickle(path) is not None


def test_logged_numbers_agree_with_the_pickled_features(run_folder):
    # The record's accuracy and class means come from the same clean features the pickle holds.
    payload = load(os.path.join(run_folder, "features", "epoch_0003.pkl"))
    record = load(os.path.join(run_folder, "metrics.pkl"))["epochs"][-1]
    H = payload["H"].astype(np.float64)
    predicted = (H @ payload["W"].T + payload["b"]).argmax(axis=1)
    assert (predicted == payload["y"]).mean() == pytest.approx(record["train_acc"], abs=1 / DIGITS_TRAIN)
    means = np.stack([H[payload["y"] == c].mean(axis=0) for c in range(10)])
    np.testing.assert_allclose(payload["class_means"], means, rtol=1e-10, atol=1e-12)


def test_default_run_prints_folder_and_plot_command(tmp_path, capsys):
    assert run_main([*TINY, "--epochs", "1", "--out-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    folder = os.path.join(str(tmp_path), "digits_mlp_cross_entropy_a1_s0")
    assert f"run folder: {folder}" in out and f"python utils.py curves {folder}" in out


def test_paper_command_without_data_says_how_to_fetch_it(tmp_path, capsys):
    argv = ["--dataset", "cifar10", "--model", "resnet18", "--loss", "cross_entropy", "--mixup-alpha", "1",
            "--epochs", "500", "--data-dir", str(tmp_path / "data"), "--out-dir", str(tmp_path / "runs")]
    assert run_main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--download" in err[0] and str(tmp_path / "data") in err[0]
    assert not (tmp_path / "runs").exists()


def test_run_gives_the_signal_handlers_back(tmp_path):
    before = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    assert run_main([*TINY, "--epochs", "1", "--out-dir", str(tmp_path)]) == 0
    assert {signum: signal.getsignal(signum) for signum in before} == before


def test_milestones_never_fall_before_the_first_epoch(tmp_path):
    assert run_main([*TINY, "--epochs", "1", "--out-dir", str(tmp_path), "--lr", "0.05"]) == 0
    document = load(os.path.join(tmp_path, "digits_mlp_cross_entropy_a1_s0", "metrics.pkl"))
    assert [r["lr"] for r in document["epochs"]] == [0.05, 0.05]  # 0.3 x 1 epoch rounds to 0: kept at 1
