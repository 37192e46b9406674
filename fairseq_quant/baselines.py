"""What users get without QAT, on the same fp32 checkpoint: post-training weight quantization and
PyTorch's dynamic int8 quantization.

- `ptq_checkpoint` turns an fp32 fairseq checkpoint into a ``quant_`` checkpoint with a weight-only strategy
  and no training: weights are quantized from their own ranges (min-max per tensor, symmetric per
  channel, ...); the result decodes with `scripts/evaluate.py` and `fairseq-generate` like a QAT one.
  Strategies that quantize activations need ranges: the calibration phase (`fairseq_quant.calibration`,
  `scripts/calibrate.py`) writes those checkpoints.
- `dynamic_int8` applies ``torch.ao.quantization.quantize_dynamic`` (int8 weights, int8 activations
  quantized per batch at run time) to every Linear it can take. fairseq's attention passes its projection
  weights to ``F.multi_head_attention_forward`` directly and reads ``q_proj.bias`` (a method on a
  dynamically quantized Linear), so attention projections stay fp32, as a user would have to leave them.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
import yaml
from torch import nn

from fairseq_quant_runtime.files import atomic_output

from .compat import load_torch_file
from .quant import Strategy
from .quant.errors import FairseqQuantError


class BaselineError(FairseqQuantError, ValueError):
    """A baseline cannot be built from the given checkpoint."""


def quantized_model_cfg(model_cfg, strategy: Strategy, source, in_place: bool = False):
    """The model configuration of an fp32 checkpoint turned into its ``quant_`` counterpart with ``strategy``
    (a copy, or ``model_cfg`` itself with ``in_place``)."""
    import copy

    from fairseq.models import ARCH_MODEL_REGISTRY

    arch = getattr(model_cfg, "arch", None)
    if arch is None:
        raise BaselineError(f"{source}: no model configuration (not a fairseq checkpoint?)")
    if arch.startswith("quant_"):
        raise BaselineError(f"{source}: already a quantized checkpoint ({arch}); give the fp32 one")
    if f"quant_{arch}" not in ARCH_MODEL_REGISTRY:
        raise BaselineError(f"{source}: no quantized counterpart of architecture {arch}")
    model_cfg = model_cfg if in_place else copy.deepcopy(model_cfg)
    for attr in ("arch", "_name"):
        setattr(model_cfg, attr, f"quant_{arch}")
    model_cfg.quant_strategy = None
    model_cfg.quant_weight_bits = model_cfg.quant_act_bits = None
    model_cfg.quant_strategy_inline = yaml.safe_dump(strategy.to_dict(), sort_keys=False)
    return model_cfg


def ptq_checkpoint(fp32_checkpoint: str | os.PathLike, out: str | os.PathLike, strategy: Strategy) -> Path:
    """Write ``out``: the fp32 checkpoint's weights under the ``quant_`` architecture and a weight-only ``strategy``.

    Quantizer state is absent, so loading initialises it from the weights (LSQ: the MSE-optimal step)."""
    quantized_acts = [spec.label() for spec in [strategy.default, *(r.spec for r in strategy.rules)]
                      if spec.act_bits is not None]
    if quantized_acts:
        raise BaselineError(f"{strategy.source}: quantizes activations ({quantized_acts[0]}); their ranges need the "
                            "calibration phase: scripts/calibrate.py (fairseq_quant.calibration.calibrate_checkpoint)")
    state = load_torch_file(fp32_checkpoint)
    cfg = state.get("cfg")
    quantized_model_cfg(cfg["model"] if cfg is not None else None, strategy, fp32_checkpoint, in_place=True)
    state.pop("last_optimizer_state", None)
    state.pop("criterion", None)
    state.setdefault("extra_state", {})["post_training_quantization"] = str(strategy)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(out) as tmp:
        torch.save(state, tmp)
    return out


def _attention_linears(model: nn.Module) -> set[str]:
    """Names of the Linear modules inside attention modules (left fp32 by `dynamic_int8`)."""
    from fairseq.modules import MultiheadAttention

    names = set()
    for name, module in model.named_modules():
        if isinstance(module, MultiheadAttention):
            names.update(f"{name}.{child}" for child, m in module.named_children() if isinstance(m, nn.Linear))
    return names


def dynamic_int8(model: nn.Module) -> tuple[nn.Module, dict]:
    """(model, size report): ``model`` itself with torch's dynamic int8 Linear layers in place of its
    float ones; attention stays fp32."""
    skip = _attention_linears(model)
    targets = {name for name, m in model.named_modules() if type(m) is nn.Linear and name not in skip}
    if not targets:
        raise BaselineError("the model has no Linear layer that dynamic quantization can take")
    int8_params = sum(model.get_submodule(n).weight.numel() for n in targets)
    float_params = sum(p.numel() for p in model.parameters()) - int8_params
    # int8 weights (1 byte), an fp32 scale and an int zero point per tensor, everything else fp32
    size_bytes = int8_params + 8 * len(targets) + 4 * float_params
    report = {"int8_linears": len(targets), "fp32_attention_linears": len(skip),
              "int8_params": int8_params, "fp32_params": float_params, "model_mb": size_bytes / 1e6,
              "avg_weight_bits": (8 * int8_params + 32 * float_params) / (int8_params + float_params)}
    spec = {name: torch.ao.quantization.default_dynamic_qconfig for name in targets}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # quantize_dynamic is deprecated in favour of torchao
        # in place: a copy would deepcopy weight-normed convolutions, which torch refuses
        quantized = torch.ao.quantization.quantize_dynamic(model, spec, dtype=torch.qint8, inplace=True)
    return quantized, report
