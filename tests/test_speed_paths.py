"""The GPU training path's pieces, exercised on the CPU: bf16 autocast and channels_last in the training
forward, torch.compile with eager fallback, FLOP accounting, and the benchmark's and report's figures."""
import json
import math
import os
import re
import statistics
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import main
from bench.flops import mfu, peak_bf16_tflops, training_flops_per_image
from bench.report import GRID_DATASETS, defaults_comparison, grid_estimate, new_default_terms, with_model_extras
from cli import default_feature_epochs, parse_args
from compilation import compile_with_fallback, compiling
from data import DATASETS
from helpers import CHILD_ENV, ROOT, TINY, load, run_main, without_timings
from models import build_model

CUDA = torch.cuda.is_available()


# ---------------------------------------------------------------- what the training forward computes in

class TrainingForwards:
    """Output dtypes of Linear/Conv2d and the layout of Conv2d inputs, in training-mode forwards only."""

    def __init__(self):
        self.dtypes, self.channels_last = set(), set()

    def __call__(self, module, inputs, output):
        if not module.training:  # the evaluation / NC pass runs in eval mode
            return
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            self.dtypes.add(output.dtype)
        x = inputs[0]
        # the two layouts differ only with more than one channel and more than one pixel
        if isinstance(module, nn.Conv2d) and x.shape[1] > 1 and x.shape[2] * x.shape[3] > 1:
            self.channels_last.add(x.is_contiguous(memory_format=torch.channels_last))


@pytest.fixture
def training_forwards():
    log = TrainingForwards()
    handle = torch.nn.modules.module.register_module_forward_hook(log)
    yield log
    handle.remove()


@pytest.mark.parametrize("model,flags,dtype,channels_last", [
    ("resnet18", ["--amp", "--channels-last"], torch.bfloat16, {True}),
    ("resnet18", ["--no-amp", "--no-channels-last"], torch.float32, {False}),
    ("vit_tiny_4", ["--amp"], torch.bfloat16, set()),  # not a conv net: no channels_last
    ("vit_tiny_4", ["--no-amp"], torch.float32, set()),
])
def test_training_forward_runs_in_the_asked_dtype_and_layout(tmp_path, training_forwards, model, flags, dtype,
                                                              channels_last):
    argv = [*TINY, "--model", model, "--width", "0.125", "--epochs", "1", "--device", "cpu", *flags,
            "--samples-per-class", "20", "--batch-size", "50", "--out-dir", str(tmp_path), "--run-name", "r"]
    assert run_main(argv) == 0
    assert training_forwards.dtypes == {dtype}
    assert training_forwards.channels_last == channels_last
    last = load(os.path.join(tmp_path, "r", "metrics.pkl"))["epochs"][-1]
    assert np.isfinite(last["mixup_loss"]) and np.isfinite(last["nc"]["train"]["nc1"])


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_cuda_default_training_forward_is_bf16_and_channels_last(tmp_path, training_forwards):
    # --no-compile: module hooks do not run inside a compiled graph
    argv = [*TINY, "--model", "resnet18", "--width", "0.125", "--epochs", "1", "--device", "cuda", "--no-compile",
            "--samples-per-class", "20", "--batch-size", "50", "--out-dir", str(tmp_path), "--run-name", "r"]
    assert run_main(argv) == 0
    assert training_forwards.dtypes == {torch.bfloat16} and training_forwards.channels_last == {True}


# ---------------------------------------------------------------- compilation and its fallback

def raising_backend(graph, example_inputs):
    raise RuntimeError("no compiler here")


def backward_failing_backend():
    """Compiles the forward graph as is; fails on the backward graph, which AOTAutograd compiles lazily."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    def fail(graph, example_inputs):
        raise RuntimeError("no backward compiler here")
    return aot_autograd(fw_compiler=lambda graph, example_inputs: make_boxed_func(graph.forward), bw_compiler=fail)


@pytest.fixture
def compile_backend(monkeypatch):
    """use(backend): torch.compile, as main.py calls it, compiles with `backend` (an inductor-free stand-in)."""
    real = torch.compile
    torch._dynamo.reset()

    def use(backend):
        monkeypatch.setattr(torch, "compile", lambda module, mode=None: real(module, backend=backend))
    yield use
    torch._dynamo.reset()


def small_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.3),
                         nn.Flatten(), nn.Linear(4 * 6 * 6, 3))


def train_steps(step_model, model, steps=3):
    """SGD steps on fixed batches (zero_grad first, so a leftover .grad would show); losses and final state."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    data = torch.Generator().manual_seed(1)
    torch.manual_seed(2)  # dropout's stream
    losses = []
    for _ in range(steps):
        x, y = torch.randn(8, 1, 6, 6, generator=data), torch.randint(0, 3, (8,), generator=data)
        step_model.train()
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(step_model(x), y)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses, {k: v.clone() for k, v in model.state_dict().items()}


def assert_same_training(result, reference):
    (losses, state), (ref_losses, ref_state) = result, reference
    assert losses == ref_losses
    assert state.keys() == ref_state.keys()
    for key in state:
        assert torch.equal(state[key], ref_state[key]), key


@pytest.mark.parametrize("backend", [raising_backend, backward_failing_backend()], ids=["forward", "backward"])
def test_a_failing_compiler_warns_once_and_trains_exactly_as_eager(compile_backend, backend):
    compile_backend(backend)
    net, warnings = small_net(), []
    step_model = compile_with_fallback(net, "reduce-overhead", warn=warnings.append)
    result = train_steps(step_model, net)
    eager = small_net()
    assert_same_training(result, train_steps(eager, eager))
    assert len(warnings) == 1 and warnings[0].startswith("torch.compile failed (") and "compiler here" in warnings[0]
    assert not step_model.active


def test_a_working_compile_leaves_no_trace_of_its_probe_step(compile_backend):
    # dynamo's "eager" backend runs the captured graph unchanged: any difference from eager would be the
    # probe step's (batch-norm statistics, dropout's random stream or .grad not put back)
    compile_backend("eager")
    net, warnings = small_net(), []
    step_model = compile_with_fallback(net, "default", warn=warnings.append)
    result = train_steps(step_model, net)
    eager = small_net()
    assert_same_training(result, train_steps(eager, eager))
    assert warnings == [] and step_model.active and compiling(step_model)


def test_torch_compile_refusing_the_module_leaves_it_eager(monkeypatch):
    def refuse(module, mode=None):
        raise RuntimeError("torch.compile is not supported on this Python")
    monkeypatch.setattr(torch, "compile", refuse)
    net, warnings = small_net(), []
    assert compile_with_fallback(net, "default", warn=warnings.append) is net
    assert len(warnings) == 1 and "not supported on this Python" in warnings[0]
    assert not compiling(net)


@pytest.mark.parametrize("device,flags,expected", [
    ("cuda", [], True), ("cpu", [], False), ("cuda", ["--no-compile"], False), ("cpu", ["--compile"], True)])
def test_compilation_is_the_default_on_cuda_only(device, flags, expected):
    args = parse_args([*TINY, *flags])
    main.resolve_defaults(args, DATASETS["digits"][0], torch.device(device))
    assert args.compile is expected


def build(argv):
    args = parse_args(argv)
    info = DATASETS[args.dataset][0]
    main.resolve_defaults(args, info, torch.device("cpu"))
    train, test = main.load_data(args, info)
    return main.build_run(args, info, train, test, torch.device("cpu"), main.DistContext())


@pytest.mark.parametrize("backend,expected", [("eager", True), (raising_backend, False)], ids=["works", "fails"])
def test_records_say_whether_the_training_step_ran_compiled(compile_backend, tmp_path, capsys, backend, expected):
    compile_backend(backend)
    assert run_main([*TINY, "--epochs", "1", "--compile", "--out-dir", str(tmp_path), "--run-name", "r"]) == 0
    records = load(tmp_path / "r" / "metrics.pkl")["epochs"]
    assert [r["compiled"] for r in records] == [None, expected]
    assert ("torch.compile failed" in capsys.readouterr().err) == (not expected)


def test_the_ragged_last_batch_is_dropped_only_while_compiling(compile_backend, monkeypatch):
    argv = [*TINY, "--device", "cpu", "--samples-per-class", "3", "--batch-size", "8"]  # 30 samples: 3 x 8 + 6
    assert [len(y) for _, y in build([*argv, "--no-compile"]).batches] == [8, 8, 8, 6]
    compile_backend("eager")
    run = build([*argv, "--compile"])
    assert compiling(run.step_model) and [len(y) for _, y in run.batches] == [8, 8, 8]
    monkeypatch.setattr(torch, "compile", lambda module, mode=None: (_ for _ in ()).throw(RuntimeError("no")))
    run = build([*argv, "--compile"])
    assert not compiling(run.step_model) and len(run.batches) == 4


# 200 samples in batches of 50: no ragged batch, so a compiled run and an eager one see the same batches
EVEN = [*TINY, "--device", "cpu", "--samples-per-class", "20", "--batch-size", "50", "--feature-epochs", "2"]


def epochs_of(folder):
    return without_timings(load(os.path.join(folder, "metrics.pkl"))["epochs"])


def test_main_survives_a_failing_compiler_with_one_warning_and_eager_numbers(tmp_path, compile_backend, capsys):
    assert run_main([*EVEN, "--epochs", "2", "--no-compile", "--out-dir", str(tmp_path), "--run-name", "eager"]) == 0
    capsys.readouterr()
    compile_backend(raising_backend)
    assert run_main([*EVEN, "--epochs", "2", "--compile", "--out-dir", str(tmp_path), "--run-name", "failed"]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line.lower()]
    assert len(warnings) == 1 and warnings[0].startswith("main.py: warning: torch.compile failed")
    assert epochs_of(tmp_path / "failed") == epochs_of(tmp_path / "eager")


def test_a_compiled_run_resumes_to_the_same_numbers(tmp_path, compile_backend):
    compile_backend("eager")
    # a constant schedule: a multistep one depends on --epochs, which the resume changes
    common = [*EVEN, "--compile", "--scheduler", "constant", "--out-dir", str(tmp_path)]
    assert run_main([*common, "--epochs", "3", "--run-name", "whole"]) == 0
    assert run_main([*common, "--epochs", "2", "--run-name", "parts"]) == 0
    assert run_main([*common, "--epochs", "3", "--run-name", "parts", "--resume"]) == 0
    assert epochs_of(tmp_path / "parts") == epochs_of(tmp_path / "whole")


# ---------------------------------------------------------------- FLOPs and peaks

def mlp_training_flops(inputs, hidden, layers, classes):
    """A linear layer of n -> m costs 2nm per image forward, 2nm for the weight gradient and 2nm for the
    input gradient, except in the first layer, whose input needs no gradient."""
    shapes = [(inputs, hidden)] + [(hidden, hidden)] * (layers - 1) + [(hidden, classes)]
    return sum(2 * n * m * (2 if i == 0 else 3) for i, (n, m) in enumerate(shapes))


def test_training_flops_of_the_mlp_match_the_formula():
    model = build_model("mlp", 1, 8, 10, width=0.25)  # 3 hidden layers of 64
    assert training_flops_per_image(model, (1, 8, 8), 10, batch=4) == mlp_training_flops(64, 64, 3, 10)


def test_training_flops_scale_linearly_with_the_batch():
    totals = [training_flops_per_image(build_model("resnet18", 3, 32, 100, 0.125), (3, 32, 32), 100, batch) * batch
              for batch in (2, 6)]
    assert totals[1] == 3 * totals[0] and totals[0] > 0


@pytest.mark.parametrize("name,peak", [
    ("NVIDIA H100 80GB HBM3", 989.5), ("NVIDIA H100 PCIe", 756.5), ("NVIDIA H100 NVL", 835.5),
    ("NVIDIA H200", 989.5), ("NVIDIA H200 NVL", 835.5), ("NVIDIA A100-SXM4-80GB", 312.0),
    ("NVIDIA A100 80GB PCIe", 312.0), ("NVIDIA GH200 480GB", None), ("NVIDIA GeForce RTX 4090", None)])
def test_the_device_name_picks_the_peak_row(name, peak):
    row = peak_bf16_tflops(name)
    assert (row[1] if row else None) == peak


# ---------------------------------------------------------------- the benchmark and the report

def test_throughput_bench_figures_agree_with_their_definitions(tmp_path):
    results = tmp_path / "results.jsonl"
    command = [sys.executable, os.path.join(ROOT, "bench", "throughput.py"), "--models", "mlp", "--width", "0.25",
               "--dataset", "digits", "--paths", "default,classic", "--num-train", "256", "--batch-size", "64",
               "--epochs", "1", "--classic-steps", "2", "--workers", "0", "--device", "cpu",
               "--json", str(results)]  # digits is bundled: real data
    done = subprocess.run(command, cwd=ROOT, env=CHILD_ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert "digits-shaped real data, 256 train / 450 test images" in lines[0] and "no MFU" in lines[0]
    project, classic = [json.loads(line) for line in results.read_text().splitlines()]
    assert (project["path"], classic["path"]) == ("eager", "classic")  # "default" on the CPU is eager
    epoch_s = statistics.median(project["epoch_times_s"])
    assert project["images_timed"] == 256 and project["img_s"] == pytest.approx(256 / epoch_s)
    assert project["full_epoch_s"] == pytest.approx(1347 * epoch_s / 256)  # digits' training split
    assert classic["images_timed"] == 2 * 64  # --classic-steps 2
    flops = mlp_training_flops(64, 64, 3, 10)
    for record in (project, classic):
        assert record["flops_per_image"] == flops and record["mfu"] is None
        assert record["tflops"] == pytest.approx(flops * record["img_s"] / 1e12)
    assert project["nc_images"] == 256 + 450  # the NC pass reads both splits
    assert project["full_nc_s"] == pytest.approx(project["nc_s"] * (1347 + 450) / (256 + 450))
    speedup = re.fullmatch(r"speedup: ([0-9.]+)", lines[-1])
    assert speedup and float(speedup.group(1)) == round(project["img_s"] / classic["img_s"], 2)


def test_mfu_is_achieved_over_peak():
    assert mfu(2e9, 1000.0, 4.0) == pytest.approx(2e9 * 1000 / 4e12)


def test_grid_estimate_adds_up_every_cost_of_every_run():
    def record(model, path, epoch_s, **extras):
        return {"model": model, "path": path, "full_epoch_s": epoch_s, "device": "test GPU", **extras}
    extras = {"full_nc_s": 2.0, "feature_snapshot_s": 1.0, "checkpoint_s": 0.5, "full_eval_forward_fp32_s": 1.5,
              "full_eval_forward_tf32_s": 0.5, "full_eval_forward_bf16_s": 0.25}
    records = [record("wrn40_10", "eager", 10.0, **extras), record("wrn40_10", "compiled", 5.0),
               record("vit_b_4", "eager", 20.0, **extras), record("vit_b_4", "compiled", 8.0)]
    snapshots = len(default_feature_epochs(350))
    def run_s(train, nc, scale_train, scale_nc):  # fashionmnist: 60k + 10k images against CIFAR's 50k + 10k
        train, nc = train * scale_train, nc * scale_nc
        return 350 * (train + nc) + nc + snapshots * 1.0 + 350 * 0.5
    def hours(wrn, vit, nc=2.0):
        return 30 * sum(run_s(epoch, nc, 1, 1) * 2 + run_s(epoch, nc, 1.2, 70 / 60) for epoch in (wrn, vit)) / 3600
    def totals(precision):
        text = "\n".join(grid_estimate(records, eval_precision=precision))
        return [float(m.group(1)) for m in re.finditer(r"all 180 runs: (\d+) GPU-hours", text)]
    assert totals("float32") == [round(hours(10.0, 20.0)), round(hours(5.0, 8.0))]
    # another measurement forward: the NC pass's float32 forward (1.5 s) swapped for the TF32 one (0.5 s)
    assert totals("tf32") == [round(hours(10.0, 20.0, nc=1.0)), round(hours(5.0, 8.0, nc=1.0))]


def test_new_defaults_count_each_term_of_a_350_epoch_run():
    measured = {"model": "wrn40_10", "path": "p", "full_epoch_s": 10.0, "device": "test GPU", "full_nc_s": 6.0,
                "full_eval_forward_fp32_s": 5.0, "full_eval_forward_tf32_s": 1.0, "full_eval_forward_bf16_s": 0.5,
                "feature_snapshot_s": 2.0, "checkpoint_s": 0.5, "checkpoint_gb": 1.0}
    record = with_model_extras([measured])[0]
    terms = {name.split(" (")[0].split(",")[0]: (count, each) for name, count, each in
             new_default_terms(record, "cifar100", 350)}
    # Papyan's 50 epochs, epoch 0 and the feature epochs 28, 66 and 152 outside his list
    assert terms["NC passes"] == (54, pytest.approx(6.0 - 5.0 + 1.0))
    assert terms["floor samples"] == (54, pytest.approx(6.0 * 32 * 100 / 60000))
    assert terms["float32 re-measures"] == (8, 6.0)  # 188, 206, 225, 245, 268, 293, 320, 350
    assert terms["test split alone"] == (351 - 54, pytest.approx(1.0 / 6))
    assert terms["feature snapshots"] == (8, 2.0)
    before = 3500 + 54 * 2.0 + 54 * 0.32 + 8 * 6.0 + 297 / 6 + 16.0
    writes = math.ceil(before / 600) + 1
    assert terms["checkpoints"] == (writes, 0.5) and terms["host copies of unwritten states"] == (350 - writes, 0.1)
    text = "\n".join(defaults_comparison([measured, {**measured, "model": "vit_b_4"}], path="p"))
    cell_s = [sum(count * each for _, count, each in new_default_terms(record, dataset, 350)) for dataset in GRID_DATASETS]
    old = 2 * 30 * (2 * (350 * (10 + 6) + 6 + 8 * 2 + 350 * 0.5) + 350 * (12 + 7) + 7 + 8 * 2 + 350 * 0.5) / 3600
    assert f"all 180 runs: {old:.0f} GPU-hours at the old defaults, {2 * 30 * sum(cell_s) / 3600:.0f} at the new" in text
