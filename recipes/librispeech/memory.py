"""Estimated GPU memory of one VGGTransformer training batch (fp32 or QAT): the activations autograd keeps
for the backward pass, layer by layer, plus the model state (weights, gradients, Adam moments, a distillation
teacher). MB/GB are 10^6/10^9 bytes.

The coefficients are floats kept per unit of work (per frame, per encoder position, per target token, per
weight), measured with saved-tensor hooks on fairseq's layers (fp32) and on this project's quantized layers
(QAT: min-max activations, LSQ weights); tests/test_memory.py checks the total against a real forward.
"""
from argparse import Namespace
from dataclasses import dataclass

BYTES = 4  # fp32
# per unit:        fp32   QAT
ENC_LAYER = {"d": (10.0, 14.0), "ffn": (3.0, 3.25), "attn": (3.0, 2.5), "one": (4.0, 5.6)}  # per position
DEC_LAYER = {"d": (15.6, 21.15), "ffn": (3.0, 3.65), "cross": (3.0, 2.7), "self": (2.7, 0.95), "one": (-16.0, -17.0),
             "enc_d": (3.0, 4.8)}  # per target token; enc_d per encoder position
ACT_MASK = 0.25  # QAT: a fake-quantized activation keeps a boolean clamp mask (1 byte) per element for backward
QUANT_INPUT = 1.25  # QAT: extra floats per element of a quantized VGG conv input that requires a gradient
QUANT_WEIGHT = 3.1  # QAT: floats kept per quantized weight (its fake-quantized copy and masks)
ADAM_STATE = 16  # bytes per parameter: weight, gradient, two Adam moments
TEACHER = 4  # bytes per parameter of an fp32 distillation teacher


@dataclass(frozen=True)
class Arch:
    """The layer sizes of a VGGTransformer, as fairseq's architecture functions set them."""

    input_feat: int
    vgg: tuple  # (channels, kernel, pooling, convs, layer_norm) per VGG block
    enc: tuple  # (dim, heads, ffn, ...) per encoder layer
    enc_output_dim: int
    tgt_embed_dim: int
    conv_dec: tuple  # (channels, kernel, layer_norm) per decoder convolution
    dec: tuple  # (dim, heads, ffn, ...) per decoder layer


def arch_config(name: str) -> Arch:
    """Layer sizes of a registered fairseq architecture (``vggtransformer_2``, ``vggtransformer_small``, ...)."""
    import fairseq_quant  # noqa: F401  (registers vggtransformer_small and the upstream archs)
    from fairseq.models import ARCH_CONFIG_REGISTRY

    args = Namespace()
    ARCH_CONFIG_REGISTRY[name](args)
    return arch_from_args(args)


def arch_from_args(args) -> Arch:
    return Arch(int(args.input_feat_per_channel), tuple(eval(args.vggblock_enc_config)),
                tuple(eval(args.transformer_enc_config)), int(args.enc_output_dim), int(args.tgt_embed_dim),
                tuple(eval(args.conv_dec_config)), tuple(eval(args.transformer_dec_config)))


def parameters(arch: Arch, vocab: int) -> int:
    """Number of parameters of the model (weights of every layer, as fairseq builds it)."""
    n, channels, feat = 0, 1, arch.input_feat
    for out, kernel, pool, convs, layer_norm in arch.vgg:
        for _ in range(convs):
            n += channels * out * kernel * kernel + out + (2 * feat if layer_norm else 0)
            channels = out
        feat = -(-feat // pool)
    width = channels * feat
    for d, _, ffn, *_ in arch.enc:
        n += (width * d + d if width != d else 0) + 4 * (d * d + d) + 2 * d * ffn + d + ffn + 4 * d
        width = d
    n += width * arch.enc_output_dim + 3 * arch.enc_output_dim
    n += vocab * arch.tgt_embed_dim
    width = arch.tgt_embed_dim
    for out, kernel, layer_norm in arch.conv_dec:
        n += kernel * width * out + 2 * out + (2 * out if layer_norm else 0)  # weight_v, weight_g, bias
        width = out
    for d, _, ffn, *_ in arch.dec:
        n += (width * d + d if width != d else 0) + 4 * (d * d + d) + 4 * (d * arch.enc_output_dim + d) \
            + 2 * d * ffn + d + ffn + 6 * d
        width = d
    return n + width * vocab + vocab


def activation_floats(arch: Arch, vocab: int, utterances: int, frames: int, tokens: int, qat: bool,
                      distill: bool = False) -> float:
    """Floats autograd keeps for the backward pass of a batch of ``utterances`` of ``frames`` 10 ms frames
    and ``tokens`` target tokens each."""
    q = int(qat)
    per_utt, weights = 0.0, 0.0
    channels, feat, time, grad = 1, arch.input_feat, float(frames), False
    for out, kernel, pool, convs, layer_norm in arch.vgg:  # per frame at the block's time resolution
        per_utt += time * channels * feat * (1 + q * QUANT_INPUT * grad)
        for i in range(convs):
            per_utt += time * out * feat * ((2 if layer_norm else 1) + q * QUANT_INPUT * (i + 1 < convs))
            weights += channels * out * kernel * kernel
            channels = out
        per_utt += time * out * feat * 2 / pool**2  # max-pool indices (int64)
        time, feat, grad = time / pool, -(-feat // pool), True
    positions, width = time, channels * feat
    for d, heads, ffn, *_ in arch.enc:
        if width != d:  # Linear adapter
            per_utt += positions * width * (1 + q * ACT_MASK)
            weights += width * d
        c = {k: v[q] for k, v in ENC_LAYER.items()}
        per_utt += positions * (c["d"] * d + c["ffn"] * ffn + c["attn"] * heads * positions + c["one"])
        weights += 4 * d * d + 2 * d * ffn
        width = d
    per_utt += positions * (width * (1 + q * ACT_MASK) + arch.enc_output_dim + 2)  # final Linear and LayerNorm
    weights += width * arch.enc_output_dim + vocab * arch.tgt_embed_dim
    width = arch.tgt_embed_dim
    per_utt += tokens * width * (1 + q * ACT_MASK)
    for out, kernel, layer_norm in arch.conv_dec:
        per_utt += tokens * out * ((2 if layer_norm else 1) + q * ACT_MASK)
        weights += kernel * width * out
        width = out
    for d, heads, ffn, *_ in arch.dec:
        c = {k: v[q] for k, v in DEC_LAYER.items()}
        per_utt += tokens * (c["d"] * d + c["ffn"] * ffn + c["cross"] * heads * positions + c["self"] * heads * tokens
                             + c["one"]) + c["enc_d"] * positions * d
        weights += 8 * d * d + 2 * d * ffn
        width = d
    per_utt += tokens * (width * (1 + q * ACT_MASK) + vocab * (1 + 2 * distill))  # fc_out input; log-probabilities
    return utterances * per_utt + q * QUANT_WEIGHT * (weights + width * vocab)


@dataclass
class MemoryEstimate:
    utterances: int
    frames: int
    tokens: int
    activations_gb: float
    model_state_gb: float

    @property
    def total_gb(self) -> float:
        return self.activations_gb + self.model_state_gb


def batch_memory(arch: Arch, vocab: int, max_tokens: int, longest_frames: int, tokens_per_frame: float,
                 qat: bool, distill: bool = False, batch_size: int = 0) -> MemoryEstimate:
    """Memory of the worst batch fairseq can form: utterances of the longest length, as many as ``max_tokens``
    frames (or ``batch_size``) allow; attention makes longer utterances cost more per frame."""
    frames = min(longest_frames, max_tokens)
    utterances = max(1, max_tokens // frames)
    if batch_size:
        utterances = min(utterances, batch_size)
    tokens = max(1, round(frames * tokens_per_frame))
    params = parameters(arch, vocab)
    state = params * (ADAM_STATE + (TEACHER if distill else 0))
    floats = activation_floats(arch, vocab, utterances, frames, tokens, qat, distill)
    return MemoryEstimate(utterances, frames, tokens, floats * BYTES / 1e9, state / 1e9)
