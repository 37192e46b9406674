"""Standard QDQ ONNX for int8 engines: the encoder and one decoder step as complete ONNX models whose quantized
operands are ``QuantizeLinear -> DequantizeLinear`` pairs carrying the QAT model's own scales (weights: int8,
symmetric, one scale per output channel; activations: uint8 with the calibrated or learned range, per tensor or
per channel group). This is the form TensorRT and ONNX Runtime's QDQ optimiser fuse into integer kernels; it
needs every quantized operand at 8 bits or fewer with a static range, so a model with per-token (dynamic) ranges,
asymmetric or per-group weight grids is refused with one error naming the module. Activation sites at 16 bits
(the outlier remedy) stay float in the QDQ graph (an int8 engine runs them in its higher precision) and are
listed in the summary."""
from __future__ import annotations

from pathlib import Path

import onnx
import torch
from torch import nn

from fairseq_quant_runtime.files import atomic_write

from .exporter import ExportError, activation_grids, build_graphs, collect_floats, collect_weights, quantize_exactly
from .graphs import Layout, WeightTable


class QDQTable(WeightTable):
    """A :class:`WeightTable` whose weights and activations pass through torch's fake quantizers, which the ONNX
    exporter writes as QuantizeLinear/DequantizeLinear."""

    def __init__(self, weights, floats, transposed, activations, weight_scales: dict[str, torch.Tensor]):
        super().__init__(weights, floats, transposed, activations)
        self.weight_scales = weight_scales
        self.float_sites: set[str] = set()

    def w(self, module: str) -> torch.Tensor:
        w = super().w(module)
        scale = self.weight_scales.get(module)
        if scale is None:
            return w
        axis = 1 if module in self.transposed else 0
        zero = torch.zeros(scale.numel(), dtype=torch.int32)
        return torch.fake_quantize_per_channel_affine(w, scale, zero, axis, -128, 127)

    def quant(self, x, quantizer: str, integer: bool = True):
        p = self.activations.get(quantizer)
        if p is None:
            return x
        if p["kind"] == "token":
            raise ExportError(f"{quantizer}: per-token (dynamic) activation ranges have no static QDQ form")
        if p["kind"] == "zero_point":
            if p["levels"] > 255:
                self.float_sites.add(quantizer)
                return x
            if p["levels"] != 255:
                raise ExportError(f"{quantizer}: {p['levels'].bit_length()}-bit activations; QDQ export is for the "
                                  "8-bit grids of int8 engines")
            if "axis" in p:
                axis = p["axis"] % x.dim()
                scale = torch.tensor(p["scale"], dtype=torch.float32)
                zero = torch.tensor(p["zero_point"], dtype=torch.float32).round().to(torch.int32)
                return torch.fake_quantize_per_channel_affine(x, scale, zero, axis, 0, 255)
            return torch.fake_quantize_per_tensor_affine(x, float(p["scale"]), int(round(p["zero_point"])), 0, 255)
        if p["qmin"] != -128 or p["qmax"] != 127:
            raise ExportError(f"{quantizer}: a {p['qmax'] - p['qmin'] + 1}-level activation grid; QDQ export is for "
                              "the 8-bit grids of int8 engines")
        if "clip" in p:
            x = torch.clamp(x, -p["clip"], p["clip"])
        return torch.fake_quantize_per_tensor_affine(x, float(p["scale"]), 0, -128, 127)


def qdq_weights(weights) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The effective (fake-quantized) weights, and the per-output-channel scales of every quantized one, checked
    to fit a symmetric int8 grid; each weight is quantized once."""
    effective, scales = {}, {}
    for w in weights:
        if w.quantizer is None:
            effective[w.name] = w.layout.float().reshape(w.shape)
            continue
        tensor, fake = quantize_exactly(w)
        effective[w.name] = fake.reshape(w.shape)
        if tensor.offset is not None:
            raise ExportError(f"{w.name}: asymmetric weight grid (method {w.quantizer.method}); QDQ export needs "
                              "symmetric weights (lsq, symmetric)")
        channels = w.layout.shape[0]
        if tensor.groups == 1:
            scale = torch.from_numpy(tensor.scale).float().expand(channels).contiguous()
        elif tensor.groups == channels:
            scale = torch.from_numpy(tensor.scale).float()
        else:
            raise ExportError(f"{w.name}: {tensor.groups} weight groups for {channels} output channels; QDQ export "
                              "needs one scale per tensor or per output channel")
        scales[w.name] = scale
    return effective, scales


def export_qdq(model: nn.Module, out_dir) -> dict:
    """Write ``out_dir/encoder.qdq.onnx`` and ``out_dir/decoder.qdq.onnx``; returns a summary (Q/DQ node counts,
    activation sites kept float)."""
    model = model.eval()
    layout = Layout.from_model(model)
    weights = collect_weights(model, layout)
    effective, scales = qdq_weights(weights)
    grids = activation_grids(model)
    if not scales and not grids:
        raise ExportError("the model has no quantized weight or activation: nothing to write as QDQ")
    table = QDQTable(effective, collect_floats(model, layout, weights), {w.name for w in weights if w.transposed},
                     grids, scales)
    graphs = dict(zip(("encoder", "decoder"), build_graphs(layout, table)))
    out_dir = Path(out_dir)
    summary = {"float_sites": sorted(table.float_sites), "graphs": {}}
    for name, graph in graphs.items():
        counts = {op: sum(1 for n in graph.graph.node if n.op_type == op) for op in ("QuantizeLinear",
                                                                                    "DequantizeLinear")}
        path = out_dir / f"{name}.qdq.onnx"
        atomic_write(path, graph.SerializeToString())
        summary["graphs"][name] = {"path": str(path), **counts, "bytes": path.stat().st_size}
    onnx.checker.check_model(str(out_dir / "encoder.qdq.onnx"))
    return summary


__all__ = ["QDQTable", "export_qdq", "qdq_weights"]
