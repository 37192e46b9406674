"""``quantize_model``: swap a model's modules for quantized ones, in place, following a strategy.

Module types are looked up in a registry (float class -> quantized class with ``from_float``), so any
model built from registered types works; framework glue registers its own types (fairseq's attention
and LinearizedConvolution are registered by :mod:`fairseq_quant.models`). The float Parameters are
kept, so quantization-aware training starts from the trained weights.
"""
import logging
from dataclasses import dataclass, field

from torch import nn

from .attention import QuantMultiheadAttention
from .modules import QuantConv2d, QuantEmbedding, QuantLinear, QuantModule
from .quantizers import ActivationQuantizer, WeightQuantizer
from .spec import QuantSpec
from .strategy import Strategy, StrategyError

logger = logging.getLogger(__name__)

QUANT_MODULE_REGISTRY: dict[type, type] = {
    nn.Linear: QuantLinear,
    nn.Conv2d: QuantConv2d,
    nn.Embedding: QuantEmbedding,
}
# Modules whose parameters stay fp32 by design (normalisation: elementwise, in the accumulator domain).
FP32_BY_DESIGN = (nn.LayerNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.GroupNorm)


def register_quant_module(float_cls: type, quant_cls: type) -> None:
    """Quantize modules of ``float_cls`` (and subclasses) with ``quant_cls.from_float(module, spec, name, resolve)``."""
    QUANT_MODULE_REGISTRY[float_cls] = quant_cls


def quant_class_for(module: nn.Module):
    for cls in type(module).__mro__:
        if cls in QUANT_MODULE_REGISTRY:
            return QUANT_MODULE_REGISTRY[cls]
    return None


def is_quantized(module: nn.Module) -> bool:
    return isinstance(module, QuantModule) or hasattr(module, "quantized_weights")


def quantizable_names(model: nn.Module) -> list[str]:
    """Names of every module a strategy can address (registered types, including attention projections)."""
    return [name for name, m in model.named_modules() if name and (quant_class_for(m) or is_quantized(m))]


@dataclass
class LayerEntry:
    name: str
    kind: str
    spec_label: str
    rule: str
    params: int


@dataclass
class QuantizationReport:
    """What was quantized how, what stayed fp32, and the model size before and after."""

    layers: list[LayerEntry] = field(default_factory=list)
    fp32_params: list[tuple[str, int]] = field(default_factory=list)
    unsupported: list[str] = field(default_factory=list)
    fp32_mb: float = 0.0
    quant_mb: float = 0.0
    avg_weight_bits: float = 32.0
    specs: dict = field(default_factory=dict)  # module name -> the QuantSpec the strategy gave it

    def format(self) -> str:
        lines = [f"{'module':<48} {'type':<24} {'spec':<10} {'rule':<28} {'params':>10}"]
        for e in self.layers:
            lines.append(f"{e.name:<48} {e.kind:<24} {e.spec_label:<10} {e.rule:<28} {e.params:>10,}")
        fp32_total = sum(n for _, n in self.fp32_params)
        lines.append(f"parameters left in fp32: {fp32_total:,} in {len(self.fp32_params)} tensors "
                     f"(biases, normalisation{', ' + ', '.join(self.unsupported) if self.unsupported else ''})")
        if self.unsupported:
            lines.append(f"UNSUPPORTED modules left fp32: {', '.join(self.unsupported)}")
        lines.append(f"average weight bits {self.avg_weight_bits:.2f}; size {self.quant_mb:.3f} MB vs fp32 "
                     f"{self.fp32_mb:.3f} MB (x{self.fp32_mb / max(self.quant_mb, 1e-12):.2f} smaller)")
        return "\n".join(lines)


def quantize_model(model: nn.Module, strategy: Strategy) -> QuantizationReport:
    """Replace every registered module of ``model`` in place by its quantized version.

    Raises :class:`~.strategy.StrategyError` when a strategy rule matches no module (for example a
    strategy written for another model) or a module cannot take its spec (a group size that does not divide it). Modules with parameters of unregistered types are reported
    as unsupported and logged; they stay fp32.
    """
    names = quantizable_names(model)
    strategy = strategy.bind(names)
    strategy.check_matches(names)
    rules_used: dict[str, str] = {}
    specs: dict[str, QuantSpec] = {}

    def resolve(name: str):
        spec, idx = strategy.lookup(name)
        rules_used[name] = "default" if idx is None else f"rule {idx + 1}: {strategy.rules[idx].pattern}"
        specs[name] = spec
        return spec

    planned: list[tuple[nn.Module, str, nn.Module]] = []

    def plan(parent: nn.Module, prefix: str) -> None:
        for child_name, child in list(parent.named_children()):
            full = f"{prefix}.{child_name}" if prefix else child_name
            if is_quantized(child):
                continue
            quant_cls = quant_class_for(child)
            if quant_cls is None:
                plan(child, full)
                continue
            spec = resolve(full)
            inside = [n for n in names if n.startswith(full + ".")]
            if spec.is_fp32 and all(resolve(n).is_fp32 for n in inside):
                continue  # left float on purpose (with everything inside it); the report lists it
            try:
                planned.append((parent, child_name, quant_cls.from_float(child, spec, full, resolve)))
            except (ValueError, NotImplementedError) as err:  # e.g. a group size that does not divide a layer
                raise StrategyError(f"{strategy.source}: {err}") from None

    # build every replacement first (any error leaves the model untouched), then swap them in
    plan(model, "")
    for parent, child_name, replacement in planned:
        setattr(parent, child_name, replacement)
    report = build_report(model, rules_used)
    report.specs = specs
    if report.unsupported:
        logger.warning("modules of unsupported types stay fp32: %s", ", ".join(report.unsupported))
    return report


def build_report(model: nn.Module, rules_used: dict[str, str] | None = None) -> QuantizationReport:
    """Coverage and size of ``model`` as it is now: packed integer weights plus their scales, activation
    ranges, and every parameter still stored in fp32 (MB = 10^6 bytes)."""
    rules_used = rules_used or {}
    report = QuantizationReport()
    quantizer_params = {id(p) for m in model.modules() if isinstance(m, (WeightQuantizer, ActivationQuantizer))
                        for p in m.parameters(recurse=False)}
    packed: set[int] = set()
    quant_bytes, bits_sum, weight_count = 0.0, 0.0, 0
    for name, module in model.named_modules():
        if isinstance(module, QuantModule):
            for weight, quantizer in module.quantized_weights():
                bits = quantizer.active_bits if quantizer.enabled else 32  # a co-trained one: as it runs now
                groups = quantizer.granularity.num_groups(weight.shape) if quantizer.enabled else 0
                quant_bytes += weight.numel() * bits / 8 + groups * quantizer.scales_per_group() * 4
                bits_sum += bits * weight.numel()
                weight_count += weight.numel()
            # the weight (or its weight-norm parametrisation, folded at export) is stored packed
            packed.update(id(p) for n, p in module.named_parameters(recurse=False) if n != "bias")
            report.layers.append(LayerEntry(name, type(module).__name__, module.spec.label(),
                                            rules_used.get(name, "-"), module.quantized_weights()[0][0].numel()))
        elif isinstance(module, QuantMultiheadAttention):
            report.layers.append(LayerEntry(name, "QuantMultiheadAttention", module.spec.label(),
                                            rules_used.get(name, "-"), 0))
        elif quant_class_for(module) is not None and name:
            weight = getattr(module, "weight", None)
            n = weight.numel() if weight is not None else 0
            bits_sum, weight_count = bits_sum + 32 * n, weight_count + n
            report.layers.append(LayerEntry(name, type(module).__name__, "fp32", rules_used.get(name, "-"), n))
        elif (list(module.parameters(recurse=False)) and not isinstance(module, FP32_BY_DESIGN)
              and not isinstance(module, (WeightQuantizer, ActivationQuantizer))):
            report.unsupported.append(f"{name} ({type(module).__name__})")
    for pname, p in model.named_parameters():
        if id(p) not in packed and id(p) not in quantizer_params:
            report.fp32_params.append((pname, p.numel()))
            quant_bytes += 4 * p.numel()
    # a scale and a zero point per stored activation range (per-group ranges: one pair per group; per-token: none)
    quant_bytes += 8 * sum(m.range_count for m in model.modules() if isinstance(m, ActivationQuantizer))
    report.fp32_mb = 4 * sum(p.numel() for p in model.parameters() if id(p) not in quantizer_params) / 1e6
    report.quant_mb = quant_bytes / 1e6
    report.avg_weight_bits = bits_sum / max(weight_count, 1)
    return report
