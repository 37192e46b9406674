"""The convert phase of a multi-precision co-trained checkpoint: one allocation of its precisions written as an
ordinary quantized checkpoint (its strategy, state dict and stored specs), which evaluates, exports and
fine-tunes like any QAT checkpoint. The co-trained weights, steps and activation ranges are kept as they are:
nothing is recalibrated (fairseq glue over :func:`fairseq_quant.quant.coprecision.collapse`)."""
from __future__ import annotations

import copy
from pathlib import Path

import yaml

from fairseq_quant_runtime.files import atomic_output

from .quant import Strategy
from .quant.coprecision import collapse
from .quant.errors import FairseqQuantError
from .quant.strategy import Rule

EXTRA_STATE_KEY = "_extra_state"


class CollapseError(FairseqQuantError, ValueError):
    """The checkpoint is not co-trained, or the allocation asks for a precision it was not trained at."""


def allocation_of(specs: dict[str, dict], precision: int | None = None, strategy: Strategy | None = None
                  ) -> dict[str, int]:
    """Module -> precision for every co-trained module: ``precision`` where the module has it (its own
    elsewhere), or the weight bits ``strategy`` gives the module."""
    from .quant.spec import QuantSpec

    out = {}
    if strategy is not None:
        strategy = strategy.bind(specs)
    for name, raw in specs.items():
        spec = QuantSpec(**raw)
        if not spec.co_weight_bits:
            continue
        if strategy is not None:
            bits = strategy.spec_for(name).weight_bits
            if bits not in spec.precisions:
                raise CollapseError(f"{strategy.source}: {name} gets {bits}-bit weights, not one of its co-trained "
                                    f"precisions {spec.precisions}")
        else:
            bits = precision if precision in spec.precisions else spec.weight_bits
        out[name] = bits
    return out


def collapse_checkpoint(checkpoint, out, precision: int | None = None, strategy: Strategy | None = None) -> dict:
    """Write ``out``: the co-trained ``checkpoint`` at one precision or at a strategy's weight bits; returns a
    summary (modules per precision, average weight bits of the collapsed specs)."""
    from .compat import load_torch_file

    if (precision is None) == (strategy is None):
        raise CollapseError("give either a precision or a strategy whose weight bits choose the precisions")
    checkpoint, out = Path(checkpoint), Path(out)
    if not checkpoint.is_file():
        raise CollapseError(f"checkpoint not found: {checkpoint}")
    state = load_torch_file(checkpoint)
    weights = state.get("model") if isinstance(state, dict) else None
    specs = ((weights or {}).get(EXTRA_STATE_KEY) or {}).get("quant_specs")
    if not specs or not any(raw.get("co_weight_bits") for raw in specs.values()):
        raise CollapseError(f"{checkpoint}: not a co-trained checkpoint (no module has co_weight_bits)")
    allocation = allocation_of(specs, precision, strategy)
    new_weights, new_specs = collapse(weights, specs, allocation)
    default = next(iter(new_specs.values()))
    collapsed = Strategy(default, [Rule(name, spec) for name, spec in new_specs.items()],
                         source=f"{checkpoint} collapsed to {precision if precision else strategy.source}")
    new_state = {key: value for key, value in state.items() if key not in ("last_optimizer_state", "model")}
    new_state["model"] = new_weights
    new_state["cfg"] = copy.deepcopy(state["cfg"])
    model_cfg = new_state["cfg"]["model"] if isinstance(new_state["cfg"], dict) else new_state["cfg"].model
    changes = {"quant_strategy_inline": yaml.safe_dump(collapsed.to_dict(), sort_keys=False), "quant_strategy": None,
               "quant_weight_bits": None, "quant_act_bits": None, "quant_co_weight_bits": None}
    for key, value in changes.items():  # fairseq stores the model config as a dict or a namespace
        if isinstance(model_cfg, dict):
            model_cfg[key] = value
        else:
            setattr(model_cfg, key, value)
    counts: dict[int, int] = {}
    for bits in allocation.values():
        counts[bits] = counts.get(bits, 0) + 1
    summary = {"source": str(checkpoint), "out": str(out), "modules_per_precision": dict(sorted(counts.items()))}
    new_state.setdefault("extra_state", {})
    new_state["extra_state"] = {**(new_state["extra_state"] or {}), "collapsed": summary}
    out.parent.mkdir(parents=True, exist_ok=True)
    import torch

    with atomic_output(out) as tmp:
        torch.save(new_state, tmp)
    return summary
