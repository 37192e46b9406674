"""The search space: units of choice, their sizes at each bit width, and allocations as strategies.

A *unit* is a set of modules that always get the same weight bits. Three granularities:

- ``layer``: the groups of :func:`fairseq_quant.sensitivity.layer_groups` (VGG front end, the encoder's
  input projection, each encoder layer, its output projection, the token embedding, the decoder
  convolutions, each decoder layer, the output projection);
- ``block``: like ``layer`` but each transformer layer splits into its attention block(s) and its FFN
  block (``fc1`` + ``fc2``);
- ``module``: every quantizable module with a weight on its own (an attention module, with its four
  projections, counts as one).

An *allocation* maps each unit to its weight bits; :func:`allocation_strategy` turns it into a strategy
(one rule per module of each unit) that ``--quant-strategy`` loads as is. Pure PyTorch: the model is
passed in already quantizable (fairseq's types registered by :mod:`fairseq_quant.models`).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

from ..quant import QuantModule, Strategy, quantizable_names, quantize_model
from ..quant.errors import FairseqQuantError
from ..quant.replace import is_quantized, quant_class_for

UNIT_KINDS = ("layer", "block", "module")
LAYER_PARENTS = ("encoder.transformer_layers", "decoder.layers")
TOP_GROUPS = ("encoder.conv_layers", "encoder.transformer_layers", "ctc_proj", "decoder.embed_tokens",
              "decoder.conv_layers", "decoder.layers", "decoder.fc_out")


class SearchError(FairseqQuantError, ValueError):
    """Invalid search input (budget, bit widths, units): the message says what and why."""


@dataclass(frozen=True)
class Unit:
    name: str
    modules: tuple[str, ...]  # module names (each with everything inside it)


def _weighted_leaves(model: nn.Module) -> list[str]:
    """Quantizable modules that own a weight, attention modules as one (their projections inside)."""
    names = quantizable_names(model)
    out = []
    for name in names:
        if any(name.startswith(o + ".") for o in out):
            continue  # inside an attention module already taken
        module = model.get_submodule(name)
        kind = type(module).__name__
        if "MultiheadAttention" in kind or getattr(module, "weight", None) is not None or hasattr(module, "weight_v"):
            out.append(name)
    return out


def model_units(model: nn.Module, kind: str = "layer") -> list[Unit]:
    """The units of ``model`` in forward order. Every quantizable module with a weight is in exactly one."""
    if kind not in UNIT_KINDS:
        raise SearchError(f"unknown unit {kind!r}; expected one of {', '.join(UNIT_KINDS)}")
    leaves = _weighted_leaves(model)
    if kind == "module":
        return [Unit(n, (n,)) for n in leaves]
    modules = dict(model.named_modules())
    units: list[Unit] = []
    for top in TOP_GROUPS:
        if top not in modules:
            continue
        inside = [n for n in leaves if n == top or n.startswith(top + ".")]
        if not inside:
            continue
        if top not in LAYER_PARENTS:
            units.append(Unit(top, (top,)))
            continue
        for child, _ in modules[top].named_children():
            prefix = f"{top}.{child}"
            members = [n for n in inside if n == prefix or n.startswith(prefix + ".")]
            if not members:
                continue
            if kind == "layer" or members == [prefix]:
                units.append(Unit(prefix, (prefix,)))
                continue
            ffn = tuple(m for m in members if re.fullmatch(re.escape(prefix) + r"\.fc\d+", m))
            for m in members:
                if m not in ffn:
                    units.append(Unit(m, (m,)))
            if ffn:
                units.append(Unit(f"{prefix}.ffn", ffn))
    covered = {m for u in units for m in u.modules}
    missing = [n for n in leaves if not any(n == c or n.startswith(c + ".") for c in covered)]
    if missing:
        raise SearchError(f"units of kind {kind!r} miss quantizable modules {missing[:3]}; use --unit module")
    return units


ACT_FIELDS = ("act_bits", "act_method", "act_granularity", "act_groups")


def act_overrides(strategy: Strategy | None, modules) -> dict[str, dict]:
    """``{module: activation fields}`` for each of ``modules`` that a rule of ``strategy`` decides (its default
    decides nothing here): the activation settings a search keeps in every strategy it builds, such as an outlier
    site at 16 bits (``w2a8-balanced-out16.yaml``). Weight fields of those rules are ignored: the search allocates
    them."""
    if strategy is None:
        return {}
    out = {}
    modules = list(modules)
    strategy = strategy.bind(modules)
    for m in modules:
        spec, rule = strategy.lookup(m)
        if rule is not None:
            fields = spec.to_dict()
            out[m] = {k: "fp32" if k == "act_bits" and fields[k] is None else fields[k]
                      for k in ACT_FIELDS if fields[k] is not None or k == "act_bits"}
    return out


def allocation_strategy(units: list[Unit], allocation: dict[str, int], act_bits, description: str = "",
                        granularity: str = "channel", weight_method: str = "lsq",
                        act_rules: dict[str, dict] | None = None) -> Strategy:
    """A strategy giving each unit's modules its allocated weight bits (activations ``act_bits``, but for the
    modules of ``act_rules``, :func:`act_overrides`, which keep their activation fields at any weight width)."""
    missing = [u.name for u in units if u.name not in allocation]
    if missing:
        raise SearchError(f"allocation has no bits for units {missing[:3]}")
    act_rules = act_rules or {}
    bits = [allocation[u.name] for u in units]
    default_bits = max(set(bits), key=lambda b: (bits.count(b), b))  # the commonest width
    rules = []
    for unit in units:
        for m in unit.modules:
            if allocation[unit.name] != default_bits or m in act_rules:
                b = allocation[unit.name]
                rules.append({"match": f"re:{re.escape(m)}(\\..*)?", "weight_bits": b,
                              "weight_method": "binary" if b == 1 else weight_method, **act_rules.get(m, {})})
    data = {"description": description or "searched allocation",
            "default": {"weight_bits": default_bits, "act_bits": act_bits, "granularity": granularity,
                        "weight_method": "binary" if default_bits == 1 else weight_method, "act_method": "minmax"},
            "rules": rules}
    return Strategy.from_dict(data, source="search")


def strategy_yaml(strategy: Strategy, description: str) -> str:
    import yaml

    return yaml.safe_dump({"description": description, **strategy.to_dict()}, sort_keys=False)


@dataclass
class UnitCosts:
    """Per unit: quantized weight elements and bytes at each bit width; ``constant_bytes`` is everything
    else in the model (fp32 biases and normalisation, activation ranges) so that
    ``MB = (constant + sum of the units' bytes) / 1e6`` equals the quantization report's size."""

    numel: dict[str, int]
    bytes: dict[str, dict[int, float]]
    constant_bytes: float
    sq_error: dict[str, dict[int, float]]  # ||Q_b(W) - W||^2 summed over the unit's weights

    def avg_bits(self, allocation: dict[str, int]) -> float:
        total = sum(self.numel.values())
        return sum(self.numel[u] * b for u, b in allocation.items()) / total

    def mb(self, allocation: dict[str, int]) -> float:
        return (self.constant_bytes + sum(self.bytes[u][b] for u, b in allocation.items())) / 1e6

    def to_dict(self) -> dict:
        return {"numel": self.numel, "bytes": {u: {str(b): v for b, v in d.items()} for u, d in self.bytes.items()},
                "constant_bytes": self.constant_bytes,
                "sq_error": {u: {str(b): v for b, v in d.items()} for u, d in self.sq_error.items()}}

    @classmethod
    def from_dict(cls, d: dict) -> "UnitCosts":
        conv = lambda m: {u: {int(b): v for b, v in x.items()} for u, x in m.items()}  # noqa: E731
        return cls(dict(d["numel"]), conv(d["bytes"]), d["constant_bytes"], conv(d["sq_error"]))


def unit_costs(build_model, units: list[Unit], bits: list[int], act_bits, weight_method: str = "lsq") -> UnitCosts:
    """Sizes and quantization errors of every unit at every width. ``build_model()`` returns a fresh float
    model with the trained weights; it is quantized uniformly at each width in turn (per channel, with
    ``weight_method``)."""
    import torch

    numel, nbytes, sq_error, constant = {}, {u.name: {} for u in units}, {u.name: {} for u in units}, None
    for b in bits:
        model = build_model()
        report = quantize_model(model, Strategy.uniform(b, act_bits, weight_method="binary" if b == 1 else weight_method))
        total = 0.0
        for unit in units:
            n, size, err = 0, 0.0, 0.0
            for mod_name in unit.modules:
                root = model.get_submodule(mod_name)
                for module in root.modules():
                    if not isinstance(module, QuantModule):
                        continue
                    for weight, quantizer in module.quantized_weights():
                        with torch.no_grad():
                            err += float((quantizer(weight) - weight).double().pow(2).sum())
                        groups = quantizer.granularity.num_groups(weight.shape)
                        n += weight.numel()
                        size += weight.numel() * quantizer.bits / 8 + groups * quantizer.scales_per_group() * 4
            numel[unit.name], nbytes[unit.name][b], sq_error[unit.name][b] = n, size, err
            total += size
        const = report.quant_mb * 1e6 - total
        if constant is not None and abs(const - constant) > 1e-3:
            raise SearchError(f"model size is not additive over units ({const} vs {constant} bytes outside them)")
        constant = const
        unquantized = [n for n, m in model.named_modules() if quant_class_for(m) is not None and not is_quantized(m)]
        if unquantized:
            raise SearchError(f"modules left float by a uniform strategy: {unquantized[:3]}")
    return UnitCosts(numel, nbytes, float(constant), sq_error)
