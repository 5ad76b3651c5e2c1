"""The run folder on disk: atomic pickles, the checkpoint, and the config beside them.

Every file is written to a temporary name in the same folder, flushed to disk
and then renamed over the old one, so a kill at any moment (or a full disk)
leaves either the previous complete file or the new one, never half of one.
"""
from __future__ import annotations

import errno
import fcntl
import io
import json
import os
import pickle
import tempfile
from typing import Any, Callable

import torch

SCHEMA_VERSION = 1
METRICS_FILE = "metrics.pkl"
CONFIG_FILE = "config.json"
CHECKPOINT_FILE = "checkpoint.pt"
FEATURES_DIR = "features"
TEMP_PREFIX = ".partial-"
LOCK_FILE = ".lock"


class RunIOError(Exception):
    """A run-folder file could not be written; the message is one line and names the file."""


def _atomic_write(path: str, write: Callable[[io.BufferedWriter], None]) -> None:
    folder = os.path.dirname(path) or "."
    fd, temp = tempfile.mkstemp(prefix=TEMP_PREFIX, dir=folder)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except OSError as error:
        _discard(temp)
        reason = "out of disk space" if error.errno == errno.ENOSPC else error.strerror or str(error)
        raise RunIOError(f"could not write {path}: {reason}; the previous copy, if any, is intact") from None
    except BaseException:
        _discard(temp)
        raise


def _discard(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def write_pickle(path: str, obj: Any) -> None:
    _atomic_write(path, lambda handle: pickle.dump(obj, handle, protocol=pickle.HIGHEST_PROTOCOL))


def write_json(path: str, obj: Any) -> None:
    _atomic_write(path, lambda handle: handle.write(json.dumps(obj, indent=2, sort_keys=True, default=str).encode()))


def write_checkpoint(path: str, state: dict) -> None:
    _atomic_write(path, lambda handle: torch.save(state, handle))


def read_checkpoint(path: str) -> dict:
    # Only tensors and builtins are stored, so the safe loader suffices.
    return torch.load(path, map_location="cpu", weights_only=True)


def remove_partials(folder: str) -> None:
    """Temporary files of writes that a kill interrupted."""
    for root, _, files in os.walk(folder):
        for name in files:
            if name.startswith(TEMP_PREFIX):
                os.remove(os.path.join(root, name))


def lock_run_folder(folder: str):
    """Hold an exclusive lock on the run folder for this process's lifetime.

    Two jobs writing one run folder (two sweeps, or a sweep and a manual
    --resume) would interleave their epochs; the second one is refused.
    """
    handle = open(os.path.join(folder, LOCK_FILE), "a")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise RunIOError(f"run folder {folder} is in use by another process (a run still writing it); "
                         f"let it finish or stop it first") from None
    return handle


def metrics_document(config: dict, epochs: list, status: str) -> dict:
    return {"schema_version": SCHEMA_VERSION, "status": status, "config": config, "epochs": epochs}


class RunLog:
    """Writes the run folder; on non-main torchrun processes every write is skipped."""

    def __init__(self, folder: str, config: dict, enabled: bool):
        self.folder, self.config, self.enabled = folder, config, enabled

    def path(self, *parts: str) -> str:
        return os.path.join(self.folder, *parts)

    def start(self) -> None:
        """Create the folder and write config.json; raises RunIOError if the folder cannot be made."""
        if not self.enabled:
            return
        try:
            os.makedirs(self.path(FEATURES_DIR), exist_ok=True)
        except OSError as error:
            raise RunIOError(f"cannot create run folder {self.folder}: {error.strerror or error}") from None
        self._lock = lock_run_folder(self.folder)
        remove_partials(self.folder)
        write_json(self.path(CONFIG_FILE), self.config)

    def write_metrics(self, history: list, status: str) -> None:
        if self.enabled:
            write_pickle(self.path(METRICS_FILE), metrics_document(self.config, history, status))

    def write_features(self, epoch: int, payload: dict) -> None:
        if self.enabled:
            write_pickle(self.path(FEATURES_DIR, f"epoch_{epoch:04d}.pkl"), payload)

    def write_checkpoint(self, state: dict) -> None:
        if self.enabled:
            write_checkpoint(self.path(CHECKPOINT_FILE), state)
