"""The quantization library: pure PyTorch, no fairseq imports.

- :mod:`.quantizers` fake quantizers (min-max, symmetric, LSQ, PACT, binary; range observers)
- :mod:`.granularity` per-tensor / per-channel / per-group
- :mod:`.modules`, :mod:`.attention` quantized layers
- :mod:`.strategy` per-layer bit allocations (YAML) and :mod:`.replace` ``quantize_model``
- :mod:`.calibrate` activation range calibration, :mod:`.audit` operand-level honesty checks
"""
from .attention import QuantMultiheadAttention
from .calibrate import apply_range_updates, calibrate, calibration, is_calibrated, reset_quantizers
from .granularity import PerChannel, PerGroup, PerTensor, parse_granularity
from .modules import QuantConv2d, QuantConvTBC, QuantEmbedding, QuantLinear, QuantModule
from .quantizers import ActivationQuantizer, WeightQuantizer
from .replace import QuantizationReport, build_report, quantizable_names, quantize_model, register_quant_module
from .spec import FP32, QuantSpec
from .errors import CheckpointError, FairseqQuantError
from .strategy import Strategy, StrategyError

__all__ = [
    "FP32", "ActivationQuantizer", "CheckpointError", "apply_range_updates", "FairseqQuantError", "PerChannel", "PerGroup", "PerTensor", "QuantConv2d", "QuantConvTBC",
    "QuantEmbedding", "QuantLinear", "QuantModule", "QuantMultiheadAttention", "QuantSpec",
    "QuantizationReport", "Strategy", "StrategyError", "WeightQuantizer", "build_report", "calibrate",
    "calibration", "is_calibrated", "parse_granularity", "quantizable_names", "quantize_model",
    "register_quant_module", "reset_quantizers",
]
