"""The VGGTransformer as two exportable graphs: the encoder, and one decoder step with explicit caches.

fairseq keeps decoding state in a dict of tensors keyed by module ids (``incremental_state``), which ONNX
cannot express. These modules recompute the same forward pass with every state tensor as a named input
and output:

- **encoder** ``(features [B, T, 80], lengths [B]) -> (enc_bias [B, S], cross_k_i, cross_v_i [B, H, S, d])``:
  VGG blocks, the transformer stack, and each decoder layer's encoder-decoder keys and values, computed
  once per utterance; ``enc_bias`` is 0 on frames and -inf on padding. A model with a CTC head also
  outputs ``ctc_log_probs [B, S, V]`` (after ``enc_bias``), for joint CTC/attention decoding.
- **decoder step** ``(tokens [N], enc_bias, cross_k_i, cross_v_i, conv_i [N, k-1, C], self_k_i, self_v_i
  [N, H, t, d]) -> (log_probs [N, V], conv_i', self_k_i', self_v_i' [N, H, t+1, d])``: the newest token of
  each hypothesis through the LinearizedConvolution buffers, self-attention over the cached keys and values,
  encoder-decoder attention and the output projection.

Weights are looked up by the fairseq parameter name of their module (``encoder.transformer_layers.1.fc1``)
and registered as buffers named ``<name with . -> __>``; linear weights are stored transposed ([in, out]),
so that each becomes the ``B`` initializer of one ONNX ``MatMul`` that the runtime can swap for a low-bit
kernel. Activation quantization: by default none in the graph (the runtime's low-bit kernels quantize
activations to int8 themselves, dynamically per block); with ``activations`` the graph applies the QAT
model's own static activation grids (same float32 operations as training), which reproduces the
fake-quantized model.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

NEG_INF = float("-inf")


def onnx_name(module_name: str) -> str:
    return module_name.replace(".", "__")


def integer_grid(p: dict) -> tuple[float | None, float | None, int] | None:
    """A static per-tensor activation grid of at most 256 levels as the uint8 grid of ONNX's QuantizeLinear:
    (clamp low, clamp high, zero point), the clamp (None: none needed) applied before quantizing so that grids of
    fewer levels saturate where the model's do. A symmetric grid [qmin, qmax] is the uint8 grid with zero point
    128 (q + 128). None for per-channel, per-token and wider (16-bit) grids, which stay float arithmetic."""
    scale = p.get("scale")
    if p["kind"] == "zero_point" and "axis" not in p and p["levels"] <= 255:
        zero, levels = int(round(p["zero_point"])), int(p["levels"])
        if levels == 255:
            return None, None, zero
        return -zero * scale, (levels - zero) * scale, zero
    if p["kind"] == "symmetric" and p["qmin"] >= -128 and p["qmax"] <= 127:
        lo, hi = p["qmin"] * scale, p["qmax"] * scale
        if "clip" in p:
            lo, hi = max(lo, -p["clip"]), min(hi, p["clip"])
        return (None, None, 128) if (p["qmin"], p["qmax"], p.get("clip")) == (-128, 127, None) else (lo, hi, 128)
    return None


class WeightTable(nn.Module):
    """Effective weights by module name, as buffers (``transposed`` ones in [in, out] layout)."""

    def __init__(self, weights: dict[str, torch.Tensor], floats: dict[str, torch.Tensor], transposed: set[str],
                 activations: dict[str, dict] | None = None):
        super().__init__()
        self.transposed = set(transposed)
        self.activations = activations or {}  # quantizer name -> parameters (``activation_grid``); {}: none
        for name, w in weights.items():
            self.register_buffer(onnx_name(name + ".weight"), (w.t() if name in transposed else w).contiguous())
        for name, t in floats.items():
            self.register_buffer(onnx_name(name), t.contiguous())

    def w(self, module: str) -> torch.Tensor:
        return getattr(self, onnx_name(module + ".weight"))

    def f(self, name: str) -> torch.Tensor:
        return getattr(self, onnx_name(name))

    def has(self, name: str) -> bool:
        return hasattr(self, onnx_name(name))

    def quant(self, x, quantizer: str, integer: bool = True):
        """The training-time fake quantizer of ``quantizer`` (its eval grid), when exporting with activations.
        ``integer``: a static grid of at most 8 bits is written as QuantizeLinear -> DequantizeLinear (two nodes
        instead of six; a weight MatMul's input then runs in the runtime's int8-static kernel); else as float
        arithmetic: the VGG convolutions' inputs (ONNX Runtime would move a QuantizeLinear across MaxPool and run
        that in uint8, 25x slower) and the attention keys and values (as QuantizeLinear pairs they took ONNX
        Runtime's graphs twice as far from fairseq's fake-quantized model: mean |log-prob difference| 0.008
        against 0.004 on the tests' tiny model)."""
        p = self.activations.get(quantizer)
        if p is None:
            return x
        if p["kind"] == "token":  # dynamic: each position's range over its channels, as the fake quantizer
            axis = p["axis"]
            lo = torch.clamp(torch.amin(x, dim=axis, keepdim=True), max=0.0)
            hi = torch.clamp(torch.amax(x, dim=axis, keepdim=True), min=0.0)
            scale = torch.clamp(hi - lo, min=1e-8) / float(p["levels"])
            zero = torch.clamp(torch.round(-lo / scale), 0.0, float(p["levels"]))
            q = torch.clamp(torch.round(x / scale) + zero, 0.0, float(p["levels"]))
            return (q - zero) * scale
        # in the exported graph QuantizeLinear -> DequantizeLinear, which the runtime's int8-static kernel reads (the
        # same grid as the float arithmetic below: x / scale rounded half to even, saturated; torch's eager fake
        # quantizer is float32 inside, so eager checks in float64 use the arithmetic)
        integer = integer_grid(p) if integer and torch.onnx.is_in_onnx_export() else None
        if integer is not None:
            lo, hi, zero = integer
            if lo is not None:
                x = torch.clamp(x, lo, hi)
            return torch.fake_quantize_per_tensor_affine(x, float(p["scale"]), zero, 0, 255)
        scale = torch.tensor(p["scale"], dtype=x.dtype)
        if p["kind"] == "zero_point":
            zero = torch.tensor(p["zero_point"], dtype=x.dtype)
            if "axis" in p:  # per channel (per-group ranges): broadcast along the channel axis
                shape = [1] * x.dim()
                shape[p["axis"]] = -1
                scale, zero = scale.reshape(shape), zero.reshape(shape)
            q = torch.clamp(torch.round(x / scale) + zero, 0.0, float(p["levels"]))
            return (q - zero) * scale
        if "clip" in p:
            x = torch.clamp(x, -p["clip"], p["clip"])
        return torch.clamp(torch.round(x / scale), float(p["qmin"]), float(p["qmax"])) * scale

    def linear(self, x, module: str, quantize_input: bool = True):
        if quantize_input:
            x = self.quant(x, module + ".input_quantizer")
        out = torch.matmul(x, self.w(module))
        return out + self.f(module + ".bias") if self.has(module + ".bias") else out

    def layer_norm(self, x, module: str, eps: float = 1e-5):
        w, b = self.f(module + ".weight"), self.f(module + ".bias")
        return F.layer_norm(x, (w.shape[0],), w, b, eps)


class Layout:
    """The architecture as plain data (stored in the model file's config)."""

    @staticmethod
    def from_model(model) -> dict:
        from fairseq.modules import TransformerDecoderLayer, TransformerEncoderLayer

        enc, dec = model.encoder, model.decoder
        vgg = []
        for i, block in enumerate(enc.conv_layers):
            ops = []
            for j, layer in enumerate(block.layers):
                name = f"encoder.conv_layers.{i}.layers.{j}"
                if isinstance(layer, nn.Conv2d) or type(layer).__name__ == "QuantConv2d":
                    if layer.groups != 1 or tuple(layer.dilation) != (1, 1):
                        raise ValueError(f"{name}: grouped or dilated convolutions are not exported")
                    ops.append({"op": "conv", "name": name, "stride": list(layer.stride),
                                "padding": list(layer.padding)})
                elif isinstance(layer, nn.LayerNorm):
                    ops.append({"op": "layer_norm", "name": name, "eps": layer.eps})
                elif isinstance(layer, nn.ReLU):
                    ops.append({"op": "relu"})
                elif isinstance(layer, nn.MaxPool2d):
                    k = layer.kernel_size if isinstance(layer.kernel_size, int) else layer.kernel_size[0]
                    ops.append({"op": "max_pool", "kernel": int(k), "ceil_mode": bool(layer.ceil_mode)})
                else:
                    raise ValueError(f"{name}: {type(layer).__name__} in a VGG block is not exported")
            vgg.append(ops)
        if getattr(enc, "transformer_context", None) is not None or any(s != 1 for s in enc.transformer_sampling):
            raise ValueError("encoders with a limited attention context or transformer sampling are not exported")
        enc_stack = []
        for i, layer in enumerate(enc.transformer_layers):
            name = f"encoder.transformer_layers.{i}"
            if isinstance(layer, TransformerEncoderLayer):
                enc_stack.append({"op": "layer", "name": name, "normalize_before": bool(layer.normalize_before)})
            elif isinstance(layer, nn.Linear) or type(layer).__name__ == "QuantLinear":
                enc_stack.append({"op": "linear", "name": name})
            elif isinstance(layer, nn.LayerNorm):
                enc_stack.append({"op": "layer_norm", "name": name, "eps": layer.eps})
            else:
                raise ValueError(f"{name}: {type(layer).__name__} is not exported")
        dec_convs = []
        for i, layer in enumerate(dec.conv_layers):
            name = f"decoder.conv_layers.{i}"
            kind = type(layer).__name__
            if kind in ("LinearizedConvolution", "QuantConvTBC"):
                kernel = layer.kernel_size[0] if kind == "LinearizedConvolution" else layer.kernel_size
                pad = layer.padding[0] if kind == "LinearizedConvolution" else layer.pad
                if pad != kernel - 1:
                    raise ValueError(f"{name}: only causal convolutions (padding = kernel - 1) are exported")
                dec_convs.append({"op": "conv", "name": name, "kernel": int(kernel),
                                  "in": int(layer.in_channels), "out": int(layer.out_channels)})
            elif isinstance(layer, nn.LayerNorm):
                dec_convs.append({"op": "layer_norm", "name": name, "eps": layer.eps})
            elif isinstance(layer, nn.ReLU):
                dec_convs.append({"op": "relu"})
            else:
                raise ValueError(f"{name}: {kind} is not exported")
        dec_layers = []
        for i, layer in enumerate(dec.layers):
            name = f"decoder.layers.{i}"
            if not isinstance(layer, TransformerDecoderLayer) or layer.encoder_attn is None:
                raise ValueError(f"{name}: only transformer decoder layers with encoder attention are exported")
            dec_layers.append({"name": name, "normalize_before": bool(layer.normalize_before)})
        attn = dec.layers[0].self_attn
        return {
            "in_channels": int(enc.in_channels), "input_dim": int(enc.input_dim), "vgg": vgg,
            "pooling": [int(k) for k in enc.pooling_kernel_sizes], "encoder": enc_stack,
            "decoder_convs": dec_convs, "decoder_layers": dec_layers,
            "embed_dim": int(attn.embed_dim), "heads": int(attn.num_heads),
            "vocab_size": int(dec.fc_out.out_features if hasattr(dec.fc_out, "out_features")
                              else dec.fc_out.weight.shape[0]),
            "padding_idx": int(dec.padding_idx),
            # a CTC head on the encoder (joint CTC/attention decoding): the encoder graph outputs its log-probs
            "ctc": hasattr(model, "ctc_proj"),
        }


def _heads(x, heads: int):
    """[B, T, C] -> [B, H, T, d]."""
    b, t, c = x.shape
    return x.reshape(b, t, heads, c // heads).transpose(1, 2)


def _merge(x):
    """[B, H, T, d] -> [B, T, C]."""
    b, h, t, d = x.shape
    return x.transpose(1, 2).reshape(b, t, h * d)


def _feed_forward(t: WeightTable, x, name: str, pre: bool):
    """A transformer layer's FFN sublayer: fc2(relu(fc1(x))) with its residual and ``final_layer_norm``
    before (``normalize_before``) or after."""
    y = t.layer_norm(x, name + ".final_layer_norm") if pre else x
    x = x + t.linear(F.relu(t.linear(y, name + ".fc1")), name + ".fc2")
    return x if pre else t.layer_norm(x, name + ".final_layer_norm")


def _attend(table: WeightTable, prefix: str, q, k, v, bias):
    """softmax(q k^T + bias) v with the attention's operand quantizers; q is already scaled, k and v are
    already quantized (they may come from a cache)."""
    scores = torch.matmul(table.quant(q, prefix + ".q_quantizer"), k.transpose(2, 3))
    if bias is not None:
        scores = scores + bias
    return torch.matmul(table.quant(torch.softmax(scores, dim=-1), prefix + ".prob_quantizer"), v)


class EncoderGraph(nn.Module):
    def __init__(self, layout: dict, table: WeightTable):
        super().__init__()
        self.layout, self.table = layout, table
        self.heads = layout["heads"]

    def vgg(self, x):
        t = self.table
        for block in self.layout["vgg"]:
            for op in block:
                if op["op"] == "conv":
                    x = F.conv2d(t.quant(x, op["name"] + ".input_quantizer", integer=False), t.w(op["name"]), t.f(op["name"] + ".bias") if t.has(op["name"] + ".bias") else None,
                                 tuple(op["stride"]), tuple(op["padding"]))
                elif op["op"] == "layer_norm":
                    x = t.layer_norm(x, op["name"], op["eps"])
                elif op["op"] == "relu":
                    x = F.relu(x)
                else:
                    x = F.max_pool2d(x, op["kernel"], op["kernel"], ceil_mode=op["ceil_mode"])
        return x

    def self_attention(self, x, prefix, bias):
        t, h = self.table, self.heads
        scaling = (x.shape[-1] // h) ** -0.5
        q = _heads(t.linear(x, prefix + ".q_proj") * scaling, h)
        k = t.quant(_heads(t.linear(x, prefix + ".k_proj"), h), prefix + ".k_quantizer", integer=False)
        v = t.quant(_heads(t.linear(x, prefix + ".v_proj"), h), prefix + ".v_quantizer", integer=False)
        return t.linear(_merge(_attend(t, prefix, q, k, v, bias)), prefix + ".out_proj")

    def encoder_layer(self, x, op, bias):
        t, name, pre = self.table, op["name"], op["normalize_before"]
        residual = x
        y = t.layer_norm(x, name + ".self_attn_layer_norm") if pre else x
        x = residual + self.self_attention(y, name + ".self_attn", bias)
        if not pre:
            x = t.layer_norm(x, name + ".self_attn_layer_norm")
        return _feed_forward(t, x, name, pre)

    def forward(self, features, lengths):
        bsz, frames, _ = features.shape
        x = features.reshape(bsz, frames, self.layout["in_channels"], self.layout["input_dim"]).transpose(1, 2)
        x = self.vgg(x)  # [B, C, S, F]
        x = x.transpose(1, 2).reshape(bsz, x.shape[2], -1)  # [B, S, C * F]
        for k in self.layout["pooling"]:
            lengths = torch.div(lengths + (k - 1), k, rounding_mode="floor")
        steps = torch.arange(x.shape[1], device=x.device).unsqueeze(0)
        pad = steps >= lengths.unsqueeze(1)  # [B, S]
        bias = torch.where(pad, torch.tensor(NEG_INF, dtype=x.dtype), torch.tensor(0.0, dtype=x.dtype))
        attn_bias = bias[:, None, None, :]
        for op in self.layout["encoder"]:
            if op["op"] == "linear":
                x = self.table.linear(x, op["name"])
            elif op["op"] == "layer_norm":
                x = self.table.layer_norm(x, op["name"], op["eps"])
            else:
                x = self.encoder_layer(x, op, attn_bias)
        outputs = [bias]
        if self.layout.get("ctc"):
            outputs.append(torch.log_softmax(self.table.linear(x, "ctc_proj"), dim=-1))  # [B, S, V]
        for layer in self.layout["decoder_layers"]:
            prefix = layer["name"] + ".encoder_attn"
            outputs.append(self.table.quant(_heads(self.table.linear(x, prefix + ".k_proj"), self.heads),
                                            prefix + ".k_quantizer", integer=False))
            outputs.append(self.table.quant(_heads(self.table.linear(x, prefix + ".v_proj"), self.heads),
                                            prefix + ".v_quantizer", integer=False))
        return tuple(outputs)


class DecoderStepGraph(nn.Module):
    """One step for N hypotheses; argument order as :func:`decoder_io_names`."""

    def __init__(self, layout: dict, table: WeightTable):
        super().__init__()
        self.layout, self.table = layout, table
        self.heads = layout["heads"]
        self.n_layers = len(layout["decoder_layers"])
        self.n_convs = sum(op["op"] == "conv" for op in layout["decoder_convs"])

    def forward(self, tokens, enc_bias, *state):
        t, h = self.table, self.heads
        n = self.n_layers
        cross = state[: 2 * n]
        convs = state[2 * n: 2 * n + self.n_convs]
        selfs = state[2 * n + self.n_convs:]
        x = F.embedding(tokens, t.w("decoder.embed_tokens"))  # [N, C]
        new_convs, new_selfs = [], []
        conv_i = 0
        for op in self.layout["decoder_convs"]:
            if op["op"] == "conv":
                x = t.quant(x, op["name"] + ".input_quantizer")  # the buffer holds quantized inputs
                buffer = torch.cat([convs[conv_i], x.unsqueeze(1)], dim=1)  # [N, k, C]
                new_convs.append(buffer[:, 1:])
                x = t.linear(buffer.reshape(-1, op["kernel"] * op["in"]), op["name"], quantize_input=False)
                conv_i += 1
            elif op["op"] == "layer_norm":
                x = t.layer_norm(x, op["name"], op["eps"])
            else:
                x = F.relu(x)
        # one step: x stays [N, C] and every reshape has a constant shape (no shape arithmetic in the graph)
        c = x.shape[-1]
        d = c // h
        scaling = d**-0.5

        def heads(y):  # [N, C] -> [N, H, 1, d]
            return y.reshape(-1, h, 1, d)

        def merge(y):  # [N, H, 1, d] -> [N, C]
            return y.reshape(-1, c)

        bias = enc_bias.unsqueeze(1).unsqueeze(1)
        for i, layer in enumerate(self.layout["decoder_layers"]):
            name, pre = layer["name"], layer["normalize_before"]
            # self-attention over the cached keys/values and the new step
            residual = x
            y = t.layer_norm(x, name + ".self_attn_layer_norm") if pre else x
            prefix = name + ".self_attn"
            q = heads(t.linear(y, prefix + ".q_proj") * scaling)
            k_new = t.quant(heads(t.linear(y, prefix + ".k_proj")), prefix + ".k_quantizer", integer=False)
            v_new = t.quant(heads(t.linear(y, prefix + ".v_proj")), prefix + ".v_quantizer", integer=False)
            k = torch.cat([selfs[2 * i], k_new], dim=2)  # the caches hold quantized keys and values
            v = torch.cat([selfs[2 * i + 1], v_new], dim=2)
            new_selfs += [k, v]
            x = residual + t.linear(merge(_attend(t, prefix, q, k, v, None)), prefix + ".out_proj")
            if not pre:
                x = t.layer_norm(x, name + ".self_attn_layer_norm")
            # encoder-decoder attention over the precomputed keys/values
            residual = x
            y = t.layer_norm(x, name + ".encoder_attn_layer_norm") if pre else x
            prefix = name + ".encoder_attn"
            q = heads(t.linear(y, prefix + ".q_proj") * scaling)
            x = residual + t.linear(merge(_attend(t, prefix, q, cross[2 * i], cross[2 * i + 1], bias)),
                                    prefix + ".out_proj")
            if not pre:
                x = t.layer_norm(x, name + ".encoder_attn_layer_norm")
            x = _feed_forward(t, x, name, pre)
        logits = t.linear(x, "decoder.fc_out")
        return (torch.log_softmax(logits, dim=-1), *new_convs, *new_selfs)


def encoder_io_names(layout: dict) -> tuple[list[str], list[str]]:
    outputs = ["enc_bias", *(["ctc_log_probs"] if layout.get("ctc") else [])]
    for i in range(len(layout["decoder_layers"])):
        outputs += [f"cross_k_{i}", f"cross_v_{i}"]
    return ["features", "lengths"], outputs


def decoder_io_names(layout: dict) -> tuple[list[str], list[str]]:
    n = len(layout["decoder_layers"])
    convs = [f"conv_{i}" for i in range(sum(op["op"] == "conv" for op in layout["decoder_convs"]))]
    selfs = [name for i in range(n) for name in (f"self_k_{i}", f"self_v_{i}")]
    cross = [name for i in range(n) for name in (f"cross_k_{i}", f"cross_v_{i}")]
    inputs = ["tokens", "enc_bias", *cross, *convs, *selfs]
    outputs = ["log_probs", *[c + "_out" for c in convs], *[s + "_out" for s in selfs]]
    return inputs, outputs


def initial_decoder_state(layout: dict, n: int, src_len: int, dtype=torch.float32) -> dict[str, torch.Tensor]:
    """Empty conv buffers and self-attention caches for ``n`` hypotheses (torch; the runtime has its own)."""
    heads, dim = layout["heads"], layout["embed_dim"] // layout["heads"]
    state = {}
    convs = [op for op in layout["decoder_convs"] if op["op"] == "conv"]
    for i, op in enumerate(convs):
        state[f"conv_{i}"] = torch.zeros(n, op["kernel"] - 1, op["in"], dtype=dtype)
    for i in range(len(layout["decoder_layers"])):
        state[f"self_k_{i}"] = torch.zeros(n, heads, 0, dim, dtype=dtype)
        state[f"self_v_{i}"] = torch.zeros(n, heads, 0, dim, dtype=dtype)
    return state


__all__ = ["DecoderStepGraph", "EncoderGraph", "Layout", "WeightTable", "integer_grid", "decoder_io_names", "encoder_io_names",
           "initial_decoder_state", "onnx_name"]
