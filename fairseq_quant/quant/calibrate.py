"""Calibration: estimate activation ranges on a few batches with the model running in fp32."""
from contextlib import contextmanager

import torch
from torch import nn

from .quantizers import ActivationQuantizer, WeightQuantizer


def activation_quantizers(model: nn.Module) -> list[ActivationQuantizer]:
    return [m for m in model.modules() if isinstance(m, ActivationQuantizer) and m.enabled]


@contextmanager
def calibration(model: nn.Module):
    """Inside the block, activation quantizers observe (outputs stay fp32); on exit they fix their ranges."""
    quantizers = activation_quantizers(model)
    for q in quantizers:
        q.start_calibration()
    try:
        yield quantizers
    finally:
        for q in quantizers:
            q.finish_calibration()


def calibrate(model: nn.Module, batches, forward=None) -> int:
    """Run ``forward(model, batch)`` (default ``model(batch)``) over ``batches`` without gradients.

    Returns the number of batches seen.
    """
    forward = forward or (lambda m, b: m(b))
    seen = 0
    with calibration(model), torch.no_grad():
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
