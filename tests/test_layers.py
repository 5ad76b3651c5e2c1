"""Below the last layer: stage names, per-layer NC against direct computations, manifold mixup."""
import math
import numpy as np
import pytest
import torch

import train
from collapse_metrics import LAYER_METRIC_KEYS, ClassMoments, nc_metrics, nearest_mean_hits
from helpers import TINY, load, rebuild_run, run_main, without_timings
from layers import INPUT, ManifoldMixer, manifold_mixup_choices, read_stages, stage_vector
from models import MODELS, build_model

WIDTH = 1 / 16
C = 7
EXPECTED_STAGES = {
    "mlp": ["hidden1", "hidden2", "features"],
    "resnet": ["stem", "layer1", "layer2", "layer3", "layer4", "features"],
    "wrn": ["stem", "block1", "block2", "block3", "features"],
    "vgg": ["pool1", "pool2", "pool3", "pool4", "pool5", "features"],
    "vit": ["embed", *[f"block{i}" for i in range(12)], "features"],
}


def family(name):
    return next(prefix for prefix in EXPECTED_STAGES if name.startswith(prefix))


def small(name, shape=(3, 32, 32)):
    torch.manual_seed(0)
    return build_model(name, shape[0], shape[1], C, WIDTH).eval()


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_architecture_names_its_stages_input_to_output(name):
    model = small(name)
    assert list(model.stages) == EXPECTED_STAGES[family(name)]
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), read_stages(model, list(model.stages)) as vectors:
        features = model.features(x)
    assert set(vectors) == set(model.stages) - {"features"}
    for stage, h in vectors.items():
        assert h.shape[0] == 3 and h.dim() == 2 and torch.isfinite(h).all(), stage
    assert not any(m._forward_hooks for m in model.modules())  # the hooks are gone after the block
    # the last stage before the global pool repeats the features (documented in models/base.py): ResNet's
    # layer4, whose spatial mean is what the average pool hands to the classifier, and VGG's last pool,
    # whose map is 1x1 at 32x32
    last_before_pool = {"resnet": "layer4", "vgg": "pool5"}.get(family(name))
    if last_before_pool:
        torch.testing.assert_close(vectors[last_before_pool], features)
    if family(name) == "vit":  # each block's vector is its class token
        with torch.no_grad():
            tokens = model.body.encoder.layers[:3](model.body.encoder.dropout(
                torch.cat([model.body.class_token.expand(3, -1, -1),
                           model.body.conv_proj(x).flatten(2).transpose(1, 2)], dim=1)
                + model.body.encoder.pos_embedding))
        torch.testing.assert_close(vectors["block2"], tokens[:, 0])


def test_small_inputs_keep_the_pools_they_can_afford():
    assert list(small("vgg11_bn", (1, 8, 8)).stages) == ["pool1", "pool2", "pool3", "features"]


def test_stage_vectors_average_maps_and_read_class_tokens():
    maps = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).view(2, 3, 2, 2)
    torch.testing.assert_close(stage_vector(maps), maps.flatten(2).mean(dim=2))
    tokens = torch.randn(2, 5, 4)
    assert torch.equal(stage_vector(tokens), tokens[:, 0])
    flat = torch.randn(2, 4)
    assert stage_vector(flat) is flat


def test_random_manifold_mixup_draws_from_the_input_and_the_first_two_stages_after_the_stem():
    assert manifold_mixup_choices(small("resnet18")) == [INPUT, "layer1", "layer2"]
    assert manifold_mixup_choices(small("vit_tiny_4")) == [INPUT, "block0", "block1"]
    assert manifold_mixup_choices(small("mlp")) == [INPUT, "hidden1", "hidden2"]


# ---------------------------------------------------------------- one-pass statistics

def planted_batches(seed=0, n=600, d=12, offset=50.0):
    """Features around an offset: class means far apart, small within-class spread, one class absent."""
    generator = torch.Generator().manual_seed(seed)
    y = torch.randint(0, C - 1, (n,), generator=generator)  # class C-1 never occurs
    means = torch.randn(C, d, generator=generator, dtype=torch.float64) * 3 + offset
    H = (means[y] + 0.05 * torch.randn(n, d, generator=generator, dtype=torch.float64)).float()
    return H, y


def test_one_pass_statistics_equal_the_two_pass_metrics():
    H, y = planted_batches()
    moments = ClassMoments(C, H.shape[1], "cpu")
    for start in range(0, len(y), 128):  # batches of uneven count per class
        moments.add(H[start:start + 128], y[start:start + 128])
    direct = nc_metrics(H, y, torch.randn(C, H.shape[1], dtype=torch.float64), num_classes=C)
    got = moments.metrics()
    assert got["num_samples"] == len(y) and got["num_classes_present"] == C - 1
    # One pass subtracts sum_c n_c mu_c mu_c^T from sum_i h_i h_i^T: float64 cancellation of about
    # eps |h|^2 / tr(Sigma_W) (1e-9 here, with |h| ~ 170 and a spread of 0.05; two orders of magnitude
    # below what float32 features resolve); the two-pass metrics centre first and lose nothing.
    cancellation = torch.finfo(torch.float64).eps * float(H.double().square().sum(1).mean()) / direct["tr_sigma_w"]
    for key in LAYER_METRIC_KEYS:
        assert math.isclose(got[key], direct[key], rel_tol=16 * cancellation), key
    means = moments.class_means()
    assert torch.isnan(means[C - 1]).all()
    np.testing.assert_allclose(means[:C - 1], torch.stack([H[y == c].double().mean(0) for c in range(C - 1)]),
                               rtol=1e-12)


def test_one_pass_statistics_leave_out_and_report_non_finite_rows():
    H, y = planted_batches()
    H[5, 2] = float("inf")
    moments = ClassMoments(C, H.shape[1], "cpu")
    moments.add(H, y)
    got = moments.metrics()
    assert all(math.isnan(got[key]) for key in LAYER_METRIC_KEYS)
    assert got["nan_reasons"]["nc1"] == "1 feature rows are non-finite"
    assert torch.isfinite(moments.class_means()[:C - 1]).all()  # the row is left out of the means


def test_nearest_mean_hits_count_rows_nearest_to_their_own_mean():
    means = torch.tensor([[0.0, 0.0], [4.0, 0.0], [float("nan"), float("nan")]])
    H = torch.tensor([[0.5, 0.0], [3.0, 0.0], [1.9, 0.0], [2.1, 0.0]])
    y = torch.tensor([0, 1, 1, 1])  # the third row is nearer mean 0: a miss
    assert float(nearest_mean_hits(H, y, means)) == 3.0


# ---------------------------------------------------------------- manifold mixup

def by_hand_mlp(model, x, lam, partner):
    """The MLP's forward with the first hidden layer's output mixed, written out with its modules."""
    hidden = model.body[:4](x)
    mixed = lam * hidden + (1 - lam) * hidden[partner]
    return model.classifier(model.body[4:](mixed))


def by_hand_resnet(model, x, lam, partner):
    """ResNet-18's forward with layer1's output mixed, written out with its modules."""
    body = model.body
    h = body.layer1(body.maxpool(body.relu(body.bn1(body.conv1(x)))))
    h = lam * h + (1 - lam) * h[partner]
    h = body.layer4(body.layer3(body.layer2(h)))
    return model.classifier(torch.flatten(body.avgpool(h), 1))


@pytest.mark.parametrize("name,stage,by_hand", [("mlp", "hidden1", by_hand_mlp),
                                                ("resnet18", "layer1", by_hand_resnet)])
def test_manifold_mixup_mixes_the_stage_output_as_by_hand(name, stage, by_hand):
    model = small(name).train()
    x = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    lam, partner = torch.tensor(0.3), torch.tensor([3, 4, 5, 0, 1, 2])
    mixer = ManifoldMixer(model, [INPUT, stage])
    state = {k: v.clone() for k, v in model.state_dict().items()}
    mixer.arm(stage, lam, partner)
    got = model(x)
    model.load_state_dict(state)
    torch.testing.assert_close(model(x), got)  # armed for the step: a second forward mixes alike
    model.load_state_dict(state)  # the same batch-norm statistics for the hand-written forward
    mixer.disarm()
    disarmed = model(x)
    model.load_state_dict(state)
    mixer.remove()
    torch.testing.assert_close(disarmed, model(x))  # disarmed: the plain forward
    torch.testing.assert_close(got, by_hand(model, x, lam, partner), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(got, model(x), atol=1e-3)  # mixing did change the forward
    plain = model(x)
    mixer = ManifoldMixer(model, [INPUT, stage])
    torch.testing.assert_close(model(x), plain)  # not armed: no mixing
    mixer.remove()


def test_random_places_are_drawn_from_the_seed(monkeypatch, tmp_path):
    places = []
    real = train.mixed_batch
    monkeypatch.setattr(train, "mixed_batch", lambda run, x, y, lam, place: places.append(place) or
                        real(run, x, y, lam, place))
    argv = [*TINY, "--epochs", "1", "--mixup-layer", "random", "--feature-epochs", "0", "--out-dir", str(tmp_path)]
    drawn = []
    for seed, name in ((0, "a"), (0, "b"), (1, "c")):
        places.clear()
        assert run_main([*argv, "--seed", str(seed), "--run-name", name]) == 0
        drawn.append(list(places))
    assert drawn[0] == drawn[1] and drawn[0] != drawn[2]
    assert set(drawn[0]) == {INPUT, "hidden1", "hidden2"} and len(drawn[0]) == 11  # 11 steps in the epoch


def test_manifold_mixup_resumes_bit_identically(tmp_path):
    argv = [*TINY, "--mixup-layer", "random", "--scheduler", "constant", "--feature-epochs", "0",
            "--out-dir", str(tmp_path)]
    assert run_main([*argv, "--run-name", "full", "--epochs", "3"]) == 0
    assert run_main([*argv, "--run-name", "parts", "--epochs", "1"]) == 0
    assert run_main([*argv, "--run-name", "parts", "--epochs", "3", "--resume"]) == 0
    full, parts = (load(tmp_path / name / "metrics.pkl") for name in ("full", "parts"))
    assert without_timings(parts["epochs"]) == without_timings(full["epochs"])
    assert full["config"]["mixup_layers"] == [INPUT, "hidden1", "hidden2"]


# ---------------------------------------------------------------- per-layer NC in a run

@pytest.fixture(scope="module")
def layered_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("layers")
    assert run_main([*TINY, "--epochs", "2", "--nc-layers", "all", "--feature-epochs", "2",
                     "--feature-samples-per-class", "50", "--out-dir", str(out), "--run-name", "r"]) == 0
    return out / "r"


def test_features_entry_is_the_records_nc(layered_run):
    document = load(layered_run / "metrics.pkl")
    assert document["config"]["layer_names"] == document["config"]["nc_layers"] == ["hidden1", "hidden2", "features"]
    for record in document["epochs"]:
        entry, nc = record["nc_layers"]["features"], record["nc"]["train"]
        for key in LAYER_METRIC_KEYS:
            assert entry[key] == nc[key], key


def stage_vectors_by_hand(model, images):
    """Each hidden layer's output of the MLP, written out with its modules."""
    with torch.no_grad():
        hidden1 = model.body[:4](images)
        hidden2 = model.body[4:7](hidden1)
        return {"hidden1": hidden1, "hidden2": hidden2, "features": model.body[7:](hidden2)}


def test_per_layer_metrics_equal_a_direct_computation(layered_run):
    """The last epoch's per-layer numbers against nc_metrics on vectors computed from the checkpoint by hand."""
    run = rebuild_run(layered_run)
    model = run.model.eval()
    split = run.eval_splits["train"]
    x = run.normalize(split.images)
    vectors = stage_vectors_by_hand(model, x)
    record = load(layered_run / "metrics.pkl")["epochs"][-1]
    sample = torch.cat([torch.nonzero(split.labels == c).flatten()[:50] for c in range(10)])
    for stage, H in vectors.items():
        direct = nc_metrics(H, split.labels, model.classifier.weight, model.classifier.bias)
        logged = record["nc_layers"][stage]
        for key in LAYER_METRIC_KEYS:
            assert math.isclose(logged[key], direct[key], rel_tol=1e-6), (stage, key)
        means = torch.stack([H[split.labels == c].double().mean(0) for c in range(10)])
        nearest = torch.cdist(H[sample].double(), means).argmin(dim=1)
        assert logged["ncc_accuracy"] == pytest.approx(float((nearest == split.labels[sample]).double().mean()))
        assert logged["ncc_samples"] == len(sample) == 500
    pickled = load(layered_run / "features" / "epoch_0002.pkl")
    geometry = record["mixup_geometry"]["layers"]
    for stage, entry in pickled["layers"].items():
        mix = pickled["mixup"]
        diff = mix["y_a"] != mix["y_b"]
        lam = mix["lam"][diff, None]
        means = entry["class_means"]
        straight = lam * means[mix["y_a"][diff]] + (1 - lam) * means[mix["y_b"][diff]]
        ratio = np.linalg.norm(entry["H"][diff] - straight, axis=1) / np.linalg.norm(
            means[mix["y_a"][diff]] - means[mix["y_b"][diff]], axis=1)
        assert geometry[stage]["diff_class_nonlinearity"] == pytest.approx(ratio.mean(), rel=1e-9), stage


def test_manifold_mixup_survives_the_compile_probe():
    """The compiled step's first call runs a probe forward first; the real forward must still mix."""
    from compilation import CompiledWithFallback

    model = small("mlp").train()
    x = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    lam, partner = torch.tensor(0.3), torch.tensor([3, 4, 5, 0, 1, 2])
    mixer = ManifoldMixer(model, [INPUT, "hidden1"])
    step = CompiledWithFallback(model, model, warn=lambda message: pytest.fail(message))  # `compiled`: the module
    mixer.arm("hidden1", lam, partner)
    got = step(x)
    mixer.remove()
    torch.testing.assert_close(got, by_hand_mlp(model, x, lam, partner), rtol=1e-5, atol=1e-6)
