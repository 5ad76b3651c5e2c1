"""Grouping runs by their config difference, and the colour of each group.

A group is a set of runs that agree on the grouping keys; runs that differ
only in --seed always fall in one group and are aggregated. Its label names
the config difference ("loss=mse"). Its colour names the value of one grouping
key, the hue key: the first key of --by, else the key with the most values. The
hue comes from a fixed palette, in the sorted order of that key's values, so
figures of one sweep agree on what each colour means; the other keys' values
lighten that hue. Where two shades would be too close to tell apart, every
group gets a colour of its own instead.
"""
from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from matplotlib import colormaps
from matplotlib.colors import to_hex, to_rgb

from .loading import Run, RunError

SEED_KEY = "seed"
COMPLETE = "complete"
# Flags that record where and how a run was kept or measured, not what was trained: they
# never separate groups (feature_classes is drawn from the seed by default; nc_layers adds
# measurements below the classifier and leaves training as it is).
BOOKKEEPING_KEYS = frozenset({
    "seed", "run_name", "out_dir", "data_dir", "download", "progress", "overwrite", "resume", "checkpoint_every",
    "device", "eval_batch_size", "nc_every", "nc_epochs", "nc_layers", "feature_epochs", "feature_samples_per_class",
    "feature_classes", "feature_lambdas", "feature_pairs", "feature_mode", "feature_mix",
})
# Keys the run derives or measures about its environment; used only when a config lacks "flags".
DERIVED_KEYS = frozenset({
    "flags", "command", "git_commit", "device_name", "torch_version", "torchvision_version", "python_version",
    "num_parameters", "feature_dim", "num_classes", "channels", "image_size", "num_train", "num_test",
    "world_size", "mix_rule",
})
# Tableau's qualitative colours without grey and cyan (too close to blue), in this
# order for the sorted values of the first grouping key.
GROUP_PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#bcbd22")
# More values than the palette holds: evenly spaced along a sequential map (its pale end left out).
MANY_VALUES_CMAP, MANY_VALUES_RANGE = "viridis", (0.0, 0.9)
# The other grouping keys' values mix up to this share of white into the hue (first value: none).
LIGHTEST_SHADE = 0.5
# Two colours closer than this (CIE76 distance in CIELAB) are hard to tell apart as thin lines
# on white: three shades of one hue stay above it, four fall below (the palette's own closest
# pair, purple and pink, is 27.7 apart).
MIN_COLOUR_DISTANCE = 15.0
# sRGB (linear) to CIE XYZ, and the D65 white point, for cielab.
SRGB_TO_XYZ = np.array([[0.4124564, 0.3575761, 0.1804375], [0.2126729, 0.7151522, 0.0721750],
                        [0.0193339, 0.1191920, 0.9503041]])
D65_WHITE = np.array([0.95047, 1.0, 1.08883])
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
    assign_colours(ordered, hue_key=0 if by else None)
    return ordered


def _label(key: tuple, runs: Sequence[Run]) -> str:
    if key:
        return ", ".join(f"{k}={format_value(v)}" for k, v in key)
    config = runs[0].config  # one group only: name it by what was trained
    return ", ".join(format_value(freeze(config.get(k))) for k in ("dataset", "model", "loss") if k in config)


def _sort_key(values: tuple) -> tuple:
    return tuple(_sortable(v) for v in values)


def hue_palette(count: int) -> List[str]:
    """`count` distinct hues: the palette's first ones, or a sequential map when it is too short."""
    if count <= len(GROUP_PALETTE):
        return list(GROUP_PALETTE[:count])
    return [to_hex(c) for c in colormaps[MANY_VALUES_CMAP](np.linspace(*MANY_VALUES_RANGE, count))]


def lighten(colour: str, share_of_white: float) -> str:
    rgb = np.asarray(to_rgb(colour))
    return to_hex(rgb + (1.0 - rgb) * share_of_white)


def most_varied_key(groups: Sequence[Group]) -> int:
    """The position of the grouping key with the most distinct values (the first of a tie)."""
    counts = [len({group.key[i] for group in groups}) for i in range(len(groups[0].key))]
    return counts.index(max(counts))


def shaded_colours(groups: Sequence[Group], hue_key: int) -> List[str]:
    """Hue from the value of key `hue_key`, shade from the values of the others among that hue's groups.

    Both come from the place of the value in the sorted values of the runs drawn,
    never from the label: `loss=mse` keeps its hue when `--by` adds a key, and
    every subcommand over the same runs gives every value the same colour.
    """
    def split(group):
        return group.key[hue_key:hue_key + 1], group.key[:hue_key] + group.key[hue_key + 1:]
    hue_values = sorted({split(group)[0] for group in groups}, key=_sort_key)
    hues = hue_palette(len(hue_values))
    colours = []
    for group in groups:
        value, rest = split(group)
        rests = sorted({split(g)[1] for g in groups if split(g)[0] == value}, key=_sort_key)
        shade = LIGHTEST_SHADE * rests.index(rest) / (len(rests) - 1) if len(rests) > 1 else 0.0
        colours.append(lighten(hues[hue_values.index(value)], shade))
    return colours


def assign_colours(groups: Sequence[Group], hue_key: Optional[int] = None) -> None:
    """Shades of the hue key's hues (default: the most varied key), or one colour per group where shades
    of one hue would be mistaken for each other."""
    if not groups or not groups[0].key:
        for group, colour in zip(groups, hue_palette(len(groups))):
            group.colour = colour
        return
    colours = shaded_colours(groups, most_varied_key(groups) if hue_key is None else hue_key)
    if min_colour_distance(colours) < MIN_COLOUR_DISTANCE:
        colours = hue_palette(len(groups))  # in the groups' sorted order, as a hue would be
    for group, colour in zip(groups, colours):
        group.colour = colour


def cielab(colour: str) -> np.ndarray:
    """CIELAB (D65) of an sRGB colour: distances there follow perceived differences."""
    rgb = np.asarray(to_rgb(colour), dtype=float)
    linear = np.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)
    xyz = SRGB_TO_XYZ @ linear / D65_WHITE
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.array([116 * f[1] - 16, 500 * (f[0] - f[1]), 200 * (f[1] - f[2])])


def min_colour_distance(colours: Sequence[str]) -> float:
    """The smallest CIE76 distance between two of `colours` (inf for fewer than two)."""
    points = [cielab(colour) for colour in colours]
    return min((float(np.linalg.norm(a - b)) for i, a in enumerate(points) for b in points[i + 1:]),
               default=float("inf"))


def repeated_seeds(groups: Sequence[Group]) -> List[str]:
    """Runs of one group that share every experiment setting and the seed: 'label seed S in folder, folder'.

    A mean over such runs would count that seed more than once.
    """
    repeats = []
    for group in groups:
        keys = sorted({key for run in group.runs for key in experiment_keys(run)} | {SEED_KEY})
        folders = defaultdict(list)
        for run in group.runs:
            folders[tuple(freeze(run.config.get(key)) for key in keys)].append(run)
        for runs in folders.values():
            if len(runs) > 1:
                repeats.append(f"{group.label or 'all runs'} seed {runs[0].seed} in "
                               f"{', '.join(run.folder for run in runs)}")
    return repeats


def check_distinct_seeds(groups: Sequence[Group]) -> None:
    """Refuse groups that would average a seed with a copy of itself."""
    repeats = repeated_seeds(groups)
    if repeats:
        raise RunError(f"runs repeat a setting and its seed, so a mean would count that seed twice: "
                       f"{'; '.join(repeats)} (keep one run folder per seed)")


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
