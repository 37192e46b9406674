"""Calibration: estimate activation ranges on a few batches with the model running in fp32."""
from contextlib import contextmanager

import torch
from torch import nn

from .quantizers import ActivationQuantizer, WeightQuantizer


def activation_quantizers(model: nn.Module) -> list[ActivationQuantizer]:
    return [m for m in model.modules() if isinstance(m, ActivationQuantizer) and m.enabled]


@contextmanager
def calibration(model: nn.Module, quantizers=None):
    """Inside the block, the activation quantizers (all of the model's, or ``quantizers``) observe (outputs stay
    fp32); on exit they fix their ranges."""
    quantizers = activation_quantizers(model) if quantizers is None else list(quantizers)
    for q in quantizers:
        q.start_calibration()
    try:
        yield quantizers
    finally:
        for q in quantizers:
            q.finish_calibration()


def calibrate(model: nn.Module, batches, forward=None, quantizers=None) -> int:
    """Run ``forward(model, batch)`` (default ``model(batch)``) over ``batches`` without gradients, the activation
    quantizers (all, or ``quantizers``) observing; then each fixes its range. Put the model in eval mode first:
    that estimates the ranges decoding sees, and the fairseq quant models refuse any training-mode forward before
    they are calibrated (``fairseq_quant.calibration.calibrate_model`` does this for them).

    Returns the number of batches seen.
    """
    forward = forward or (lambda m, b: m(b))
    seen = 0
    with calibration(model, quantizers), torch.no_grad():
        for batch in batches:
            forward(model, batch)
            seen += 1
    if seen == 0:
        raise ValueError("calibration needs at least one batch")
    return seen


def reset_quantizers(model: nn.Module) -> None:
    """Forget ranges and learned steps: everything re-initialises from weights / the next calibration."""
    for m in model.modules():
        if isinstance(m, (WeightQuantizer, ActivationQuantizer)):
            m.reset()


def is_calibrated(model: nn.Module) -> bool:
    return all(bool(q.initialized) for q in activation_quantizers(model))


def apply_range_updates(model: nn.Module, reduce_max=None) -> None:
    """Apply the pending batch ranges of the model's ``minmax`` activation quantizers (see
    ``ActivationQuantizer.defer_range_updates``). ``reduce_max(t)`` returns the elementwise maximum of ``t``
    over all data-parallel workers (one call per model forward, the same size on every worker), so that each
    range follows the min/max of the whole global batch and every worker keeps identical ranges."""
    quantizers = [q for q in activation_quantizers(model) if q.method == "minmax" and q.granularity != "token"]
    if not quantizers:
        return
    # every range flattened into one vector (per-group quantizers hold several), -lo then hi: one reduction
    parts = []
    for q in quantizers:
        lo, hi = q.pending_range if q.pending_range is not None else (None, None)
        none = torch.full(q.lo.shape, float("-inf"), device=q.lo.device)
        parts.append((-lo.float() if lo is not None else none).reshape(-1))
        parts.append((hi.float() if hi is not None else none).reshape(-1))
    stats = torch.cat(parts)
    if reduce_max is not None:
        stats = reduce_max(stats)
    offset = 0
    for q in quantizers:
        n = q.lo.numel()
        neg_lo, hi = stats[offset:offset + n], stats[offset + n:offset + 2 * n]
        offset += 2 * n
        if bool(torch.isfinite(neg_lo).all()) and bool(torch.isfinite(hi).all()):
            q.update_range(-neg_lo.reshape(q.lo.shape), hi.reshape(q.hi.shape))
        q.pending_range = None
