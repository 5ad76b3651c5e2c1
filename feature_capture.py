"""Feature snapshots at the feature epochs: a per-class sample of clean training
features and the features of mixup points of a class triple (Fisher, Meng &
Papyan 2024), plus the geometry numbers logged beside them.

The sample, the triple, its image pairs and the lambda grid are fixed when the
run starts, so every epoch's snapshot describes the same points.
"""
from __future__ import annotations

import time
from contextlib import contextmanager

import numpy as np
import torch

from collapse_metrics import chord_nonlinearity, diff_class_nonlinearity, mixup_geometry, nearest_simplex_etf
from data import Split
from data.batches import Normalizer
from layers import read_stages
import ufm
from mixup import (box_weight, boxes_mask, default_triple, feature_rules, grid_boxes, interpolate, lambda_grid,
                   mixup_grid, paste, triple_pair_types, triple_pairs)
from models.base import FEATURES

UFM_CURVE_POINTS = 51  # lambdas on the theory curve of each pair type


def ufm_fit_inputs(lam, y_a, y_b, num_classes: int) -> tuple:
    """ufm.fit's targets lam e_a + (1 - lam) e_b (n, C) float64 and same-class mask, from the mixup
    points' numpy lam, y_a, y_b (as pickled): the run's fit and bench/ufm_speed.py's replay of it."""
    labels = torch.arange(num_classes)
    lam = torch.from_numpy(np.asarray(lam, dtype=np.float64))[:, None]
    y_a, y_b = torch.from_numpy(np.asarray(y_a)), torch.from_numpy(np.asarray(y_b))
    targets = (lam * (labels == y_a[:, None]) + (1 - lam) * (labels == y_b[:, None])).double()
    return targets, y_a == y_b


def first_per_class(labels: torch.Tensor, per_class: int, num_classes: int) -> torch.Tensor:
    """Indices of the first `per_class` samples of each class (all samples when 0)."""
    if per_class == 0:
        return torch.arange(labels.shape[0])
    picks = [torch.nonzero(labels == c).flatten()[:per_class] for c in range(num_classes)]
    return torch.cat(picks).sort().values


@contextmanager
def batch_statistics_without_update(model: torch.nn.Module):
    """Train-mode batch norm (batch statistics) that leaves the running statistics as they were."""
    saved = [buffer.clone() for buffer in model.buffers()]
    was_training = model.training
    model.train()
    try:
        yield
    finally:
        model.train(was_training)
        for buffer, value in zip(model.buffers(), saved):
            buffer.copy_(value)


class FeatureCapture:
    """Builds the `features/epoch_XXXX.pkl` payload and the `mixup_geometry` record entry."""

    def __init__(self, train: Split, num_classes: int, cfg, normalize: Normalizer, device):
        self.normalize, self.device = normalize, device
        self.mode, self.batch_size = cfg.feature_mode, cfg.eval_batch_size
        sample = first_per_class(train.labels, cfg.feature_samples_per_class, num_classes)
        self.sample_index = sample.numpy()
        self.sample_images = train.images[sample].to(device)
        self.sample_labels = train.labels[sample].to(device)
        labels = train.labels.numpy()
        self.triple = list(cfg.feature_classes) if cfg.feature_classes else default_triple(num_classes, cfg.seed)
        pair_a, pair_b = triple_pairs(labels, self.triple, cfg.feature_pairs, cfg.seed)
        lambdas = lambda_grid(cfg.feature_lambdas)
        self.index_a, self.index_b, self.lam = mixup_grid(pair_a, pair_b, lambdas)
        self.pair = np.tile(np.arange(pair_a.size), lambdas.size)  # each point's pair (the grid is lambda-major)
        self.y_a, self.y_b = labels[self.index_a], labels[self.index_b]
        # Only the images of the pairs live on the device; the grid indexes into them.
        unique, inverse = np.unique(np.concatenate([self.index_a, self.index_b]), return_inverse=True)
        self.pair_images = train.images[torch.from_numpy(unique)].to(device)
        self.local_a, self.local_b = torch.from_numpy(inverse).to(device).chunk(2)
        self.lam_device = torch.from_numpy(self.lam).float().to(device)
        self.rules = feature_rules(cfg)
        # CutMix points: the same pairs and grid, a box of area ~1 - lam per point, placed from the seed alone
        height, width = train.images.shape[-2:]
        self.boxes = grid_boxes(self.lam, height, width, cfg.seed)
        self.box_mask = boxes_mask(torch.from_numpy(self.boxes).to(device), height, width)
        self.box_lam = box_weight(self.boxes, height, width)  # the weight of x_a: its share of the pixels
        self.loss_name = cfg.loss
        self.loss_options = {"label_smoothing": cfg.label_smoothing, "mse_scale": cfg.mse_scale,
                             "focal_gamma": cfg.focal_gamma}

    def mixed_inputs(self, rule: str = "mixup") -> torch.Tensor:
        """lam * x_a + (1 - lam) * x_b (mixup), or x_a with its box taken from x_b (cutmix), on normalised
        images, as in training."""
        x = self.normalize(self.pair_images)
        if rule == "cutmix":
            return paste(x[self.local_a], x[self.local_b], self.box_mask)
        return interpolate(x[self.local_a], x[self.local_b], self.lam_device)

    def _features(self, model, x, autocast, layers=(), batch_size=None) -> tuple:
        """(features (n, d), {stage: vectors} of the named stages besides FEATURES), in batches."""
        batch_size = batch_size or self.batch_size
        chunks, stage_chunks = [], {name: [] for name in layers if name != FEATURES}
        with read_stages(model, layers) as vectors:
            for start in range(0, x.shape[0], batch_size):
                with autocast():
                    chunks.append(model.features(x[start:start + batch_size]).float())
                for name, kept in stage_chunks.items():
                    kept.append(vectors[name])
        return torch.cat(chunks), {name: torch.cat(kept) for name, kept in stage_chunks.items()}

    def _mixup_features(self, model, autocast, layers, rule: str = "mixup") -> tuple:
        x = self.mixed_inputs(rule)
        if self.mode == "eval":
            return self._features(model, x, autocast, layers)
        # One batch, so that the batch statistics are those of all the mixup points together.
        with batch_statistics_without_update(model):
            return self._features(model, x, autocast, layers, batch_size=x.shape[0])

    def _layer_entries(self, H_mix, pickled_mix, stage_vectors, layer_means) -> tuple:
        """The pickle's `layers` and the geometry's `layers`: each stage's mixup vectors beside its class means."""
        payload, geometry = {}, {}
        for name, means in layer_means.items():
            H = H_mix if name == FEATURES else stage_vectors[name]
            # FEATURES shares mixup.H's array: the pickle then stores it once
            payload[name] = {"H": pickled_mix if name == FEATURES else H.cpu().numpy(), "class_means": means.cpu().numpy()}
            geometry[name] = {"diff_class_nonlinearity": diff_class_nonlinearity(H, self.y_a, self.y_b, self.lam, means),
                              "diff_class_chord_nonlinearity": chord_nonlinearity(H, self.pair, self.lam,
                                                                                  self.y_a != self.y_b)}
        return payload, geometry

    def _ufm_fits(self, H, weight, bias, lam) -> dict:
        """The UFM entries of these points' pickle entry: the fit to the run's classifier (`ufm`, `H_ufm`,
        `ufm_curves`) and to the nearest simplex ETF (`ufm_etf`), both against the targets weighted by
        `lam` (mixup's lambdas, or CutMix's pasted areas)."""
        targets, same_class = ufm_fit_inputs(lam, self.y_a, self.y_b, weight.shape[0])
        fit, H_ufm, curves = self._ufm_entries(H, targets, same_class, weight, bias)
        return {"ufm": fit, "ufm_etf": self._etf_benchmark(H, targets, same_class, weight), "H_ufm": H_ufm,
                "ufm_curves": curves}

    def _ufm_entries(self, H_mix, targets, same_class, weight, bias) -> tuple:
        """(fit metrics, s H* of the mixup points, theory curves) of the run's loss (ufm.fit), in float32 arrays.

        The theory curves are s h*(lam e_a + (1 - lam) e_b) over UFM_CURVE_POINTS lambdas for each pair
        type, in feature coordinates like the fitted points (uncentred, see ufm's "One convention").
        A solver failure leaves NaN metrics that say why, and no arrays, instead of stopping the run.
        """
        start = time.perf_counter()
        try:
            fitted = ufm.fit(H_mix, targets, weight, bias, self.loss_name, same_class=same_class,
                             **self.loss_options)
        except ufm.SolverError as error:
            return ufm.unfitted_metrics(f"UFM solver failed: {error}"), None, None
        metrics = {**fitted.metrics, "time_s": time.perf_counter() - start}  # the fit alone (its results are on the host)
        if metrics["nan_reason"] is not None:
            return metrics, None, None
        lambdas = np.linspace(0.0, 1.0, UFM_CURVE_POINTS)
        pairs = triple_pair_types(self.triple)
        try:
            curves = torch.stack([ufm.theory_curve(weight, bias, pair, lambdas, self.loss_name, metrics["curve_gamma"],
                                                   metrics["curve_scale"], **self.loss_options) for pair in pairs])
        except ufm.SolverError as error:
            return ufm.unfitted_metrics(f"UFM solver failed on the theory curve: {error}"), None, None
        curve_entry = {"lambdas": lambdas, "pairs": [list(pair) for pair in pairs],
                       "H": curves.float().cpu().numpy()}
        return metrics, fitted.H_fit.float().cpu().numpy(), curve_entry

    def _etf_benchmark(self, H_mix, targets, same_class, weight) -> dict:
        """The fit against the simplex ETF nearest to W with no bias (collapse_metrics.nearest_simplex_etf):
        the classifier for which Fisher et al. 2024 derive the optimum. For an --etf-classifier run it is
        the run's own classifier; for a learned one, the paper's benchmark beside the run's own W and b."""
        try:
            etf = nearest_simplex_etf(weight)
        except ValueError as error:  # d < C - 1 (no ETF fits in the feature space), or a non-finite W
            return ufm.unfitted_metrics(f"no simplex ETF benchmark: {error}")
        try:
            return ufm.fit(H_mix, targets, etf, None, self.loss_name, same_class=same_class,
                           **self.loss_options).metrics
        except ufm.SolverError as error:
            return ufm.unfitted_metrics(f"UFM solver failed: {error}")

    def _cutmix_entries(self, model, autocast, class_means, weight, bias) -> tuple:
        """(payload entry, geometry entry) of the CutMix points: mixup_geometry and the UFM fits of their
        features against the same soft targets, weighted by the pasted areas."""
        H_cut, _ = self._mixup_features(model, autocast, [], rule="cutmix")
        geometry = mixup_geometry(H_cut, self.y_a, self.y_b, self.box_lam, class_means, weight, bias, pair=self.pair)
        entry = {"H": H_cut.cpu().numpy(), "y_a": self.y_a, "y_b": self.y_b, "lam": self.box_lam,
                 "lam_grid": self.lam, "boxes": self.boxes, "index_a": self.index_a, "index_b": self.index_b,
                 "pair": self.pair, "triple": list(self.triple), "feature_mode": self.mode}
        entry.update(self._ufm_fits(H_cut, weight, bias, self.box_lam))
        geometry.update(ufm=entry["ufm"], ufm_etf=entry["ufm_etf"])
        return entry, geometry

    @torch.inference_mode()
    def capture(self, model, epoch: int, class_means: torch.Tensor, autocast, layer_means=None):
        """(payload for the features pickle, mixup_geometry dict) at this epoch.

        The mixup points' numbers sit at the top of the geometry and under the payload's `mixup`; the CutMix
        points' (--feature-mix) under `cutmix` in both. `layer_means` ({stage: training class means}, from
        the NC pass of --nc-layers) adds each stage's mixup vectors to the payload and its non-linearity to
        the geometry.
        """
        model.eval()
        layer_means = layer_means or {}
        H_sample, _ = self._features(model, self.normalize(self.sample_images), autocast)
        weight = model.classifier.weight.double()
        bias = model.classifier.bias
        bias = bias.double() if bias is not None else torch.zeros(weight.shape[0], dtype=torch.float64, device=weight.device)
        payload = {
            "epoch": epoch,
            "H": H_sample.cpu().numpy(),
            "y": self.sample_labels.cpu().numpy(),
            "sample_index": self.sample_index,
            "class_means": class_means.cpu().numpy(),
            "W": weight.cpu().numpy(),
            "b": bias.cpu().numpy(),
        }
        geometry = {}
        if "mixup" in self.rules:
            payload["mixup"], geometry, layers = self._mixup_entries(model, autocast, class_means, weight, bias,
                                                                     layer_means)
            if layers is not None:
                payload["layers"] = layers
        if "cutmix" in self.rules:
            payload["cutmix"], geometry["cutmix"] = self._cutmix_entries(model, autocast, class_means, weight, bias)
        return payload, geometry

    def _mixup_entries(self, model, autocast, class_means, weight, bias, layer_means) -> tuple:
        """(payload entry, geometry, the payload's per-stage entries of --nc-layers or None) of the mixup points."""
        H_mix, stage_vectors = self._mixup_features(model, autocast, list(layer_means))
        geometry = mixup_geometry(H_mix, self.y_a, self.y_b, self.lam, class_means, weight, bias, pair=self.pair)
        entry = {
            "H": H_mix.cpu().numpy(), "y_a": self.y_a, "y_b": self.y_b, "lam": self.lam,
            "index_a": self.index_a, "index_b": self.index_b, "pair": self.pair,
            "triple": list(self.triple), "feature_mode": self.mode,
        }
        layers = None
        if layer_means:
            layers, geometry["layers"] = self._layer_entries(H_mix, entry["H"], stage_vectors, layer_means)
        entry.update(self._ufm_fits(H_mix, weight, bias, self.lam))
        geometry.update(ufm=entry["ufm"], ufm_etf=entry["ufm_etf"])
        return entry, geometry, layers
