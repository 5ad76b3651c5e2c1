"""Mutation testing of the pure modules (issue 16): mutmut per module, then the score table.

For each module and its test files: a fresh copy of the working tree in
mutants/<module>/, whose setup.cfg is the repository's [mutmut] section plus
the module (source_paths), its test files (the test selection) and the rest of
the project (also_copy); there `mutmut run --max-children 1` (one child: the
machine is shared) tries every mutant, no sampling. Then the counts come from
mutmut's results, and each survivor is looked up in bench/mutation_accepted.txt,
the survivors judged equivalent, device-only (only a GPU run can tell) or
message-only, each with its reason. The table gives the raw score and the score
without the accepted survivors; every other survivor is printed with its diff,
as a missing test, and makes the exit status 1.

    pip install 'mutmut==3.8.*'                                 # a dev tool: not in requirements.txt
    python bench/mutation.py                                    # the five pure modules (DEFAULT_PAIRS)
    python bench/mutation.py ufm tests/test_ufm.py              # one module or package, its test file(s)
    cd mutants/losses && mutmut show losses.x_focal__mutmut_1   # a mutant's diff, after a run

The copies stay in mutants/ (git-ignored) for `mutmut show` and `mutmut browse`;
each run starts them afresh, so no stale result is ever counted.
"""
from __future__ import annotations

import argparse
import configparser
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "mutants"
ACCEPTED = ROOT / "bench" / "mutation_accepted.txt"
DEFAULT_PAIRS = (
    ("collapse_metrics.py", ["tests/test_collapse_metrics.py", "tests/test_layers.py", "tests/test_ufm_planted.py",
                             "tests/test_measurement_precision.py"]),
    ("ufm", ["tests/test_ufm.py", "tests/test_ufm_batched.py", "tests/test_ufm_planted.py"]),
    ("losses.py", ["tests/test_losses_mixup.py"]),
    ("mixup.py", ["tests/test_losses_mixup.py", "tests/test_cutmix.py"]),
    ("data/batches.py", ["tests/test_data.py"]),
)
ACCEPTED_CATEGORIES = ("equivalent", "device-only", "message")
# One thread: the child runs fork from a process that has imported torch (an OpenMP pool does not
# survive a fork), and the machine is shared.
CHILD_ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
# Run in the copy by a fresh interpreter: mutmut's own diff of each named mutant, as JSON.
DIFF_SCRIPT = """
import json, sys
from mutmut.mutation.diff_apply import get_diff_for_mutant
path, names = sys.argv[1], sys.argv[2:]
print(json.dumps({name: get_diff_for_mutant(name, path=path) for name in names}))
"""


class MutationError(Exception):
    """A run that cannot give a table: bad arguments, or mutmut itself failed."""


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("module", nargs="?",
                        help="the module or package to mutate, e.g. losses.py or ufm (default: DEFAULT_PAIRS)")
    parser.add_argument("tests", nargs="*", help="its test files, e.g. tests/test_ufm.py")
    parser.add_argument("--report-only", action="store_true",
                        help="no new run: the table of the last run's results in mutants/ (after editing "
                             f"{ACCEPTED.name})")
    args = parser.parse_args(argv)
    if args.module and not args.tests:
        parser.error("name the module's test file(s) after the module")
    if args.module:
        args.module = args.module.rstrip("/")
        if not ((ROOT / args.module).is_file() or (ROOT / args.module / "__init__.py").is_file()):
            parser.error(f"no module or package {args.module} in {ROOT}")
    for path in args.tests:
        if not (ROOT / path).is_file():
            parser.error(f"no file {path} in {ROOT}")
    return args


# ---------------------------------------------------------------- the copy and its configuration

def copy_tree(destination: Path):
    """The working tree as git sees it (tracked and untracked files, not the ignored ones)."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            check=True, capture_output=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        source = ROOT / name
        if source.is_file():  # a file deleted but not yet staged is still listed
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, destination / name)


def project_paths(copy: Path) -> list:
    """What the tests may import or load: every top-level module, every folder of Python files
    (packages, and scripts/ and bench/, whose scripts some tests load by path), pytest's configuration."""
    modules = [p.name for p in sorted(copy.glob("*.py"))]
    folders = [p.name + "/" for p in sorted(copy.iterdir())
               if p.is_dir() and p.name != "tests" and any(p.glob("*.py"))]
    return modules + folders + ["pytest.ini"]


def write_config(copy: Path, module: str, tests: list):
    config = configparser.ConfigParser()
    config.read(copy / "setup.cfg")
    if not config.has_section("mutmut"):
        config.add_section("mutmut")
    config["mutmut"]["source_paths"] = module
    config["mutmut"]["pytest_add_cli_args_test_selection"] = "\n" + "\n".join(tests)
    config["mutmut"]["also_copy"] = "\n" + "\n".join(p for p in project_paths(copy) if p.rstrip("/") != module)
    with open(copy / "setup.cfg", "w") as handle:
        config.write(handle)


# ---------------------------------------------------------------- running mutmut and reading its results

def run_mutmut(copy: Path):
    """`mutmut run` in the copy; its progress output (a spinner) goes to mutmut.log there."""
    with open(copy / "mutmut.log", "w") as log:
        done = subprocess.run(["mutmut", "run", "--max-children", "1"], cwd=copy, env=CHILD_ENV,
                              stdout=log, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        tail = (copy / "mutmut.log").read_text(errors="replace")[-2000:]
        raise MutationError(f"mutmut run failed in {copy} (exit {done.returncode}); the log ends:\n{tail}")


def result_files(copy: Path, module: str) -> list:
    """mutmut's results files (one per source file): the module's, or each of a package's files'."""
    mutated = copy / "mutants" / module
    return [Path(str(mutated) + ".meta")] if module.endswith(".py") else sorted(mutated.rglob("*.py.meta"))


def statuses(copy: Path, module: str) -> dict:
    """{mutant name: (mutmut's status word, its source file relative to the copy)}."""
    from mutmut.stats import status_by_exit_code  # imported here: --help works without mutmut
    found = {}
    for meta_path in result_files(copy, module):
        source = str(meta_path.relative_to(copy / "mutants")).removesuffix(".meta")
        meta = json.loads(meta_path.read_text())
        found.update({name: (status_by_exit_code[code], source) for name, code in meta["exit_code_by_key"].items()})
    return found


def diffs(copy: Path, names_by_source: dict) -> dict:
    """{mutant name: its diff}, one mutmut call per source file."""
    found = {}
    for source, names in names_by_source.items():
        done = subprocess.run([sys.executable, "-c", DIFF_SCRIPT, source, *names], cwd=copy, env=CHILD_ENV,
                              check=True, capture_output=True, text=True)
        found.update(json.loads(done.stdout))
    return found


# ---------------------------------------------------------------- the accepted survivors

def function_of(mutant: str) -> str:
    """'losses.x_focal__mutmut_4' -> 'losses.x_focal': numbering changes with the code, the function does not."""
    return mutant.rsplit("__mutmut_", 1)[0]


def changed_lines(diff: str) -> tuple:
    """The removed and added lines of a diff: with the function, the key of an accepted mutant."""
    return tuple(normalised(line) for line in diff.splitlines()
                 if line[:1] in "-+" and not line.startswith(("---", "+++")))


def normalised(line: str) -> str:
    """'-    code' -> '- code': the indentation of a diff line depends on where the function sits."""
    return line[0] + " " + line[1:].strip()


def load_accepted(path: Path) -> dict:
    """{(function, changed lines): 'category: reason'} from blocks of
    'function | category: reason' followed by the '- old' and '+ new' lines."""
    accepted = {}
    for block in path.read_text().split("\n\n"):
        lines = [line for line in block.splitlines() if line and not line.startswith("#")]
        if not lines:
            continue
        function, _, verdict = (part.strip() for part in lines[0].partition("|"))
        if verdict.split(":")[0] not in ACCEPTED_CATEGORIES:
            raise MutationError(f"{path.name}: '{lines[0]}' needs 'function | category: reason', "
                                f"category one of {', '.join(ACCEPTED_CATEGORIES)}")
        accepted[(function, tuple(normalised(line) for line in lines[1:]))] = verdict
    return accepted


# ---------------------------------------------------------------- one module, the table

def mutate(module: str, tests: list, accepted: dict, report_only: bool) -> dict:
    copy = WORK / module.replace("/", ".").removesuffix(".py")
    if report_only:
        if not (copy / "seconds").is_file():  # written last, after mutmut's results
            raise MutationError(f"no results of {module} in {copy}: run without --report-only first")
        seconds = float((copy / "seconds").read_text())
    else:
        shutil.rmtree(copy, ignore_errors=True)
        copy.mkdir(parents=True)
        copy_tree(copy)
        write_config(copy, module, tests)
        start = time.perf_counter()
        run_mutmut(copy)
        seconds = time.perf_counter() - start
        (copy / "seconds").write_text(f"{seconds:.1f}\n")
    found = statuses(copy, module)
    status = {name: word for name, (word, _) in found.items()}
    survivors = sorted((name for name, word in status.items() if word not in ("killed", "timeout")), key=mutant_order)
    by_source = {}
    for name in survivors:
        by_source.setdefault(found[name][1], []).append(name)
    survivor_diffs = diffs(copy, by_source)
    verdicts = {name: accepted.get((function_of(name), changed_lines(survivor_diffs[name]))) for name in survivors}
    return {"module": module, "tests": tests, "seconds": seconds, "status": status,
            "diffs": survivor_diffs, "verdicts": verdicts}


def mutant_order(name: str):
    function, _, number = name.rpartition("__mutmut_")
    return function, int(number) if number.isdigit() else 0


def percent(part: int, whole: int) -> str:
    return f"{100.0 * part / whole:.1f} %" if whole else "n/a"


def table(results: list) -> str:
    """Killed counts the timeouts too: a mutant that makes the tests hang is caught."""
    lines = ["| module, tests | mutants | killed (timeouts) | survived | raw score | accepted (eq/dev/msg) | "
             "score without accepted | time |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in results:
        total = len(r["status"])
        timeouts = sum(word == "timeout" for word in r["status"].values())
        killed = timeouts + sum(word == "killed" for word in r["status"].values())
        categories = [sum(bool(v) and v.startswith(c) for v in r["verdicts"].values()) for c in ACCEPTED_CATEGORIES]
        accepted = sum(categories)
        lines.append(f"| {r['module']}, {' '.join(Path(t).name for t in r['tests'])} | {total} | {killed} ({timeouts}) | "
                     f"{total - killed} | {percent(killed, total)} | {accepted} ({'/'.join(map(str, categories))}) | "
                     f"{percent(killed, total - accepted)} | {r['seconds']:.0f} s |")
    return "\n".join(lines)


def report(results: list, accepted: dict) -> str:
    out = [table(results)]
    for r in results:
        missing = [name for name, verdict in r["verdicts"].items() if verdict is None]
        if missing:
            out.append(f"\n{r['module']}: {len(missing)} survivor(s) not in {ACCEPTED.name} (a missing test?):")
            for name in missing:
                out.append(f"\n{name} ({r['status'][name]})\n{r['diffs'][name].rstrip()}")
    seen = {(function_of(n), changed_lines(r["diffs"][n])) for r in results for n in r["verdicts"]}
    run_modules = tuple(r["module"].replace("/", ".").removesuffix(".py") + "." for r in results)
    stale = [key for key in accepted if key[0].startswith(run_modules) and key not in seen]
    if stale:  # killed now, or the code changed: the entry no longer describes a survivor
        out.append(f"\n{len(stale)} entries of {ACCEPTED.name} match no survivor:")
        out.extend(f"  {function}: {' / '.join(lines)}" for function, lines in stale)
    return "\n".join(out)


def main(argv=None) -> int:
    args = parse_args(argv)
    pairs = [(args.module, args.tests)] if args.module else DEFAULT_PAIRS
    if shutil.which("mutmut") is None:
        print("mutation: mutmut is not installed (pip install 'mutmut==3.8.*')", file=sys.stderr)
        return 2
    try:
        accepted = load_accepted(ACCEPTED)
        results = []
        for module, tests in pairs:
            if not args.report_only:
                print(f"mutating {module} against {' '.join(tests)} ...", flush=True)
            results.append(mutate(module, tests, accepted, args.report_only))
    except MutationError as error:
        print(f"mutation: {error}", file=sys.stderr)
        return 1
    print(report(results, accepted))
    return 1 if any(verdict is None for r in results for verdict in r["verdicts"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
