"""Mixup geometry (Fisher, Meng & Papyan 2024): the triple's mixup points, the ETF classifier, train-mode BN."""
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from data import load_dataset
from data.batches import Normalizer, channel_stats
from feature_capture import FeatureCapture
from helpers import TINY, load, run_main
from mixup import default_triple
from models import build_model

FEATURE_EPOCHS = (0, 1, 2)
LAMBDAS, PAIRS = 5, 3


@pytest.fixture(scope="module")
def digits():
    _, train, _ = load_dataset("digits", "unused", download=False)
    return train


def _capture(train, mode="eval", classes=None, seed=0):
    cfg = SimpleNamespace(feature_mode=mode, eval_batch_size=64, feature_samples_per_class=4,
                          feature_classes=classes, seed=seed, feature_pairs=PAIRS, feature_lambdas=LAMBDAS,
                          loss="cross_entropy", label_smoothing=0.0, mse_scale=1.0, focal_gamma=2.0)
    mean, std = channel_stats(train.images)
    return FeatureCapture(train, 10, cfg, Normalizer(mean, std, "cpu", channels_last=False), "cpu")


@pytest.fixture(scope="module")
def etf_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("etf")
    argv = [*TINY, "--epochs", "2", "--etf-classifier", "--out-dir", str(out), "--run-name", "r",
            "--feature-epochs", ",".join(map(str, FEATURE_EPOCHS)), "--feature-classes", "2,5,7",
            "--feature-lambdas", str(LAMBDAS), "--feature-pairs", str(PAIRS)]
    assert run_main(argv) == 0
    return os.path.join(out, "r")


def _features(folder, epoch):
    return load(os.path.join(folder, "features", f"epoch_{epoch:04d}.pkl"))


def test_triple_and_mixup_points_are_the_same_at_every_epoch(etf_run):
    first = _features(etf_run, 0)["mixup"]
    assert first["triple"] == [2, 5, 7]
    assert set(first["y_a"]) | set(first["y_b"]) == {2, 5, 7}
    assert len(first["lam"]) == 6 * PAIRS * LAMBDAS  # 3 same-class + 3 different-class pair types
    for epoch in FEATURE_EPOCHS[1:]:
        later = _features(etf_run, epoch)["mixup"]
        for key in ("y_a", "y_b", "lam", "index_a", "index_b"):
            np.testing.assert_array_equal(later[key], first[key])
    assert not np.array_equal(_features(etf_run, 0)["mixup"]["H"], _features(etf_run, 2)["mixup"]["H"])


def test_mixup_geometry_is_logged_at_feature_epochs(etf_run):
    records = load(os.path.join(etf_run, "metrics.pkl"))["epochs"]
    for record in records:
        geometry = record["mixup_geometry"]
        assert geometry["lambdas"] == pytest.approx(np.linspace(0, 1, LAMBDAS).tolist())
        assert -1 <= geometry["same_class_alignment"] <= 1 and geometry["diff_class_nonlinearity"] >= 0
        fractions = np.array([geometry["pred_a_fraction"], geometry["pred_b_fraction"],
                              geometry["pred_other_fraction"]])
        np.testing.assert_allclose(fractions.sum(axis=0), 1.0)
    trained = records[-1]["mixup_geometry"]
    # after training, pure x_a (lambda 1) is mostly classified as a and pure x_b (lambda 0) as b
    assert trained["pred_a_fraction"][-1] > 0.5 and trained["pred_b_fraction"][0] > 0.5
    assert trained["margin_ab"][-1] > 0 > trained["margin_ab"][0]


def test_etf_classifier_is_a_frozen_simplex_etf(etf_run):
    W0, W2 = _features(etf_run, 0)["W"], _features(etf_run, 2)["W"]
    np.testing.assert_array_equal(W0, W2)  # frozen through training
    C = W0.shape[0]
    gram = W0.astype(np.float64) @ W0.T.astype(np.float64)
    expected = (np.eye(C) - 1.0 / C) * C / (C - 1)
    np.testing.assert_allclose(gram / gram[0, 0], expected, atol=1e-6)
    assert not _features(etf_run, 0)["b"].any()  # no bias


def test_mixed_inputs_are_exact_interpolations(digits):
    capture = _capture(digits)
    x = capture.normalize(digits.images)
    lam = torch.from_numpy(capture.lam).float().view(-1, 1, 1, 1)
    expected = lam * x[capture.index_a] + (1 - lam) * x[capture.index_b]
    assert torch.equal(capture.mixed_inputs(), expected)
    assert np.array_equal(capture.y_a, digits.labels.numpy()[capture.index_a])


def test_default_triple_is_drawn_from_all_classes():
    drawn = {c for seed in range(20) for c in default_triple(100, seed)}
    assert max(drawn) >= 10 and len(drawn) > 30  # not only the first ten classes of CIFAR-100


def test_default_triple_follows_the_seed(digits):
    assert _capture(digits, seed=3).triple == default_triple(10, 3)


def test_train_mode_features_leave_running_statistics_untouched(digits):
    torch.manual_seed(0)
    model = build_model("mlp", 1, 8, 10, 0.1)
    model.train()
    for _ in range(3):  # give the running statistics values other than their initial ones
        model(torch.randn(32, 1, 8, 8))
    before = {name: buffer.clone() for name, buffer in model.named_buffers()}
    means = torch.zeros(10, model.feature_dim, dtype=torch.float64)
    _, train_geometry = _capture(digits, mode="train").capture(model, 0, means, lambda: torch.autocast("cpu", enabled=False))
    for name, buffer in model.named_buffers():
        assert torch.equal(buffer, before[name]), name
    _, eval_geometry = _capture(digits, mode="eval").capture(model, 0, means, lambda: torch.autocast("cpu", enabled=False))
    # batch statistics really were used: the two modes see different features
    assert train_geometry["margin_ab"] != eval_geometry["margin_ab"]


def _targets(mixup, num_classes):
    """lam e_a + (1 - lam) e_b of every mixup point, written out."""
    lam = mixup["lam"][:, None]
    classes = np.arange(num_classes)
    return lam * (classes == mixup["y_a"][:, None]) + (1 - lam) * (classes == mixup["y_b"][:, None])


def test_ufm_fit_of_every_feature_epoch_is_the_fit_of_the_pickled_features(etf_run):
    """The logged fit, H_ufm and theory curves equal ufm's functions applied to the pickle's own arrays."""
    import ufm

    records = {r["epoch"]: r for r in load(os.path.join(etf_run, "metrics.pkl"))["epochs"]}
    for epoch in FEATURE_EPOCHS:
        features = load(os.path.join(etf_run, "features", f"epoch_{epoch:04d}.pkl"))
        mixup = features["mixup"]
        direct = ufm.fit(mixup["H"], _targets(mixup, 10), features["W"], features["b"], "cross_entropy",
                         same_class=mixup["y_a"] == mixup["y_b"], label_smoothing=0.0, mse_scale=1.0, focal_gamma=2.0)
        logged = records[epoch]["mixup_geometry"]["ufm"]
        assert logged == mixup["ufm"] and logged["nan_reason"] is None and logged["time_s"] > 0
        for key in ("residual", "residual_same_class", "residual_diff_class", "scatter_floor", "shape_residual",
                    "outside_share", "curve_gamma"):
            assert logged[key] == pytest.approx(direct.metrics[key], rel=1e-9), key
        # the ETF benchmark: for a run whose classifier is a fixed simplex ETF, it is the run's own fit
        benchmark = records[epoch]["mixup_geometry"]["ufm_etf"]
        assert benchmark == mixup["ufm_etf"] and benchmark["nan_reason"] is None
        for key in ("residual", "scatter_floor", "shape_residual", "gamma", "scale"):
            assert benchmark[key] == pytest.approx(logged[key], rel=1e-6), key
        np.testing.assert_allclose(mixup["H_ufm"], direct.H_fit.numpy(), rtol=1e-5, atol=1e-6 * np.abs(mixup["H_ufm"]).max())
        curves = mixup["ufm_curves"]
        assert curves["pairs"] == [[2, 2], [5, 5], [7, 7], [2, 5], [2, 7], [5, 7]]
        by_hand = ufm.theory_curve(features["W"], features["b"], (2, 5), curves["lambdas"], "cross_entropy",
                                   logged["curve_gamma"], logged["curve_scale"], label_smoothing=0.0, mse_scale=1.0,
                                   focal_gamma=2.0)
        np.testing.assert_allclose(curves["H"][3], by_hand.numpy(), rtol=1e-5, atol=1e-6 * np.abs(curves["H"]).max())


def test_mse_with_a_fixed_etf_classifier_is_logged_as_not_identifiable(tmp_path):
    """mse, simplex-ETF W, b = 0: H* = W^T t / (C/(C-1) + gamma) has one shape for every gamma."""
    argv = [*TINY, "--epochs", "1", "--loss", "mse", "--etf-classifier", "--feature-epochs", "1",
            "--feature-lambdas", str(LAMBDAS), "--feature-pairs", str(PAIRS), "--out-dir", str(tmp_path),
            "--run-name", "r"]
    assert run_main(argv) == 0
    fit = load(tmp_path / "r" / "metrics.pkl")["epochs"][-1]["mixup_geometry"]["ufm"]
    assert fit["identifiable"] is False and fit["gamma"] is None and 0 < fit["residual"] < 1
