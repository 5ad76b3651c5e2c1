"""A model's stages below the classifier: reading them (per-layer NC) and mixing one (manifold mixup).

Every model names its stages, input to output, in `model.stages` (stage name ->
submodule; the last is FEATURES, the penultimate layer). Both uses go through
forward hooks on those submodules, so no model's forward is written twice and
DDP, torch.compile and checkpoints see the model unchanged.

A stage's output becomes one vector per input: a convolutional map (B, C, H, W)
is averaged over space (d = channels), a transformer block's tokens (B, T, D)
are read at the class token, a (B, d) output is taken as it is. (The flattened
maps would not fit in memory at N = 50,000: ResNet-18's first stage alone is
64 x 32 x 32 floats per image, 13 GB over CIFAR's training split.)
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Dict, Iterator, List, Optional, Sequence

import torch
from torch import nn

from collapse_metrics import LAYER_METRIC_KEYS, ClassMoments, nearest_mean_hits
from mixup import interpolate
from models.base import FEATURES

INPUT = "input"  # --mixup-layer's name for mixing the images (plain mixup)
RANDOM = "random"  # --mixup-layer's name for a stage drawn per batch
MANIFOLD_MIXUP_DEPTH = 2  # Verma et al. 2019 mix the input or one of the first two stages after the stem
STEM_STAGES = ("stem", "embed")
BOOKKEEPING_KEYS = ("num_samples", "num_classes_present", "nan_reasons")


def stage_vector(output: torch.Tensor) -> torch.Tensor:
    """One feature vector per input from a stage's output (see the module docstring)."""
    if output.dim() == 4:
        return output.mean(dim=(2, 3))
    if output.dim() == 3:
        return output[:, 0]
    return output


def resolve_layers(model, spec: Optional[str]) -> List[str]:
    """--nc-layers as a list of stage names in model order: "all", "" / None (none), or NAME,NAME."""
    names = list(model.stages)
    if not spec:
        return []
    if spec == "all":
        return names
    wanted = [name.strip() for name in spec.split(",") if name.strip()]
    unknown = [name for name in wanted if name not in names]
    if unknown:
        raise ValueError(f"unknown stage(s) {', '.join(unknown)}; this model's stages are {', '.join(names)}")
    return [name for name in names if name in wanted]


def manifold_mixup_choices(model) -> List[str]:
    """What --mixup-layer random draws from: the input and the first stages after the stem (Verma et al. 2019)."""
    body = [name for name in model.stages if name not in STEM_STAGES and name != FEATURES]
    return [INPUT, *body[:MANIFOLD_MIXUP_DEPTH]]


@contextmanager
def read_stages(model, names: Sequence[str]) -> Iterator[Dict[str, torch.Tensor]]:
    """Within the block, every forward of `model` leaves stage_vector(output) of each named stage in the dict.

    FEATURES is left out: the caller has the features as the forward's result.
    """
    outputs: Dict[str, torch.Tensor] = {}
    handles = []
    for name in names:
        if name == FEATURES:
            continue
        def keep(module, inputs, output, name=name):
            outputs[name] = stage_vector(output).float()
        handles.append(model.get_submodule(model.stages[name]).register_forward_hook(keep))
    try:
        yield outputs
    finally:
        for handle in handles:
            handle.remove()


class LayerStatistics:
    """Per-layer NC statistics of the clean training split, gathered during the measurement forward.

    Each chosen stage's vectors are reduced to a ClassMoments (O(C d + d^2))
    as each batch passes; only the rows of a fixed per-class sample are kept,
    for the nearest-class-mean accuracy (which needs the final means, so it
    cannot be decided as the batch passes). FEATURES keeps only that sample:
    its metrics are the ones `nc_statistics` computes for the record's nc.
    """

    def __init__(self, names: Sequence[str], num_classes: int, sample_rows: torch.Tensor):
        self.names, self.num_classes = list(names), num_classes
        self.sample_rows = sample_rows  # (N,) bool on the device: rows whose vectors are kept
        self.moments: Dict[str, ClassMoments] = {}
        self.samples: Dict[str, List[torch.Tensor]] = {name: [] for name in self.names}
        self.sample_labels: List[torch.Tensor] = []

    def add(self, vectors: Dict[str, torch.Tensor], labels: torch.Tensor, rows: slice) -> None:
        keep = self.sample_rows[rows]
        self.sample_labels.append(labels[keep])
        for name in self.names:
            h = vectors[name]
            if name != FEATURES:
                if name not in self.moments:
                    self.moments[name] = ClassMoments(self.num_classes, h.shape[1], h.device)
                self.moments[name].add(h, labels)
            self.samples[name].append(h[keep])

    def finish(self, all_reduce, features_metrics: dict, features_means: torch.Tensor) -> tuple:
        """({name: metrics + ncc_accuracy}, {name: (C, d) class means}), summed over processes.

        The FEATURES entry takes its metrics and means from the record's NC pass.
        """
        labels = torch.cat(self.sample_labels)
        results, means = {}, {}
        for name in self.names:
            if name == FEATURES:
                metrics = {key: features_metrics[key] for key in (*LAYER_METRIC_KEYS, *BOOKKEEPING_KEYS)}
                metrics["nan_reasons"] = {key: why for key, why in metrics["nan_reasons"].items()
                                          if key in LAYER_METRIC_KEYS}
                means[name] = features_means
            else:
                moments = self.moments[name]
                for statistic in moments.statistics():
                    all_reduce(statistic)
                metrics, means[name] = moments.metrics(), moments.class_means()
            hits = torch.stack([nearest_mean_hits(torch.cat(self.samples[name]), labels, means[name]),
                                torch.tensor(float(len(labels)), dtype=torch.float64, device=labels.device)])
            all_reduce(hits)
            correct, total = hits.tolist()
            results[name] = {**metrics, "ncc_accuracy": correct / total if total else float("nan"),
                             "ncc_samples": int(total)}
        return results, means


class ManifoldMixer:
    """Mixes the output of one stage inside the training forward: lam h + (1 - lam) h[partner].

    Hooks sit on every candidate stage; `arm` chooses the stage, weights and
    partners of the step's forward passes, `disarm` ends them. A forward run
    twice for one step (torch.compile's probe, see compilation.py) mixes alike
    both times, and no forward outside a training step (measurement, feature
    capture) is ever mixed.
    """

    def __init__(self, model, names: Sequence[str]):
        self._armed: Optional[tuple] = None
        self._handles = [model.get_submodule(model.stages[name]).register_forward_hook(self._hook(name))
                         for name in names if name != INPUT]

    def _hook(self, name: str):
        def mix(module, inputs, output):
            if self._armed is None or self._armed[0] != name:
                return None
            _, lam, partner = self._armed
            return interpolate(output, output[partner], lam)
        return mix

    def arm(self, name: str, lam: torch.Tensor, partner: torch.Tensor) -> None:
        self._armed = (name, lam, partner)

    def disarm(self) -> None:
        self._armed = None

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
