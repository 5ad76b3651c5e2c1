"""scripts/sweep.py: the plan, a real sweep on CPU, skipping, resuming after a kill, failures, bad input.

The plan tests run in-process. The real runs are main.py subprocesses on the bundled
digits with a tiny MLP; only the killed sweep is itself a subprocess, since it must be
sent a signal.
"""
import importlib.util
import os
import pickle
import re
import shlex
import signal
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SWEEP_PATH = os.path.join(ROOT, "scripts", "sweep.py")
MAIN_PATH = os.path.join(ROOT, "main.py")
TINY_RUN = ["--epochs", "2", "--width", "0.1"]
TINY_SUFFIX = "_width=0.1"
# Long enough that the killed run is still training when the signal arrives (an epoch takes
# at least ~0.1 s here and the sweep passes a signal on within 0.2 s), short enough to finish quickly.
KILLED_RUN_EPOCHS = 12
CHECKPOINT_WAIT_S = 180
SWEEP_EXIT_WAIT_S = 60
ACTIONS = ("run", "resume", "skip")


def load_sweep_module():
    spec = importlib.util.spec_from_file_location("sweep", SWEEP_PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["sweep"] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


sweep = load_sweep_module()


@pytest.fixture(autouse=True)
def one_thread_per_run(monkeypatch):
    """The runs here are tiny: one thread each halves their CPU time (no spinning thread pools)."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def plan_rows(text):
    """Each plan line as a dict: action, index, name, slot, why, and the env and argv of its command."""
    rows = []
    for line in text.splitlines():
        if line.split(" ", 1)[0] not in ACTIONS or "  $ " not in line:
            continue  # progress lines such as "run <name> on cpu"
        head, command = line.split("  $ ", 1)
        action, index, name, slot, why = [field.strip() for field in head.split("  ") if field.strip()]
        tokens = shlex.split(command)
        env_count = next(i for i, token in enumerate(tokens) if "=" not in token)
        env = dict(token.split("=", 1) for token in tokens[:env_count])
        rows.append({"action": action, "index": int(index), "name": name, "slot": slot, "why": why,
                     "env": env, "argv": tokens[env_count:]})
    return rows


def flag_value(argv, flag):
    return argv[argv.index(flag) + 1]


def load_metrics(folder):
    with open(os.path.join(folder, "metrics.pkl"), "rb") as handle:
        return pickle.load(handle)


def epochs_of(folder):
    return [record["epoch"] for record in load_metrics(folder)["epochs"]]


def attempts_logged(folder):
    """Header lines the sweep writes once per start of a run."""
    with open(os.path.join(folder, "stdout.log")) as handle:
        return sum(line.startswith("==== ") for line in handle)


# ---------------------------------------------------------------- the plan

GRID_MODELS = ("mlp", "vgg11_bn")
GRID_LOSSES = ("cross_entropy", "mse")
GRID_ALPHAS = ("0", "1")
GRID_FLAGS = ["--datasets", "digits", "--models", ",".join(GRID_MODELS), "--losses", ",".join(GRID_LOSSES),
              "--alphas", ",".join(GRID_ALPHAS), "--seeds", "3", "--gpus", "0,1"]
EXPECTED = [(model, loss, alpha) for model in GRID_MODELS for loss in GRID_LOSSES for alpha in GRID_ALPHAS]


def expected_name(model, loss, alpha):
    return f"digits_{model}_{loss}_a{alpha}_s3{TINY_SUFFIX}"


def test_dry_run_plans_every_grid_entry_in_order_round_robin_over_gpus(tmp_path, capsys):
    out_dir = str(tmp_path / "runs")
    code = sweep.main([*GRID_FLAGS, "--out-dir", out_dir, "--dry-run", "--", *TINY_RUN])
    rows = plan_rows(capsys.readouterr().out)

    assert code == 0
    assert [row["name"] for row in rows] == [expected_name(*e) for e in EXPECTED]
    assert [row["index"] for row in rows] == list(range(8))
    for k, (row, (model, loss, alpha)) in enumerate(zip(rows, EXPECTED)):
        argv = row["argv"]
        assert (row["action"], row["slot"], row["why"]) == ("run", f"gpu {k % 2}", "new")
        assert row["env"]["CUDA_VISIBLE_DEVICES"] == str(k % 2)
        assert argv[:2] == [sys.executable, MAIN_PATH]
        expected_flags = {"--dataset": "digits", "--model": model, "--loss": loss, "--mixup-alpha": alpha,
                          "--seed": "3", "--epochs": "2", "--width": "0.1", "--out-dir": out_dir,
                          "--run-name": row["name"], "--device": "cuda"}
        assert {flag: flag_value(argv, flag) for flag in expected_flags} == expected_flags
        assert "--resume" in argv
    assert not os.path.exists(out_dir)  # a dry run writes nothing


def test_count_and_index_name_the_same_entries(capsys):
    assert sweep.main([*GRID_FLAGS, "--count", "--", *TINY_RUN]) == 0
    assert capsys.readouterr().out.strip() == "8"

    assert sweep.main([*GRID_FLAGS, "--index", "5", "--dry-run", "--", *TINY_RUN]) == 0
    rows = plan_rows(capsys.readouterr().out)
    assert [row["name"] for row in rows] == [expected_name(*EXPECTED[5])]
    assert rows[0]["env"]["CUDA_VISIBLE_DEVICES"] == "0"  # an array task uses the first slot


@pytest.mark.parametrize("extras, suffix", [
    ([], ""),
    (["--epochs", "5", "--checkpoint-every", "2", "--data-dir", "x"], ""),  # a resume may change these
    (["--width", "0.1"], "_width=0.1"),
    (["--optimizer", "adam", "--etf-classifier"], "_etf-classifier_optimizer=adam"),
    (["--no-augment"], "_no-augment"),
])
def test_names_carry_the_flags_that_make_a_different_run(extras, suffix):
    assert sweep.name_suffix(sweep.check_extras(extras)) == suffix


def test_a_long_suffix_becomes_a_short_hash():
    many_epochs = ",".join(str(e) for e in range(30))
    suffix = sweep.name_suffix(sweep.check_extras(["--epochs", "30", "--feature-epochs", many_epochs]))
    assert re.fullmatch(r"_x[0-9a-f]{8}", suffix)


@pytest.mark.parametrize("argv, phrase", [
    (["--losses", "nope"], "invalid choice: 'nope'"),
    (["--seeds", "0,,1"], "empty item"),
    (["--seeds", "1,1"], "would share the run name"),
    (["--gpus", "0,0"], "lists a GPU twice"),
    (["--epochs", "2"], "main.py flags go after --"),
    (["--", "--width", "x"], "invalid positive float value: 'x'"),
    (["--", "--seed", "4"], "--seed after --: use the sweep's --seeds"),
    (["--", "--see", "4"], "main.py would refuse --see 4: unrecognized arguments: --see 4"),  # no abbreviations
    (["--", "--overwrite"], "--overwrite after --"),
    (["--index", "1"], "the grid has 1 entries"),
])
def test_bad_input_gets_one_line_and_exit_2(tmp_path, capsys, argv, phrase):
    own, extras = sweep.split_argv(argv)
    gpus = [] if "--gpus" in own else ["--gpus", "cpu"]
    code = sweep.main([*own, *gpus, "--out-dir", str(tmp_path / "runs"), "--", *extras])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("sweep.py: error: ") and err.count("\n") == 1 and phrase in err
    assert not os.path.exists(tmp_path / "runs")


def test_metrics_with_foreign_objects_are_not_unpickled(tmp_path):
    entry = sweep.make_entry(0, ["--dataset", "digits", "--model", "mlp"], [], str(tmp_path), "")
    os.makedirs(entry.folder)
    with open(os.path.join(entry.folder, "metrics.pkl"), "wb") as handle:
        pickle.dump({"status": "complete", "epochs": [], "config": {"hook": os.system}}, handle)
    action, why = sweep.decide(entry)
    assert action == "resume" and "refused to load global posix.system" in why  # never called, never skipped


@pytest.mark.parametrize("code, state", [
    (0, "complete"), (130, "interrupted"), (143, "interrupted"),
    (-signal.SIGTERM, "interrupted"),  # stopped while still importing, before main.py's handler was in place
    (1, "failed"), (2, "failed"), (3, "failed"), (-signal.SIGKILL, "failed"), (None, "failed"),
])
def test_exit_codes_are_sorted_into_complete_interrupted_failed(code, state):
    assert sweep.Outcome(step=None, code=code, note="").state == state


def test_a_failure_is_summed_up_by_the_last_line_of_its_latest_attempt(tmp_path):
    log = tmp_path / "stderr.log"
    log.write_text("==== first attempt\nold error\n==== second attempt\n")
    assert sweep.last_line(str(log)) == ""  # the second attempt wrote nothing: not the old error
    with open(log, "a") as handle:
        handle.write("main.py: error: new error\n\n")
    assert sweep.last_line(str(log)) == "main.py: error: new error"


# ---------------------------------------------------------------- real runs

def test_real_sweep_completes_then_skips_every_run(tmp_path, capsys):
    own = ["--models", "mlp", "--losses", "cross_entropy,mse", "--gpus", "cpu", "--jobs", "2", "--out-dir", str(tmp_path / "runs")]
    argv = [*own, "--", *TINY_RUN]
    names = [f"digits_mlp_{loss}_a1_s0{TINY_SUFFIX}" for loss in ("cross_entropy", "mse")]
    folders = [os.path.join(tmp_path, "runs", name) for name in names]

    assert sweep.main(argv) == 0
    assert "2 completed, 0 skipped" in capsys.readouterr().out
    for folder, loss in zip(folders, ("cross_entropy", "mse")):
        metrics = load_metrics(folder)
        assert metrics["status"] == "complete" and metrics["config"]["loss"] == loss
        assert epochs_of(folder) == [0, 1, 2]
        assert attempts_logged(folder) == 1
    written = [os.stat(os.path.join(f, "metrics.pkl")).st_mtime_ns for f in folders]

    assert sweep.main(argv) == 0
    out = capsys.readouterr().out
    assert [(row["action"], row["name"]) for row in plan_rows(out)] == [("skip", n) for n in names]
    assert "0 completed, 2 skipped" in out
    assert [os.stat(os.path.join(f, "metrics.pkl")).st_mtime_ns for f in folders] == written
    assert [attempts_logged(f) for f in folders] == [1, 1]  # nothing was started again

    assert sweep.main([*own, "--dry-run", "--", "--epochs", "3", "--width", "0.1"]) == 0
    rows = plan_rows(capsys.readouterr().out)
    assert [(row["action"], row["why"]) for row in rows] == \
        [("resume", "complete at 2 epochs; extending to 3")] * 2


def test_failing_run_makes_the_sweep_exit_1_and_list_it(tmp_path, capsys):
    own = ["--datasets", "mnist", "--models", "mlp", "--gpus", "cpu", "--out-dir", str(tmp_path / "runs")]
    extras = ["--epochs", "1", "--data-dir", str(tmp_path / "no_data")]
    folder = os.path.join(tmp_path, "runs", "mnist_mlp_cross_entropy_a1_s0")
    stderr_log = os.path.join(folder, "stderr.log")

    assert sweep.main([*own, "--", *extras]) == 1
    err = capsys.readouterr().err
    assert f"mnist_mlp_cross_entropy_a1_s0  exit 1  {stderr_log}" in err.splitlines()[-1]
    with open(stderr_log) as handle:
        assert "main.py: error: mnist is not under --data-dir" in handle.read().splitlines()[-1]
    assert not os.path.exists(os.path.join(folder, "metrics.pkl"))

    assert sweep.main([*own, "--dry-run", "--", *extras]) == 0  # a folder with only logs is a new run
    assert [(row["action"], row["why"]) for row in plan_rows(capsys.readouterr().out)] == [("run", "new")]


def test_killed_sweep_exits_nonzero_and_a_rerun_resumes(tmp_path, capsys):
    out_dir = str(tmp_path / "runs")
    argv = ["--models", "mlp", "--gpus", "cpu", "--out-dir", out_dir, "--", "--epochs", str(KILLED_RUN_EPOCHS), "--width", "0.1"]
    folder = os.path.join(out_dir, f"digits_mlp_cross_entropy_a1_s0{TINY_SUFFIX}")
    with open(tmp_path / "sweep.out", "w") as out, open(tmp_path / "sweep.err", "w") as err:
        process = subprocess.Popen([sys.executable, SWEEP_PATH, *argv], stdout=out, stderr=err)
        wait_for_file(os.path.join(folder, "checkpoint.pt"), process)
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=SWEEP_EXIT_WAIT_S)

    assert code == 128 + signal.SIGTERM
    assert "stopped by SIGTERM" in (tmp_path / "sweep.err").read_text()
    metrics = load_metrics(folder)
    assert metrics["status"] == "interrupted"
    stopped_after = epochs_of(folder)[-1]
    assert 1 <= stopped_after < KILLED_RUN_EPOCHS

    assert sweep.main(argv) == 0
    rows = plan_rows(capsys.readouterr().out)
    assert rows[0]["action"] == "resume" and rows[0]["why"] == f"interrupted at epoch {stopped_after}/{KILLED_RUN_EPOCHS}"
    with open(os.path.join(folder, "stdout.log")) as handle:
        assert f"(resuming after epoch {stopped_after})" in handle.read()
    assert load_metrics(folder)["status"] == "complete"
    assert epochs_of(folder) == list(range(KILLED_RUN_EPOCHS + 1))  # every epoch once, none repeated


def wait_for_file(path, process):
    deadline = time.monotonic() + CHECKPOINT_WAIT_S
    while not os.path.exists(path):
        assert process.poll() is None, f"the sweep ended (exit {process.returncode}) before {path} appeared"
        assert time.monotonic() < deadline, f"{path} did not appear within {CHECKPOINT_WAIT_S} s"
        time.sleep(0.05)
