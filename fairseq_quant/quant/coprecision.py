"""Multi-precision co-training (Li et al. 2025, "Towards One-bit ASR"): one set of latent weights trained at
several weight precisions at once, so that any per-layer allocation of those precisions can be evaluated
(and deployed) without retraining.

A module whose :class:`~.spec.QuantSpec` has ``co_weight_bits`` owns a weight quantizer that runs at any of
its precisions (:attr:`~.quantizers.WeightQuantizer.precisions`). This module chooses them:

- :func:`weight_precision` (a context manager) sets the precision of every weight quantizer for the forwards
  inside it: one precision for all (quantizers without it keep their own), or one per module;
- :func:`sample_allocation` draws each module's precision at random (stochastic precision);
- :func:`collapse` turns a co-trained model's state dict and specs into those of an ordinary quantized model at
  one allocation (the chosen precision's step becomes ``step``): the *convert* phase before export.

Activation quantizers are shared by every precision. Pure PyTorch.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from .quantizers import WeightQuantizer
from .spec import QuantSpec

QUANTIZER_SUFFIX = ".weight_quantizer"


def weight_quantizers(model: nn.Module) -> dict[str, WeightQuantizer]:
    """Module name (the quantizer's owner) -> its weight quantizer, for every enabled weight quantizer."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, WeightQuantizer) and module.enabled:
            out[name[: -len(QUANTIZER_SUFFIX)] if name.endswith(QUANTIZER_SUFFIX) else name] = module
    return out


def co_precisions(model: nn.Module) -> list[int]:
    """Every co-training precision some module of ``model`` has, high to low (empty: not co-trained)."""
    return sorted({b for q in weight_quantizers(model).values() for b in q.co_bits}, reverse=True)


@contextmanager
def weight_precision(model: nn.Module, bits: int | dict[str, int] | None):
    """Run the forwards inside at ``bits``: an int sets every weight quantizer that has that precision (the others
    keep their own); a dict sets the named modules (every other keeps its own); None changes nothing. A dict
    naming an unknown module or a precision the module lacks is an error. The previous precisions are restored
    on exit, also after an exception."""
    quantizers = weight_quantizers(model)
    if isinstance(bits, dict):
        unknown = sorted(set(bits) - set(quantizers))
        if unknown:
            raise KeyError(f"no quantized weight named {unknown[:3]}; modules look like {sorted(quantizers)[:3]}")
        for name, b in bits.items():
            if b not in quantizers[name].precisions:
                raise ValueError(f"{name}: precision {b} is not one of its co-trained precisions "
                                 f"{quantizers[name].precisions}")
    saved = {name: q.active_bits for name, q in quantizers.items()}
    try:
        for name, q in quantizers.items():
            if isinstance(bits, dict):
                q.active_bits = bits.get(name, q.bits)
            elif bits is not None:
                q.active_bits = bits if bits in q.precisions else q.bits
        yield
    finally:
        for name, q in quantizers.items():
            q.active_bits = saved[name]


def sample_allocation(model: nn.Module, generator: torch.Generator | None = None,
                      allowed: set[int] | None = None) -> dict[str, int]:
    """Each co-trained module's precision drawn uniformly from its precisions (those in ``allowed``, its own
    always included), with torch's generator: under fairseq the draws follow the trainer's per-update seed, so
    a resumed training draws the same ones."""
    out = {}
    for name, q in weight_quantizers(model).items():
        if not q.co_bits:
            continue
        choices = [b for b in q.precisions if allowed is None or b in allowed or b == q.bits]
        out[name] = choices[int(torch.randint(len(choices), (), generator=generator))]
    return out


def collapse(state_dict: dict, specs: dict[str, dict], allocation: dict[str, int] | int
             ) -> tuple[dict, dict[str, QuantSpec]]:
    """The state dict and per-module specs of an ordinary quantized model from a co-trained one at
    ``allocation`` (module -> precision, or one precision for every module that has it; unnamed modules keep
    their own): each module's spec gets ``weight_bits`` = its precision and no ``co_weight_bits``; under lsq the
    precision's step and its initialised flag become ``step``/``initialized``; the other precisions' steps
    are dropped. ``specs`` are ``{module: QuantSpec.to_dict()}`` as the model stores them; a dict-valued
    ``_extra_state`` entry holding them under ``quant_specs`` gets the new ones."""
    new_specs: dict[str, QuantSpec] = {}
    chosen: dict[str, int] = {}
    for name, raw in specs.items():
        spec = QuantSpec(**raw)
        if not spec.co_weight_bits:
            new_specs[name] = spec
            continue
        b = allocation.get(name, spec.weight_bits) if isinstance(allocation, dict) else (
            allocation if allocation in spec.precisions else spec.weight_bits)
        if b not in spec.precisions:
            raise ValueError(f"{name}: precision {b} is not one of its co-trained precisions {spec.precisions}")
        chosen[name] = b
        method = "binary" if b == 1 else spec.weight_method
        new_specs[name] = spec.updated(weight_bits=b, weight_method=method, co_weight_bits=None)
    if isinstance(allocation, dict):
        unknown = sorted(set(allocation) - set(chosen))
        if unknown:
            raise KeyError(f"no co-trained module named {unknown[:3]}")
    out = {}
    for key, value in state_dict.items():
        owner, _, leaf = key.rpartition(QUANTIZER_SUFFIX + ".")
        if owner in chosen and (leaf.startswith("step_w") or leaf.startswith("initialized_w")):
            continue  # a co-training precision's own state: the chosen one is copied below
        if key.endswith("_extra_state") and isinstance(value, dict) and "quant_specs" in value:
            value = {**value, "quant_specs": {n: spec.to_dict() for n, spec in new_specs.items()}}
        out[key] = value
    for name, b in chosen.items():
        prefix = name + QUANTIZER_SUFFIX + "."
        own = QuantSpec(**specs[name]).weight_bits
        if b == own:
            continue
        if b == 1 or f"{prefix}step_w{b}" not in state_dict:  # binary, or a method without learned steps
            out.pop(prefix + "step", None)
            continue
        out[prefix + "step"] = state_dict[f"{prefix}step_w{b}"]
        out[prefix + "initialized"] = state_dict[f"{prefix}initialized_w{b}"]
    return out, new_specs
