"""Reading run folders safely.

A pickle can run arbitrary code when it is loaded, and run folders travel
between machines and people. Every pickle is therefore read through
`RestrictedUnpickler`, which resolves globals from a fixed table of builtins
and numpy array machinery and refuses everything else, so loading a file can
never import a module or call a function outside that table.
"""
from __future__ import annotations

import builtins
import codecs
import glob
import os
import pickle
import re
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional, Sequence

import numpy as np

METRICS_FILE = "metrics.pkl"
CONFIG_FILE = "config.json"
FEATURES_DIR = "features"
FEATURES_PATTERN = re.compile(r"^epoch_(\d+)\.pkl$")
SUPPORTED_SCHEMA_VERSIONS = (1,)
GLOB_CHARACTERS = "*?["

# Builtins that only build plain data; nothing here can reach the file system,
# import a module or evaluate code (eval, exec, getattr, __import__ are absent).
SAFE_BUILTINS = ("dict", "list", "tuple", "set", "frozenset", "str", "bytes", "bytearray", "int", "float",
                 "complex", "bool", "slice", "range")

# Protocols 0-2 name the builtins module by its Python 2 name.
BUILTIN_MODULES = ("builtins", "__builtin__")

# Pickles of numpy 1.x name numpy.core; numpy 2 names numpy._core. Both are
# resolved to the objects of the numpy installed here, never imported by name.
_CORE = getattr(np, "_core", None) or np.core
NUMPY_GLOBALS = {
    (f"{package}.multiarray", "_reconstruct"): _CORE.multiarray._reconstruct
    for package in ("numpy.core", "numpy._core")
}
NUMPY_GLOBALS.update({(f"{package}.multiarray", "scalar"): _CORE.multiarray.scalar
                      for package in ("numpy.core", "numpy._core")})
NUMPY_GLOBALS.update({(f"{package}.numeric", "_frombuffer"): _CORE.numeric._frombuffer
                      for package in ("numpy.core", "numpy._core")})
NUMPY_GLOBALS.update({("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype})
# numpy 2 pickles a dtype through its class, e.g. numpy.dtypes.Float64DType.
NUMPY_GLOBALS.update({("numpy.dtypes", name): cls for name, cls in vars(getattr(np, "dtypes", object)).items()
                      if isinstance(cls, type) and issubclass(cls, np.dtype)})

# What a damaged pickle raises while it is read: truncation, bad opcodes, bad
# lengths, memo lookups that miss, arguments numpy rejects. Each becomes one line.
DAMAGED_PICKLE_ERRORS = (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError,
                         KeyError, OverflowError, MemoryError, RecursionError)


class RunError(Exception):
    """A run folder or file that cannot be used; the message is one line and names the path."""


class RefusedGlobal(pickle.UnpicklingError):
    """The pickle names a global outside the allowed table."""


def _latin1_encode(text: str, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    """_codecs.encode as protocol-2 pickles of bytes use it, limited to latin-1 (the only codec they name)."""
    if encoding != "latin1":
        raise RefusedGlobal(f"refused to load global _codecs.encode with codec {encoding!r}")
    return codecs.encode(text, encoding, errors)


class RestrictedUnpickler(pickle.Unpickler):
    """An Unpickler whose globals come only from the tables above."""

    def find_class(self, module: str, name: str):
        if module in BUILTIN_MODULES and name in SAFE_BUILTINS:
            return getattr(builtins, name)
        if (module, name) in NUMPY_GLOBALS:
            return NUMPY_GLOBALS[(module, name)]
        if (module, name) == ("_codecs", "encode"):
            return _latin1_encode
        raise RefusedGlobal(f"refused to load global {module}.{name}")


def load_pickle(path: str):
    """The object in `path`, read by the restricted unpickler; RunError with one line otherwise."""
    try:
        with open(path, "rb") as handle:
            return RestrictedUnpickler(handle).load()
    except FileNotFoundError:
        raise RunError(f"{path}: no such file") from None
    except RefusedGlobal as error:
        raise RunError(f"{path}: {error} (only builtins and numpy arrays are allowed)") from None
    except OSError as error:
        raise RunError(f"{path}: cannot read: {error.strerror or error}") from None
    except DAMAGED_PICKLE_ERRORS as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise RunError(f"{path}: truncated or damaged pickle ({reason})") from None


@dataclass
class Run:
    """One run folder: its resolved config, its epoch records and its final status."""
    folder: str
    config: dict
    records: List[dict]
    status: str

    @property
    def name(self) -> str:
        return os.path.basename(os.path.normpath(self.folder))

    @property
    def seed(self):
        return self.config.get("seed")

    def record_at(self, epoch: int) -> Optional[dict]:
        for record in self.records:
            if record.get("epoch") == epoch:
                return record
        return None

    def last_epoch(self) -> Optional[int]:
        return self.records[-1].get("epoch") if self.records else None


def load_run(folder: str) -> Run:
    """Read and check `folder`/metrics.pkl."""
    if not os.path.isdir(folder):
        raise RunError(f"run folder {folder} does not exist")
    path = os.path.join(folder, METRICS_FILE)
    if not os.path.isfile(path):
        raise RunError(f"{folder}: missing {METRICS_FILE} (the run has not finished its first epoch, "
                       f"or this is not a run folder)")
    document = load_pickle(path)
    if not isinstance(document, dict) or "schema_version" not in document:
        raise RunError(f"{path}: not a metrics file (no schema_version)")
    version = document["schema_version"]
    if version not in SUPPORTED_SCHEMA_VERSIONS:
        supported = ", ".join(str(v) for v in SUPPORTED_SCHEMA_VERSIONS)
        raise RunError(f"{path}: unknown schema_version {version!r} (this utils.py reads {supported})")
    config, records = document.get("config"), document.get("epochs")
    if not isinstance(config, dict) or not isinstance(records, list) or \
            not all(isinstance(r, dict) and "epoch" in r for r in records):
        raise RunError(f"{path}: schema_version {version} file without a config dict and a list of epoch records")
    return Run(folder=folder, config=config, records=records, status=str(document.get("status", "unknown")))


def feature_epochs(folder: str) -> List[int]:
    """Epochs that have a features pickle, ascending."""
    directory = os.path.join(folder, FEATURES_DIR)
    if not os.path.isdir(directory):
        return []
    matches = (FEATURES_PATTERN.match(name) for name in os.listdir(directory))
    return sorted(int(m.group(1)) for m in matches if m)


def named_epochs(text: str, available: Sequence[int], absent: Callable[[int, str], str]) -> List[int]:
    """The epochs that --epochs names ('1,10,last'), in the order given, each checked against
    `available` (ascending, not empty); absent(epoch, listing) is the error for one not there."""
    epochs = []
    for token in (t.strip() for t in text.split(",") if t.strip()):
        if token == "last":
            epoch = available[-1]
        elif token.lstrip("-").isdigit():
            epoch = int(token)
        else:
            raise RunError(f"--epochs: {token!r} is not an epoch number or 'last'")
        if epoch not in available:
            raise RunError(absent(epoch, ", ".join(map(str, available))))
        epochs.append(epoch)
    if not epochs:
        raise RunError("--epochs needs at least one epoch")
    return epochs


def features_path(folder: str, epoch: int) -> str:
    return os.path.join(folder, FEATURES_DIR, f"epoch_{epoch:04d}.pkl")


REQUIRED_FEATURE_KEYS = ("H", "y", "W", "class_means")
REQUIRED_MIXUP_KEYS = ("H", "y_a", "y_b", "lam", "triple")
MIXED_POINTS = ("mixup", "cutmix")  # the payload keys of the class-triple points of each mixing rule


def load_features(folder: str, epoch: int) -> Dict:
    """The features pickle of `epoch`, checked for the arrays the figures use."""
    path = features_path(folder, epoch)
    payload = load_pickle(path)
    if not isinstance(payload, dict) or any(key not in payload for key in REQUIRED_FEATURE_KEYS):
        raise RunError(f"{path}: not a features file (needs {', '.join(REQUIRED_FEATURE_KEYS)})")
    # a run measures the points of its mixing rules (--feature-mix): mixup's, CutMix's or both
    points = [payload.get(rule) for rule in MIXED_POINTS if rule in payload]
    if not points or any(not isinstance(p, dict) or any(key not in p for key in REQUIRED_MIXUP_KEYS) for p in points):
        raise RunError(f"{path}: no mixup points (needs mixup or cutmix with {', '.join(REQUIRED_MIXUP_KEYS)})")
    return payload


def _is_run_folder(path: str) -> bool:
    # config.json alone still marks a run (one that has not logged an epoch yet), so
    # that it is reported as missing metrics.pkl instead of being skipped silently.
    return os.path.isfile(os.path.join(path, METRICS_FILE)) or os.path.isfile(os.path.join(path, CONFIG_FILE))


def _runs_below(parent: str) -> List[str]:
    found = []
    for root, dirs, _ in os.walk(parent):
        dirs.sort()
        if _is_run_folder(root):
            found.append(root)
            dirs.clear()  # a run's own subfolders (features/) hold no runs
    return found


def _expand(pattern: str) -> List[str]:
    if not any(ch in pattern for ch in GLOB_CHARACTERS):
        return [pattern]
    matches = sorted(path for path in glob.glob(pattern) if os.path.isdir(path))
    if not matches:
        raise RunError(f"no run folder matches {pattern}")
    return matches


def find_run_folders(arguments: Iterable[str]) -> List[str]:
    """Run folders named by the arguments: folders, globs, or parents of run folders (a sweep)."""
    folders, seen = [], set()
    for argument in arguments:
        for path in _expand(argument):
            if os.path.isfile(path):
                raise RunError(f"{path} is a file; name the run folder that holds it")
            if not os.path.isdir(path):
                raise RunError(f"run folder {path} does not exist")
            below = [path] if _is_run_folder(path) else _runs_below(path)
            if not below:
                raise RunError(f"{path}: no {METRICS_FILE} here or in any folder below it")
            for folder in below:
                key = os.path.realpath(folder)
                if key not in seen:
                    seen.add(key)
                    folders.append(folder)
    return folders


def load_runs(arguments: Iterable[str]) -> List[Run]:
    return [load_run(folder) for folder in find_run_folders(arguments)]
