"""The measurement pass runs in float32 whatever --amp says; bf16 measurement only on request, or under
auto where the run has measured that its rounding floor lies far below NC1."""
import math

import numpy as np
import pytest
import torch
from torch import nn

from cli import parse_args
from collapse_metrics import nc1_floor, nc_metrics
from data import DatasetInfo, Split
from distributed import DistContext
from main import build_run, resolve_defaults
from models import FeatureClassifier
import train
from train import make_eval_autocast, measure, measure_checked

C, SIDE, PER_CLASS, FEATURES = 10, 8, 30, 32
INFO = DatasetInfo("digits", 1, SIDE, C, False)


def nearly_collapsed_split(seed: int) -> Split:
    """Each class one fixed image; every sample differs from it in one pixel by one grey level."""
    generator = torch.Generator().manual_seed(seed)
    prototypes = torch.randint(20, 236, (C, 1, SIDE, SIDE), generator=generator, dtype=torch.uint8)
    labels = torch.arange(C).repeat_interleave(PER_CLASS)
    images = prototypes[labels].clone().view(len(labels), -1)
    pixel = torch.randint(0, SIDE * SIDE, (len(labels),), generator=generator)
    images[torch.arange(len(labels)), pixel] += 1
    return Split(images.view(-1, 1, SIDE, SIDE), labels)


def planted_model() -> FeatureClassifier:
    """A linear feature map with a large common offset: |h| far above the distances between class means."""
    torch.manual_seed(0)
    body = nn.Sequential(nn.Flatten(), nn.Linear(SIDE * SIDE, FEATURES))
    with torch.no_grad():
        body[1].bias.fill_(100.0)
    return FeatureClassifier(body, FEATURES, C, convolutional=False)


def measured_nc1(*flags) -> tuple:
    """(NC1 of the run's measurement pass, NC1 of the same features computed in float64 by hand)."""
    args = parse_args(["--device", "cpu", "--amp", "--epochs", "1", "--feature-epochs", "1", *flags])
    device = torch.device("cpu")
    resolve_defaults(args, INFO, device)
    train, test = nearly_collapsed_split(1), nearly_collapsed_split(2)
    run = build_run(args, INFO, train, test, device, DistContext())
    run.model = planted_model().eval()
    fields, _, _ = measure(run, with_nc=True)
    x = run.normalize(train.images).flatten(1).double()
    linear = run.model.body[1]
    exact = x @ linear.weight.double().T + linear.bias.double()
    truth = nc_metrics(exact, train.labels, run.model.classifier.weight, run.model.classifier.bias)["nc1"]
    return fields["nc"]["train"]["nc1"], truth, run


def test_default_measurement_is_float32_even_with_amp():
    nc1, truth, run = measured_nc1()
    assert run.cfg.amp and run.cfg.eval_precision == "auto" and run.eval_precision == "float32"  # auto on a CPU
    assert abs(nc1 - truth) / truth < 1e-3  # float32 features: the planted value


def test_bf16_measurement_shows_its_rounding_floor():
    nc1, truth, run = measured_nc1("--eval-precision", "bf16")
    assert run.cfg.eval_precision == "bf16"
    assert nc1 > 30 * truth  # rounding |h| ~ 100 to 8 bits swamps one grey level of difference


def test_tf32_measurement_is_float32_on_the_cpu_and_sets_the_cuda_flags_only_inside():
    nc1_tf32, _, run = measured_nc1("--eval-precision", "tf32")
    assert run.cfg.eval_precision == "tf32" and nc1_tf32 == measured_nc1()[0]  # no TF32 arithmetic on a CPU
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    for precision, inside in (("tf32", (True, True)), ("float32", (False, False))):
        context = make_eval_autocast(torch.device("cuda"), precision)
        with context():
            assert (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) == inside
        assert (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) == before


def test_auto_measures_this_collapse_in_float32_after_finding_the_bf16_floor(monkeypatch):
    """bf16 rounding swamps one grey level of difference: its floor is far above the true NC1, so auto redoes the pass."""
    monkeypatch.setitem(train.AUTO_FAST_PRECISION, "cpu", "bf16")
    _, truth, run = measured_nc1()
    assert run.eval_precision == "bf16" and run.floor_sample is not None
    fields, _, _ = measure_checked(run, with_nc=True)
    assert fields["eval_precision"] == "float32" and fields["nc1_floor"] > 30 * truth
    assert abs(fields["nc"]["train"]["nc1"] - truth) / truth < 1e-3


# ---------------------------------------------------------------- nc1_floor's exact value (mutation testing, issue 16)

def _floor_by_numpy(D, y, means):
    """tr(Sigma_noise Sigma_B^+) / P straight from nc1_floor's docstring, in numpy: Sigma_noise centred per
    class present in the sample over n - P_s; Sigma_B = M^T M / P over the P classes with finite means."""
    D, y, means = np.asarray(D, dtype=np.float64), np.asarray(y), np.asarray(means, dtype=np.float64)
    classes = np.unique(y)
    centred = np.concatenate([D[y == c] - D[y == c].mean(axis=0) for c in classes])
    sigma_noise = centred.T @ centred / (len(y) - len(classes))
    present = means[np.isfinite(means).all(axis=1)]
    M = present - present.mean(axis=0)
    sigma_b = M.T @ M / len(present)
    return float(np.trace(sigma_noise @ np.linalg.pinv(sigma_b))) / len(present)


def test_nc1_floor_is_the_docstring_formula_exactly():
    """Against numpy: C = 6 classes in d = 4 (more classes than dimensions), means far from 0, class 5 absent
    from training (NaN mean), class 2 absent from the sample, class 3 with a single sample (its difference is
    its class's mean: no spread); with and without num_classes."""
    rng = np.random.default_rng(33)
    C, d = 6, 4
    means = 10.0 + rng.normal(size=(C, d))
    means[5] = np.nan
    y = np.array([0] * 7 + [1] * 6 + [4] * 8 + [3])
    D = 0.01 * rng.normal(size=(len(y), d)) + 0.05 * rng.normal(size=(C, d))[y]
    expected = _floor_by_numpy(D, y, means)
    assert 0.0 < expected < 1.0
    for num_classes in (None, C):
        assert nc1_floor(torch.tensor(D), torch.tensor(y), torch.tensor(means), num_classes) == \
            pytest.approx(expected, rel=1e-9)


def test_nc1_floor_with_exactly_two_classes_and_its_nan_cases():
    rng = np.random.default_rng(34)
    means = rng.normal(size=(2, 3))
    y = np.array([0, 0, 0, 1, 1])
    D = rng.normal(size=(5, 3))
    assert nc1_floor(torch.tensor(D), torch.tensor(y), torch.tensor(means)) == \
        pytest.approx(_floor_by_numpy(D, y, means), rel=1e-9)
    # as many rows as classes in the sample: no spread to estimate
    assert math.isnan(nc1_floor(torch.tensor(D[[0, 3]]), torch.tensor(y[[0, 3]]), torch.tensor(means)))
    # one non-finite difference, however many rows
    D[1, 2] = math.inf
    assert math.isnan(nc1_floor(torch.tensor(D), torch.tensor(y), torch.tensor(means)))
    # one class with a finite mean
    assert math.isnan(nc1_floor(torch.tensor(D[[0, 1, 2]]), torch.tensor(y[[0, 1, 2]]),
                                torch.tensor(np.array([means[0], [np.nan] * 3]))))
    # Sigma_B = 0: no floor; zero differences: floor 0
    coincident = torch.tensor(np.array([means[0], means[0]]))
    assert math.isnan(nc1_floor(torch.tensor(rng.normal(size=(5, 3))), torch.tensor(y), coincident))
    assert nc1_floor(torch.zeros(5, 3, dtype=torch.float64), torch.tensor(y), torch.tensor(means)) == 0.0
