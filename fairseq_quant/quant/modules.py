"""Quantized layers. Each keeps the float module's Parameters (same names, same state-dict keys) and
quantizes every weight and input activation it uses; biases and normalisation stay fp32 (they live in
the 32-bit accumulator domain of integer inference).

Weights are quantized in output-channel-first layout: Linear/Embedding ``[out, in]``, Conv2d
``[out, in, kh, kw]``, ConvTBC ``[out, kernel * in]`` (its linearized layout, shared by the training
path and the incremental decoding path, so both see exactly the same quantized values).
"""
import uuid

import torch
import torch.nn.functional as F
from torch import nn

from .granularity import PerGroup
from .quantizers import ActivationQuantizer, WeightQuantizer
from .spec import QuantSpec


def make_weight_quantizer(spec: QuantSpec, weight_layout_shape, name: str) -> WeightQuantizer:
    granularity = spec.weight_granularity
    if isinstance(granularity, PerGroup):
        granularity.check(weight_layout_shape, name)
    return WeightQuantizer(
        bits=spec.weight_bits, method=spec.weight_method, granularity=granularity,
        num_groups=granularity.num_groups(weight_layout_shape), name=f"{name}.weight",
        co_bits=spec.co_weight_bits or (),
    )


def make_act_quantizer(spec: QuantSpec, name: str, width: int, channel_dim: int = -1, **kwargs) -> ActivationQuantizer:
    """The spec's activation quantizer for an input of ``width`` channels along ``channel_dim``."""
    granularity = spec.act_granularity if spec.act_bits is not None else "tensor"
    return ActivationQuantizer(bits=spec.act_bits, method=spec.act_method, name=name, granularity=granularity,
                               groups=spec.act_groups if granularity == "peg" else None, width=width,
                               channel_dim=channel_dim, **kwargs)


class QuantModule(nn.Module):
    """Shared behaviour of every quantized layer: its spec and its weight tensors for sizing."""

    spec: QuantSpec

    def quantized_weights(self):
        """(layout-shaped weight tensor, its WeightQuantizer) pairs, for size accounting and export."""
        return [(self.weight_layout(), self.weight_quantizer)]

    def weight_layout(self) -> torch.Tensor:
        return self.weight


class QuantLinear(QuantModule):
    """``y = x_q W_q^T + b``."""

    def __init__(self, weight: nn.Parameter, bias, spec: QuantSpec, name: str = "linear"):
        super().__init__()
        self.spec = spec
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.weight = weight
        self.bias = bias
        self.weight_quantizer = make_weight_quantizer(spec, weight.shape, name)
        self.input_quantizer = make_act_quantizer(spec, f"{name}.input", self.in_features)

    @classmethod
    def from_float(cls, module: nn.Linear, spec: QuantSpec, name: str, resolve=None):
        return cls(module.weight, module.bias, spec, name)

    def forward(self, x):
        return F.linear(self.input_quantizer(x), self.weight_quantizer(self.weight), self.bias)

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.spec.label()}"


class QuantConv2d(QuantModule):
    """2-D convolution with quantized input and weight (VGG front end)."""

    def __init__(self, conv: nn.Conv2d, spec: QuantSpec, name: str = "conv2d"):
        super().__init__()
        if conv.padding_mode != "zeros":
            raise NotImplementedError(f"{name}: padding_mode '{conv.padding_mode}' is not supported")
        self.spec = spec
        self.weight, self.bias = conv.weight, conv.bias
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups
        self.weight_quantizer = make_weight_quantizer(spec, conv.weight.shape, name)
        self.input_quantizer = make_act_quantizer(spec, f"{name}.input", conv.in_channels, channel_dim=1)

    @classmethod
    def from_float(cls, module: nn.Conv2d, spec: QuantSpec, name: str, resolve=None):
        return cls(module, spec, name)

    def forward(self, x):
        return F.conv2d(self.input_quantizer(x), self.weight_quantizer(self.weight), self.bias,
                        self.stride, self.padding, self.dilation, self.groups)

    def extra_repr(self):
        return f"{tuple(self.weight.shape)}, stride={self.stride}, padding={self.padding}, {self.spec.label()}"


class QuantEmbedding(QuantModule):
    """Embedding lookup from a quantized table (one scale per row unless the spec groups rows)."""

    def __init__(self, emb: nn.Embedding, spec: QuantSpec, name: str = "embedding"):
        super().__init__()
        if emb.max_norm is not None or emb.sparse:
            raise NotImplementedError(f"{name}: embeddings with max_norm or sparse gradients are not supported")
        self.spec = spec
        self.weight = emb.weight
        self.padding_idx = emb.padding_idx
        self.weight_quantizer = make_weight_quantizer(spec, emb.weight.shape, name)

    @classmethod
    def from_float(cls, module: nn.Embedding, spec: QuantSpec, name: str, resolve=None):
        return cls(module, spec, name)

    def forward(self, tokens):
        return F.embedding(tokens, self.weight_quantizer(self.weight), self.padding_idx)

    def extra_repr(self):
        return f"{tuple(self.weight.shape)}, padding_idx={self.padding_idx}, {self.spec.label()}"


class IncrementalStateMixin:
    """Per-module slots in fairseq's ``incremental_state`` dict (same scheme as fairseq: ``<uuid>.<key>``)."""

    def _init_incremental_state(self):
        self._incremental_state_id = str(uuid.uuid4())

    def _state_key(self, key: str) -> str:
        return f"{self._incremental_state_id}.{key}"

    def get_incremental_state(self, incremental_state, key):
        if incremental_state is None:
            return None
        return incremental_state.get(self._state_key(key))

    def set_incremental_state(self, incremental_state, key, value):
        if incremental_state is not None:
            incremental_state[self._state_key(key)] = value
        return incremental_state


class QuantConvTBC(IncrementalStateMixin, QuantModule):
    """Quantized causal 1-D convolution over [time, batch, channel] (fairseq's LinearizedConvolution).

    Training path: ``conv_tbc`` on quantized input and weight, future steps removed. Incremental
    decoding path: a buffer of the last ``kernel`` quantized inputs times the linearized quantized
    weight. Weight normalisation (``weight_g``/``weight_v``) is kept as the trainable
    parametrisation; the normalised weight is what gets quantized.
    """

    def __init__(self, conv, spec: QuantSpec, name: str = "conv_tbc"):
        super().__init__()
        self._init_incremental_state()
        self.spec = spec
        self.kernel_size = conv.kernel_size[0]
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.pad = conv.padding[0]
        self.bias = conv.bias
        self.weight_norm_dim = None
        if hasattr(conv, "weight_g") and hasattr(conv, "weight_v"):
            self.weight_g, self.weight_v = conv.weight_g, conv.weight_v
            self.weight_norm_dim = _weight_norm_dim(conv)
        else:
            self.weight = conv.weight
        layout = (self.out_channels, self.kernel_size * self.in_channels)
        self.weight_quantizer = make_weight_quantizer(spec, layout, name)
        self.input_quantizer = make_act_quantizer(spec, f"{name}.input", self.in_channels)

    @classmethod
    def from_float(cls, module, spec: QuantSpec, name: str, resolve=None):
        return cls(module, spec, name)

    def tbc_weight(self) -> torch.Tensor:
        """The float weight in ConvTBC layout [kernel, in, out]."""
        if self.weight_norm_dim is None:
            return self.weight
        return torch._weight_norm(self.weight_v, self.weight_g, self.weight_norm_dim)

    def weight_layout(self) -> torch.Tensor:
        return self.tbc_weight().permute(2, 0, 1).reshape(self.out_channels, -1)

    def quantized_linear_weight(self) -> torch.Tensor:
        return self.weight_quantizer(self.weight_layout())

    def forward(self, x, incremental_state=None):
        w_lin = self.quantized_linear_weight()
        if incremental_state is None:
            w_tbc = w_lin.reshape(self.out_channels, self.kernel_size, self.in_channels).permute(1, 2, 0)
            out = torch.conv_tbc(self.input_quantizer(x).contiguous(), w_tbc.contiguous(), self.bias, self.pad)
            if self.kernel_size > 1 and self.pad > 0:
                out = out[: -self.pad]
            return out
        # incremental: x is [batch, time, channel]; only the newest step is used
        bsz = x.size(0)
        newest = self.input_quantizer(x[:, -1, :])
        buffer = self.get_incremental_state(incremental_state, "input_buffer")
        if buffer is None:
            buffer = newest.new_zeros(bsz, self.kernel_size, self.in_channels)
        buffer = torch.cat([buffer[:, 1:], newest.unsqueeze(1)], dim=1)
        self.set_incremental_state(incremental_state, "input_buffer", buffer)
        out = F.linear(buffer.reshape(bsz, -1), w_lin, self.bias)
        return out.view(bsz, 1, -1)

    def reorder_incremental_state(self, incremental_state, new_order):
        buffer = self.get_incremental_state(incremental_state, "input_buffer")
        if buffer is not None:
            self.set_incremental_state(incremental_state, "input_buffer", buffer.index_select(0, new_order))

    def extra_repr(self):
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, padding={self.pad}, "
                f"weight_norm={self.weight_norm_dim is not None}, {self.spec.label()}")


def _weight_norm_dim(module) -> int:
    for hook in module._forward_pre_hooks.values():
        if getattr(hook, "name", None) == "weight" and hasattr(hook, "dim"):
            return hook.dim
    raise ValueError(f"{type(module).__name__} has weight_g/weight_v but no weight_norm hook")
