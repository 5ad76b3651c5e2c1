"""Where and how NC is measured: the log schedule, the rounding floor, auto precision, wall-time checkpoints."""
import itertools
import math
import os
import signal

import pytest
import torch

import cli
import run_io
import train
from cli import default_feature_epochs, log_nc_epochs, nc_epoch_schedule
from collapse_metrics import nc1_floor, nc_metrics
from helpers import TINY, load, one_torch_thread, run_main, without_timings

# The epoch_list of Papyan, Han & Donoho's notebook (50 epochs of 350).
PAPYAN_EPOCHS = [*range(1, 15), 16, 17, 19, 20, 22, 24, 27, 29, 32, 35, 38, 42, 45, 50, 54, 59, 65, 71, 77, 85,
                 92, 101, 110, 121, 132, 144, 158, 172, 188, 206, 225, 245, 268, 293, 320, 350]


def test_log_schedule_is_papyans_list_at_350_epochs():
    assert log_nc_epochs(350) == PAPYAN_EPOCHS
    assert nc_epoch_schedule("log", 350, []) == [0, *PAPYAN_EPOCHS]


@pytest.mark.parametrize("epochs", [1, 7, 50, 51, 120, 349, 1000])
def test_log_schedule_holds_0_the_last_and_every_feature_epoch(epochs):
    features = default_feature_epochs(epochs)
    schedule = nc_epoch_schedule("log", epochs, features)
    assert all(a < b for a, b in zip(schedule, schedule[1:]))
    assert schedule[0] == 0 and schedule[-1] == epochs and set(features) <= set(schedule)
    assert len(log_nc_epochs(epochs)) == min(epochs, cli.LOG_NC_EPOCH_COUNT)


def test_every_and_list_schedules():
    assert nc_epoch_schedule("every:4", 10, [3]) == [0, 3, 4, 8, 10]
    assert nc_epoch_schedule("2,5,40", 10, []) == [0, 2, 5, 10]  # 40 waits for a longer --epochs
    assert nc_epoch_schedule("all", 3, []) == [0, 1, 2, 3]


@pytest.mark.parametrize("flags, phrase", [
    (["--nc-every", "5"], "--nc-epochs every:5"),
    (["--nc-epochs", "every:0"], "K >= 1"),
    (["--nc-epochs", "often"], "--nc-epochs"),
    (["--checkpoint-every", "10mins"], "duration"),
    (["--checkpoint-every", "0s"], "duration"),
])
def test_bad_schedule_flags_get_one_line(tmp_path, capsys, flags, phrase):
    assert run_main([*TINY, "--out-dir", str(tmp_path), *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and phrase in err[0]
    assert not os.listdir(tmp_path)


def test_checkpoint_every_reads_epochs_and_durations():
    assert cli.checkpoint_policy(3) == (3, None)
    assert cli.checkpoint_policy("10min") == (None, 600.0)
    assert cli.checkpoint_policy("1.5h") == (None, 5400.0)
    assert cli.checkpoint_policy("45s") == (None, 45.0)


def _planted(seed, per_class=200, C=5, d=8, noise_scale=0.1):
    """Class means, labels and a noise covariance Sigma = L L^T, with L of the given scale."""
    gen = torch.Generator().manual_seed(seed)
    means = 3.0 * torch.randn(C, d, generator=gen, dtype=torch.float64)
    L = noise_scale * torch.randn(d, d, generator=gen, dtype=torch.float64)
    y = torch.arange(C).repeat_interleave(per_class)
    return gen, means, L, y


def _analytic_floor(means, L):
    M = means - means.mean(dim=0)
    sigma_b = M.T @ M / means.shape[0]
    return float(torch.trace(L @ L.T @ torch.linalg.pinv(sigma_b))) / means.shape[0]


@pytest.mark.parametrize("seed", [0, 1])
def test_floor_of_planted_noise_is_the_analytic_one(seed):
    gen, means, L, y = _planted(seed)
    # Gaussian noise of covariance L L^T, plus a per-class offset that moves class means, not the spread
    offsets = torch.randn(means.shape, generator=gen, dtype=torch.float64)
    D = torch.randn(len(y), means.shape[1], generator=gen, dtype=torch.float64) @ L.T + offsets[y]
    analytic = _analytic_floor(means, L)
    assert nc1_floor(D, y, means) == pytest.approx(analytic, rel=0.10)
    # ... and it is what that noise alone does to nc1 (the same pseudo-inverse convention)
    H = means[y] + torch.randn(len(y), means.shape[1], generator=gen, dtype=torch.float64) @ L.T
    assert nc_metrics(H, y, torch.eye(means.shape[0], means.shape[1], dtype=torch.float64))["nc1"] == \
        pytest.approx(analytic, rel=0.10)


def test_floor_edge_cases():
    _, means, L, y = _planted(0, per_class=4)
    assert nc1_floor(torch.zeros(len(y), means.shape[1]), y, means) == 0.0
    coincident = means[:1].expand(len(means), -1)  # Sigma_B = 0: no floor exists
    assert math.isnan(nc1_floor(torch.randn(len(y), means.shape[1], dtype=torch.float64), y, coincident))
    assert math.isnan(nc1_floor(torch.full((len(y), means.shape[1]), math.nan), y, means))


AUTO_RUN = [*TINY, "--epochs", "4", "--feature-epochs", "2"]


def _auto_records(tmp_path, name, margin, monkeypatch, precision="auto"):
    monkeypatch.setitem(train.AUTO_FAST_PRECISION, "cpu", "bf16")  # the tests' fast path
    monkeypatch.setattr(train, "FLOOR_MARGIN", margin)
    assert run_main([*AUTO_RUN, "--out-dir", str(tmp_path), "--run-name", name, "--eval-precision", precision]) == 0
    return load(os.path.join(tmp_path, name, "metrics.pkl"))["epochs"]


def test_auto_redoes_a_pass_in_float32_only_near_its_floor(tmp_path, monkeypatch):
    exact = _auto_records(tmp_path, "exact", 100.0, monkeypatch, precision="float32")
    fast = _auto_records(tmp_path, "fast", train.FLOOR_MARGIN, monkeypatch)  # the real margin, 100
    assert all(r["eval_precision"] == "bf16" and r["nc"]["train"]["nc1"] > 100 * r["nc1_floor"] > 0 for r in fast)
    assert all(r["eval_precision"] == "float32" and r["nc1_floor"] is None for r in exact)
    assert all(f["nc"]["train"]["nc1"] != e["nc"]["train"]["nc1"] for f, e in zip(fast, exact))  # bf16 differs
    # A margin between the passes' own NC1 / floor ratios: those below it, and only those, are redone in float32
    ratios = [r["nc"]["train"]["nc1"] / r["nc1_floor"] for r in fast]
    low, high = sorted(ratios)[1:3]
    margin = math.sqrt(low * high)
    mixed = _auto_records(tmp_path, "mixed", margin, monkeypatch)
    for record, ratio, fast_record, exact_record in zip(mixed, ratios, fast, exact):
        redone = ratio < margin
        assert record["eval_precision"] == ("float32" if redone else "bf16")
        assert record["nc1_floor"] == fast_record["nc1_floor"]  # the floor of the fast pass, either way
        assert record["nc"] == (exact_record if redone else fast_record)["nc"]
    assert 0 < sum(ratio < margin for ratio in ratios) < len(ratios)


def test_auto_is_float32_on_a_cpu(tmp_path):
    assert run_main([*AUTO_RUN, "--out-dir", str(tmp_path), "--run-name", "r"]) == 0
    document = load(os.path.join(tmp_path, "r", "metrics.pkl"))
    assert document["config"]["eval_precision"] == "auto"
    assert document["config"]["eval_precision_resolved"] == "float32"
    assert {(r["eval_precision"], r["nc1_floor"]) for r in document["epochs"]} == {("float32", None)}


# Eight epochs measured at the log schedule of a 4-epoch count (1, 2, 4, 8), plus epoch 0 and feature epoch 3,
# with a checkpoint after the first epoch ending 2 s of the fake clock after the last one.
WALL_TIME_RUN = [*TINY, "--epochs", "8", "--nc-epochs", "log", "--feature-epochs", "3", "--checkpoint-every", "2s"]


@pytest.fixture(autouse=True)
def one_thread():
    with one_torch_thread():
        yield


@pytest.fixture
def wall_clock(monkeypatch):
    """A clock that advances one second per reading, and the epochs of the checkpoints written."""
    ticks = itertools.count()
    monkeypatch.setattr(train, "checkpoint_clock", lambda: float(next(ticks)))
    monkeypatch.setattr(cli, "LOG_NC_EPOCH_COUNT", 4)
    written = []
    real_write = run_io.RunLog.write_checkpoint

    def recording_write(log, state):
        written.append(state["epoch"])
        real_write(log, state)

    monkeypatch.setattr(run_io.RunLog, "write_checkpoint", recording_write)
    return written


def test_resume_under_log_schedule_and_wall_time_checkpoints_is_bit_identical(tmp_path, monkeypatch, wall_clock):
    argv = [*WALL_TIME_RUN, "--out-dir", str(tmp_path)]
    assert run_main([*argv, "--run-name", "full"]) == 0
    # the clock read after epochs 1, 2, ... and after each write: a checkpoint every other epoch
    assert wall_clock == [2, 4, 6, 8]
    full = load(os.path.join(tmp_path, "full", "metrics.pkl"))
    assert [r["epoch"] for r in full["epochs"] if r["nc"]] == [0, 1, 2, 3, 4, 8]
    assert all(r["train_loss"] is None and r["test_acc"] is not None for r in full["epochs"] if not r["nc"])

    real_epoch = train.train_one_epoch

    def stop_in_epoch_6(run, epoch):
        if epoch == 6:
            run.stop.signum = signal.SIGTERM  # as the handler does: the next step raises Interrupted
        return real_epoch(run, epoch)

    wall_clock.clear()
    monkeypatch.setattr(train, "train_one_epoch", stop_in_epoch_6)
    assert run_main([*argv, "--run-name", "cut"]) == 128 + signal.SIGTERM
    assert wall_clock == [2, 4, 5]  # epoch 5 was not due, and is saved at the stop
    assert run_io.read_checkpoint(os.path.join(tmp_path, "cut", "checkpoint.pt"))["epoch"] == 5

    monkeypatch.setattr(train, "train_one_epoch", real_epoch)
    assert run_main([*argv, "--run-name", "cut", "--resume"]) == 0
    resumed = load(os.path.join(tmp_path, "cut", "metrics.pkl"))
    assert resumed["status"] == "complete"
    assert without_timings(resumed["epochs"]) == without_timings(full["epochs"])
    path = os.path.join("features", "epoch_0003.pkl")
    got, want = load(os.path.join(tmp_path, "cut", path)), load(os.path.join(tmp_path, "full", path))
    assert (got["H"] == want["H"]).all() and (got["mixup"]["H"] == want["mixup"]["H"]).all()


def test_nc_figure_of_a_log_schedule_marks_the_measured_epochs_on_a_log_axis(tmp_path, monkeypatch, wall_clock):
    import utils
    assert run_main([*WALL_TIME_RUN, "--out-dir", str(tmp_path), "--run-name", "r"]) == 0
    figures = []
    save = utils.save_figure
    monkeypatch.setattr(utils, "save_figure", lambda figure, path, dpi: (figures.append(figure), save(figure, path, dpi)))
    assert utils.main(["nc", str(tmp_path / "r"), "--out", str(tmp_path / "nc.png"), "--dpi", "40"]) == 0
    nc1_panel = figures[-1].axes[0]
    assert nc1_panel.get_xscale() == "symlog"
    line = nc1_panel.get_lines()[0]
    assert list(line.get_xdata()) == [0, 1, 2, 3, 4, 8] and line.get_marker() == "o"
