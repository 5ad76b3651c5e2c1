"""Reliability: exact resume after any interruption, nothing overwritten, one clear line per bad input."""
import errno
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

import run_io
from helpers import CHILD_ENV, ROOT, TINY, load, run_main, spawn_main, without_timings

# 84 steps of 16 per epoch: long enough to be killed in the middle of one.
RESUMABLE = [*TINY, "--epochs", "5", "--batch-size", "16", "--feature-epochs", "1,3,5"]
CHILD_TIMEOUT_S = 240


def _argv(out, name, *extra):
    return [*RESUMABLE, "--out-dir", str(out), "--run-name", name, *extra]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run, made in a child process like the interrupted ones."""
    out = tmp_path_factory.mktemp("reference")
    child = spawn_main(_argv(out, "full"))
    _, err = child.communicate(timeout=CHILD_TIMEOUT_S)
    assert child.returncode == 0, err
    return os.path.join(out, "full")


def _wait_for_epoch(child, epoch):
    """Read the child's stdout until its summary line of `epoch` appears."""
    for line in child.stdout:
        if line.startswith(f"epoch {epoch}/"):
            return
    raise AssertionError(f"child ended before epoch {epoch}: {child.stderr.read()}")


def _resume_and_compare(out, name, reference):
    code = subprocess.run([sys.executable, os.path.join(ROOT, "main.py"), *_argv(out, name, "--resume")],
                          cwd=ROOT, env=CHILD_ENV, capture_output=True, text=True, timeout=CHILD_TIMEOUT_S)
    assert code.returncode == 0, code.stderr
    resumed = load(os.path.join(out, name, "metrics.pkl"))
    assert resumed["status"] == "complete"
    expected = load(os.path.join(reference, "metrics.pkl"))
    assert without_timings(resumed["epochs"]) == without_timings(expected["epochs"])
    for epoch in (1, 3, 5):  # the features pickles too
        path = os.path.join("features", f"epoch_{epoch:04d}.pkl")
        got, want = load(os.path.join(out, name, path)), load(os.path.join(reference, path))
        assert (got["H"] == want["H"]).all() and (got["mixup"]["H"] == want["mixup"]["H"]).all()
    assert not [f for f in os.listdir(os.path.join(out, name)) if f.startswith(run_io.TEMP_PREFIX)]
    return resumed


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_resume_after_signal_is_bit_identical(tmp_path, reference, signum):
    child = spawn_main(_argv(tmp_path, "stopped"))
    _wait_for_epoch(child, 2)
    child.send_signal(signum)
    _, err = child.communicate(timeout=CHILD_TIMEOUT_S)
    assert child.returncode == 128 + signum
    assert "--resume" in err.strip().splitlines()[-1]
    stopped = load(os.path.join(tmp_path, "stopped", "metrics.pkl"))
    assert stopped["status"] == "interrupted" and stopped["epochs"][-1]["epoch"] >= 2
    _resume_and_compare(tmp_path, "stopped", reference)


def test_resume_after_sigkill_mid_epoch_is_bit_identical(tmp_path, reference):
    child = spawn_main(_argv(tmp_path, "killed"))
    _wait_for_epoch(child, 2)
    time.sleep(0.05)  # into epoch 3's training steps
    child.kill()
    child.communicate(timeout=CHILD_TIMEOUT_S)
    assert load(os.path.join(tmp_path, "killed", "metrics.pkl"))["status"] == "running"
    _resume_and_compare(tmp_path, "killed", reference)


# A child whose fourth pickle write stops half-way with SIGKILL, as a power cut would.
KILLED_MID_WRITE = textwrap.dedent("""
    import os, pickle, signal, sys
    sys.path.insert(0, {root!r})
    real_dump, calls = pickle.dump, [0]
    def dump_then_die(obj, handle, protocol=None):
        calls[0] += 1
        if calls[0] == 4:
            data = pickle.dumps(obj, protocol=protocol)
            handle.write(data[: len(data) // 2])
            handle.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        real_dump(obj, handle, protocol=protocol)
    pickle.dump = dump_then_die
    import main
    sys.exit(main.main({argv!r}))
""")


def test_resume_after_sigkill_mid_pickle_write_is_bit_identical(tmp_path, reference):
    script = KILLED_MID_WRITE.format(root=ROOT, argv=_argv(tmp_path, "cut"))
    child = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=CHILD_ENV, capture_output=True,
                           text=True, timeout=CHILD_TIMEOUT_S)
    assert child.returncode == -signal.SIGKILL
    folder = os.path.join(tmp_path, "cut")
    assert [f for f in os.listdir(folder) if f.startswith(run_io.TEMP_PREFIX)]  # the half-written file
    survivor = load(os.path.join(folder, "metrics.pkl"))  # the previous complete copy
    assert survivor["epochs"] and survivor["status"] == "running"
    _resume_and_compare(tmp_path, "cut", reference)


def test_resume_refuses_changed_flags_and_names_them(tmp_path, capsys):
    assert run_main([*TINY, "--epochs", "1", "--out-dir", str(tmp_path), "--run-name", "r"]) == 0
    capsys.readouterr()
    code = run_main([*TINY, "--epochs", "2", "--lr", "0.2", "--loss", "mse", "--out-dir", str(tmp_path),
                     "--run-name", "r", "--resume"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "--lr 0.2 (saved 0.05)" in err[0] and "--loss 'mse' (saved 'cross_entropy')" in err[0]


@pytest.mark.parametrize("scheduler", ["cosine", "multistep", "constant"])
def test_resume_extends_a_complete_run_on_the_new_schedule(tmp_path, scheduler):
    """4 epochs extended to 8 train epochs 5-8 at the rates of a fresh 8-epoch run."""
    argv = [*TINY, "--out-dir", str(tmp_path), "--scheduler", scheduler, "--nc-epochs", "every:100", "--feature-epochs", "0"]
    assert run_main([*argv, "--run-name", "r", "--epochs", "4"]) == 0
    short = [r["lr"] for r in load(os.path.join(tmp_path, "r", "metrics.pkl"))["epochs"]]
    assert run_main([*argv, "--run-name", "r", "--epochs", "8", "--resume"]) == 0
    assert run_main([*argv, "--run-name", "fresh", "--epochs", "8"]) == 0
    extended = load(os.path.join(tmp_path, "r", "metrics.pkl"))
    fresh = [r["lr"] for r in load(os.path.join(tmp_path, "fresh", "metrics.pkl"))["epochs"]]
    assert [r["epoch"] for r in extended["epochs"]] == list(range(9)) and extended["status"] == "complete"
    lrs = [r["lr"] for r in extended["epochs"]]
    assert lrs[:5] == short  # epochs 0-4 as the 4-epoch run trained them
    assert lrs[5:] == pytest.approx(fresh[5:], rel=1e-12)  # the rest as the 8-epoch schedule says
    if scheduler != "constant":
        assert fresh[5:] != short[1:]  # the schedule does change with the length


def test_colliding_milestones_drop_the_rate_once_per_epoch(tmp_path):
    """At 5 epochs, 0.3 and 0.5 both round to epoch 2: the second drop moves to epoch 3."""
    argv = [*TINY, "--epochs", "5", "--nc-epochs", "every:100", "--feature-epochs", "0", "--out-dir", str(tmp_path),
            "--run-name", "r"]
    assert run_main(argv) == 0
    lrs = [r["lr"] for r in load(os.path.join(tmp_path, "r", "metrics.pkl"))["epochs"][1:]]
    assert lrs == pytest.approx([0.05, 0.05, 0.005, 0.0005, 0.00005], rel=1e-12)


def test_existing_run_folder_is_never_overwritten_without_a_flag(tmp_path, capsys):
    argv = [*TINY, "--epochs", "1", "--out-dir", str(tmp_path), "--run-name", "r"]
    assert run_main(argv) == 0
    folder = tmp_path / "r"
    before = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    capsys.readouterr()
    assert run_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--resume" in err[0] and "--overwrite" in err[0]
    assert {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()} == before
    assert run_main([*argv, "--overwrite"]) == 0


def test_diverged_run_stops_and_keeps_earlier_epochs(tmp_path, capsys):
    argv = [*TINY, "--epochs", "3", "--lr", "1e6", "--out-dir", str(tmp_path), "--run-name", "r"]
    assert run_main(argv) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "non-finite" in err[0]
    document = load(os.path.join(tmp_path, "r", "metrics.pkl"))
    assert document["status"] == "diverged"
    assert [r["status"] for r in document["epochs"]] == ["ok", "diverged"]
    assert document["epochs"][1]["nc"]["train"]["nan_reasons"]  # NaN metrics say why


def test_allow_nonfinite_keeps_training(tmp_path):
    argv = [*TINY, "--epochs", "2", "--lr", "1e6", "--out-dir", str(tmp_path), "--run-name", "r",
            "--allow-nonfinite"]
    assert run_main(argv) == 0
    document = load(os.path.join(tmp_path, "r", "metrics.pkl"))
    assert document["status"] == "complete" and len(document["epochs"]) == 3


def test_full_disk_keeps_the_last_good_pickle(tmp_path, capsys, monkeypatch):
    real_dump, calls = pickle.dump, [0]

    def dump_until_disk_full(obj, handle, protocol=None):
        calls[0] += 1
        if calls[0] == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_dump(obj, handle, protocol=protocol)

    monkeypatch.setattr(run_io.pickle, "dump", dump_until_disk_full)
    argv = [*TINY, "--epochs", "4", "--feature-epochs", "4", "--out-dir", str(tmp_path), "--run-name", "r"]
    assert run_main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "out of disk space" in err[0] and "metrics.pkl" in err[0]
    monkeypatch.undo()
    survivor = load(os.path.join(tmp_path, "r", "metrics.pkl"))
    assert [r["epoch"] for r in survivor["epochs"]] == [0, 1]
    assert not [f for f in os.listdir(tmp_path / "r") if f.startswith(run_io.TEMP_PREFIX)]


BAD_INPUTS = [
    (["--dataset", "imagenet"], 2, "choose from"),
    (["--model", "resnet9"], 2, "choose from"),
    (["--loss", "hinge"], 2, "choose from"),
    (["--epochs", "0"], 2, "--epochs"),
    (["--epochs", "-3"], 2, "--epochs"),
    (["--mixup-alpha", "-1"], 2, "--mixup-alpha"),
    (["--lr", "fast"], 2, "--lr"),
    (["--batch-size", "0"], 2, "--batch-size"),
    (["--batch-size", "5000"], 2, "larger than the training set"),
    (["--epochs", "3", "--feature-epochs", "1,4"], 2, "--feature-epochs"),
    (["--feature-classes", "1,2,10"], 2, "--feature-classes"),
    (["--feature-classes", "1,1,2"], 2, "--feature-classes"),
    (["--milestones", "0.5,0.3"], 2, "--milestones"),
    (["--resume", "--overwrite"], 2, "--resume"),
    (["--device", "tpu"], 2, "--device"),
    (["--seed", "-1"], 2, "--seed"),
    (["--seed", "1.5"], 2, "--seed"),
    (["--batch-size", "1"], 2, "--batch-size"),
]


@pytest.mark.parametrize("flags,code,phrase", BAD_INPUTS, ids=[" ".join(f) for f, _, _ in BAD_INPUTS])
def test_bad_input_gets_one_line_and_no_run_folder(tmp_path, capsys, flags, code, phrase):
    out = tmp_path / "runs"
    assert run_main([*TINY, "--epochs", "2", "--out-dir", str(out), *flags]) == code
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and phrase in err[0] and "Traceback" not in err[0]
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible")
def test_cuda_without_a_gpu_is_a_usage_error(tmp_path, capsys):
    assert run_main([*TINY, "--device", "cuda", "--out-dir", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no CUDA GPU" in err[0]
    assert not (tmp_path / "runs").exists()


def test_unwritable_out_dir_gets_one_line(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    assert run_main([*TINY, "--epochs", "1", "--out-dir", str(blocker / "runs")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot create run folder" in err[0]


def test_corrupt_dataset_files_get_one_line(tmp_path, capsys):
    folder = tmp_path / "data" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name in ("data_batch_1", "batches.meta", "test_batch"):
        (folder / name).write_bytes(b"not a pickle")
    code = run_main(["--dataset", "cifar10", "--epochs", "1", "--data-dir", str(tmp_path / "data"),
                     "--out-dir", str(tmp_path / "runs")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and "corrupt" in err[0]
    assert not (tmp_path / "runs").exists()


def test_a_last_batch_of_one_sample_is_dropped(tmp_path):
    """1347 digits in batches of 673: two full batches and one sample, which batch norm cannot train on."""
    argv = [*TINY, "--epochs", "1", "--batch-size", "673", "--out-dir", str(tmp_path), "--run-name", "r"]
    assert run_main(argv) == 0
    assert load(os.path.join(tmp_path, "r", "metrics.pkl"))["status"] == "complete"


def test_a_missing_package_is_named_not_taken_for_missing_data(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn", None)  # makes `import sklearn` fail
    assert run_main([*TINY, "--epochs", "1", "--out-dir", str(tmp_path / "runs")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "scikit-learn" in err[0] and "--download" not in err[0]
    assert not (tmp_path / "runs").exists()


def test_resume_on_another_device_type_is_refused_before_touching_the_folder(tmp_path, capsys):
    argv = [*TINY, "--epochs", "2", "--out-dir", str(tmp_path), "--run-name", "r"]
    assert run_main([*argv[:-4], "--epochs", "1", *argv[-4:]]) == 0
    checkpoint = tmp_path / "r" / "checkpoint.pt"
    state = torch.load(checkpoint, weights_only=True)
    state["device_type"] = "cuda"  # as a GPU run writes it, with a CUDA generator's 16-byte state
    state["rng"][0]["data"] = state["rng"][0]["pairs"] = torch.zeros(16, dtype=torch.uint8)
    torch.save(state, checkpoint)
    before = {p.name: p.read_bytes() for p in (tmp_path / "r").iterdir() if p.is_file()}
    capsys.readouterr()
    assert run_main([*argv, "--resume", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "written on cuda" in err[0] and "--device cuda" in err[0]
    assert {p.name: p.read_bytes() for p in (tmp_path / "r").iterdir() if p.is_file()} == before
    del state["device_type"]  # an older checkpoint: the device type is read off the generator state
    torch.save(state, checkpoint)
    assert run_main([*argv, "--resume"]) == 2 and "written on cuda" in capsys.readouterr().err


@pytest.mark.parametrize("alpha,label", [("1", "mixup loss"), ("0", "train-batch loss")])
def test_epoch_line_names_the_batch_loss_by_what_was_trained(tmp_path, capsys, alpha, label):
    argv = [*TINY, "--epochs", "1", "--mixup-alpha", alpha, "--out-dir", str(tmp_path), "--run-name", "r"]
    assert run_main(argv) == 0
    epoch_line = [line for line in capsys.readouterr().out.splitlines() if line.startswith("epoch 1/1")][0]
    assert label in epoch_line and ("mixup" in epoch_line) == (alpha != "0")


@pytest.mark.parametrize("flags", [[], ["--resume", "--epochs", "2"], ["--overwrite"]],
                         ids=["no flag", "resume", "overwrite"])
def test_a_run_folder_in_use_is_refused_with_that_reason_first(tmp_path, capsys, flags):
    """A rerun of a run still in progress hears that it is in use, not advice to --resume or --overwrite."""
    argv = [*TINY, "--epochs", "1", "--out-dir", str(tmp_path), "--run-name", "r"]
    assert run_main(argv) == 0
    before = {p.name: p.read_bytes() for p in (tmp_path / "r").iterdir() if p.is_file()}
    holder = run_io.lock_run_folder(str(tmp_path / "r"))  # as the job still writing it would
    try:
        capsys.readouterr()
        assert run_main([*argv, *flags]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "in use by another process" in err[0] and "pass --resume" not in err[0]
    finally:
        holder.close()
    assert {p.name: p.read_bytes() for p in (tmp_path / "r").iterdir() if p.is_file()} == before
