"""Fake quantizers: quantize-dequantize in floating point with straight-through gradients.

A quantizer with ``bits=None`` is off (fp32 pass-through). Weight quantizers take the weight in
output-channel-first layout and split it into groups (:mod:`.granularity`); activation quantizers
use one range per tensor, estimated during calibration (:class:`RangeObserver`) or learned; or one range per
group of channels (``peg``: per-embedding-group, Bondarenko et al. 2021), or one per token, computed from
the token itself (``token``: dynamic).

Rounding uses the straight-through estimator: ``round_ste(x)`` is ``round(x)`` forward and the
identity backward, so gradients reach the fp32 master weights; values clamped away get zero gradient.
"""
import math
from dataclasses import dataclass

import torch
from torch import nn

from .granularity import Granularity, PerChannel, PerTensor

WEIGHT_METHODS = ("minmax", "symmetric", "lsq", "balanced", "binary")
LEARNED_STEP_METHODS = ("lsq", "balanced")  # weight methods with a learned step per group
ACT_METHODS = ("minmax", "percentile", "mse", "pact", "lsq", "fixed")
# tensor: one range per tensor; peg: one range per group of channels (channels sorted by their calibrated range
# and cut into equal groups, so the few outlier channels share a group; the permutation is free at inference: an
# integer kernel permutes the columns of the next weight instead); token: one range per position over its channels,
# computed from the values themselves at every forward (dynamic, nothing to calibrate)
ACT_GRANULARITIES = ("tensor", "peg", "token")
MAX_BITS = 8
# activation sites may also stay at 16 bits: the remedy for outlier sites (Bondarenko et al. 2021), whose 8-bit
# per-tensor grid wastes its levels on a few large residual dimensions
HIGH_ACT_BITS = 16


def check_bits(bits, what: str = "bits", activation: bool = False):
    """None (fp32) or an int in 1..8 (activations: or 16); anything else is an error naming ``what``."""
    if bits is None:
        return None
    allowed = isinstance(bits, int) and not isinstance(bits, bool) and (
        1 <= bits <= MAX_BITS or (activation and bits == HIGH_ACT_BITS))
    if not allowed:
        extra = f", {HIGH_ACT_BITS}" if activation else ""
        raise ValueError(f"{what} must be an integer in 1..{MAX_BITS}{extra} or fp32, got {bits!r}")
    return bits


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round() forward, identity backward."""
    return x + (x.round() - x).detach()


def grad_scale(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Value of x forward, gradient multiplied by ``scale`` backward (LSQ's step-size gradient scale)."""
    return (x - x * scale).detach() + x * scale


def signed_range(bits: int) -> tuple[int, int]:
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors)


# Each fake quantizer below has three paths with the same forward values, bit for bit (the composite's
# ``x + (round(x) - x)`` is exactly ``round(x)``: the difference is exact by Sterbenz's lemma):
# - without gradients (decoding, calibration): one new tensor, then in-place operations; the composite
#   allocates about eight tensors the size of the input, and on large activations (the VGG front end of a
#   batch) that allocation, not the arithmetic, was most of the decoding time;
# - with a gradient for the input only (activations and weights in QAT, range buffers fixed): an autograd
#   function that keeps a boolean mask of the unclamped values, the straight-through gradient;
# - with gradients for the range or step (LSQ, PACT): the composite of differentiable operations.


class _FakeQuantSTE(torch.autograd.Function):
    """``(clamp(round(x / scale) + zero_point, qmin, qmax) - zero_point) * scale`` forward; the incoming
    gradient where ``round(x / scale) + zero_point`` lies in ``[qmin, qmax]`` (inclusive, as clamp's)."""

    @staticmethod
    def forward(ctx, x, scale, zero_point, qmin, qmax):
        q = x.div(scale).round_()
        if zero_point is not None:
            q.add_(zero_point)
        ctx.save_for_backward((q >= qmin) & (q <= qmax))
        q.clamp_(qmin, qmax)
        if zero_point is not None:
            q.sub_(zero_point)
        return q.mul_(scale)

    @staticmethod
    def backward(ctx, grad):
        (inside,) = ctx.saved_tensors
        return grad * inside, None, None, None, None


def _fake_quant(x, scale, zero_point, qmin: int, qmax: int):
    """Fast paths of the symmetric and zero-point quantizers, when ``scale`` needs no gradient."""
    if _needs_grad(x):
        return _FakeQuantSTE.apply(x, scale, zero_point, qmin, qmax)
    q = x.div(scale).round_()
    if zero_point is not None:
        q.add_(zero_point).clamp_(qmin, qmax).sub_(zero_point)
    else:
        q.clamp_(qmin, qmax)
    return q.mul_(scale)


def fake_quant_affine(x, lo, hi, bits: int):
    """Asymmetric range quantization: ``round((x - lo) * (2^b - 1) / (hi - lo))`` levels mapped back.

    ``lo``/``hi`` broadcast against ``x``; the result takes at most 2^b distinct values per range.
    """
    levels = 2**bits - 1
    scale = torch.clamp(hi - lo, min=1e-8) / levels
    if not _needs_grad(x, lo, hi):
        return (x - lo).div_(scale).round_().clamp_(0, levels).mul_(scale).add_(lo)
    q = torch.clamp(round_ste((x - lo) / scale), 0, levels)
    return q * scale + lo


def fake_quant_zero_point(x, lo, hi, bits: int):
    """Affine quantization with an integer zero point, so that 0.0 (padding, ReLU) is exactly a level."""
    levels = 2**bits - 1
    scale = torch.clamp(hi - lo, min=1e-8) / levels
    zero_point = torch.clamp(torch.round(-lo / scale), 0, levels).detach()
    if not _needs_grad(lo, hi):
        return _fake_quant(x, scale.detach(), zero_point, 0, levels)
    q = torch.clamp(round_ste(x / scale) + zero_point, 0, levels)
    return (q - zero_point) * scale


def fake_quant_symmetric(x, scale, bits: int):
    """Signed symmetric quantization onto the integer grid [-2^(b-1), 2^(b-1)-1] times ``scale``."""
    qmin, qmax = signed_range(bits)
    if not _needs_grad(scale):
        return _fake_quant(x, scale.detach() if isinstance(scale, torch.Tensor) else scale, None, qmin, qmax)
    return torch.clamp(round_ste(x / scale), qmin, qmax) * scale


@dataclass
class Grid:
    """The values a quantizer outputs: ``offset + q * scale`` for integers ``q`` in ``[qmin, qmax]``.

    ``scale``/``offset`` are per group ([groups, 1] for weights in their group view) or per tensor (scalars).
    """

    scale: torch.Tensor
    offset: torch.Tensor
    qmin: int
    qmax: int
    bits: int

    def off_grid(self, values: torch.Tensor, tol: float = 1e-3) -> torch.Tensor:
        """Mask of ``values`` (broadcast against scale/offset) farther than ``tol`` steps from a grid point."""
        q = (values.detach().float() - self.offset.float()) / self.scale.float()
        nearest = q.round()
        return ((q - nearest).abs() > tol) | (nearest < self.qmin) | (nearest > self.qmax)


def zero_point_grid(lo, hi, bits: int) -> Grid:
    """Grid of :func:`fake_quant_zero_point`."""
    levels = 2**bits - 1
    scale = torch.clamp(hi - lo, min=1e-8) / levels
    zero_point = torch.clamp(torch.round(-lo / scale), 0, levels)
    return Grid(scale.detach(), (-zero_point * scale).detach(), 0, levels, bits)


def symmetric_grid(scale, bits: int) -> Grid:
    """Grid of :func:`fake_quant_symmetric`."""
    qmin, qmax = signed_range(bits)
    return Grid(scale.detach(), torch.zeros_like(scale).detach(), qmin, qmax, bits)


class _BinarizeSTE(torch.autograd.Function):
    """sign(w) forward; gradient passes only where |w| <= 1 (BinaryConnect / XNOR-Net)."""

    @staticmethod
    def forward(ctx, w):
        ctx.save_for_backward(w)
        return torch.where(w >= 0, torch.ones_like(w), -torch.ones_like(w))

    @staticmethod
    def backward(ctx, grad):
        (w,) = ctx.saved_tensors
        return grad * (w.abs() <= 1).to(grad.dtype)


def binarize(w_groups: torch.Tensor) -> torch.Tensor:
    """1-bit weights: ``mean|w| * sign(w)`` per group (rows of ``w_groups``)."""
    alpha = w_groups.abs().mean(dim=1, keepdim=True).detach()
    return _BinarizeSTE.apply(w_groups) * alpha


def fake_quant_balanced(x, scale, bits: int):
    """Quantization onto the balanced grid ``(q - (2^b - 1)/2) * scale``, ``q`` in ``[0, 2^b - 1]``: as many levels
    above zero as below and none at zero (ParetoQ's SEQ, Liu et al. 2025). At 2 bits the levels are
    ``{-1.5, -0.5, 0.5, 1.5} * scale`` where the signed grid has ``{-2, -1, 0, 1} * scale``: every level of the
    signed grid but one lies on one side. Computed as ``q * scale + offset`` with ``offset = scale * -(2^b - 1)/2``,
    the float32 operations of the exported file's dequantization; with a scale that needs a gradient, the
    gradient of LSQ (straight-through rounding)."""
    levels = 2**bits - 1
    offset = scale * (-levels / 2)
    if not _needs_grad(scale):
        q = torch.round((x - offset) / scale).clamp_(0, levels)
        return q * scale + offset
    return torch.clamp(round_ste((x - offset) / scale), 0, levels) * scale + offset


def balanced_grid(scale: torch.Tensor, bits: int) -> "Grid":
    levels = 2**bits - 1
    scale = scale.detach()
    return Grid(scale, scale * (-levels / 2), 0, levels, bits)


def top_level(bits: int, balanced: bool = False) -> float:
    """The largest level of a grid in steps: ``(2^b - 1)/2`` balanced, ``2^(b-1) - 1`` signed (at least 1)."""
    return (2**bits - 1) / 2 if balanced else max(signed_range(bits)[1], 1)


def mse_scale_search(groups: torch.Tensor, bits: int, candidates: int = 64, balanced: bool = False) -> torch.Tensor:
    """Per-row scale minimising the squared quantization error (rows are groups) on the signed symmetric grid,
    or on the balanced one."""
    qmax = top_level(bits, balanced)
    quantize = fake_quant_balanced if balanced else fake_quant_symmetric
    max_abs = groups.abs().amax(dim=1).clamp(min=1e-8)
    best_err = torch.full_like(max_abs, float("inf"))
    best = max_abs / qmax
    for ratio in torch.linspace(0.1, 1.0, candidates).tolist():
        scale = (max_abs * ratio / qmax).unsqueeze(1)
        err = (quantize(groups, scale, bits) - groups).pow(2).sum(dim=1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, scale.squeeze(1), best)
    return best


class WeightQuantizer(nn.Module):
    """Fake-quantizes a weight tensor (output-channel-first layout) to ``bits`` per group.

    Methods: ``minmax`` (asymmetric, range from the current weights), ``symmetric`` (signed,
    max-abs scale), ``lsq`` (learned step size, initialised to the MSE-optimal scale from the first
    weights it sees), ``balanced`` (``lsq`` on the balanced grid of :func:`fake_quant_balanced`), ``binary``
    (1 bit: sign times mean magnitude).

    Multi-precision co-training: ``co_bits`` are further precisions of the same weights. ``active_bits`` (set by
    :func:`fairseq_quant.quant.coprecision.weight_precision`, else ``bits``) chooses the one a forward uses; under
    ``lsq`` each precision has its own learned step (``step_w{b}``, initialised like ``step`` at its first use),
    1 bit is always ``binary``.
    """

    def __init__(self, bits=None, method: str = "symmetric", granularity: Granularity = PerChannel(),
                 num_groups: int = 1, name: str = "weight", co_bits=()):
        super().__init__()
        self.bits = check_bits(bits, f"{name}: weight bits")
        if method not in WEIGHT_METHODS:
            raise ValueError(f"{name}: unknown weight method '{method}'; expected one of {WEIGHT_METHODS}")
        if self.bits == 1 and method != "binary":
            raise ValueError(f"{name}: 1-bit weights use method 'binary', got '{method}'")
        if method == "binary" and self.bits not in (1, None):
            raise ValueError(f"{name}: method 'binary' is 1-bit, got {self.bits} bits")
        self.method = method
        self.granularity = granularity
        self.name = name
        self.last_grid: Grid | None = None  # the grid of the latest output (for the audit)
        self.register_buffer("initialized", torch.tensor(False))
        if method in LEARNED_STEP_METHODS and self.bits is not None:
            self.step = nn.Parameter(torch.ones(num_groups))
        self.co_bits = tuple(check_bits(b, f"{name}: co-training weight bits") for b in co_bits)
        if self.co_bits and (self.bits is None or method == "binary" or self.bits in self.co_bits):
            raise ValueError(f"{name}: co-training precisions {self.co_bits} need a multi-bit own precision "
                             f"besides them, got {self.bits} ({method})")
        for b in self.co_bits:
            if method in LEARNED_STEP_METHODS and b > 1:
                self.register_parameter(f"step_w{b}", nn.Parameter(torch.ones(num_groups)))
                self.register_buffer(f"initialized_w{b}", torch.tensor(False))
        self.active_bits = self.bits

    @property
    def precisions(self) -> tuple:
        """Every precision this quantizer can run at, its own first."""
        return (self.bits, *self.co_bits)

    @property
    def enabled(self) -> bool:
        return self.bits is not None

    def reset(self) -> None:
        """Forget learned state: it is re-initialised from the weights at the next forward."""
        self.initialized.fill_(False)
        for b in self.co_bits:
            if hasattr(self, f"initialized_w{b}"):
                getattr(self, f"initialized_w{b}").fill_(False)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if self.bits is None:
            return w
        bits = self.active_bits
        if bits != self.bits and bits not in self.co_bits:
            raise ValueError(f"{self.name}: active precision {bits} is not one of {self.precisions}")
        return self._quantize(self.granularity.group_view(w), bits).reshape(w.shape)

    def _quantize(self, groups: torch.Tensor, bits: int) -> torch.Tensor:
        """``groups`` at precision ``bits`` (its own or a co-training one): binary at 1 bit, else the method, under
        lsq with that precision's own step."""
        if self.method == "binary" or bits == 1:
            alpha = groups.abs().mean(dim=1, keepdim=True).detach()
            self.last_grid = Grid((2 * alpha).clamp(min=1e-12), -alpha, 0, 1, 1)
            return binarize(groups)
        if self.method == "minmax":
            lo = groups.amin(dim=1, keepdim=True).detach()
            hi = groups.amax(dim=1, keepdim=True).detach()
            levels = 2**bits - 1
            self.last_grid = Grid(torch.clamp(hi - lo, min=1e-8) / levels, lo, 0, levels, bits)
            return fake_quant_affine(groups, lo, hi, bits)
        if self.method == "symmetric":
            scale = (groups.abs().amax(dim=1, keepdim=True) / (2 ** (bits - 1) - 1)).clamp(min=1e-8).detach()
            self.last_grid = symmetric_grid(scale, bits)
            return fake_quant_symmetric(groups, scale, bits)
        return self._lsq(groups, bits)

    def _lsq(self, groups: torch.Tensor, bits: int) -> torch.Tensor:
        own = bits == self.bits
        step = self.step if own else getattr(self, f"step_w{bits}")
        initialized = self.initialized if own else getattr(self, f"initialized_w{bits}")
        if step.numel() != groups.shape[0]:
            raise ValueError(f"{self.name}: LSQ has {step.numel()} steps for {groups.shape[0]} groups")
        balanced = self.method == "balanced"
        if not bool(initialized):
            with torch.no_grad():
                step.copy_(mse_scale_search(groups.detach(), bits, balanced=balanced))
                initialized.fill_(True)
        g = 1.0 / math.sqrt(groups.shape[1] * top_level(bits, balanced))
        scaled = grad_scale(step, g).abs().clamp(min=1e-8).unsqueeze(1)
        if balanced:
            self.last_grid = balanced_grid(scaled, bits)
            return fake_quant_balanced(groups, scaled, bits)
        self.last_grid = symmetric_grid(scaled, bits)
        return fake_quant_symmetric(groups, scaled, bits)

    def scales_per_group(self) -> int:
        """Stored numbers per group besides the packed integers (scale, and offset if asymmetric)."""
        return 2 if self.method == "minmax" else 1

    def extra_repr(self) -> str:
        if self.bits is None:
            return "fp32"
        co = f", co_bits={self.co_bits}, active_bits={self.active_bits}" if self.co_bits else ""
        return f"bits={self.bits}, method={self.method}, granularity={self.granularity}{co}"


class RangeObserver:
    """Collects activation statistics during calibration; ``compute_range(method)`` picks a range.

    Keeps the exact running min/max and a bounded random sample of values for the percentile and
    MSE estimators. Not a module: it holds no state that must survive a checkpoint.
    """

    def __init__(self, max_samples: int = 1 << 20, per_batch: int = 1 << 16, seed: int = 0):
        self.lo = math.inf
        self.hi = -math.inf
        self.samples: list[torch.Tensor] = []
        self.kept = 0
        self.max_samples = max_samples
        self.per_batch = per_batch
        self.generator = torch.Generator().manual_seed(seed)
        self.channel_lo: torch.Tensor | None = None  # per-channel min/max (collect_channels; PEG calibration)
        self.channel_hi: torch.Tensor | None = None

    def collect_channels(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        """Fold one batch's per-channel min/max into the running ones."""
        self.channel_lo = lo if self.channel_lo is None else torch.minimum(self.channel_lo, lo)
        self.channel_hi = hi if self.channel_hi is None else torch.maximum(self.channel_hi, hi)

    def collect(self, x: torch.Tensor) -> None:
        flat = x.detach().float().reshape(-1).cpu()
        if flat.numel() == 0:
            return
        self.lo = min(self.lo, float(flat.min()))
        self.hi = max(self.hi, float(flat.max()))
        if self.kept < self.max_samples:
            if flat.numel() > self.per_batch:
                idx = torch.randint(flat.numel(), (self.per_batch,), generator=self.generator)
                flat = flat[idx]
            self.samples.append(flat)
            self.kept += flat.numel()

    def compute_range(self, method: str, bits: int, percentile: float = 99.99) -> tuple[float, float]:
        if not self.samples:
            raise RuntimeError("no activations were observed during calibration")
        if method in ("minmax", "pact", "lsq"):
            return self.lo, self.hi
        values = torch.cat(self.samples)
        if method == "percentile":
            q = torch.tensor([(100 - percentile) / 100, percentile / 100])
            lo, hi = torch.quantile(values, q).tolist()
            return lo, hi
        if method == "mse":
            full_lo, full_hi = min(self.lo, 0.0), max(self.hi, 0.0)  # the grid always contains 0
            best, best_err = (full_lo, full_hi), math.inf
            for ratio in torch.linspace(0.2, 1.0, 41).tolist():
                lo, hi = full_lo * ratio, full_hi * ratio
                err = float((fake_quant_zero_point(values, torch.tensor(lo), torch.tensor(hi), bits) - values).pow(2).mean())
                if err < best_err:
                    best, best_err = (lo, hi), err
            return best
        raise ValueError(f"no range estimator for method '{method}'")


class ActivationQuantizer(nn.Module):
    """Fake-quantizes an activation tensor with one range per tensor (``granularity`` "tensor"), per group of
    channels ("peg", ``groups`` groups of the ``width`` channels along ``channel_dim``) or per token ("token").

    Methods: ``minmax`` (running min/max, exponential moving average while training), ``percentile``
    and ``mse`` (range fixed at calibration), ``pact`` (learned symmetric clipping ``alpha``),
    ``lsq`` (learned step size), ``fixed`` (a known range such as softmax probabilities in [0, 1]).
    Ranges come from calibration, an explicit phase: run batches with ``observing=True`` (outputs stay
    fp32), then ``finish_calibration()``; an uncalibrated quantizer refuses to run. A ``minmax`` training
    batch is quantized with the range as it was before the batch; with ``momentum`` > 0 (0: the range stays
    where calibration put it) the range then moves toward the batch's min/max, at once or, with
    ``defer_range_updates``, when :func:`~.calibrate.apply_range_updates` reduces the pending batch ranges
    of all data-parallel workers (so that every worker keeps the same grid).

    ``peg`` ranges are min-max per group; calibration sorts the channels by their observed range and cuts them
    into ``groups`` equal groups (``group_of``: each channel's group). ``token`` needs no calibration: each
    position's range is its own min/max over the channels (0 always inside).
    """

    def __init__(self, bits=None, method: str = "minmax", fixed_range: tuple[float, float] | None = None,
                 momentum: float = 0.01, name: str = "activation", granularity: str = "tensor",
                 groups: int | None = None, width: int | None = None, channel_dim: int = -1):
        super().__init__()
        self.bits = check_bits(bits, f"{name}: activation bits", activation=True)
        if method not in ACT_METHODS:
            raise ValueError(f"{name}: unknown activation method '{method}'; expected one of {ACT_METHODS}")
        if method == "fixed" and fixed_range is None:
            raise ValueError(f"{name}: method 'fixed' needs fixed_range=(lo, hi)")
        if self.bits == 1 and method in ("pact", "lsq"):
            raise ValueError(f"{name}: 1-bit activations need a range method (minmax, percentile, mse), "
                             f"not '{method}' (its signed 1-bit grid is {{-1, 0}})")
        if granularity not in ACT_GRANULARITIES:
            raise ValueError(f"{name}: unknown activation granularity '{granularity}'; expected one of "
                             f"{ACT_GRANULARITIES}")
        if granularity != "tensor" and method != "minmax":
            raise ValueError(f"{name}: activation granularity '{granularity}' uses min-max ranges (act_method "
                             f"minmax), not '{method}'")
        shape = ()
        if granularity == "peg":
            if not isinstance(groups, int) or isinstance(groups, bool) or groups < 1:
                raise ValueError(f"{name}: activation granularity 'peg' needs a positive number of groups, "
                                 f"got {groups!r}")
            if width is None:
                raise ValueError(f"{name}: activation granularity 'peg' needs the width of its input")
            if width % groups:
                raise ValueError(f"{name}: {groups} activation groups do not divide the {width} channels of its "
                                 f"input (use a divisor of {width})")
            shape = (groups,)
        elif groups is not None:
            raise ValueError(f"{name}: activation groups ({groups}) apply to granularity 'peg', not '{granularity}'")
        if granularity == "token" and width == 1 and self.bits is not None:
            raise ValueError(f"{name}: per-token ranges over its single input channel would keep every value exact "
                             "(unquantized); give this site act_granularity tensor")
        self.method = method
        self.granularity = granularity
        self.groups, self.width, self.channel_dim = groups, width, channel_dim
        self.momentum = momentum
        self.name = name
        self.last_grid: Grid | None = None  # the grid of the latest output (for the audit)
        self.defer_range_updates = False
        self.pending_range: tuple[torch.Tensor, torch.Tensor] | None = None  # batch (min, max) not yet applied
        self.observing = False
        self.observer: RangeObserver | None = None
        self.register_buffer("initialized", torch.tensor(method == "fixed" or granularity == "token"))
        lo, hi = fixed_range if fixed_range is not None else (0.0, 0.0)
        self.register_buffer("lo", torch.full(shape, float(lo)))
        self.register_buffer("hi", torch.full(shape, float(hi)))
        if granularity == "peg":  # channel -> group; calibration sorts the channels by range before cutting
            self.register_buffer("group_of", torch.arange(width) // (width // groups))
        if method == "pact":
            self.alpha = nn.Parameter(torch.tensor(1.0))
        if method == "lsq":
            self.step = nn.Parameter(torch.tensor(1.0))

    @property
    def enabled(self) -> bool:
        return self.bits is not None

    def start_calibration(self) -> None:
        if self.enabled and self.method != "fixed" and self.granularity != "token":
            self.observing = True
            self.observer = RangeObserver()

    def finish_calibration(self) -> None:
        if not self.observing:
            return
        self.observing = False
        observer, self.observer = self.observer, None
        if not observer.samples:
            return
        if self.granularity == "peg":
            self._set_group_ranges(observer.channel_lo, observer.channel_hi)
        else:
            self._set_range(*observer.compute_range(self.method, self.bits))

    def reset(self) -> None:
        if self.method != "fixed" and self.granularity != "token":
            self.initialized.fill_(False)

    @property
    def range_count(self) -> int:
        """Stored ranges (a scale and a zero point each): one per tensor, one per group, none for dynamic ones."""
        if not self.enabled or self.granularity == "token":
            return 0
        return self.groups if self.granularity == "peg" else 1

    def _channel_view(self, t: torch.Tensor, ndim: int) -> torch.Tensor:
        """A per-channel vector shaped to broadcast along ``channel_dim`` of an ``ndim``-dimensional input."""
        shape = [1] * ndim
        shape[self.channel_dim] = -1
        return t.reshape(shape)

    def _channel_minmax(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if x.shape[self.channel_dim] != self.width:
            raise ValueError(f"{self.name}: input has {x.shape[self.channel_dim]} channels along dimension "
                             f"{self.channel_dim}, its groups were made for {self.width}")
        flat = x.detach().float().movedim(self.channel_dim, 0).reshape(self.width, -1)
        return flat.amin(dim=1), flat.amax(dim=1)

    def _group_minmax(self, ch_lo: torch.Tensor, ch_hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lo = torch.full((self.groups,), math.inf).scatter_reduce(0, self.group_of.cpu(), ch_lo.cpu(), "amin")
        hi = torch.full((self.groups,), -math.inf).scatter_reduce(0, self.group_of.cpu(), ch_hi.cpu(), "amax")
        return lo.clamp(max=0.0).to(self.lo), hi.clamp(min=0.0).to(self.hi)

    @torch.no_grad()
    def _set_group_ranges(self, ch_lo: torch.Tensor, ch_hi: torch.Tensor) -> None:
        """PEG calibration: channels sorted by their range (hi - lo, 0 kept inside), cut into equal groups."""
        ch_lo, ch_hi = ch_lo.clamp(max=0.0), ch_hi.clamp(min=0.0)
        order = torch.argsort(ch_hi - ch_lo, stable=True)
        group_of = torch.empty(self.width, dtype=torch.long)
        group_of[order] = torch.arange(self.width) // (self.width // self.groups)
        self.group_of.copy_(group_of)
        lo, hi = self._group_minmax(ch_lo, ch_hi)
        self.lo.copy_(lo)
        self.hi.copy_(torch.maximum(hi, lo + 1e-8))
        self.initialized.fill_(True)

    @torch.no_grad()
    def _set_range(self, lo: float, hi: float) -> None:
        lo, hi = min(lo, 0.0), max(hi, 0.0)  # keep 0 inside the range (padding, ReLU zeros)
        if hi - lo < 1e-8:
            hi = lo + 1e-8
        self.lo.fill_(lo)
        self.hi.fill_(hi)
        if self.method == "pact":
            self.alpha.fill_(max(abs(lo), abs(hi)))
        elif self.method == "lsq":
            _, qmax = signed_range(self.bits)
            self.step.fill_(max(abs(lo), abs(hi)) / max(qmax, 1))
        self.initialized.fill_(True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bits is None:
            return x
        if self.observing:
            self.observer.collect(x)
            if self.granularity == "peg":
                self.observer.collect_channels(*self._channel_minmax(x))
            return x
        if not bool(self.initialized):
            raise RuntimeError(
                f"{self.name}: activation quantizer has no range; calibrate the model first "
                "(fairseq_quant.quant.calibrate; for a fairseq checkpoint: scripts/calibrate.py), or load a "
                "calibrated checkpoint"
            )
        if self.training and self.method == "minmax" and self.momentum > 0 and self.granularity != "token":
            if self.granularity == "peg":
                self.pending_range = self._group_minmax(*self._channel_minmax(x))
            else:
                self.pending_range = (x.detach().min().clamp(max=0.0), x.detach().max().clamp(min=0.0))
        out = self._quantize(x)
        if self.pending_range is not None and not self.defer_range_updates:
            self.update_range(*self.pending_range)
        return out

    @torch.no_grad()
    def update_range(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        """Move the running range toward a batch range (exponential moving average with ``momentum``)."""
        m = self.momentum
        self.lo.mul_(1 - m).add_(m * lo.to(self.lo))
        self.hi.mul_(1 - m).add_(m * hi.to(self.hi))
        self.pending_range = None

    def _quantize(self, x: torch.Tensor) -> torch.Tensor:
        if self.method == "pact":
            alpha = self.alpha.abs().clamp(min=1e-6)
            clipped = torch.minimum(torch.maximum(x, -alpha), alpha)
            _, qmax = signed_range(self.bits)
            self.last_grid = symmetric_grid(alpha / max(qmax, 1), self.bits)
            return fake_quant_symmetric(clipped, alpha / max(qmax, 1), self.bits)
        if self.method == "lsq":
            _, qmax = signed_range(self.bits)
            g = 1.0 / math.sqrt(x.numel() * max(qmax, 1))
            step = grad_scale(self.step, g).abs().clamp(min=1e-8)
            self.last_grid = symmetric_grid(step, self.bits)
            return fake_quant_symmetric(x, step, self.bits)
        lo, hi = self.lo, self.hi
        if self.granularity == "peg":
            lo, hi = self._channel_view(lo[self.group_of], x.dim()), self._channel_view(hi[self.group_of], x.dim())
        elif self.granularity == "token":
            lo = x.detach().amin(dim=self.channel_dim, keepdim=True).clamp(max=0.0)
            hi = x.detach().amax(dim=self.channel_dim, keepdim=True).clamp(min=0.0)
        self.last_grid = zero_point_grid(lo, hi, self.bits)
        return fake_quant_zero_point(x, lo, hi, self.bits)

    def extra_repr(self) -> str:
        if self.bits is None:
            return "fp32"
        groups = f", groups={self.groups}" if self.granularity == "peg" else ""
        return f"bits={self.bits}, method={self.method}, granularity={self.granularity}{groups}"


__all__ = [
    "ACT_GRANULARITIES", "ACT_METHODS", "WEIGHT_METHODS", "ActivationQuantizer", "Grid", "PerChannel", "PerTensor", "RangeObserver",
    "WeightQuantizer", "binarize", "check_bits", "fake_quant_affine", "fake_quant_symmetric", "fake_quant_zero_point",
    "round_ste",
]
