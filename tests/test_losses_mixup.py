"""Every loss on soft targets, and mixup's lambdas, pairing, mixed inputs and targets."""
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import mixup
from losses import LOSSES, build_loss

C = 5


def logits_and_labels(batch=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, C, generator=generator, dtype=torch.float64) * 3
    labels = torch.randint(0, C, (batch,), generator=generator)
    return logits, labels


def one_hot(labels):
    return F.one_hot(labels, C).double()


# ---------------------------------------------------------------- losses

def test_cross_entropy_with_one_hot_equals_index_cross_entropy():
    logits, y = logits_and_labels()
    got = build_loss("cross_entropy")(logits, one_hot(y))
    torch.testing.assert_close(got, F.cross_entropy(logits, y))


def test_mixup_cross_entropy_is_lam_weighted_sum():
    logits, y_a = logits_and_labels()
    y_b = y_a.roll(1)
    lam = torch.tensor(0.3, dtype=torch.float64)
    targets = mixup.soft_targets(y_a, y_b, lam, C).double()
    got = build_loss("cross_entropy")(logits, targets)
    expected = lam * F.cross_entropy(logits, y_a) + (1 - lam) * F.cross_entropy(logits, y_b)
    torch.testing.assert_close(got, expected)


def test_mixup_cross_entropy_per_sample_lam():
    logits, y_a = logits_and_labels()
    y_b = y_a.flip(0)
    lam = torch.linspace(0, 1, 8, dtype=torch.float64)
    targets = mixup.soft_targets(y_a, y_b, lam, C).double()
    got = build_loss("cross_entropy")(logits, targets)
    per_a = F.cross_entropy(logits, y_a, reduction="none")
    per_b = F.cross_entropy(logits, y_b, reduction="none")
    torch.testing.assert_close(got, (lam * per_a + (1 - lam) * per_b).mean())


@pytest.mark.parametrize("smoothing", [0.1, 0.25])
def test_label_smoothing_matches_torch(smoothing):
    logits, y = logits_and_labels()
    got = build_loss("cross_entropy", label_smoothing=smoothing)(logits, one_hot(y))
    torch.testing.assert_close(got, F.cross_entropy(logits, y, label_smoothing=smoothing))
    assert not torch.isclose(got, F.cross_entropy(logits, y))


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_label_smoothing_reaches_every_loss_as_a_target_transform(name):
    """eps = 0.3 changes every loss, and equals that loss on (1 - eps) t + eps / C (written out here)."""
    logits, y = logits_and_labels()
    targets = mixup.soft_targets(y, y.roll(3), torch.linspace(0.1, 0.9, len(y)), C)
    options = dict(mse_scale=2.0, focal_gamma=1.5)
    plain = build_loss(name, **options)
    smoothed = build_loss(name, label_smoothing=0.3, **options)
    by_hand = 0.7 * targets + 0.3 / C
    torch.testing.assert_close(smoothed(logits, targets), plain(logits, by_hand), rtol=1e-12, atol=0)
    assert not torch.isclose(smoothed(logits, targets), plain(logits, targets), rtol=1e-3)


@pytest.mark.parametrize("kappa", [1.0, 5.0])
def test_mse_is_half_sum_of_squares_against_scaled_target(kappa):
    logits, y = logits_and_labels()
    got = build_loss("mse", mse_scale=kappa)(logits, one_hot(y))
    expected = sum(0.5 * sum((logits[i, c] - kappa * (c == y[i])) ** 2 for c in range(C))
                   for i in range(len(y))) / len(y)
    torch.testing.assert_close(got, expected)


def test_mae_and_smooth_l1_against_scaled_target():
    logits, y = logits_and_labels()
    diff = logits - 2.0 * one_hot(y)
    mae = build_loss("mae", mse_scale=2.0)(logits, one_hot(y))
    huber = build_loss("smooth_l1", mse_scale=2.0)(logits, one_hot(y))
    torch.testing.assert_close(mae, diff.abs().sum(1).mean())
    expected = torch.where(diff.abs() < 1, 0.5 * diff ** 2, diff.abs() - 0.5).sum(1).mean()
    torch.testing.assert_close(huber, expected)


def test_focal_with_gamma_zero_is_cross_entropy():
    logits, y = logits_and_labels()
    got = build_loss("focal", focal_gamma=0.0)(logits, one_hot(y))
    torch.testing.assert_close(got, F.cross_entropy(logits, y))


def test_focal_down_weights_easy_samples():
    logits, y = logits_and_labels()
    p = F.softmax(logits, 1).gather(1, y[:, None]).squeeze(1)
    expected = (-(1 - p) ** 2 * p.log()).mean()
    torch.testing.assert_close(build_loss("focal", focal_gamma=2.0)(logits, one_hot(y)), expected)


@pytest.mark.parametrize("gamma", [0.0, 0.5, 1.0, 2.0])
def test_focal_gradients_stay_finite_when_a_sample_is_certain(gamma):
    logits = torch.tensor([[40.0, 0.0, 0.0], [0.0, 1.0, 2.0]], requires_grad=True)  # p = 1 in float32
    targets = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.5, 0.5]])
    loss = build_loss("focal", focal_gamma=gamma)(logits, targets)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()
    assert logits.grad[0].abs().max() < 1e-6 and logits.grad[1].abs().sum() > 0.1


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_every_loss_takes_soft_targets_with_finite_gradients(name):
    logits, y_a = logits_and_labels()
    logits = logits.float().requires_grad_()
    targets = mixup.soft_targets(y_a, y_a.roll(3), torch.rand(8, generator=torch.Generator().manual_seed(2)), C)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. softmax's deprecated implicit dim: say dim=1
        loss = build_loss(name, label_smoothing=0.1, mse_scale=2.0, focal_gamma=2.0)(logits, targets)
        loss.backward()
    assert loss.dim() == 0 and torch.isfinite(loss) and loss > 0
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


def test_builders_default_to_gamma_two_and_kappa_one():
    """Without options: focal is Lin et al.'s gamma = 2, the regression losses aim at kappa = 1 (the CLI's defaults)."""
    logits, y = logits_and_labels()
    targets = mixup.soft_targets(y, y.roll(2), torch.linspace(0.2, 1.0, len(y)), C).double()
    p = logits.exp() / logits.exp().sum(dim=1, keepdim=True)
    diff = logits - targets
    expected = {
        "cross_entropy": -(targets * p.log()).sum(1).mean(),
        "focal": -(targets * (1 - p) ** 2 * p.log()).sum(1).mean(),
        "mse": 0.5 * (diff ** 2).sum(1).mean(),
        "mae": diff.abs().sum(1).mean(),
        "smooth_l1": torch.where(diff.abs() < 1, 0.5 * diff ** 2, diff.abs() - 0.5).sum(1).mean(),
    }
    assert sorted(expected) == sorted(LOSSES)
    for name, value in expected.items():
        torch.testing.assert_close(build_loss(name)(logits, targets), value, rtol=1e-12, atol=0, msg=name)


# ---------------------------------------------------------------- soft targets and mixed batches

def test_soft_targets_keep_num_classes_when_a_batch_lacks_classes():
    targets = mixup.soft_targets(torch.tensor([0, 1]), torch.tensor([1, 0]), torch.tensor(0.75), 10)
    assert targets.shape == (2, 10) and targets.dtype == torch.float32
    expected = torch.zeros(2, 10)
    expected[0, :2] = torch.tensor([0.75, 0.25])
    expected[1, :2] = torch.tensor([0.25, 0.75])
    assert torch.equal(targets, expected)
    loss = build_loss("mse")(torch.zeros(2, 10), targets)  # full-width logits and targets
    torch.testing.assert_close(loss, torch.tensor(0.5 * (0.75 ** 2 + 0.25 ** 2)))


def test_soft_targets_same_class_pair_is_one_hot():
    targets = mixup.soft_targets(torch.tensor([3]), torch.tensor([3]), torch.tensor([0.4]), 4)
    torch.testing.assert_close(targets, torch.tensor([[0.0, 0.0, 0.0, 1.0]]))


def images_and_labels(batch=16):
    generator = torch.Generator().manual_seed(0)
    return torch.randn(batch, 3, 4, 4, generator=generator), torch.arange(batch) % C


@pytest.mark.parametrize("per_sample", [False, True])
def test_mixup_batch_mixes_the_inputs_with_the_partner(per_sample):
    x, y = images_and_labels()
    lam = torch.linspace(0.1, 0.9, 16) if per_sample else torch.tensor(0.3)
    partner = mixup.pair_permutation(16, torch.Generator().manual_seed(7), "cpu")
    assert not torch.equal(partner, torch.arange(16))

    mixed, targets = mixup.mixup_batch(x, y, lam, torch.Generator().manual_seed(7), C)

    weight = lam.reshape(-1, 1, 1, 1)
    torch.testing.assert_close(mixed, weight * x + (1 - weight) * x[partner], rtol=0, atol=1e-6)
    torch.testing.assert_close(targets, lam.reshape(-1, 1) * F.one_hot(y, C) + (1 - lam.reshape(-1, 1))
                               * F.one_hot(y[partner], C), rtol=0, atol=1e-6)
    assert not torch.allclose(mixed, x)  # something was actually mixed


def test_mixup_batch_makes_no_tensor_on_the_default_device():
    # With the default device set to 'meta' (no data), a tensor made without x's device fails or
    # shows in the outputs' .device: on a CPU machine the only way to see a forgotten device=.
    x, y = images_and_labels()
    lam = torch.linspace(0.1, 0.9, 16)
    partner = torch.randperm(16, generator=torch.Generator().manual_seed(7))  # the draw the batch uses
    generator = torch.Generator().manual_seed(7)
    with torch.device("meta"):
        mixed, targets = mixup.mixup_batch(x, y, lam, generator, C)
    assert mixed.device.type == targets.device.type == "cpu"
    weight = lam.reshape(-1, 1, 1, 1)
    torch.testing.assert_close(mixed, weight * x + (1 - weight) * x[partner], rtol=0, atol=1e-6)


def test_mix_with_lam_one_returns_the_batch():
    x, _ = images_and_labels()
    assert torch.equal(mixup.mix(x, torch.tensor(1.0), torch.arange(16).flip(0)), x)


def test_mix_per_sample_weights_each_image():
    x = torch.stack([torch.full((1, 2, 2), 10.0), torch.full((1, 2, 2), 20.0)])
    mixed = mixup.mix(x, torch.tensor([0.25, 1.0]), torch.tensor([1, 0]))
    assert torch.equal(mixed[:, 0, 0, 0], torch.tensor([0.25 * 10 + 0.75 * 20, 20.0]))


def test_pair_permutation_is_a_seeded_permutation():
    first = mixup.pair_permutation(50, torch.Generator().manual_seed(1), "cpu")
    again = mixup.pair_permutation(50, torch.Generator().manual_seed(1), "cpu")
    assert torch.equal(first, again)
    assert sorted(first.tolist()) == list(range(50))


# ---------------------------------------------------------------- lambdas

def test_sample_lambdas_alpha_zero_is_all_ones():
    lams = mixup.sample_lambdas(np.random.default_rng(0), 0.0, steps=4, batch_size=3, per_sample=True)
    assert lams.shape == (4, 3) and np.all(lams == 1)
    assert np.all(mixup.sample_lambdas(np.random.default_rng(0), 0.0, 4, 3, per_sample=False) == np.ones(4))


@pytest.mark.parametrize("per_sample, shape", [(False, (50,)), (True, (50, 8))])
def test_sample_lambdas_shape_range_and_seed(per_sample, shape):
    lams = mixup.sample_lambdas(np.random.default_rng(3), 1.0, 50, 8, per_sample)
    again = mixup.sample_lambdas(np.random.default_rng(3), 1.0, 50, 8, per_sample)
    other = mixup.sample_lambdas(np.random.default_rng(4), 1.0, 50, 8, per_sample)
    assert lams.shape == shape
    assert np.all((lams >= 0) & (lams <= 1)) and lams.std() > 0.1
    assert np.array_equal(lams, again) and not np.array_equal(lams, other)


def test_sample_lambdas_follow_beta_alpha_alpha():
    small = mixup.sample_lambdas(np.random.default_rng(0), 0.2, 20000, 1, False)
    large = mixup.sample_lambdas(np.random.default_rng(0), 8.0, 20000, 1, False)
    assert abs(small.mean() - 0.5) < 0.02 and abs(large.mean() - 0.5) < 0.02
    assert abs(large.var() - 1 / (4 * 17)) < 0.002  # Beta(a, a) variance 1 / (4 (2a + 1))
    assert np.mean((small < 0.1) | (small > 0.9)) > 0.5  # small alpha piles up at 0 and 1


# ---------------------------------------------------------------- the triple of classes for the figures

def test_default_triple_is_three_distinct_classes_from_all():
    triples = {tuple(mixup.default_triple(100, seed)) for seed in range(20)}
    assert all(len(set(t)) == 3 and list(t) == sorted(t) and all(0 <= c < 100 for c in t) for t in triples)
    assert max(max(t) for t in triples) >= 10
    assert mixup.default_triple(100, 5) == mixup.default_triple(100, 5)


def test_default_triple_of_three_classes_is_all_three():
    for seed in range(20):
        assert mixup.default_triple(3, seed) == [0, 1, 2]


def test_triple_pairs_take_every_image_once_when_a_class_has_exactly_enough():
    labels = np.repeat(np.arange(3), 4)  # 4 images per class, 4 pairs per type
    index_a, index_b = mixup.triple_pairs(labels, (0, 1, 2), pairs_per_type=4, seed=3)
    for t, (class_a, class_b) in enumerate(mixup.triple_pair_types((0, 1, 2))):
        block = slice(4 * t, 4 * (t + 1))
        assert sorted(index_a[block]) == list(np.flatnonzero(labels == class_a)), (class_a, class_b)
        if class_a != class_b:  # a same-class partner is any other image of the class
            assert sorted(index_b[block]) == list(np.flatnonzero(labels == class_b)), (class_a, class_b)


def test_triple_pair_types_order():
    assert mixup.triple_pair_types((2, 5, 7)) == [(2, 2), (5, 5), (7, 7), (2, 5), (2, 7), (5, 7)]


def test_triple_pairs_follow_the_pair_types():
    labels = np.random.default_rng(0).integers(0, 6, 200)
    index_a, index_b = mixup.triple_pairs(labels, (1, 3, 4), pairs_per_type=25, seed=9)
    assert index_a.shape == index_b.shape == (150,)
    types = mixup.triple_pair_types((1, 3, 4))
    for t, (class_a, class_b) in enumerate(types):
        block = slice(25 * t, 25 * (t + 1))
        assert np.all(labels[index_a[block]] == class_a) and np.all(labels[index_b[block]] == class_b)
    same = slice(0, 75)
    assert np.all(index_a[same] != index_b[same])  # never an image with itself


def test_triple_pairs_are_reproducible_for_a_seed():
    labels = np.arange(60) % 3
    first = mixup.triple_pairs(labels, (0, 1, 2), 10, seed=1)
    again = mixup.triple_pairs(labels, (0, 1, 2), 10, seed=1)
    other = mixup.triple_pairs(labels, (0, 1, 2), 10, seed=2)
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other))


def test_triple_pairs_same_class_with_two_images_pairs_them_with_each_other():
    labels = np.array([0, 1, 1, 2, 2, 2, 0, 0])  # class 1 has two images: 1 and 2
    index_a, index_b = mixup.triple_pairs(labels, (0, 1, 2), pairs_per_type=6, seed=0)
    block = slice(6, 12)
    assert set(zip(index_a[block], index_b[block])) <= {(1, 2), (2, 1)}


def test_triple_pairs_same_class_partners_are_drawn_pair_by_pair():
    # Within a class of 40 images, each pair gets its own random offset to its partner (not one
    # offset for the whole block): the offsets of 30 pairs take many values.
    labels = np.repeat(np.arange(3), 40)
    index_a, index_b = mixup.triple_pairs(labels, (0, 1, 2), pairs_per_type=30, seed=4)
    for block in (slice(0, 30), slice(30, 60), slice(60, 90)):
        offsets = (index_b[block] - index_a[block]) % 40
        assert np.all(offsets > 0) and len(set(offsets.tolist())) > 10


def test_triple_pairs_single_image_class_pairs_it_with_itself():
    labels = np.array([0, 1, 1, 2, 2])
    index_a, index_b = mixup.triple_pairs(labels, (0, 1, 2), pairs_per_type=3, seed=0)
    assert np.all(index_a[:3] == 0) and np.all(index_b[:3] == 0)


def test_triple_pairs_refuse_an_empty_class():
    with pytest.raises(ValueError, match="class 2"):
        mixup.triple_pairs(np.array([0, 1, 0, 1]), (0, 1, 2), 3, seed=0)


def test_lambda_grid_and_mixup_grid():
    lambdas = mixup.lambda_grid(5)
    assert np.allclose(lambdas, [0, 0.25, 0.5, 0.75, 1]) and np.array_equal(mixup.lambda_grid(1), [1.0])
    assert np.array_equal(mixup.lambda_grid(2), [0.0, 1.0])  # the two ends, not a single 1.0
    index_a, index_b = np.array([3, 4, 5]), np.array([6, 7, 8])
    flat_a, flat_b, lam = mixup.mixup_grid(index_a, index_b, lambdas)
    assert flat_a.shape == flat_b.shape == lam.shape == (15,)
    assert np.array_equal(flat_a[3:6], index_a) and np.array_equal(flat_b[12:15], index_b)
    assert np.array_equal(lam, np.repeat(lambdas, 3))  # lambda-major


def test_interpolate_matches_mixup_grid_rows():
    x = torch.arange(12, dtype=torch.float32).view(6, 2)
    flat_a, flat_b, lam = mixup.mixup_grid(np.array([0, 1]), np.array([4, 5]), mixup.lambda_grid(3))
    mixed = mixup.interpolate(x[flat_a], x[flat_b], torch.from_numpy(lam))
    assert mixed.shape == (6, 2)
    torch.testing.assert_close(mixed[2], x[0] * 0.5 + x[4] * 0.5)
    torch.testing.assert_close(mixed[0], x[4])  # lam = 0: all partner
    torch.testing.assert_close(mixed[5], x[1])  # lam = 1: all first image
