"""Per-layer-group sensitivity: quantize one group of a trained fp32 model at a time (post-training, the
rest fp32) and measure how much the WER moves. The table says which layers lose the most at low bits.

Groups of a VGGTransformer: the VGG front end, each child of the encoder's transformer stack (its input
projection, every layer, its output projection), the CTC head (``*_ctc`` archs), the token embedding, the
decoder convolutions, each decoder layer and the output projection.
"""
from __future__ import annotations

import re

from torch import nn

from .quant import Strategy

GROUP_PARENTS = ("encoder.transformer_layers", "decoder.layers")


def layer_groups(model: nn.Module) -> list[str]:
    """Module names of the groups, in forward order, that hold parameters."""
    modules = dict(model.named_modules())
    groups = []
    for name in ("encoder.conv_layers", "encoder.transformer_layers", "ctc_proj", "decoder.embed_tokens",
                 "decoder.conv_layers", "decoder.layers", "decoder.fc_out"):
        if name not in modules:
            continue
        if name in GROUP_PARENTS:
            groups += [f"{name}.{child}" for child, m in modules[name].named_children()
                       if any(p.requires_grad for p in m.parameters()) and not isinstance(m, nn.LayerNorm)]
        else:
            groups.append(name)
    return groups


def group_strategy(group: str, weight_bits: int, weight_method: str = "lsq",
                   granularity: str = "channel") -> Strategy:
    """Weights of ``group`` (and everything inside it) at ``weight_bits``, everything else fp32; activations
    fp32. With ``lsq`` and no training, the step is the MSE-optimal one for the weights."""
    return Strategy.from_dict({
        "description": f"sensitivity: {group} at {weight_bits} bits, the rest fp32",
        "default": {"weight_bits": "fp32", "act_bits": "fp32"},
        "rules": [{"match": f"re:{re.escape(group)}(\\..*)?", "weight_bits": weight_bits, "act_bits": "fp32",
                   "weight_method": weight_method, "granularity": granularity}],
    }, source=f"sensitivity {group}")
