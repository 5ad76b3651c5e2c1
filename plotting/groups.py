"""Grouping runs by their config difference, and the colour of each group.

A group is a set of runs that agree on the grouping keys; runs that differ
only in --seed always fall in one group and are aggregated. Its label names
the config difference ("loss=mse"), and its colour is derived from that label
alone, so the same group has the same colour in every subcommand.
"""
from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from .loading import Run, RunError

SEED_KEY = "seed"
COMPLETE = "complete"
# Flags that record where and how a run was kept, not what was trained: they
# never separate groups (feature_classes is drawn from the seed by default).
BOOKKEEPING_KEYS = frozenset({
    "seed", "run_name", "out_dir", "data_dir", "download", "progress", "overwrite", "resume", "checkpoint_every",
    "device", "eval_batch_size", "nc_every", "feature_epochs", "feature_samples_per_class", "feature_classes",
    "feature_lambdas", "feature_pairs", "feature_mode",
})
# Keys the run derives or measures about its environment; used only when a config lacks "flags".
DERIVED_KEYS = frozenset({
    "flags", "command", "git_commit", "device_name", "torch_version", "torchvision_version", "python_version",
    "num_parameters", "feature_dim", "num_classes", "channels", "image_size", "num_train", "num_test",
    "world_size",
})
# Tableau's qualitative colours without grey and cyan (too close to blue): any two
# of them stay apart in a legend, since a group's palette slot comes from a hash.
GROUP_PALETTE = ("#1F77B4", "#FF7F0E", "#2CA02C", "#D62728", "#9467BD", "#8C564B", "#E377C2", "#BCBD22")
# Keys described in a figure's title when every run shares them, in this order.
TITLE_KEYS = ("dataset", "model", "width", "loss", "mixup_alpha", "optimizer", "lr", "epochs")


@dataclass
class Group:
    key: Tuple[Tuple[str, object], ...]
    label: str
    runs: List[Run]
    colour: str = ""
    mixed_keys: Dict[str, list] = field(default_factory=dict)  # other keys that differ inside the group

    @property
    def seeds(self) -> list:
        return sorted({run.seed for run in self.runs if run.seed is not None})

    @property
    def legend_label(self) -> str:
        """The label, the number of runs behind a mean line, and any run that did not complete."""
        count = len(self.runs)
        label = self.label
        if count > 1:
            only_seeds = not self.mixed_keys and len(self.seeds) == count
            label += f" ({count} {'seeds' if only_seeds else 'runs'})"
        unfinished = Counter(run.status for run in self.runs if run.status != COMPLETE)
        if unfinished:
            label += " [" + ", ".join(f"{n} {status}" for status, n in sorted(unfinished.items())) + "]"
        return label


def freeze(value):
    """A hashable, comparable stand-in for a config value (lists become tuples)."""
    if isinstance(value, (list, tuple)):
        return tuple(freeze(item) for item in value)
    if isinstance(value, dict):
        return tuple(sorted((k, freeze(v)) for k, v in value.items()))
    return value


def format_value(value) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, tuple):
        return ",".join(format_value(item) for item in value)
    return str(value)


def experiment_keys(run: Run) -> List[str]:
    """The config keys that describe what was trained (flags minus bookkeeping)."""
    flags = run.config.get("flags")
    keys = flags.keys() if isinstance(flags, dict) else (k for k in run.config if k not in DERIVED_KEYS)
    return [k for k in keys if k not in BOOKKEEPING_KEYS]


def differing_keys(runs: Sequence[Run]) -> List[str]:
    """Experiment keys whose value is not the same in every run, sorted."""
    keys = sorted({key for run in runs for key in experiment_keys(run)})
    return [key for key in keys if len({freeze(run.config.get(key)) for run in runs}) > 1]


def _sortable(value):
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (0, float(value), "")
    return (1, 0.0, str(value))


def _check_keys(runs: Sequence[Run], keys: Sequence[str]) -> None:
    known = sorted({key for run in runs for key in run.config})
    for key in keys:
        if all(key not in run.config for run in runs):
            raise RunError(f"--by {key}: no run has this config key (keys: {', '.join(known)})")


def group_runs(runs: Sequence[Run], by: Optional[Sequence[str]] = None) -> List[Group]:
    """Runs grouped by the keys `by`, or by every experiment key that differs between them (seed aside)."""
    if by:
        _check_keys(runs, by)
        keys = list(by)
    else:
        keys = [key for key in differing_keys(runs) if key != SEED_KEY]
    groups: Dict[tuple, Group] = {}
    for run in runs:
        key = tuple((k, freeze(run.config.get(k))) for k in keys)
        if key not in groups:
            groups[key] = Group(key=key, label=_label(key, runs), runs=[])
        groups[key].runs.append(run)
    ordered = sorted(groups.values(), key=lambda g: tuple(_sortable(v) for _, v in g.key))
    for group in ordered:
        group.mixed_keys = {key: sorted({format_value(freeze(r.config.get(key))) for r in group.runs})
                            for key in differing_keys(group.runs) if key not in keys and key != SEED_KEY}
    assign_colours(ordered)
    return ordered


def _label(key: tuple, runs: Sequence[Run]) -> str:
    if key:
        return ", ".join(f"{k}={format_value(v)}" for k, v in key)
    config = runs[0].config  # one group only: name it by what was trained
    return ", ".join(format_value(freeze(config.get(k))) for k in ("dataset", "model", "loss") if k in config)


def _hash_index(label: str) -> int:
    return int(hashlib.sha256(label.encode()).hexdigest(), 16) % len(GROUP_PALETTE)


def assign_colours(groups: Sequence[Group]) -> None:
    """Each group's colour from its label; a clash within one figure moves to the next free colour.

    The groups arrive in a fixed order, so the same set of groups gets the same
    colours in every subcommand.
    """
    taken = set()
    for group in groups:
        index = _hash_index(group.label)
        for step in range(len(GROUP_PALETTE)):
            candidate = GROUP_PALETTE[(index + step) % len(GROUP_PALETTE)]
            if candidate not in taken or len(taken) >= len(GROUP_PALETTE):
                break
        group.colour = candidate
        taken.add(candidate)


def common_description(runs: Sequence[Run], exclude: Sequence[str] = ()) -> str:
    """What every run shares, for a figure title: 'digits · mlp · loss=mse · mixup_alpha=1 · 80 epochs'."""
    parts = []
    for key in TITLE_KEYS:
        values = {freeze(run.config.get(key)) for run in runs}
        if key in exclude or len(values) != 1 or None in values:
            continue
        value = format_value(values.pop())
        if key in ("dataset", "model"):
            parts.append(value)
        elif key == "epochs":
            parts.append(f"{value} epochs")
        else:
            parts.append(f"{key}={value}")
    return " · ".join(parts)


def describe_mixing(groups: Sequence[Group]) -> List[str]:
    """One note per group that aggregates runs differing in more than the seed."""
    notes = []
    for group in groups:
        if group.mixed_keys:
            mixed = "; ".join(f"{k} in {{{', '.join(v)}}}" for k, v in group.mixed_keys.items())
            notes.append(f"note: group {group.label} aggregates runs that also differ in {mixed}; "
                         f"add the key to --by to separate them")
    return notes
