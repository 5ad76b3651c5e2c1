#!/usr/bin/env python3
"""Run a grid of main.py trainings, one per GPU at a time, so that a rerun picks up where it stopped.

    python scripts/sweep.py --datasets cifar10,cifar100 --models wrn40_10,vit_b_4 \\
        --losses cross_entropy,mse --alphas 0,1 --seeds 0,1,2 --out-dir runs -- --epochs 300
    python scripts/sweep.py <grid flags> --dry-run       # the plan, one line per run
    python scripts/sweep.py <grid flags> --count         # how many grid entries (for sbatch --array)
    python scripts/sweep.py <grid flags> --index 7       # entry 7 only (one SLURM array task)

Flags after `--` go to every main.py run unchanged. Grid order is datasets, models,
losses, alphas, rules, seeds (seeds vary fastest), so entry i is the same run on every machine.
--rules mixup,cutmix,switch makes the mixing rule a dimension: each sets main.py's
--mixup-alpha and --cutmix-alpha from the grid's alpha (mixup: A, 0; cutmix: 0, A; switch: A, A).

A run is named <dataset>_<model>_<loss>_a<alpha>[_cut<A>...]_s<seed> (main.py's default name), plus
_<flag>=<value> for each flag after `--` that differs from main.py's default and that a
resume may not change (so sweeps with different settings never share a folder). Its folder
<out-dir>/<name>/ holds main.py's files and the run's stdout.log and stderr.log (appended
to, one header line per attempt).

Runs whose metrics.pkl says complete (at the --epochs asked) are skipped. Every other run
is started with --resume, which main.py reads as "continue from checkpoint.pt, or start at
epoch 0 if there is none"; so a killed or crashed sweep is resumed by running it again.
Run k of those to do goes to slot k mod S (S = GPUs x --jobs); each slot works through its
own list in order, which makes the plan exactly what runs.

Exit status: 0 every run complete, 1 some run failed (listed with its exit code and log),
2 bad flags, 128 + signal number when interrupted (SIGINT/SIGTERM are passed on to the
runs, which stop at their next step; a second signal stops them at once; SIGHUP, as when
the terminal closes, is passed on as SIGTERM).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import hashlib
import io
import itertools
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections import deque
from typing import Dict, List, Optional, Sequence, Tuple

SCRIPT_DIR = os.path.dirname(os.path.abspath(__file__))
PROJECT_DIR = os.path.dirname(SCRIPT_DIR)
MAIN_PY = os.path.join(PROJECT_DIR, "main.py")
if PROJECT_DIR not in sys.path:
    sys.path.insert(0, PROJECT_DIR)

import cli  # noqa: E402  main.py's own parser: every run's flags are checked before any run starts
from plotting.loading import RunError, load_run  # noqa: E402  the project's safe reader of run folders
from run_io import CHECKPOINT_FILE, METRICS_FILE  # noqa: E402

PROG = "sweep.py"
STDOUT_LOG, STDERR_LOG = "stdout.log", "stderr.log"
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
# How a stopped run ends: main.py's exit codes, or death by the signal itself when it came before
# main.py had installed its handler (while importing, for example).
INTERRUPTED_EXITS = {128 + signal.SIGINT, 128 + signal.SIGTERM, -signal.SIGINT, -signal.SIGTERM}
LOG_HEADER = "==== "  # starts the line the sweep writes into both logs at each start of a run
# Signals that stop the sweep, and what each run is sent: main.py stops cleanly on SIGINT/SIGTERM;
# a closed terminal (SIGHUP) must not leave runs going on unsupervised, so it becomes SIGTERM.
STOP_SIGNALS = {signal.SIGINT: signal.SIGINT, signal.SIGTERM: signal.SIGTERM, signal.SIGHUP: signal.SIGTERM}
POLL_S = 0.2  # how often running children are checked; a signal is passed on within this time
RUN, RESUME, SKIP = "run", "resume", "skip"
CPU = "cpu"
SUFFIX_MAX_CHARS = 48  # a longer readable suffix becomes a hash, to keep folder names manageable
SUFFIX_HASH_CHARS = 8
SAFE_SUFFIX = re.compile(r"[A-Za-z0-9._,=+-]*")
STDERR_TAIL_BYTES = 4096  # enough to find the one-line error main.py prints last

# The grid, outermost first: main.py's flag (by its argparse dest), the sweep's flag, its metavar.
GRID_DIMENSIONS = (("dataset", "--datasets", "NAMES"), ("model", "--models", "NAMES"), ("loss", "--losses", "NAMES"),
                   ("mixup_alpha", "--alphas", "A,A,..."), ("mix_rule", "--rules", "RULES"),
                   ("seed", "--seeds", "S,S,..."))
# The mixing rule is no single main.py flag: each value sets both alphas, from the grid's alpha (the Beta
# parameter of whichever rule mixes), as (mixup_alpha, cutmix_alpha); "switch" is timm's per-batch choice.
RULE_DIMENSION = "mix_rule"
RULE_ALPHAS = {"mixup": ("A", "0"), "cutmix": ("0", "A"), "switch": ("A", "A")}
# main.py flags the sweep sets itself, and what to use instead of passing them after `--`.
SWEEP_OWNED = {**{dest: f"use the sweep's {flag}" for dest, flag, _ in GRID_DIMENSIONS if dest != RULE_DIMENSION},
               "cutmix_alpha": "use the sweep's --rules cutmix or switch (with --alphas as its Beta parameter)",
               "out_dir": "use the sweep's --out-dir", "run_name": "the sweep names every run",
               "device": "the sweep picks the device from --gpus", "resume": "the sweep always resumes",
               "overwrite": "delete a run folder by hand to start that run again"}
# Flags that do not make a different run (a resume may change them), so they stay out of the name.
NAME_NEUTRAL = frozenset(cli.RESUMABLE_CHANGES) | frozenset(SWEEP_OWNED) | frozenset(cli.NAMED_MIXING_FLAGS)


class UsageError(Exception):
    """Bad sweep input; reported on one line, exit 2."""


def say(text: str, stream=None) -> None:
    """Print a line; a closed pipe or terminal must not stop a sweep that is supervising runs."""
    stream = stream or sys.stdout
    try:
        print(text, file=stream, flush=True)
    except OSError:  # EPIPE after `| head`, EIO once the terminal has hung up: write to nowhere from now on
        os.dup2(os.open(os.devnull, os.O_WRONLY), stream.fileno())


# ---------------------------------------------------------------- command line

class SweepParser(argparse.ArgumentParser):
    def error(self, message):
        hint = " (main.py flags go after --)" if "unrecognized arguments" in message else ""
        raise UsageError(message + hint)


def build_parser() -> argparse.ArgumentParser:
    out_dir = cli.build_parser().get_default("out_dir")  # main.py's default
    parser = SweepParser(prog=PROG, formatter_class=argparse.RawDescriptionHelpFormatter, description=__doc__,
                         usage=f"{PROG} [grid flags] [--gpus IDS] [--dry-run | --count | --index I] [-- main.py flags]")
    grid = parser.add_argument_group("grid (comma-separated lists; every combination is one run)")
    for dest, flag, metavar in GRID_DIMENSIONS:
        what = (f"mixing rules: {', '.join(RULE_ALPHAS)} (each value sets main.py's --mixup-alpha and "
                f"--cutmix-alpha from --alphas; default: the alphas alone, no CutMix)") if dest == RULE_DIMENSION \
            else f"values of main.py --{dest.replace('_', '-')} (default: main.py's default)"
        grid.add_argument(flag, default=None, metavar=metavar, help=what)
    where = parser.add_argument_group("where the runs go")
    where.add_argument("--out-dir", default=out_dir, metavar="DIR",
                       help=f"parent folder of the run folders (default: {out_dir})")
    where.add_argument("--gpus", default=None, metavar="IDS",
                       help="GPU ids to use, e.g. 0,1,2,3, or 'cpu' (default: $CUDA_VISIBLE_DEVICES if set, "
                            "else every GPU PyTorch sees, else cpu)")
    where.add_argument("--jobs", type=cli.positive_int, default=1, metavar="N",
                       help="runs at the same time on each GPU, or on the CPU with --gpus cpu (default: 1)")
    what = parser.add_argument_group("what to do (default: run the grid)")
    exclusive = what.add_mutually_exclusive_group()
    exclusive.add_argument("--dry-run", action="store_true", help="print the plan (one line per run) and exit")
    exclusive.add_argument("--count", action="store_true",
                           help="print the number of grid entries and exit (for sbatch --array=0-<count - 1>)")
    what.add_argument("--index", type=cli.nonnegative_int, default=None, metavar="I",
                      help="only grid entry I (0-based; a SLURM array task id), on the first slot; "
                           "with --dry-run, print its plan line")
    return parser


def split_argv(argv: Sequence[str]) -> Tuple[List[str], List[str]]:
    """The sweep's own flags, and main.py's after the first `--`."""
    argv = list(argv)
    if "--" not in argv:
        return argv, []
    cut = argv.index("--")
    return argv[:cut], argv[cut + 1:]


def comma_list(text: str, flag: str) -> List[str]:
    items = [item.strip() for item in text.split(",")]
    if not all(items):
        raise UsageError(f"{flag} {text!r}: empty item in the comma-separated list")
    return items


# ---------------------------------------------------------------- main.py's flags

def parse_main_flags(parse, argv: Sequence[str]) -> argparse.Namespace:
    """Run one of cli's parsers on argv, turning its printed error and exit into a UsageError."""
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured), contextlib.redirect_stdout(captured):
            return parse(list(argv))
    except SystemExit as stop:
        if stop.code == 0:  # --help or similar
            raise UsageError("main.py flags after -- may not ask for help; see python main.py --help") from None
        message = captured.getvalue().strip().removeprefix("main.py: error: ")
        raise UsageError(f"main.py would refuse {shlex.join(argv)}: {message}") from None
    except cli.UsageError as error:
        raise UsageError(f"main.py would refuse {shlex.join(argv)}: {error}") from None


_UNSET = object()


def check_extras(extras: Sequence[str]) -> argparse.Namespace:
    """Refuse main.py flags the sweep sets itself; returns the extras parsed (main.py refuses abbreviations)."""
    parser = cli.build_parser()
    parser.set_defaults(**{dest: _UNSET for dest in SWEEP_OWNED})
    given = parse_main_flags(parser.parse_args, extras)
    for dest, instead in SWEEP_OWNED.items():
        if getattr(given, dest) is not _UNSET:
            raise UsageError(f"--{dest.replace('_', '-')} after --: {instead}")
    return parse_main_flags(cli.build_parser().parse_args, extras)


def name_suffix(extras: argparse.Namespace) -> str:
    """Readable `_flag=value` parts for the extras that make a different run; a hash if too long."""
    defaults = vars(cli.build_parser().parse_args([]))
    changed = {dest: value for dest, value in sorted(vars(extras).items())
               if dest not in NAME_NEUTRAL and value != defaults[dest]}
    if not changed:
        return ""
    suffix = "".join(f"_{flag_label(dest, value)}" for dest, value in changed.items())
    if len(suffix) <= SUFFIX_MAX_CHARS and SAFE_SUFFIX.fullmatch(suffix):
        return suffix
    digest = hashlib.sha1(json.dumps(changed, sort_keys=True, default=str).encode()).hexdigest()
    return f"_x{digest[:SUFFIX_HASH_CHARS]}"


def flag_label(dest: str, value) -> str:
    key = dest.replace("_", "-")
    if value is True:
        return key
    if value is False:
        return f"no-{key}"
    if isinstance(value, list):
        return f"{key}={','.join(format_value(v) for v in value)}"
    return f"{key}={format_value(value)}"


def format_value(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


# ---------------------------------------------------------------- the grid

@dataclasses.dataclass(frozen=True)
class Entry:
    """One grid point: main.py's flags without --device (the slot adds it)."""
    index: int
    name: str
    folder: str
    argv: Tuple[str, ...]
    epochs: int
    flags: dict  # as main.py records them in metrics.pkl, to check a complete run was this one


def expand_grid(args, extras: List[str]) -> List[Entry]:
    suffix = name_suffix(check_extras(extras))
    dimensions = []
    for dest, flag, _ in GRID_DIMENSIONS:
        given = getattr(args, flag[2:])
        values = comma_list(given, flag) if given is not None else [None]  # None: main.py's default
        if dest == RULE_DIMENSION:
            unknown = [value for value in values if value is not None and value not in RULE_ALPHAS]
            if unknown:
                raise UsageError(f"--rules {given!r}: unknown rule {unknown[0]!r} (rules: {', '.join(RULE_ALPHAS)})")
        dimensions.append([(dest, value) for value in values])
    entries, seen = [], {}
    for combination in itertools.product(*dimensions):
        grid = grid_tokens(dict(combination))
        entry = make_entry(len(entries), grid, extras, args.out_dir, suffix)
        if entry.name in seen:
            raise UsageError(f"grid entries {seen[entry.name]} and {entry.index} would share the "
                             f"run name {entry.name} (a value listed twice?)")
        seen[entry.name] = entry.index
        entries.append(entry)
    return entries


def grid_tokens(values: Dict[str, Optional[str]]) -> List[str]:
    """main.py flags of one grid point ({dest: value, None for main.py's default}); a rule sets both alphas."""
    rule = values.pop(RULE_DIMENSION)
    if rule is not None:
        alpha = values["mixup_alpha"] or format_value(cli.build_parser().get_default("mixup_alpha"))
        values["mixup_alpha"], values["cutmix_alpha"] = (alpha if a == "A" else a for a in RULE_ALPHAS[rule])
    return [token for dest, value in values.items() if value is not None
            for token in (f"--{dest.replace('_', '-')}", value)]


def make_entry(index: int, grid: List[str], extras: List[str], out_dir: str, suffix: str) -> Entry:
    unnamed = parse_main_flags(cli.parse_args, [*grid, *extras, "--out-dir", out_dir])
    name = unnamed.run_name + suffix
    argv = [*grid, *extras, "--out-dir", out_dir, "--run-name", name, "--resume"]
    parsed = parse_main_flags(cli.parse_args, argv)
    flags = json.loads(json.dumps(vars(parsed), default=str))  # compared as main.py stores them
    return Entry(index, name, os.path.join(out_dir, name), tuple(argv), parsed.epochs, flags)


# ---------------------------------------------------------------- slots

def device_list(gpus: Optional[str]) -> List[str]:
    if gpus is None:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        if visible is not None:
            gpus = visible.strip() or CPU  # set but empty hides every GPU
        else:
            import torch  # already loaded by cli

            gpus = ",".join(str(i) for i in range(torch.cuda.device_count())) or CPU
    if gpus.strip() == CPU:
        return [CPU]
    devices = comma_list(gpus, "--gpus")
    if CPU in devices:
        raise UsageError(f"--gpus {gpus!r}: either GPU ids or the word cpu, not both")
    if len(set(devices)) != len(devices):
        raise UsageError(f"--gpus {gpus!r} lists a GPU twice; use --jobs N for N runs per GPU")
    return devices


def make_slots(gpus: Optional[str], jobs: int) -> List[str]:
    """One device per slot, interleaved, so that the first runs spread over every GPU."""
    devices = device_list(gpus)
    return [device for _ in range(jobs) for device in devices]


def slot_label(device: str) -> str:
    return CPU if device == CPU else f"gpu {device}"


def child_env(device: str, cpu_slots: int) -> Dict[str, str]:
    """The variables the sweep sets for a run on `device` (shown in the plan, added to os.environ)."""
    env = {"CUDA_VISIBLE_DEVICES": "" if device == CPU else device}
    if device == CPU and cpu_slots > 1 and "OMP_NUM_THREADS" not in os.environ:
        # parallel CPU runs would each start a thread per core and slow one another down
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // cpu_slots))
    return env


def child_argv(entry: Entry, device: str) -> List[str]:
    return [sys.executable, MAIN_PY, *entry.argv, "--device", CPU if device == CPU else "cuda"]


# ---------------------------------------------------------------- what each run needs

def decide(entry: Entry) -> Tuple[str, str]:
    """(action, why) for a run, from what its folder holds."""
    def has(file: str) -> bool:
        return os.path.isfile(os.path.join(entry.folder, file))

    if not has(METRICS_FILE):  # a folder with only the logs of a run that failed at start is new
        return (RESUME, "checkpoint but no metrics yet") if has(CHECKPOINT_FILE) else (RUN, "new")
    try:
        metrics = load_run(entry.folder)  # only builtins and numpy arrays are unpickled
    except RunError as error:
        return RESUME, f"unreadable, main.py decides: {error}"
    last = metrics.last_epoch() or 0
    asked = metrics.config.get("epochs")
    if metrics.status != "complete":
        return RESUME, f"{metrics.status} at epoch {last}/{asked}"
    differing = flags_differing(metrics.config.get("flags", {}), entry.flags)
    if differing:
        return RESUME, f"complete, but with other flags ({', '.join(differing)}); main.py will refuse"
    if asked is not None and asked < entry.epochs:
        return RESUME, f"complete at {asked} epochs; extending to {entry.epochs}"
    return SKIP, f"complete at epoch {last}"


def flags_differing(saved: dict, wanted: dict) -> List[str]:
    return sorted(key for key in set(saved) | set(wanted)
                  if key not in cli.RESUMABLE_CHANGES and saved.get(key) != wanted.get(key))


@dataclasses.dataclass
class Step:
    entry: Entry
    action: str
    why: str
    device: str  # where it runs (the first slot for skipped runs: only shown in their command)
    env: Dict[str, str]

    @property
    def command(self) -> List[str]:
        return child_argv(self.entry, self.device)

    def command_text(self) -> str:
        return " ".join([*(f"{k}={shlex.quote(v)}" for k, v in self.env.items()), shlex.join(self.command)])

    def log(self, name: str) -> str:
        return os.path.join(self.entry.folder, name)


def plan(entries: List[Entry], slots: List[str]) -> List[Step]:
    """Decide every run; run k of those to do goes to slot k mod len(slots)."""
    cpu_slots = slots.count(CPU)
    steps, todo = [], 0
    for entry in entries:
        action, why = decide(entry)
        device = slots[todo % len(slots)] if action != SKIP else slots[0]
        todo += action != SKIP
        steps.append(Step(entry, action, why, device, child_env(device, cpu_slots)))
    return steps


def plan_line(step: Step, name_width: int) -> str:
    where = "-" if step.action == SKIP else slot_label(step.device)
    # columns are separated by two spaces (none of them contains two in a row), for scripts that read the plan
    return (f"{step.action:<6}  {step.entry.index:>4}  {step.entry.name:<{name_width}}  {where:<6}  "
            f"{step.why}  $ {step.command_text()}")


def print_plan(steps: List[Step], slots: List[str]) -> None:
    todo = [s for s in steps if s.action != SKIP]
    devices = ", ".join(dict.fromkeys(slot_label(d) for d in slots))
    say(f"sweep: {len(steps)} grid entries; {len(todo)} to run or resume on {len(slots)} slot(s) ({devices}), "
        f"{len(steps) - len(todo)} complete; logs: <run folder>/{STDOUT_LOG}, {STDERR_LOG}")
    width = max(len(s.entry.name) for s in steps)
    for step in steps:
        say(plan_line(step, width))


# ---------------------------------------------------------------- running

@dataclasses.dataclass
class Outcome:
    step: Step
    code: Optional[int]  # None: it could not be started
    note: str

    @property
    def state(self) -> str:
        if self.code == 0:
            return "complete"
        return "interrupted" if self.code in INTERRUPTED_EXITS else "failed"


class SignalRelay:
    """Catches the stop signals; the loop passes each one on, once, to every running run."""

    def __init__(self):
        self.first: Optional[int] = None
        self.pending: List[int] = []
        self._previous = {}

    def __enter__(self):
        for signum in STOP_SIGNALS:
            self._previous[signum] = signal.signal(signum, self._catch)
        return self

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _catch(self, signum, frame):
        self.pending.append(signum)
        self.first = self.first or signum

    def forward(self, processes: List[subprocess.Popen]) -> None:
        while self.pending:
            signum = self.pending.pop(0)
            passed = STOP_SIGNALS[signum]
            for process in processes:
                process.send_signal(passed)
            say(f"{PROG}: {signal.Signals(signum).name}: sent {passed.name} to {len(processes)} running run(s), "
                f"which stop at their next step (signal again to stop them at once)", sys.stderr)


def open_logs(step: Step) -> Tuple[int, int]:
    """Create the run folder and append an attempt header to both logs; returns their descriptors."""
    os.makedirs(step.entry.folder, exist_ok=True)
    header = f"{LOG_HEADER}{datetime.datetime.now().isoformat(timespec='seconds')} sweep {step.action}: " \
             f"{step.command_text()}\n".encode()
    descriptors = []
    for name in (STDOUT_LOG, STDERR_LOG):
        fd = os.open(step.log(name), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.write(fd, header)
        descriptors.append(fd)
    return descriptors[0], descriptors[1]


def launch(step: Step) -> subprocess.Popen:
    out, err = open_logs(step)
    try:
        # own session: a Ctrl-C at the terminal reaches only the sweep, which passes it on exactly once
        return subprocess.Popen(step.command, env={**os.environ, **step.env}, stdin=subprocess.DEVNULL,
                                stdout=out, stderr=err, start_new_session=True)
    finally:
        os.close(out)
        os.close(err)


def last_line(path: str) -> str:
    """The last line the latest attempt wrote to a log ("" if none)."""
    try:
        with open(path, "rb") as handle:
            handle.seek(max(0, os.path.getsize(path) - STDERR_TAIL_BYTES))
            lines = handle.read().decode(errors="replace").splitlines()
    except OSError:
        return ""
    headers = [i for i, line in enumerate(lines) if line.startswith(LOG_HEADER)]
    latest = [line.strip() for line in lines[headers[-1] + 1 if headers else 0:] if line.strip()]
    return latest[-1] if latest else ""


def run_steps(steps: List[Step], slots: List[str]) -> Tuple[List[Outcome], Optional[int]]:
    """Run every step on its slot; returns the outcomes and the stop signal, if one came."""
    queues = [deque() for _ in slots]
    todo = [s for s in steps if s.action != SKIP]
    for k, step in enumerate(todo):
        queues[k % len(slots)].append(step)
    running: Dict[int, Tuple[Step, subprocess.Popen, float]] = {}
    outcomes: List[Outcome] = []
    with SignalRelay() as relay:
        while running or (relay.first is None and any(queues)):
            if relay.first is None:
                start_idle_slots(queues, running, outcomes, len(todo))
            relay.forward([process for _, process, _ in running.values()])
            for slot, (step, process, started) in list(running.items()):
                if process.poll() is not None:
                    del running[slot]
                    outcomes.append(finished(step, process.returncode, started, len(outcomes) + 1, len(todo)))
            time.sleep(POLL_S)
    return outcomes, relay.first


def start_idle_slots(queues, running, outcomes: List[Outcome], total: int) -> None:
    for slot, queue in enumerate(queues):
        while slot not in running and queue:
            step = queue.popleft()
            try:
                running[slot] = (step, launch(step), time.monotonic())
            except OSError as error:  # e.g. an unwritable --out-dir: that run fails, the others go on
                outcomes.append(Outcome(step, None, f"could not start: {error}"))
                say(f"[{len(outcomes)}/{total}] failed {step.entry.name}: could not start: {error}", sys.stderr)
                continue
            say(f"{step.action} {step.entry.name} on {slot_label(step.device)}")


def finished(step: Step, code: int, started: float, done: int, total: int) -> Outcome:
    seconds = time.monotonic() - started
    outcome = Outcome(step, code, last_line(step.log(STDERR_LOG)) if code else "")
    detail = f"exit {code}, {seconds:.0f} s" + (f": {outcome.note}" if outcome.note else "")
    say(f"[{done}/{total}] {outcome.state} {step.entry.name} ({detail})",
        sys.stderr if outcome.state == "failed" else sys.stdout)
    return outcome


def report(steps: List[Step], outcomes: List[Outcome], signum: Optional[int]) -> int:
    counts = {state: sum(o.state == state for o in outcomes) for state in ("complete", "failed", "interrupted")}
    skipped = sum(s.action == SKIP for s in steps)
    not_started = sum(s.action != SKIP for s in steps) - len(outcomes)
    say(f"sweep: {counts['complete']} completed, {skipped} skipped (already complete), {counts['failed']} failed, "
        f"{counts['interrupted']} interrupted, {not_started} not started")
    failed = [o for o in outcomes if o.state == "failed"]
    if failed:
        say(f"{PROG}: {len(failed)} failed run(s):", sys.stderr)
        for outcome in failed:
            code = "not started" if outcome.code is None else f"exit {outcome.code}"
            say(f"  {outcome.step.entry.name}  {code}  {outcome.step.log(STDERR_LOG)}", sys.stderr)
    if signum is not None:
        say(f"{PROG}: stopped by {signal.Signals(signum).name}; run the same command again to resume", sys.stderr)
        return 128 + signum
    return EXIT_FAILED if failed else EXIT_OK


def exec_single(step: Step) -> int:
    """One array task: become main.py, so the scheduler's signals reach the run directly and once."""
    say(plan_line(step, len(step.entry.name)))
    if step.action == SKIP:
        return EXIT_OK
    try:
        out, err = open_logs(step)
    except OSError as error:
        say(f"{PROG}: error: cannot write the logs of {step.entry.name}: {error}", sys.stderr)
        return EXIT_FAILED
    say(f"logs: {step.log(STDOUT_LOG)}, {step.log(STDERR_LOG)}")
    sys.stderr.flush()
    os.dup2(out, 1)
    os.dup2(err, 2)
    try:
        os.execve(sys.executable, step.command, {**os.environ, **step.env})
    except OSError as error:  # only reached if the interpreter cannot be started
        say(f"{PROG}: error: cannot start {sys.executable}: {error}", sys.stderr)
        return EXIT_FAILED


# ---------------------------------------------------------------- entry point

def main(argv: Optional[Sequence[str]] = None) -> int:
    own, extras = split_argv(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(own)
        entries = expand_grid(args, extras)
        if args.count:
            say(str(len(entries)))
            return EXIT_OK
        if args.index is not None:
            if args.index >= len(entries):
                raise UsageError(f"--index {args.index}: the grid has {len(entries)} entries (0-{len(entries) - 1})")
            entries = [entries[args.index]]
        slots = make_slots(args.gpus, args.jobs)
    except UsageError as error:
        say(f"{PROG}: error: {error}", sys.stderr)
        return EXIT_USAGE
    steps = plan(entries, slots)
    if args.index is not None and not args.dry_run:
        return exec_single(steps[0])
    print_plan(steps, slots)
    if args.dry_run:
        return EXIT_OK
    outcomes, signum = run_steps(steps, slots)
    return report(steps, outcomes, signum)


if __name__ == "__main__":
    sys.exit(main())
