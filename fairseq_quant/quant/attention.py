"""Quantized multi-head attention with fairseq's ``MultiheadAttention`` interface.

fairseq's attention hands its raw projection weights to ``F.multi_head_attention_forward`` whenever
there is no incremental state (always in the encoder), so quantizing its Linears changes nothing there.
This module replaces the whole attention and always runs one explicit path, in which every operand is
quantized: the q/k/v/out projections (weights and inputs), both operands of ``QK^T``, the softmax
probabilities and both operands of ``AV``. Incremental decoding caches float keys and values and
quantizes them where they are used, with the same (frozen at eval) ranges.
"""
import torch
import torch.nn.functional as F
from torch import nn

from .modules import IncrementalStateMixin, QuantLinear, make_act_quantizer
from .quantizers import ActivationQuantizer
from .spec import QuantSpec


class QuantMultiheadAttention(IncrementalStateMixin, nn.Module):
    """Drop-in replacement for fairseq's MultiheadAttention (self, encoder-decoder, incremental)."""

    def __init__(self, embed_dim: int, num_heads: int, q_proj: QuantLinear, k_proj: QuantLinear,
                 v_proj: QuantLinear, out_proj: QuantLinear, spec: QuantSpec, dropout: float = 0.0,
                 self_attention: bool = False, encoder_decoder_attention: bool = False,
                 name: str = "attention"):
        super().__init__()
        self._init_incremental_state()
        if embed_dim % num_heads:
            raise ValueError(f"{name}: embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.spec = spec
        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.head_dim = embed_dim // num_heads
        self.scaling = self.head_dim**-0.5
        self.dropout = dropout
        self.self_attention = self_attention
        self.encoder_decoder_attention = encoder_decoder_attention
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = q_proj, k_proj, v_proj, out_proj
        # one quantizer per matmul operand: Q and K^T of QK^T, probabilities and V of AV
        self.q_quantizer = make_act_quantizer(spec, f"{name}.q", self.head_dim)
        self.k_quantizer = make_act_quantizer(spec, f"{name}.k", self.head_dim)
        self.v_quantizer = make_act_quantizer(spec, f"{name}.v", self.head_dim)
        self.prob_quantizer = ActivationQuantizer(bits=spec.act_bits, method="fixed", fixed_range=(0.0, 1.0),
                                                  name=f"{name}.softmax")

    @classmethod
    def from_float(cls, mha, spec: QuantSpec, name: str, resolve=None):
        """Build from a fairseq MultiheadAttention, reusing its projection Parameters."""
        if getattr(mha, "bias_k", None) is not None or getattr(mha, "add_zero_attn", False):
            raise NotImplementedError(f"{name}: attention with add_bias_kv/add_zero_attn is not supported")
        resolve = resolve or (lambda _child: spec)
        projections = {}
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            child = getattr(mha, proj)
            projections[proj] = QuantLinear(child.weight, child.bias, resolve(f"{name}.{proj}"), f"{name}.{proj}")
        return cls(mha.embed_dim, mha.num_heads, spec=spec, dropout=float(mha.dropout_module.p),
                   self_attention=bool(mha.self_attention),
                   encoder_decoder_attention=bool(mha.encoder_decoder_attention), name=name, **projections)

    # fairseq's incremental-state interface (TransformerDecoderLayer calls these directly)
    def _get_input_buffer(self, incremental_state):
        return self.get_incremental_state(incremental_state, "attn_state") or {}

    def _set_input_buffer(self, incremental_state, buffer):
        return self.set_incremental_state(incremental_state, "attn_state", buffer)

    def reorder_incremental_state(self, incremental_state, new_order):
        buffer = self.get_incremental_state(incremental_state, "attn_state")
        if buffer:
            for key, value in buffer.items():
                if value is not None:
                    buffer[key] = value.index_select(0, new_order)
            self._set_input_buffer(incremental_state, buffer)
        return incremental_state

    def forward(self, query, key, value, key_padding_mask=None, incremental_state=None, need_weights=True,
                static_kv=False, attn_mask=None, before_softmax=False, need_head_weights=False):
        need_weights = need_weights or need_head_weights
        tgt_len, bsz, _ = query.shape
        saved = None
        if incremental_state is not None:
            saved = self._get_input_buffer(incremental_state)
            if "prev_key" in saved and static_kv:
                key = value = None
        q = self.q_proj(query)
        if self.self_attention:
            k, v = self.k_proj(query), self.v_proj(query)
        elif key is None:
            k = v = None
        else:
            k, v = self.k_proj(key), self.v_proj(value if not self.encoder_decoder_attention else key)
        q = self._heads(q * self.scaling, bsz)
        k = self._heads(k, bsz) if k is not None else None
        v = self._heads(v, bsz) if v is not None else None
        if saved is not None:
            k, v, key_padding_mask = self._extend_with_cache(saved, k, v, key_padding_mask, bsz, static_kv)
            self._set_input_buffer(incremental_state, saved)
        src_len = k.size(1)
        scores = torch.bmm(self.q_quantizer(q), self.k_quantizer(k).transpose(1, 2))
        if attn_mask is not None:
            scores = scores + attn_mask.unsqueeze(0)
        if key_padding_mask is not None:
            scores = scores.view(bsz, self.num_heads, tgt_len, src_len).masked_fill(
                key_padding_mask.view(bsz, 1, 1, src_len).to(torch.bool), float("-inf")
            ).view(bsz * self.num_heads, tgt_len, src_len)
        if before_softmax:
            return scores, v
        probs_float = F.softmax(scores, dim=-1, dtype=torch.float32)
        probs = self.prob_quantizer(probs_float.type_as(scores))
        if self.training and self.dropout > 0:
            # dropout as a 0/1 mask with the 1/(1-p) rescaling after AV: the operand stays on the probability grid
            keep = torch.rand_like(probs) >= self.dropout
            attn = torch.bmm(probs * keep, self.v_quantizer(v)) / (1 - self.dropout)
        else:
            attn = torch.bmm(probs, self.v_quantizer(v))
        attn = attn.transpose(0, 1).contiguous().view(tgt_len, bsz, self.embed_dim)
        attn = self.out_proj(attn)
        weights = None
        if need_weights:
            weights = probs_float.view(bsz, self.num_heads, tgt_len, src_len).transpose(1, 0)
            if not need_head_weights:
                weights = weights.mean(dim=0)
        return attn, weights

    def _heads(self, x, bsz):
        """[time, batch, embed] -> [batch * heads, time, head_dim]."""
        return x.contiguous().view(-1, bsz * self.num_heads, self.head_dim).transpose(0, 1)

    def _extend_with_cache(self, saved, k, v, key_padding_mask, bsz, static_kv):
        if "prev_key" in saved:
            prev_k = saved["prev_key"].view(bsz * self.num_heads, -1, self.head_dim)
            prev_v = saved["prev_value"].view(bsz * self.num_heads, -1, self.head_dim)
            k = prev_k if static_kv else torch.cat([prev_k, k], dim=1)
            v = prev_v if static_kv else torch.cat([prev_v, v], dim=1)
        key_padding_mask = _merge_padding_masks(key_padding_mask, saved.get("prev_key_padding_mask"),
                                                bsz, k.size(1), static_kv)
        saved["prev_key"] = k.view(bsz, self.num_heads, -1, self.head_dim)
        saved["prev_value"] = v.view(bsz, self.num_heads, -1, self.head_dim)
        saved["prev_key_padding_mask"] = key_padding_mask
        return k, v, key_padding_mask

    def quantized_weights(self):
        return [pair for proj in (self.q_proj, self.k_proj, self.v_proj, self.out_proj)
                for pair in proj.quantized_weights()]

    def extra_repr(self):
        kind = "self" if self.self_attention else "encoder-decoder" if self.encoder_decoder_attention else "cross"
        return f"embed_dim={self.embed_dim}, heads={self.num_heads}, {kind}, {self.spec.label()}"


def _merge_padding_masks(new, prev, bsz, src_len, static_kv):
    """Padding mask over the cached + new keys, as fairseq builds it (True = padding)."""
    if prev is not None and static_kv:
        return prev
    if prev is None and new is None:
        return None
    if prev is None:
        prev = torch.zeros(bsz, src_len - new.size(1), dtype=torch.bool, device=new.device)
    if new is None:
        new = torch.zeros(bsz, src_len - prev.size(1), dtype=torch.bool, device=prev.device)
    return torch.cat([prev.to(torch.bool), new.to(torch.bool)], dim=1)
