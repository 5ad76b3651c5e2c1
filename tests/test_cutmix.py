"""CutMix, --mix-prob and --switch-prob: the boxes, their targets, the draws, the runs and their measurement."""
import importlib.util
import json
import math
import os
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import mixup
import utils
from cli import parse_args
from helpers import TINY, load, one_torch_thread, run_main, without_timings
from plotting.metrics import resolve_metric, value_at

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
H, W = 8, 8  # the digits' image size


def box_case(lam, centre):
    mask, weight = mixup.box_masks(torch.tensor(lam), torch.tensor(centre), H, W)
    return mask[:, 0], weight


# ---------------------------------------------------------------- boxes and targets

def test_box_weight_is_one_minus_the_masked_area_exactly_also_at_the_border():
    generator = torch.Generator().manual_seed(0)
    lam = torch.rand(500, generator=generator)
    centre = torch.rand(500, 2, generator=generator)
    centre[:100] = torch.tensor([0.0, 0.0])          # a corner: clipped on two sides
    centre[100:200, 1] = 0.999                       # the right border
    mask, weight = mixup.box_masks(lam, centre, H, W)
    pixels = mask.sum(dim=(1, 2, 3)).float()
    assert torch.equal(weight, 1 - pixels / (H * W))  # the target weight is the pasted area, not the nominal one
    assert (pixels[:100] < (1 - lam[:100]) * H * W + 1e-4).all()  # clipping only removes pixels


def test_a_box_is_one_rectangle_of_the_rounded_sides_when_it_fits():
    mask, weight = box_case([0.75, 0.0, 1.0, 0.4375], [[0.5, 0.5], [0.5, 0.5], [0.3, 0.6], [0.5, 0.5]])
    rows, cols = mask.any(dim=2), mask.any(dim=1)
    assert rows[0].nonzero().flatten().tolist() == [2, 3, 4, 5] and cols[0].nonzero().flatten().tolist() == [2, 3, 4, 5]
    assert mask[0].sum() == rows[0].sum() * cols[0].sum() == 16  # a 4 x 4 box: 1 - 0.75 of 64 pixels
    assert weight.tolist() == [0.75, 0.0, 1.0, 0.4375]  # lam 0: the whole image; lam 1: nothing


def test_a_corner_box_is_clipped_and_its_weight_says_so():
    mask, weight = box_case([0.75], [[0.0, 0.0]])  # a 4 x 4 box centred on pixel (0, 0): a 2 x 2 corner
    assert mask[0, :2, :2].all() and mask[0].sum() == 4
    assert weight.item() == 1 - 4 / 64


def test_cutmix_targets_weigh_each_label_by_its_pixels():
    batch = 6
    x = torch.arange(batch, dtype=torch.float32)[:, None, None, None].expand(batch, 1, H, W).contiguous()
    y = torch.arange(batch)
    lam = torch.tensor([0.3, 0.9, 0.5, 0.0, 1.0, 0.6])
    centre = torch.tensor([[0.1, 0.9], [0.5, 0.5], [0.99, 0.0], [0.5, 0.5], [0.2, 0.2], [0.7, 0.4]])
    generator = torch.Generator().manual_seed(3)
    mixed, targets = mixup.cutmix_batch(x, y, lam, centre, None, generator, batch)
    partner = mixup.pair_permutation(batch, torch.Generator().manual_seed(3), "cpu")
    for i in range(batch):
        own = (mixed[i] == i).float().mean()
        from_partner = (mixed[i] == int(partner[i])).float().mean()
        if int(partner[i]) != i:
            assert own + from_partner == 1  # every pixel comes from one of the two images
            assert targets[i, i] == own and targets[i, partner[i]] == from_partner
        assert math.isclose(targets[i].sum().item(), 1.0, abs_tol=1e-6)


def test_per_sample_switch_mixes_the_others_by_interpolation():
    x = torch.randn(4, 1, H, W, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1, 2, 3])
    lam = torch.tensor([0.5, 0.5, 0.25, 0.25])
    centre = torch.full((4, 2), 0.5)
    cut = torch.tensor([True, False, True, False])
    mixed, targets = mixup.cutmix_batch(x, y, lam, centre, cut, torch.Generator().manual_seed(1), 4)
    partner = mixup.pair_permutation(4, torch.Generator().manual_seed(1), "cpu")
    assert torch.equal(mixed[1], 0.5 * x[1] + 0.5 * x[partner[1]])
    assert targets[3, 3] == 0.25 or partner[3] == 3
    mask, weight = mixup.box_masks(lam[:1], centre[:1], H, W)
    assert torch.equal(mixed[0], torch.where(mask[0], x[partner[0]], x[0]))
    assert targets[0, 0] == weight[0] or partner[0] == 0


def expected_side(fraction, lam, size):
    """[low, high) of a side of length size * sqrt(1 - lam) centred at fraction * size: ends rounded, clipped."""
    centre, half = fraction * size, size * math.sqrt(1 - lam) / 2
    return min(max(math.floor(centre - half + 0.5), 0), size), min(max(math.floor(centre + half + 0.5), 0), size)


def test_boxes_on_a_wide_image_match_their_rows_and_columns():
    height, width = 8, 16  # lambdas with exact square roots and centres on whole pixels: no float rounding
    cases = [(lam, r / 8, c / 8) for lam in (1.0, 0.9375, 0.75, 0.4375, 0.0) for r in range(8) for c in range(8)]
    lam = torch.tensor([case[0] for case in cases])
    centre = torch.tensor([case[1:] for case in cases])
    mask, weight = mixup.box_masks(lam, centre, height, width)
    assert mask.shape == (len(cases), 1, height, width) and mask.dtype == torch.bool
    for i, (l, r, c) in enumerate(cases):
        top, bottom = expected_side(r, l, height)
        left, right = expected_side(c, l, width)
        expected = np.zeros((height, width), dtype=bool)
        expected[top:bottom, left:right] = True
        assert np.array_equal(mask[i, 0].numpy(), expected), (l, r, c)
        assert weight[i].item() == 1 - (bottom - top) * (right - left) / (height * width)
    x = torch.arange(len(cases), dtype=torch.float32)[:, None, None, None].expand(-1, 2, height, width).contiguous()
    mixed, _ = mixup.cutmix_batch(x, torch.zeros(len(cases), dtype=torch.long), lam, centre, None,
                                  torch.Generator().manual_seed(0), 2)
    partner = mixup.pair_permutation(len(cases), torch.Generator().manual_seed(0), "cpu")
    assert torch.equal(mixed, torch.where(mask, x[partner], x))


def test_a_box_side_centred_outside_the_image_clips_to_nothing_at_its_border():
    size, lam = 8, torch.tensor([0.75, 0.75, 0.9375, 0.0])  # sides of 4, 4, 2 and 8 pixels
    centre = torch.tensor([-5.0, 13.0, 9.5, -4.5])
    low, high = mixup.box_sides(lam, centre, size)
    expected = [expected_side(c / size, l, size) for l, c in zip(lam.tolist(), centre.tolist())]
    assert list(zip(low.tolist(), high.tolist())) == expected
    assert all(a == b for a, b in expected)  # empty: nothing to paste, not a negative area


def test_boxes_mask_takes_whole_pixels_of_each_side():
    boxes = torch.tensor([[1, 3, 0, 5], [0, 0, 2, 4], [2, 5, 4, 6]])
    mask = mixup.boxes_mask(boxes, 5, 6)[:, 0].numpy()
    for i, (top, bottom, left, right) in enumerate(boxes.tolist()):
        expected = np.zeros((5, 6), dtype=bool)
        expected[top:bottom, left:right] = True
        assert np.array_equal(mask[i], expected)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_cutmix_stays_on_the_device():
    generator = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(4, 1, H, W, device="cuda")
    lam, centre = torch.full((4,), 0.5, device="cuda"), torch.full((4, 2), 0.5, device="cuda")
    mixed, targets = mixup.cutmix_batch(x, torch.arange(4, device="cuda"), lam, centre, None, generator, 4)
    assert mixed.is_cuda and targets.is_cuda
    assert mixup.boxes_mask(torch.tensor([[1, 3, 2, 4]], device="cuda"), H, W).is_cuda


def test_grid_boxes_have_the_documented_sizes_and_every_position():
    lambdas = np.tile(np.linspace(0, 1, 401), 200)
    share = 1 - lambdas
    for height, width in ((8, 8), (5, 12), (8, 200)):
        boxes = mixup.grid_boxes(lambdas, height, width, seed=7)
        assert boxes.shape == (lambdas.size, 4) and boxes.dtype.kind == "i"
        top, bottom, left, right = boxes.T
        rows, cols = bottom - top, right - left
        assert (top >= 0).all() and (bottom <= height).all() and (left >= 0).all() and (right <= width).all()
        assert (np.abs(rows - height * np.sqrt(share)) <= 0.5).all()  # height * sqrt(1 - lam) rows, rounded
        target = share * height * width
        best = np.abs(rows[:, None] * np.arange(width + 1)[None, :] - target[:, None]).min(axis=1)
        assert np.allclose(np.abs(rows * cols - target)[rows > 0], best[rows > 0], rtol=0, atol=1e-9)
        assert (cols[rows == 0] == 0).all()  # a box of no rows pastes nothing and has no columns either
        if width <= 12:  # every position that keeps a box inside the image occurs
            for size in np.unique(rows):
                assert set(top[rows == size]) == set(range(height - size + 1))
            for size in np.unique(cols):
                assert set(left[cols == size]) == set(range(width - size + 1))
    grid = np.linspace(0, 1, 5)
    outside = grid.copy()
    outside[0], outside[-1] = -0.5, 1.5  # lambdas outside [0, 1] count as 0 and 1
    assert np.array_equal(mixup.grid_boxes(outside, 8, 200, 3), mixup.grid_boxes(grid, 8, 200, 3))


# ---------------------------------------------------------------- the draws

def test_plain_mixup_draws_nothing_more():
    rng = np.random.default_rng(5)
    lams = mixup.sample_lambdas(rng, 1.0, 10, 4, per_sample=False)
    state = rng.bit_generator.state
    draws = mixup.sample_mixing(rng, lams, 1.0, 0.0, 1.0, 0.5)
    assert rng.bit_generator.state == state  # today's runs keep their random streams
    assert np.array_equal(draws.lam, lams) and draws.mixed.all() and not draws.cut.any()


def binomial_interval(n, p, z=4.0):
    """An interval that holds a Binomial(n, p) count with probability above 1 - 6e-5."""
    spread = z * math.sqrt(n * p * (1 - p))
    return n * p - spread, n * p + spread


@pytest.mark.parametrize("per_sample", [False, True])
def test_switch_and_mix_frequencies_match_their_probabilities(per_sample):
    rng = np.random.default_rng(11)
    steps, batch, mix_prob, switch_prob = 4000, 8, 0.7, 0.3
    lams = mixup.sample_lambdas(rng, 1.0, steps, batch, per_sample)
    draws = mixup.sample_mixing(rng, lams, 1.0, 1.0, mix_prob, switch_prob)
    low, high = binomial_interval(draws.mixed.size, mix_prob)
    assert low <= draws.mixed.sum() <= high
    mixed = draws.mixed.sum()
    low, high = binomial_interval(mixed, switch_prob)
    assert low <= (draws.cut & draws.mixed).sum() <= high
    assert (draws.lam[~draws.mixed] == 1).all()
    assert np.array_equal(draws.lam[draws.mixed & ~draws.cut], lams[draws.mixed & ~draws.cut])


def test_cutmix_alone_cuts_every_mixed_batch():
    rng = np.random.default_rng(2)
    lams = mixup.sample_lambdas(rng, 0.0, 50, 4, per_sample=False)
    draws = mixup.sample_mixing(rng, lams, 0.0, 1.0, 1.0, 0.5)
    assert draws.cut.all() and ((draws.lam > 0) & (draws.lam < 1)).all()
    assert draws.centre.shape == (50, 2) and ((draws.centre >= 0) & (draws.centre < 1)).all()


def test_feature_boxes_come_from_the_seed_alone_and_match_their_lambdas():
    lambdas = np.tile(mixup.lambda_grid(21), 20)
    first, again, other = (mixup.grid_boxes(lambdas, H, W, seed) for seed in (4, 4, 5))
    assert np.array_equal(first, again) and not np.array_equal(first, other)
    assert (first[:, [0, 2]] >= 0).all() and (first[:, 1] <= H).all() and (first[:, 3] <= W).all()
    weight = mixup.box_weight(first, H, W)
    mask = mixup.boxes_mask(torch.from_numpy(first), H, W)
    assert np.array_equal(1 - mask.sum(dim=(1, 2, 3)).numpy() / (H * W), weight)
    assert np.abs(weight - lambdas).max() <= 0.07  # whole pixels on an 8 x 8 image
    for value in np.unique(lambdas):  # one weight per grid lambda, wherever the box sits
        assert np.unique(weight[lambdas == value]).size == 1


@pytest.mark.parametrize("per_sample", [False, True])
def test_draws_have_their_documented_types_and_shapes(per_sample):
    for mixup_alpha, cutmix_alpha, mix_prob in ((1.0, 0.0, 1.0), (1.0, 0.0, 0.5), (0.0, 1.0, 1.0),
                                                (0.0, 1.0, 0.5), (1.0, 1.0, 1.0), (1.0, 1.0, 0.5)):
        rng = np.random.default_rng(3)
        lams = mixup.sample_lambdas(rng, mixup_alpha, 50, 4, per_sample)
        draws = mixup.sample_mixing(rng, lams, mixup_alpha, cutmix_alpha, mix_prob, 0.5)
        shape = lams.shape
        assert draws.mixed.dtype == bool and draws.cut.dtype == bool
        assert draws.lam.shape == draws.mixed.shape == draws.cut.shape == shape
        assert draws.centre.shape == (*shape, 2)
        assert (draws.lam[~draws.mixed] == 1).all()
        assert np.array_equal(draws.lam[draws.mixed & ~draws.cut], lams[draws.mixed & ~draws.cut])
        if cutmix_alpha == 0:
            assert not draws.cut.any() and not draws.centre.any()
        else:
            assert draws.cut.any() and draws.cut.all() == (mixup_alpha == 0)  # CutMix alone cuts every mixed one
            cut_lams = draws.lam[draws.cut & draws.mixed]
            assert np.unique(cut_lams).size == cut_lams.size  # one Beta draw per cut batch (or sample)


# ---------------------------------------------------------------- rules named by the configuration

def config(**flags):
    return SimpleNamespace(**flags)


def test_mixes_and_rule_name_follow_the_alphas_and_mix_prob():
    for mixup_alpha, cutmix_alpha, rule in ((0.0, 0.0, "none"), (0.5, 0.0, "mixup"), (0.0, 0.5, "cutmix"),
                                            (0.5, 0.5, "switch")):
        for mix_prob in (1.0, 0.3, 0.0):
            cfg = config(mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha, mix_prob=mix_prob)
            assert mixup.mixes(cfg) == (rule != "none" and mix_prob > 0)
            assert mixup.rule_name(cfg) == (rule if mix_prob > 0 else "none")


def test_feature_rules_take_feature_mix_else_the_runs_rules():
    assert mixup.feature_rules(config(feature_mix=["cutmix"], mixup_alpha=1.0, cutmix_alpha=0.0)) == ["cutmix"]
    assert mixup.feature_rules(config(feature_mix=["mixup"], mixup_alpha=0.0, cutmix_alpha=1.0)) == ["mixup"]
    assert mixup.feature_rules(config(feature_mix=["cutmix", "mixup"], mixup_alpha=0.0,
                                      cutmix_alpha=0.0)) == ["mixup", "cutmix"]
    assert mixup.feature_rules(config(feature_mix=None, mixup_alpha=0.0, cutmix_alpha=1.0)) == ["cutmix"]
    assert mixup.feature_rules(config(mixup_alpha=1.0, cutmix_alpha=1.0)) == ["mixup", "cutmix"]
    assert mixup.feature_rules(config(mixup_alpha=0.0, cutmix_alpha=0.0)) == ["mixup"]  # no mixing: mixup's
    # a namespace from before the flags: a missing alpha counts as 0
    assert mixup.feature_rules(config(cutmix_alpha=1.0)) == ["cutmix"]
    assert mixup.feature_rules(config(mixup_alpha=1.0)) == ["mixup"]
    assert mixup.feature_rules(config(mixup_alpha=0.0)) == ["mixup"]
    assert mixup.feature_rules(config()) == ["mixup"]


# ---------------------------------------------------------------- flags and names

def test_cutmix_is_refused_at_a_stage_and_named_apart(capsys):
    assert run_main([*TINY, "--cutmix-alpha", "1", "--mixup-layer", "hidden1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--cutmix-alpha" in err and "hidden1" in err
    assert run_main([*TINY, "--switch-prob", "1.5"]) == 2
    names = {parse_args(flags).run_name for flags in ([], ["--cutmix-alpha", "1"], ["--mixup-alpha", "0",
             "--cutmix-alpha", "1"], ["--mix-prob", "0.5"], ["--switch-prob", "0.2"])}
    assert len(names) == 5 and "digits_mlp_cross_entropy_a1_s0" in names


def test_sweep_rules_set_both_alphas_and_own_cutmix_alpha():
    spec = importlib.util.spec_from_file_location("sweep_for_cutmix", os.path.join(ROOT, "scripts", "sweep.py"))
    sweep = importlib.util.module_from_spec(spec)
    sys.modules["sweep_for_cutmix"] = sweep
    spec.loader.exec_module(sweep)
    args = sweep.build_parser().parse_args(["--alphas", "0.4", "--rules", "mixup,cutmix,switch"])
    entries = sweep.expand_grid(args, [])
    alphas = [(parse_args(list(e.argv)).mixup_alpha, parse_args(list(e.argv)).cutmix_alpha) for e in entries]
    assert alphas == [(0.4, 0.0), (0.0, 0.4), (0.4, 0.4)]
    assert len({e.folder for e in entries}) == 3
    with pytest.raises(sweep.UsageError, match="--rules"):
        sweep.expand_grid(args, ["--cutmix-alpha", "1"])


# ---------------------------------------------------------------- runs

# Default feature epochs: 1 for --epochs 1, then 2 and 3 once resumed to --epochs 3 (1, 2, 3 in one go).
RUN = [*TINY, "--scheduler", "constant", "--feature-pairs", "4", "--feature-lambdas", "5",
       "--feature-samples-per-class", "10"]


@pytest.fixture(autouse=True)
def one_thread():
    with one_torch_thread():
        yield


def test_mix_prob_zero_trains_as_no_mixup(tmp_path):
    argv = [*RUN, "--epochs", "2", "--feature-epochs", "2", "--out-dir", str(tmp_path)]
    assert run_main([*argv, "--run-name", "off", "--mixup-alpha", "0"]) == 0
    assert run_main([*argv, "--run-name", "never", "--mix-prob", "0"]) == 0
    off, never = (load(tmp_path / name / "metrics.pkl") for name in ("off", "never"))
    assert without_timings(never["epochs"]) == without_timings(off["epochs"])
    assert never["config"]["mix_rule"] == off["config"]["mix_rule"] == "none"


@pytest.fixture(scope="module")
def cutmix_runs(tmp_path_factory):
    """A switch run in one go and in two parts (resumed), measuring both rules' points."""
    out = tmp_path_factory.mktemp("cutmix")
    argv = [*RUN, "--cutmix-alpha", "1", "--switch-prob", "0.5", "--out-dir", str(out)]
    with one_torch_thread():
        assert run_main([*argv, "--run-name", "full", "--epochs", "3"]) == 0
        assert run_main([*argv, "--run-name", "parts", "--epochs", "1"]) == 0
        assert run_main([*argv, "--run-name", "parts", "--epochs", "3", "--resume"]) == 0
    return out


def test_a_cutmix_run_resumes_bit_identically_with_the_same_boxes(cutmix_runs):
    full, parts = (load(cutmix_runs / name / "metrics.pkl") for name in ("full", "parts"))
    assert without_timings(parts["epochs"]) == without_timings(full["epochs"])
    assert full["config"]["mix_rule"] == "switch" and full["config"]["feature_mix"] == ["mixup", "cutmix"]
    epochs = [load(cutmix_runs / name / "features" / f"epoch_{e:04d}.pkl") for name in ("full", "parts")
              for e in (1, 2, 3)]
    for payload in epochs[1:]:  # parts' epochs 2 and 3 come from the resumed process
        assert np.array_equal(payload["cutmix"]["boxes"], epochs[0]["cutmix"]["boxes"])
    assert np.array_equal(epochs[2]["cutmix"]["H"], epochs[5]["cutmix"]["H"])


def test_cutmix_geometry_is_finite_and_differs_from_mixups(cutmix_runs):
    geometry = load(cutmix_runs / "full" / "metrics.pkl")["epochs"][-1]["mixup_geometry"]
    cut = geometry["cutmix"]
    for key in ("same_class_alignment", "diff_class_nonlinearity"):
        assert math.isfinite(cut[key]) and cut[key] != geometry[key]
    assert math.isfinite(cut["ufm"]["residual"]) and cut["ufm"]["residual"] != geometry["ufm"]["residual"]
    assert all(math.isfinite(v) for v in cut["pred_a_fraction"] + cut["margin_ab"])
    record = load(cutmix_runs / "full" / "metrics.pkl")["epochs"][-1]
    assert value_at(record, resolve_metric("cutmix.diff_class_nonlinearity")) == cut["diff_class_nonlinearity"]


def test_representations_draw_the_cutmix_points(cutmix_runs, tmp_path, capsys):
    out = tmp_path / "cutmix.png"
    assert utils.main(["representations", str(cutmix_runs / "full"), "--mix", "cutmix", "--theory",
                       "--out", str(out)]) == 0
    assert out.stat().st_size > 0
    assert utils.main(["representations", str(cutmix_runs / "full"), "--mix", "cutmix", "--view", "means"]) == 2


def test_per_sample_cutmix_alone_trains_and_measures_only_its_points(tmp_path):
    argv = [*RUN, "--epochs", "1", "--mixup-alpha", "0", "--cutmix-alpha", "1",
            "--mixup-per-sample", "--mix-prob", "0.8", "--out-dir", str(tmp_path), "--run-name", "r"]
    assert run_main(argv) == 0
    record = load(tmp_path / "r" / "metrics.pkl")["epochs"][-1]
    assert set(record["mixup_geometry"]) == {"cutmix"} and math.isfinite(record["mixup_loss"])
    assert "mixup" not in load(tmp_path / "r" / "features" / "epoch_0001.pkl")


def test_a_run_saved_before_the_mixing_flags_existed_resumes(tmp_path):
    argv = [*RUN, "--feature-epochs", "1", "--out-dir", str(tmp_path), "--run-name", "old"]
    assert run_main([*argv, "--epochs", "1"]) == 0
    config_path = tmp_path / "old" / "config.json"
    config = json.loads(config_path.read_text())
    for key in ("cutmix_alpha", "mix_prob", "switch_prob", "feature_mix"):
        del config["flags"][key]  # as a run folder written before these flags existed
    config_path.write_text(json.dumps(config))
    assert run_main([*argv, "--epochs", "2", "--resume"]) == 0
    assert run_main([*argv, "--epochs", "3", "--resume", "--cutmix-alpha", "1"]) == 2  # a real change still is refused
