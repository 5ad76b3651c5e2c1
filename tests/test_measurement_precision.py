"""The measurement pass runs in float32 whatever --amp says; bf16 measurement only on request, or under
auto where the run has measured that its rounding floor lies far below NC1."""
import torch
from torch import nn

from cli import parse_args
from collapse_metrics import nc_metrics
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
