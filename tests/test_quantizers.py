"""Fake quantizers, range estimation, QuantSpec and quantize_model / calibrate on small plain-PyTorch models."""
import math
from collections import OrderedDict

import pytest
import torch
from torch import nn

from fairseq_quant.quant import (
    PerChannel, PerGroup, PerTensor, QuantLinear, QuantSpec, Strategy, calibrate, is_calibrated,
    quantize_model, reset_quantizers,
)
from fairseq_quant.quant.calibrate import activation_quantizers
from fairseq_quant.quant.quantizers import (
    ActivationQuantizer, WeightQuantizer, binarize, check_bits, fake_quant_affine, fake_quant_balanced,
    fake_quant_symmetric, fake_quant_zero_point, mse_scale_search, round_ste,
)

GRANULARITIES = {"tensor": PerTensor(), "channel": PerChannel(), "group16": PerGroup(16)}


def weight(seed=0, shape=(8, 64)):
    torch.manual_seed(seed)
    return torch.randn(*shape)


def make_wq(method, bits, gran, shape):
    return WeightQuantizer(bits=bits, method=method, granularity=gran, num_groups=gran.num_groups(shape))


# ---------------------------------------------------------------------------------------------
# weight quantizers: levels, shapes, error bounds
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("gran_name", list(GRANULARITIES))
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("method", ["minmax", "symmetric", "lsq", "balanced"])
def test_weight_levels_per_group(method, bits, gran_name):
    gran = GRANULARITIES[gran_name]
    w = weight(shape=(8, 64))
    out = make_wq(method, bits, gran, w.shape)(w)
    assert out.shape == w.shape
    groups = gran.group_view(out.detach())
    assert groups.shape[0] == gran.num_groups(w.shape)
    for row in groups:
        n = torch.unique(row).numel()
        assert 2 <= n <= 2**bits, f"{n} distinct values in a {bits}-bit group"
    # the quantized tensor is a real approximation, not a constant
    assert (out - w).abs().mean() < w.abs().mean()


@pytest.mark.parametrize("gran_name", list(GRANULARITIES))
@pytest.mark.parametrize("method,bits", [("binary", 1)] + [(m, b) for m in ("minmax", "symmetric", "lsq", "balanced")
                                                          for b in (2, 3, 4, 8)])
def test_weights_lie_on_the_grid_the_quantizer_reports(method, bits, gran_name):
    gran = GRANULARITIES[gran_name]
    w = weight(3, (8, 64))
    wq = make_wq(method, bits, gran, w.shape)
    out = wq(w).detach()
    grid = wq.last_grid
    assert (grid.bits, grid.qmax - grid.qmin) == (bits, 2**bits - 1)
    assert not grid.off_grid(gran.group_view(out)).any()
    # the float weights are not on it (but for a min-max range's ends), nor are values moved by a fifth of a step
    assert grid.off_grid(gran.group_view(w)).float().mean() > 0.8
    assert grid.off_grid(gran.group_view(out) + 0.2 * grid.scale).all()


@pytest.mark.parametrize("method", ["minmax", "percentile", "mse", "pact", "lsq"])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_activations_lie_on_the_grid_the_quantizer_reports(method, bits):
    torch.manual_seed(4)
    q = ActivationQuantizer(bits=bits, method=method)
    calibration_batch = torch.randn(1000) * 3
    q.start_calibration()
    q(calibration_batch)
    q.finish_calibration()
    for mode in (q.train, q.eval):
        mode()
        x = torch.randn(1000) * 3
        out = q(x).detach()
        assert not q.last_grid.off_grid(out).any()
        assert q.last_grid.off_grid(x).float().mean() > 0.9


@pytest.mark.parametrize("gran_name", list(GRANULARITIES))
def test_binary_weights_are_plus_minus_mean_abs(gran_name):
    gran = GRANULARITIES[gran_name]
    w = weight(1, (8, 64))
    q = WeightQuantizer(bits=1, method="binary", granularity=gran)
    out = q(w)
    assert out.shape == w.shape
    w_groups, out_groups = gran.group_view(w), gran.group_view(out.detach())
    for w_row, o_row in zip(w_groups, out_groups):
        alpha = w_row.abs().mean()
        assert torch.unique(o_row).numel() == 2
        torch.testing.assert_close(o_row, torch.where(w_row >= 0, alpha, -alpha))


def test_binary_requires_one_bit_and_one_bit_requires_binary():
    with pytest.raises(ValueError, match="1-bit weights use method 'binary'"):
        WeightQuantizer(bits=1, method="lsq")
    with pytest.raises(ValueError, match="method 'binary' is 1-bit"):
        WeightQuantizer(bits=4, method="binary")
    with pytest.raises(ValueError, match="unknown weight method 'foo'"):
        WeightQuantizer(bits=4, method="foo")


@pytest.mark.parametrize("gran_name", list(GRANULARITIES))
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_minmax_error_bound(bits, gran_name):
    gran = GRANULARITIES[gran_name]
    w = weight(2, (8, 64))
    out = make_wq("minmax", bits, gran, w.shape)(w)
    wg, og = gran.group_view(w), gran.group_view(out.detach())
    bound = (wg.amax(1) - wg.amin(1)) / (2**bits - 1) / 2 + 1e-6
    err = (wg - og).abs().amax(1)
    assert torch.all(err <= bound)
    # and the bound is nearly attained (it is the right bound, not a loose one)
    assert torch.all(err >= 0.5 * bound)
    # minmax keeps both ends of each group's range
    torch.testing.assert_close(og.amin(1), wg.amin(1))
    torch.testing.assert_close(og.amax(1), wg.amax(1))


@pytest.mark.parametrize("gran_name", list(GRANULARITIES))
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_symmetric_error_bound(bits, gran_name):
    gran = GRANULARITIES[gran_name]
    w = weight(3, (8, 64))
    out = make_wq("symmetric", bits, gran, w.shape)(w)
    wg, og = gran.group_view(w), gran.group_view(out.detach())
    scale = wg.abs().amax(1) / (2 ** (bits - 1) - 1)
    err = (wg - og).abs().amax(1)
    assert torch.all(err <= scale / 2 * (1 + 1e-5))
    # every output is an integer multiple of the group's scale inside the signed grid
    k = og / scale[:, None]
    torch.testing.assert_close(k, k.round(), atol=1e-4, rtol=0)
    assert k.round().abs().max() <= 2 ** (bits - 1) - 1


@pytest.mark.parametrize("method", ["minmax", "symmetric", "lsq"])
def test_more_bits_less_error(method):
    w = weight(4, (16, 64))
    errs = {b: (make_wq(method, b, PerChannel(), w.shape)(w).detach() - w).pow(2).mean().item() for b in (2, 4, 8)}
    assert errs[8] < errs[4] < errs[2]
    assert errs[8] < 0.01 * errs[2]


def test_minmax_hand_computed_example():
    # lo = 0, hi = 1, 2 bits: levels 0, 1/3, 2/3, 1.  (x - lo) / scale = 0, 0.3, 1.5, 3;
    # torch rounds half to even, so 1.5 -> 2 -> 2/3.
    w = torch.tensor([[0.0, 0.1, 0.5, 1.0]])
    out = WeightQuantizer(bits=2, method="minmax", granularity=PerTensor())(w)
    torch.testing.assert_close(out, torch.tensor([[0.0, 0.0, 2.0 / 3.0, 1.0]]), atol=1e-7, rtol=0)
    out = fake_quant_affine(w, torch.tensor(0.0), torch.tensor(1.0), 2)
    torch.testing.assert_close(out, torch.tensor([[0.0, 0.0, 2.0 / 3.0, 1.0]]), atol=1e-7, rtol=0)
    # asymmetric range: lo = -1, hi = 2 at 2 bits -> levels -1, 0, 1, 2 (scale 1).
    # (x - lo) = -2, 0.4, 1.4, 1.5, 2.5, 3.49, 8 -> round half even 0(clamped), 0, 1, 2, 2, 3, 3(clamped)
    x = torch.tensor([-3.0, -0.6, 0.4, 0.5, 1.5, 2.49, 7.0])
    assert fake_quant_affine(x, torch.tensor(-1.0), torch.tensor(2.0), 2).tolist() == [
        -1.0, -1.0, 0.0, 1.0, 1.0, 2.0, 2.0]


def test_symmetric_hand_computed_example():
    # scale 0.25, 3 bits: integer grid -4..3; round half to even; clamp
    x = torch.tensor([0.125, 0.375, 0.625, -0.125, -0.375, 2.0, -3.0])
    out = fake_quant_symmetric(x, torch.tensor(0.25), 3)
    assert out.tolist() == [0.0, 0.5, 0.5, 0.0, -0.5, 0.75, -1.0]
    # WeightQuantizer symmetric: scale = max|w| / (2^(b-1) - 1) = 1/3 at 3 bits
    w = torch.tensor([[-1.0, -0.26, 0.25, 0.5, 0.75]])
    out = WeightQuantizer(bits=3, method="symmetric", granularity=PerTensor())(w)
    torch.testing.assert_close(out, torch.tensor([[-1.0, -1 / 3, 1 / 3, 2 / 3, 2 / 3]]), atol=1e-7, rtol=0)


@pytest.mark.parametrize("bits", [4, 8])
def test_zero_point_reproduces_zero_exactly(bits):
    lo, hi = torch.tensor(-0.3), torch.tensor(1.7)
    x = torch.tensor([0.0, -0.3, 0.0, 1.7, 0.05, 0.0, 1.0])
    out = fake_quant_zero_point(x, lo, hi, bits)
    assert out[0].item() == 0.0 and out[2].item() == 0.0 and out[5].item() == 0.0
    scale = 2.0 / (2**bits - 1)
    assert (out - x).abs().max() <= scale / 2 + 1e-6
    # a dense sweep: at most 2^b integer levels of the scale, with 0 among them
    sweep = fake_quant_zero_point(torch.linspace(-1.0, 3.0, 2001), lo, hi, bits)
    levels = torch.unique(sweep)
    assert levels.numel() == 2**bits
    k = levels / scale
    torch.testing.assert_close(k, k.round(), atol=1e-4, rtol=0)
    assert 0.0 in levels.tolist()
    # the plain affine grid does not contain 0 for this range (which is why the zero point exists)
    assert fake_quant_affine(torch.tensor([0.0]), lo, hi, 4).item() != 0.0
    # and an ActivationQuantizer with this range keeps exact zeros too
    aq = ActivationQuantizer(bits=bits, method="fixed", fixed_range=(-0.3, 1.7)).eval()
    assert aq(torch.zeros(5)).eq(0).all()


# ---------------------------------------------------------------------------------------------
# straight-through gradients
# ---------------------------------------------------------------------------------------------

def test_round_ste_gradient_is_identity():
    x = torch.tensor([0.2, 1.7, -2.5], requires_grad=True)
    y = round_ste(x)
    assert y.tolist() == [0.0, 2.0, -2.0]
    y.sum().backward()
    assert x.grad.tolist() == [1.0, 1.0, 1.0]


def test_ste_affine_gradient_zero_outside_range():
    x = torch.tensor([-3.0, -0.9, -0.2, 0.0, 0.4, 0.95, 1.8, 5.0], requires_grad=True)
    fake_quant_affine(x, torch.tensor(-1.0), torch.tensor(1.0), 4).sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0]


def test_ste_activation_quantizer_gradient_zero_outside_range():
    aq = ActivationQuantizer(bits=8, method="fixed", fixed_range=(-1.0, 1.0))
    x = torch.tensor([-3.0, -0.5, 0.0, 0.5, 0.9, 3.0], requires_grad=True)
    aq(x).sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 1.0, 0.0]


def test_binarize_gradient_only_where_abs_le_one():
    w = torch.tensor([[1.5, -2.0, 0.3, -0.7, 1.0, -0.1]], requires_grad=True)
    out = binarize(w)
    alpha = (1.5 + 2.0 + 0.3 + 0.7 + 1.0 + 0.1) / 6
    torch.testing.assert_close(out.detach(), torch.tensor([[alpha, -alpha, alpha, -alpha, alpha, -alpha]]))
    out.sum().backward()
    torch.testing.assert_close(w.grad, alpha * torch.tensor([[0.0, 0.0, 1.0, 1.0, 1.0, 1.0]]))
    # through WeightQuantizer as well
    w2 = w.detach().clone().requires_grad_()
    WeightQuantizer(bits=1, method="binary", granularity=PerTensor())(w2).sum().backward()
    assert w2.grad[0, 0].item() == 0.0 and w2.grad[0, 1].item() == 0.0
    assert torch.all(w2.grad[0, 2:] > 0)


# ---------------------------------------------------------------------------------------------
# learned quantizers: LSQ and PACT
# ---------------------------------------------------------------------------------------------

def test_lsq_initialises_from_weights_and_reset_reinitialises():
    w = weight(5, (16, 64))
    q = make_wq("lsq", 2, PerChannel(), w.shape)
    assert not bool(q.initialized)
    assert q.step.tolist() == [1.0] * 16
    q(w)
    assert bool(q.initialized)
    expected = mse_scale_search(w, 2)
    torch.testing.assert_close(q.step.detach(), expected)
    assert not torch.allclose(q.step.detach(), torch.ones(16))
    # later forwards keep the (possibly trained) step
    with torch.no_grad():
        q.step.mul_(3)
    q(w)
    torch.testing.assert_close(q.step.detach(), 3 * expected)
    q.reset()
    assert not bool(q.initialized)
    q(w)
    assert bool(q.initialized)
    torch.testing.assert_close(q.step.detach(), expected)


def test_balanced_grid_hand_computed_example():
    """2 bits: levels {-1.5, -0.5, 0.5, 1.5} * step, none at zero, where the signed grid has {-2, -1, 0, 1}."""
    w = torch.tensor([[-3.0, -1.2, -0.1, 0.0, 0.3, 0.9, 1.1, 5.0]])
    out = fake_quant_balanced(w, torch.tensor([[1.0]]), 2)
    assert out.tolist() == [[-1.5, -1.5, -0.5, 0.5, 0.5, 0.5, 1.5, 1.5]]
    assert fake_quant_symmetric(w, torch.tensor([[1.0]]), 2).tolist() == [[-2.0, -1.0, -0.0, 0.0, 0.0, 1.0, 1.0, 1.0]]
    assert fake_quant_balanced(w, torch.tensor([[0.5]]), 3).tolist() == [[-1.75, -1.25, -0.25, 0.25, 0.25, 0.75, 1.25,
                                                                          1.75]]
    # the straight-through gradient: identity inside the grid's range, zero outside; the step's gradient is LSQ's
    x = w.clone().requires_grad_(True)
    step = torch.tensor([[1.0]], requires_grad=True)
    fake_quant_balanced(x, step, 2).sum().backward()
    assert x.grad.tolist() == [[0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0]]
    # d/ds of (q - 1.5) * s with q = round(w/s + 1.5): (q - 1.5) - w/s inside, the clamped level outside
    expected = sum([-1.5, -1.5 + 1.2, -0.5 + 0.1, 0.5 - 0.0, 0.5 - 0.3, 0.5 - 0.9, 1.5 - 1.1, 1.5])
    assert step.grad.item() == pytest.approx(expected, abs=1e-6)


def test_balanced_weights_quantize_gaussian_weights_better_than_the_signed_grid():
    """On normal weights the balanced 2-bit grid (MSE-initialised step) has lower error than the signed one: the
    signed grid spends one of its four levels on an asymmetric extra negative step."""
    w = weight(7, (64, 256))
    errors = {}
    for method in ("lsq", "balanced"):
        q = make_wq(method, 2, PerChannel(), w.shape)
        errors[method] = ((q(w) - w).pow(2).sum() / w.pow(2).sum()).item()
        torch.testing.assert_close(q.step.detach(), mse_scale_search(w, 2, balanced=method == "balanced"))
    # Lloyd-Max for a unit normal at 4 levels is 0.1175; the best symmetric 4-level uniform grid 0.1188
    assert errors["balanced"] == pytest.approx(0.119, abs=0.004)
    assert errors["lsq"] > errors["balanced"] * 1.2


def test_lsq_step_learns():
    w = weight(6, (16, 64))
    q = make_wq("lsq", 2, PerChannel(), w.shape)
    best = (q(w) - w).pow(2).sum().item()  # MSE-initialised
    with torch.no_grad():
        q.step.mul_(5)  # deliberately bad
    loss = (q(w) - w).pow(2).sum()
    loss.backward()
    assert q.step.grad is not None and torch.all(q.step.grad != 0)
    initial = loss.item()
    assert initial > 3 * best
    final = _minimise(lambda: (q(w) - w).pow(2).sum(), q.step, lr=0.05)
    assert final < 0.5 * initial
    assert final < 1.3 * best


def _minimise(loss_fn, param, lr, steps=100):
    """Adam on one parameter for ``steps`` steps; returns the final loss."""
    opt = torch.optim.Adam([param], lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        loss_fn().backward()
        opt.step()
    return loss_fn().item()


def _pact_data():
    torch.manual_seed(0)
    x = torch.randn(4096)
    x[:2] = torch.tensor([20.0, -20.0])  # heavy tail: two far outliers
    return x


@pytest.mark.parametrize("start,direction", [(20.0, -1), (0.3, +1)])
def test_pact_alpha_learns(start, direction):
    x = _pact_data()
    q = calibrated(ActivationQuantizer(bits=4, method="pact"), x).train()  # alpha = max|x|
    assert bool(q.initialized) and q.alpha.item() == 20.0
    with torch.no_grad():
        q.alpha.fill_(start)
    loss = (q(x) - x).pow(2).mean()
    loss.backward()
    assert q.alpha.grad is not None and q.alpha.grad.item() != 0.0
    # gradient descent moves alpha in `direction`
    assert math.copysign(1, -q.alpha.grad.item()) == direction
    initial = loss.item()
    final = _minimise(lambda: (q(x) - x).pow(2).mean(), q.alpha, lr=0.2)
    assert final < 0.35 * initial
    alpha = q.alpha.item()
    assert 2.5 < alpha < 8.0  # grid search puts the optimum near 4
    assert (alpha - start) * direction > 0


@pytest.mark.parametrize("method", ["pact", "lsq"])
@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_signed_activation_quantizers_are_odd(method, bits):
    """pact/lsq are symmetric: q(-x) == -q(x), and positive inputs must not all collapse to 0.

    At 1 bit the signed integer grid is {-1, 0}, so every positive activation becomes 0: the quantizer
    must either refuse 1 bit or keep the sign of positive inputs.
    """
    try:
        q = ActivationQuantizer(bits=bits, method=method).train()
    except ValueError:
        assert bits == 1
        return
    x = torch.tensor([0.8, 0.5, 0.3, -0.3, -0.5, -0.8])
    calibrated(q, x)  # alpha = 0.8 / step = 0.8 / qmax
    out = q(x).detach()
    torch.testing.assert_close(out[:3], -out.flip(0)[:3])
    assert out[0].item() > 0


# ---------------------------------------------------------------------------------------------
# activation range estimation
# ---------------------------------------------------------------------------------------------

def _outlier_batches():
    torch.manual_seed(7)
    batches = [torch.randn(8000) for _ in range(3)]
    # two outlier pairs in 24000 values: below the 0.01% tail that percentile 99.99 cuts
    for b in (batches[0], batches[2]):
        b[torch.randperm(8000)[:2]] = torch.tensor([60.0, -45.0])
    return batches


def _calibrated(method, batches, bits=4):
    q = ActivationQuantizer(bits=bits, method=method, name=f"act_{method}")
    q.start_calibration()
    assert q.observing
    for b in batches:
        out = q(b)
        assert out is b  # fp32 pass-through while observing
    assert not bool(q.initialized)
    q.finish_calibration()
    assert not q.observing and bool(q.initialized)
    return q.eval()


def test_minmax_calibration_exact_observed_range():
    torch.manual_seed(0)
    batches = [torch.randn(100) * 2 for _ in range(3)]
    q = _calibrated("minmax", batches)
    assert q.lo.item() == min(b.min().item() for b in batches)
    assert q.hi.item() == max(b.max().item() for b in batches)
    # all-positive data: 0 is pulled into the range
    positive = [torch.rand(100) + 1.0 for _ in range(2)]
    q = _calibrated("minmax", positive)
    assert q.lo.item() == 0.0
    assert q.hi.item() == max(b.max().item() for b in positive)


def test_percentile_and_mse_ranges_on_outliers():
    batches = _outlier_batches()
    x = torch.cat(batches)
    qs = {m: _calibrated(m, batches) for m in ("minmax", "percentile", "mse")}
    assert (qs["minmax"].lo.item(), qs["minmax"].hi.item()) == (-45.0, 60.0)
    # percentile ignores the handful of outliers
    assert qs["percentile"].hi.item() < 0.1 * 60.0
    assert qs["percentile"].lo.item() > 0.1 * -45.0
    assert qs["percentile"].hi.item() > 3.0  # still covers the Gaussian bulk
    # mse: no wider than minmax, lower error than minmax
    assert qs["mse"].lo.item() >= -45.0 and qs["mse"].hi.item() <= 60.0
    assert qs["mse"].hi.item() - qs["mse"].lo.item() < 105.0
    errs = {m: (q(x) - x).pow(2).mean().item() for m, q in qs.items()}
    assert errs["mse"] < 0.5 * errs["minmax"]
    assert errs["percentile"] < 0.5 * errs["minmax"]


def test_uncalibrated_eval_raises_with_name():
    q = ActivationQuantizer(bits=8, method="minmax", name="encoder.layers.0.fc1.input").eval()
    with pytest.raises(RuntimeError, match=r"encoder\.layers\.0\.fc1\.input"):
        q(torch.randn(4))


def calibrated(q, x):
    """The calibration phase of one quantizer on one batch."""
    q.start_calibration()
    q(x)
    q.finish_calibration()
    return q


def test_uncalibrated_training_raises_with_name():
    q = ActivationQuantizer(bits=8, method="minmax", name="encoder.layers.0.fc1.input").train()
    with pytest.raises(RuntimeError, match=r"encoder\.layers\.0\.fc1\.input: activation quantizer has no range; "
                                           r"calibrate the model first"):
        q(torch.randn(4))
    assert not bool(q.initialized)  # no hidden calibration on the first training batch


def test_momentum_zero_keeps_the_calibrated_range_in_training():
    q = calibrated(ActivationQuantizer(bits=8, method="minmax", momentum=0.0), torch.tensor([-1.0, 2.0])).train()
    q(torch.tensor([-30.0, 40.0]))
    assert (q.lo.item(), q.hi.item()) == (-1.0, 2.0) and q.pending_range is None


def test_calibrated_then_ema_only_in_training():
    q = calibrated(ActivationQuantizer(bits=8, method="minmax", momentum=0.1), torch.tensor([-1.0, 0.5, 2.0])).train()
    assert bool(q.initialized)
    assert (q.lo.item(), q.hi.item()) == (-1.0, 2.0)
    q(torch.tensor([-3.0, 4.0]))
    assert q.lo.item() == pytest.approx(0.9 * -1.0 + 0.1 * -3.0)
    assert q.hi.item() == pytest.approx(0.9 * 2.0 + 0.1 * 4.0)
    # a batch without negatives moves lo towards 0 (0 is always in the range)
    q(torch.tensor([1.0, 2.0]))
    assert q.lo.item() == pytest.approx(0.9 * (0.9 * -1.0 + 0.1 * -3.0))
    lo, hi = q.lo.item(), q.hi.item()
    q.eval()
    q(torch.tensor([-100.0, 100.0]))
    assert (q.lo.item(), q.hi.item()) == (lo, hi)


def test_a_training_batch_is_quantized_with_the_range_before_it():
    q = calibrated(ActivationQuantizer(bits=2, method="minmax", momentum=0.5), torch.tensor([-1.0, 2.0])).train()
    # calibrated to [-1, 2]: grid step 1
    out = q(torch.tensor([-5.0, 0.4, 7.0]))
    assert out.tolist() == [-1.0, 0.0, 2.0]  # clipped to the old range, then the range moves
    assert (q.lo.item(), q.hi.item()) == (-3.0, 4.5)


def test_deferred_range_updates_follow_the_global_batch_on_every_worker():
    """Two data-parallel workers see different batches; with deferred updates both quantize with the same
    grid and move their ranges toward the min/max over both batches."""
    from fairseq_quant.quant import apply_range_updates

    batches = [torch.tensor([-2.0, 1.0]), torch.tensor([-1.0, 6.0])]
    workers = []
    for batch in batches:
        q = ActivationQuantizer(bits=8, method="minmax", momentum=0.5)
        q._set_range(-1.0, 1.0)
        q.defer_range_updates = True
        workers.append(nn.Sequential(q).train())
    outs = [w(b) for w, b in zip(workers, batches)]
    scales = [w[0].last_grid.scale.item() for w in workers]
    assert scales[0] == scales[1] == pytest.approx(2.0 / 255)
    assert all(w[0].hi.item() == 1.0 for w in workers)  # nothing applied yet
    assert outs[1].tolist()[1] == pytest.approx(1.0, abs=2 / 255)  # 6.0 clipped to the range before the batch
    # reduce_max: what torch.distributed.all_reduce(MAX) returns, here with the other worker's statistics
    local = {0: torch.tensor([2.0, 1.0]), 1: torch.tensor([1.0, 6.0])}  # [-min, max] of each batch
    for i, w in enumerate(workers):
        apply_range_updates(w, reduce_max=lambda t, other=local[1 - i]: torch.maximum(t, other))
    for w in workers:
        assert (w[0].lo.item(), w[0].hi.item()) == (-1.5, 3.5) and w[0].pending_range is None
    # a single process applies its own batch range at once
    q = ActivationQuantizer(bits=8, method="minmax", momentum=0.5)
    q._set_range(-1.0, 1.0)
    q.train()(batches[1])
    assert (q.lo.item(), q.hi.item()) == (-1.0, 3.5)


def test_fp32_activation_quantizer_is_identity():
    q = ActivationQuantizer(bits=None).eval()
    x = torch.randn(5)
    assert q(x) is x
    w = torch.randn(3, 4)
    assert WeightQuantizer(bits=None)(w) is w


# ---------------------------------------------------------------------------------------------
# bits validation and QuantSpec
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [0, 9, 2.5, True, "x", -1])
def test_check_bits_rejects(bad):
    with pytest.raises(ValueError, match="must be an integer in 1..8"):
        check_bits(bad, "weight bits")
    with pytest.raises(ValueError, match="weight_bits"):
        QuantSpec(weight_bits=bad)
    with pytest.raises(ValueError, match="act_bits"):
        QuantSpec(act_bits=bad)


@pytest.mark.parametrize("fp32", ["fp32", "FP32", "float", None, 32])
def test_fp32_words(fp32):
    spec = QuantSpec(weight_bits=fp32, act_bits=fp32)
    assert spec.weight_bits is None and spec.act_bits is None and spec.is_fp32
    assert spec.label() == "wfp32afp32"


def test_check_bits_accepts_1_to_8():
    assert [check_bits(b) for b in range(1, 9)] == list(range(1, 9))
    assert check_bits(None) is None


def test_one_bit_weights_force_binary():
    spec = QuantSpec(weight_bits=1, act_bits=8)
    assert spec.weight_method == "binary"
    assert QuantSpec(weight_bits=1, weight_method="minmax").weight_method == "binary"
    assert QuantSpec(weight_bits=4).weight_method == "lsq"
    with pytest.raises(ValueError, match="binary"):
        QuantSpec(weight_bits=4, weight_method="binary")


# ---------------------------------------------------------------------------------------------
# quantize_model, report, calibrate
# ---------------------------------------------------------------------------------------------

def small_model():
    torch.manual_seed(0)
    return nn.Sequential(OrderedDict([
        ("fc1", nn.Linear(64, 32)), ("relu", nn.ReLU()), ("norm", nn.LayerNorm(32)), ("fc2", nn.Linear(32, 8)),
    ]))


def test_quantize_model_keeps_parameters_and_keys():
    model = small_model()
    before_params = dict(model.named_parameters())
    before_state = {k: v.clone() for k, v in model.state_dict().items()}
    quantize_model(model, Strategy.uniform(4, 8, granularity="channel", weight_method="lsq"))
    assert isinstance(model.fc1, QuantLinear) and isinstance(model.fc2, QuantLinear)
    assert isinstance(model.norm, nn.LayerNorm)
    # the very same Parameter objects: QAT starts from the trained weights
    assert model.fc1.weight is before_params["fc1.weight"]
    assert model.fc1.bias is before_params["fc1.bias"]
    assert model.fc2.weight is before_params["fc2.weight"]
    state = model.state_dict()
    for key, value in before_state.items():
        assert key in state
        assert torch.equal(state[key], value)
    new_keys = set(state) - set(before_state)
    assert new_keys == {
        "fc1.weight_quantizer.initialized", "fc1.weight_quantizer.step", "fc1.input_quantizer.initialized",
        "fc1.input_quantizer.lo", "fc1.input_quantizer.hi",
        "fc2.weight_quantizer.initialized", "fc2.weight_quantizer.step", "fc2.input_quantizer.initialized",
        "fc2.input_quantizer.lo", "fc2.input_quantizer.hi",
    }
    assert model.fc1.weight_quantizer.step.shape == (32,)


def test_report_sizes_exact():
    model = small_model()
    report = quantize_model(model, Strategy.uniform(4, 8, granularity="channel", weight_method="lsq"))
    assert [(e.name, e.kind, e.spec_label, e.rule, e.params) for e in report.layers] == [
        ("fc1", "QuantLinear", "w4a8", "default", 64 * 32),
        ("fc2", "QuantLinear", "w4a8", "default", 32 * 8),
    ]
    assert report.fp32_params == [("fc1.bias", 32), ("norm.weight", 32), ("norm.bias", 32), ("fc2.bias", 8)]
    assert report.unsupported == []
    fc1 = 64 * 32 * 4 / 8 + 32 * 4          # packed 4-bit weights + one fp32 scale per output channel
    fc2 = 32 * 8 * 4 / 8 + 8 * 4
    fp32 = (32 + 32 + 32 + 8) * 4            # biases and LayerNorm
    act_ranges = 2 * 8                       # lo/hi of the two input quantizers
    assert fc1 + fc2 + fp32 + act_ranges == 1744
    assert report.quant_mb == pytest.approx(1744 / 1e6, abs=1e-12)
    assert report.fp32_mb == pytest.approx(4 * (64 * 32 + 32 + 32 + 32 + 32 * 8 + 8) / 1e6, abs=1e-12)
    assert report.avg_weight_bits == 4.0
    text = report.format()
    assert "fc1" in text and "w4a8" in text and "0.002 MB vs fp32 0.010 MB" in text


def test_report_single_linear_4bit_channel_lsq():
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU())
    report = quantize_model(model, Strategy.uniform(4, 8, granularity="channel", weight_method="lsq"))
    expected_bytes = 64 * 32 * 4 / 8 + 32 * 4 + 32 * 4 + 8  # weights, scales, bias, act range
    assert expected_bytes == 1288
    assert report.quant_mb == pytest.approx(0.001288, abs=1e-12)
    assert report.fp32_mb == pytest.approx((64 * 32 + 32) * 4 / 1e6, abs=1e-12)


def test_report_minmax_stores_two_numbers_per_group():
    model = nn.Sequential(nn.Linear(64, 32))
    report = quantize_model(model, Strategy.uniform(2, 8, granularity="group", group_size=16, weight_method="minmax"))
    groups = 32 * 64 // 16
    assert report.quant_mb == pytest.approx((64 * 32 * 2 / 8 + groups * 2 * 4 + 32 * 4 + 8) / 1e6, abs=1e-12)
    assert report.avg_weight_bits == 2.0


def test_calibrate_and_reset():
    model = small_model()
    quantize_model(model, Strategy.uniform(4, 8))
    quantizers = activation_quantizers(model)
    assert len(quantizers) == 2 and not is_calibrated(model)
    torch.manual_seed(1)
    batches = [torch.randn(5, 64) for _ in range(3)]
    model.eval()
    assert calibrate(model, batches) == 3
    assert all(bool(q.initialized) for q in quantizers) and is_calibrated(model)
    lo, hi = model.fc1.input_quantizer.lo.item(), model.fc1.input_quantizer.hi.item()
    assert lo == min(b.min().item() for b in batches) and hi == max(b.max().item() for b in batches)
    out = model(batches[0])
    assert out.shape == (5, 8) and torch.isfinite(out).all()
    reset_quantizers(model)
    assert not any(bool(q.initialized) for q in quantizers) and not is_calibrated(model)
    assert not bool(model.fc1.weight_quantizer.initialized)
    with pytest.raises(RuntimeError, match="fc1.input"):
        model(batches[0])
    with pytest.raises(ValueError, match="at least one batch"):
        calibrate(model, [])


# ---------------------------------------------------------------------------------------------
# fast paths: the same values as the composite of differentiable operations, bit for bit
# ---------------------------------------------------------------------------------------------

def _composite_zero_point(x, lo, hi, bits):
    levels = 2**bits - 1
    scale = torch.clamp(hi - lo, min=1e-8) / levels
    zero_point = torch.clamp(torch.round(-lo / scale), 0, levels)
    return (torch.clamp(round_ste(x / scale) + zero_point, 0, levels) - zero_point) * scale


def _composite_symmetric(x, scale, bits):
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return torch.clamp(round_ste(x / scale), qmin, qmax) * scale


def _composite_affine(x, lo, hi, bits):
    levels = 2**bits - 1
    scale = torch.clamp(hi - lo, min=1e-8) / levels
    return torch.clamp(round_ste((x - lo) / scale), 0, levels) * scale + lo


def _hard_inputs(seed, scale=0.05):
    """Values spread beyond the range, exact half steps (ties), zeros and the range ends."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4000, generator=g) * 2
    ties = (torch.randint(-60, 60, (500,), generator=g) + 0.5) * scale
    return torch.cat([x, ties, torch.zeros(10), torch.tensor([-0.3, 1.7, 1e-9, -1e-9])])


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
@pytest.mark.parametrize("seed", [0, 1])
def test_fast_paths_equal_the_composite_bit_for_bit_and_leave_the_input_alone(bits, seed):
    x = _hard_inputs(seed)
    lo, hi = torch.tensor(-0.3), torch.tensor(1.7)
    scale = torch.tensor(0.05)
    groups_lo, groups_hi = torch.tensor([[-1.0], [-0.2]]), torch.tensor([[1.0], [0.9]])
    cases = [
        (fake_quant_zero_point, _composite_zero_point, (lo, hi, bits), x),
        (fake_quant_symmetric, _composite_symmetric, (scale, max(bits, 2)), x),
        (fake_quant_affine, _composite_affine, (groups_lo, groups_hi, bits), x[:4000].reshape(2, 2000)),
    ]
    for fast, composite, args, values in cases:
        expected = composite(values, *args)
        before = values.clone()
        with torch.no_grad():
            assert torch.equal(fast(values, *args), expected), fast.__name__
        leaf = values.clone().requires_grad_(True)
        assert torch.equal(fast(leaf, *args).detach(), expected), fast.__name__
        assert torch.equal(values, before), fast.__name__


@pytest.mark.parametrize("bits", [2, 8])
def test_fast_path_gradient_is_the_straight_through_mask(bits):
    x = _hard_inputs(3).requires_grad_(True)
    lo, hi = torch.tensor(-0.3), torch.tensor(1.7)
    grad_out = torch.randn(x.shape, generator=torch.Generator().manual_seed(4))
    fake_quant_zero_point(x, lo, hi, bits).backward(grad_out)
    levels = 2**bits - 1
    scale = (hi - lo) / levels
    q = torch.round(x.detach() / scale) + torch.round(-lo / scale)
    inside = (q >= 0) & (q <= levels)
    assert 0 < int(inside.sum()) < x.numel()
    assert torch.equal(x.grad, grad_out * inside)
    # the composite's gradient, ((g * scale) * mask) / scale, differs from it by rounding only
    y = x.detach().clone().requires_grad_(True)
    _composite_zero_point(y, lo, hi, bits).backward(grad_out)
    torch.testing.assert_close(y.grad, x.grad, rtol=1e-6, atol=0)


def test_learned_scales_keep_their_gradient():
    # LSQ and PACT learn the step or the clipping value: the composite path, with a gradient for the scale
    x = torch.linspace(-1, 1, 50)
    scale = torch.tensor(0.1, requires_grad=True)
    fake_quant_symmetric(x, scale, 4).sum().backward()
    assert scale.grad is not None and scale.grad.abs().item() > 0
