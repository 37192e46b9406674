"""Checkpoint -> ``.fqm`` model file: the bridge between the training side (torch, fairseq) and the runtime.

Every weight the model multiplies with is stored as the integers of its quantizer's grid (the values the
quantization-aware-trained model computed with, bit for bit) or, where it is not quantized, as floats.
The ONNX graphs of the encoder and of one decoder step (:mod:`.graphs`) are stored without their weights;
the runtime puts the weights back at load time, as low-bit ``MatMulNBits`` or float ``MatMul`` per layer.
"""
from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from pathlib import Path

import onnx
import torch
from torch import nn

from ..quant.quantizers import WeightQuantizer
from fairseq_quant_runtime import fqm
from .graphs import (DecoderStepGraph, EncoderGraph, Layout, WeightTable, decoder_io_names, encoder_io_names,
                     onnx_name)

logger = logging.getLogger(__name__)
OPSET = 17
TABLE_PREFIX = "table."


class ExportError(ValueError):
    """The checkpoint cannot be exported as asked (one line naming the problem)."""


@dataclass
class Weight:
    name: str  # module name
    layout: torch.Tensor  # float weight in output-channel-first layout
    quantizer: WeightQuantizer | None
    transposed: bool  # used as the B of a MatMul ([in, out])
    shape: tuple[int, ...]  # the shape the graph uses before transposition


def _module_weight(module) -> tuple[torch.Tensor, WeightQuantizer | None]:
    """(output-channel-first float weight, enabled quantizer or None) of a float or quantized module."""
    if hasattr(module, "quantized_weights"):
        layout, quantizer = module.quantized_weights()[0]
        return layout.detach(), (quantizer if quantizer.enabled else None)
    kind = type(module).__name__
    if kind == "LinearizedConvolution":  # ConvTBC weight [kernel, in, out] (weight-normalised or plain)
        if hasattr(module, "weight_g"):
            from ..quant.modules import _weight_norm_dim

            w = torch._weight_norm(module.weight_v, module.weight_g, _weight_norm_dim(module))
        else:
            w = module.weight
        return w.detach().permute(2, 0, 1).reshape(w.shape[2], -1), None
    return module.weight.detach(), None


def collect_weights(model: nn.Module, layout: dict) -> list[Weight]:
    modules = dict(model.named_modules())
    names = []  # (module name, transposed)
    names += [(op["name"], False) for block in layout["vgg"] for op in block if op["op"] == "conv"]
    for op in layout["encoder"]:
        if op["op"] == "linear":
            names.append((op["name"], True))
        elif op["op"] == "layer":
            names += [(f"{op['name']}.self_attn.{p}", True) for p in ("q_proj", "k_proj", "v_proj", "out_proj")]
            names += [(f"{op['name']}.fc1", True), (f"{op['name']}.fc2", True)]
    if layout.get("ctc"):
        names.append(("ctc_proj", True))
    names.append(("decoder.embed_tokens", False))
    names += [(op["name"], True) for op in layout["decoder_convs"] if op["op"] == "conv"]
    for layer in layout["decoder_layers"]:
        for attn in ("self_attn", "encoder_attn"):
            names += [(f"{layer['name']}.{attn}.{p}", True) for p in ("q_proj", "k_proj", "v_proj", "out_proj")]
        names += [(f"{layer['name']}.fc1", True), (f"{layer['name']}.fc2", True)]
    names.append(("decoder.fc_out", True))
    weights = []
    for name, transposed in names:
        if name not in modules:
            raise ExportError(f"the model has no module {name} (not a VGGTransformer of the supported layout)")
        w, quantizer = _module_weight(modules[name])
        weights.append(Weight(name, w, quantizer, transposed, tuple(w.shape)))
    return weights


def collect_floats(model: nn.Module, layout: dict, weights: list[Weight]) -> dict[str, torch.Tensor]:
    """Biases and normalisation parameters (fp32 at training time)."""
    modules = dict(model.named_modules())
    floats = {}
    norm_names = [op["name"] for block in layout["vgg"] for op in block if op["op"] == "layer_norm"]
    norm_names += [op["name"] for op in layout["decoder_convs"] if op["op"] == "layer_norm"]
    norm_names += [op["name"] for op in layout["encoder"] if op["op"] == "layer_norm"]
    for op in layout["encoder"]:
        if op["op"] == "layer":
            norm_names += [f"{op['name']}.self_attn_layer_norm", f"{op['name']}.final_layer_norm"]
    for layer in layout["decoder_layers"]:
        norm_names += [f"{layer['name']}.{n}" for n in ("self_attn_layer_norm", "encoder_attn_layer_norm",
                                                         "final_layer_norm")]
    for name in norm_names:
        floats[f"{name}.weight"] = modules[name].weight.detach()
        floats[f"{name}.bias"] = modules[name].bias.detach()
    for w in weights:
        bias = getattr(modules[w.name], "bias", None)
        if bias is not None:
            floats[f"{w.name}.bias"] = bias.detach().reshape(-1)
    return floats


def quantize_exactly(w: Weight) -> tuple[fqm.QuantTensor, torch.Tensor]:
    """The quantizer's integers and scales, and the fake-quantized weight they reproduce bit for bit."""
    quantizer = w.quantizer
    with torch.no_grad():
        was_training = quantizer.training
        quantizer.eval()
        fake = quantizer(w.layout.float())
        quantizer.train(was_training)
        grid = quantizer.last_grid
        groups = quantizer.granularity.group_view(fake)
        n_groups = groups.shape[0]
        scale = grid.scale.float().reshape(-1).expand(n_groups).contiguous()
        offset = grid.offset.float().reshape(-1).expand(n_groups).contiguous()
        q = torch.round((groups - offset[:, None]) / scale[:, None]).clamp(grid.qmin, grid.qmax)
    symmetric = bool((offset == 0).all())
    tensor = fqm.QuantTensor(tuple(fake.shape), grid.bits, grid.qmin, q.to(torch.int32).numpy(),
                             scale.numpy(), None if symmetric else offset.numpy())
    again = torch.from_numpy(tensor.dequantize())
    if not torch.equal(again, fake):
        bad = int((again != fake).sum())
        raise ExportError(f"{w.name}: {bad} of {fake.numel()} weights are not reproduced by their integers "
                          f"and scales (method {quantizer.method})")
    return tensor, fake


def export_graph(module: nn.Module, args: tuple, inputs: list[str], outputs: list[str],
                 dynamic_axes: dict) -> onnx.ModelProto:
    buffer = io.BytesIO()
    with torch.no_grad():
        torch.onnx.export(module, args, buffer, input_names=inputs, output_names=outputs, dynamic_axes=dynamic_axes,
                          opset_version=OPSET, do_constant_folding=False, dynamo=False)
    return onnx.load_from_string(buffer.getvalue())


def strip_weights(graph: onnx.ModelProto, known: set[str]) -> dict[str, str]:
    """Remove the weight initializers (the runtime restores them); {initializer name: tensor name}."""
    kept, refs = [], {}
    for init in graph.graph.initializer:
        if init.name.startswith(TABLE_PREFIX):
            tensor = init.name[len(TABLE_PREFIX):]
            if tensor not in known:
                raise ExportError(f"graph initializer {init.name} is not a stored tensor")
            refs[init.name] = tensor
        else:
            kept.append(init)
    del graph.graph.initializer[:]
    graph.graph.initializer.extend(kept)
    return refs


def trace_inputs(layout: dict, table: WeightTable):
    """Example inputs for tracing (batch 2, 40 frames; 2 hypotheses with 3 cached steps)."""
    feats = torch.randn(2, 40, layout["in_channels"] * layout["input_dim"])
    lengths = torch.tensor([40, 31])
    enc = EncoderGraph(layout, table)
    with torch.no_grad():
        enc_out = enc(feats, lengths)
    heads, dim = layout["heads"], layout["embed_dim"] // layout["heads"]
    convs = [torch.zeros(2, op["kernel"] - 1, op["in"]) for op in layout["decoder_convs"] if op["op"] == "conv"]
    selfs = [torch.randn(2, heads, 3, dim) for _ in range(2 * len(layout["decoder_layers"]))]
    cross = enc_out[2:] if layout.get("ctc") else enc_out[1:]  # the decoder does not take the CTC log-probs
    dec_args = (torch.tensor([2, 7]), enc_out[0], *cross, *convs, *selfs)
    return (feats, lengths), dec_args


def activation_grid(quantizer) -> dict:
    """The eval-time grid of an activation quantizer, as the float32 numbers its fake quantization uses."""
    from ..quant.quantizers import signed_range

    bits = quantizer.bits
    if quantizer.method in ("pact", "lsq"):
        _, qmax = signed_range(bits)
        qmin = -qmax - 1
        if quantizer.method == "pact":
            alpha = quantizer.alpha.detach().abs().clamp(min=1e-6)
            return {"kind": "symmetric", "scale": float(alpha / max(qmax, 1)), "qmin": qmin, "qmax": qmax,
                    "clip": float(alpha)}
        step = quantizer.step.detach().abs().clamp(min=1e-8)
        return {"kind": "symmetric", "scale": float(step), "qmin": qmin, "qmax": qmax}
    levels = 2**bits - 1
    if quantizer.granularity == "token":  # computed from each position's own values
        return {"kind": "token", "levels": levels, "axis": quantizer.channel_dim}
    lo, hi = quantizer.lo, quantizer.hi
    if quantizer.granularity == "peg":  # a range per channel, from its group's
        lo, hi = lo[quantizer.group_of], hi[quantizer.group_of]
    scale = torch.clamp(hi - lo, min=1e-8) / levels
    zero_point = torch.clamp(torch.round(-lo / scale), 0, levels)
    if quantizer.granularity == "peg":
        return {"kind": "zero_point", "scale": scale.tolist(), "zero_point": zero_point.tolist(), "levels": levels,
                "axis": quantizer.channel_dim, "groups": quantizer.groups}
    return {"kind": "zero_point", "scale": float(scale), "zero_point": float(zero_point), "levels": levels}


def activation_grids(model: nn.Module) -> dict[str, dict]:
    from ..quant.quantizers import ActivationQuantizer

    grids = {}
    for name, module in model.named_modules():
        if isinstance(module, ActivationQuantizer) and module.enabled:
            if not bool(module.initialized):
                raise ExportError(f"{name}: activation quantizer was never calibrated")
            grids[name] = activation_grid(module)
    return grids


def build_graphs(layout: dict, table: WeightTable) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    enc_args, dec_args = trace_inputs(layout, table)
    enc_in, enc_out = encoder_io_names(layout)
    axes = {"features": {0: "batch", 1: "frames"}, "lengths": {0: "batch"}, "enc_bias": {0: "batch", 1: "src"}}
    axes.update({name: {0: "batch", 2: "src"} for name in enc_out[1:]})
    if "ctc_log_probs" in axes:
        axes["ctc_log_probs"] = {0: "batch", 1: "src"}
    encoder = export_graph(EncoderGraph(layout, table), enc_args, enc_in, enc_out, axes)
    dec_in, dec_out = decoder_io_names(layout)
    axes = {"tokens": {0: "hyps"}, "enc_bias": {0: "hyps", 1: "src"}, "log_probs": {0: "hyps"}}
    for name in dec_in[2:] + dec_out[1:]:
        if name.startswith("cross"):
            axes[name] = {0: "hyps", 2: "src"}
        elif name.startswith("conv"):
            axes[name] = {0: "hyps"}
        else:
            axes[name] = {0: "hyps", 2: "steps_out" if name.endswith("_out") else "steps"}
    decoder = export_graph(DecoderStepGraph(layout, table), dec_args, dec_in, dec_out, axes)
    return encoder, decoder


def build_model_file(model: nn.Module, dictionary_symbols: list[str], spm_proto: bytes,
                     special: dict, features: dict, source: dict, float16: bool = False,
                     exact_activations: bool = False) -> tuple[fqm.ModelFile, dict]:
    """The :class:`~fairseq_quant_runtime.fqm.ModelFile` of a (quantized or float) VGGTransformer.

    ``exact_activations`` also stores graphs that apply the model's static activation grids
    ("encoder_actq"/"decoder_actq"): they compute what the fake-quantized model computes, and with 8-bit grids
    the runtime's int8-static kernel runs their linear layers in integers."""
    model = model.eval()
    layout = Layout.from_model(model)
    weights = collect_weights(model, layout)
    floats = collect_floats(model, layout, weights)
    file = fqm.ModelFile(config={})
    effective, summary = {}, {"quantized": {}, "float_weights": []}
    for w in weights:
        if w.quantizer is not None:
            tensor, fake = quantize_exactly(w)
            file.tensors[w.name + ".weight"] = tensor
            effective[w.name] = fake.reshape(w.shape)
            summary["quantized"][w.name] = tensor.bits
        else:
            value = w.layout.float()  # an unquantized weight stays fp32
            file.tensors[w.name + ".weight"] = value.numpy()
            effective[w.name] = value
            summary["float_weights"].append(w.name)
    for name, value in floats.items():
        stored = value.float().half() if float16 else value.float()
        file.tensors[name] = stored.numpy()
        floats[name] = stored.float()
    transposed = {w.name for w in weights if w.transposed}
    table = WeightTable(effective, floats, transposed)
    graphs = dict(zip(("encoder", "decoder"), build_graphs(layout, table)))
    grids = activation_grids(model)
    if exact_activations and grids:
        exact = WeightTable(effective, floats, transposed, grids)
        graphs.update(zip(("encoder_actq", "decoder_actq"), build_graphs(layout, exact)))
    known = set(file.tensors)
    graph_refs = {}
    for graph_name, graph in graphs.items():
        refs = strip_weights(graph, {onnx_name(n) for n in known})
        by_onnx = {onnx_name(n): n for n in known}
        graph_refs[graph_name] = {init: {"tensor": by_onnx[t], "transpose": by_onnx[t].removesuffix(".weight")
                                         in transposed and by_onnx[t].endswith(".weight")}
                                  for init, t in refs.items()}
        file.blobs[f"{graph_name}.onnx"] = graph.SerializeToString()
    file.blobs["spm.model"] = spm_proto
    file.config = {"model": "vggtransformer", "layout": layout, "graphs": graph_refs,
                   "dictionary": dictionary_symbols, **special, "features": features, "source": source,
                   "activation_quantization": grids}
    return file, summary


def decode_only_spm(spm_model: Path) -> bytes:
    """The SentencePiece model without its normaliser's precompiled NFKC table (240 kB of the 244 kB): the
    runtime only turns pieces into text, which never uses it."""
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(Path(spm_model).read_bytes())
    proto.normalizer_spec.precompiled_charsmap = b""
    proto.normalizer_spec.name = "identity"
    proto.denormalizer_spec.precompiled_charsmap = b""
    return proto.SerializeToString()




FEATURES = {"sample_rate": 16000, "num_mel_bins": 80, "frame_length_ms": 25.0, "frame_shift_ms": 10.0,
            "normalization": "utterance_mean_var"}


def export_checkpoint(checkpoint, data_dir, out, spm_model=None, float16: bool = True, fp16_scales: bool = False,
                      onnx_dir=None, onnx_kernel: str = "nbits", exact_activations: bool = False) -> dict:
    """Write ``out`` (.fqm) from a fairseq checkpoint; returns the size breakdown (bytes)."""
    from ..evaluate import find_spm_model, load_checkpoint

    model, task = load_checkpoint(checkpoint, data_dir)
    if not hasattr(model, "encoder") or not hasattr(model.encoder, "conv_layers"):
        raise ExportError(f"{checkpoint}: {type(model).__name__} is not a VGGTransformer encoder-decoder")
    d = task.target_dictionary
    special = {"eos": d.eos(), "pad": d.pad(), "unk": d.unk(), "bos": d.bos()}
    spm_path = Path(spm_model) if spm_model else find_spm_model(Path(data_dir))
    try:
        file, summary = build_model_file(model, list(d.symbols), decode_only_spm(spm_path), special, FEATURES,
                                         {"checkpoint": str(checkpoint)}, float16=float16,
                                         exact_activations=exact_activations)
    except AttributeError as err:
        raise ExportError(f"{checkpoint}: not a VGGTransformer of the supported layout ({err})") from err
    sizes = fqm.write(out, file, "float16" if fp16_scales else "float32")
    quantized = [t for t in file.tensors.values() if isinstance(t, fqm.QuantTensor)]
    weight_values = sum(int(np_prod(t.shape)) for t in file.tensors.values())
    quant_values = sum(int(np_prod(t.shape)) for t in quantized)
    sizes.update({
        "file": str(out), "checkpoint": str(checkpoint),
        "fp32_bytes": 4 * weight_values,
        "quantized_values": quant_values, "float_values": weight_values - quant_values,
        "avg_weight_bits": (sum(t.bits * int(np_prod(t.shape)) for t in quantized) / quant_values
                            if quant_values else 32.0),
        "bits": summary["quantized"], "float_weights": summary["float_weights"],
    })
    sizes["ratio"] = sizes["fp32_bytes"] / sizes["total"]
    if onnx_dir:
        from fairseq_quant_runtime.graphs import materialize

        onnx_dir = Path(onnx_dir)
        onnx_dir.mkdir(parents=True, exist_ok=True)
        written = fqm.read(out)
        for graph in ("encoder", "decoder"):
            proto = materialize(written, graph, onnx_kernel)
            tmp = onnx_dir / f".{graph}.onnx.tmp"
            tmp.write_bytes(proto.SerializeToString())
            tmp.replace(onnx_dir / f"{graph}.onnx")
    return sizes


def np_prod(shape) -> int:
    total = 1
    for d in shape:
        total *= int(d)
    return total


def format_sizes(sizes: dict) -> str:
    rows = [("quantized weights (bit-packed)", sizes["weights"]), ("scales and offsets", sizes["scales"]),
            ("float leftovers (biases, norms, unquantized)", sizes["floats"]),
            ("graphs + SentencePiece (zlib)", sizes["blobs"]), ("header (zlib JSON)", sizes["header"])]
    lines = [f"{sizes['file']}: {sizes['total']:,} bytes, x{sizes['ratio']:.2f} smaller than the fp32 weights "
             f"({sizes['fp32_bytes']:,} bytes); average weight bits {sizes['avg_weight_bits']:.2f}",
             f"{'part':<46} {'bytes':>10} {'share':>7}"]
    for name, value in rows:
        lines.append(f"{name:<46} {value:>10,} {value / sizes['total']:>7.1%}")
    return "\n".join(lines)


__all__ = ["ExportError", "FEATURES", "build_model_file", "collect_weights", "decode_only_spm", "export_checkpoint",
           "format_sizes", "quantize_exactly"]
