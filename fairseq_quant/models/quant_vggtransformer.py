"""Quantized VGGTransformer models for fairseq (``--arch quant_vggtransformer_*``).

The upstream model is built as usual, then :func:`fairseq_quant.quant.quantize_model` swaps every
module (VGG Conv2d, Linear, attention, LinearizedConvolution, embedding, output projection) for its
quantized version following ``--quant-strategy FILE`` or a uniform ``--quant-weight-bits N
--quant-act-bits M``. The float parameter names are unchanged, so ``--finetune-from-model fp32.pt``
loads a trained fp32 checkpoint. Activation ranges come from the calibration phase
(``scripts/calibrate.py``: a calibrated post-training-quantized checkpoint, the start of QAT with
``--finetune-from-model``); quantizer state is saved in QAT checkpoints so that resuming restores it exactly.
"""
import argparse
import logging

import torch
import yaml
import torch.distributed as dist
from examples.speech_recognition.models.vggtransformer import (
    TransformerDecoder,
    VGGTransformerEncoderModel,
    VGGTransformerModel,
    base_architecture,
    base_architecture_enconly,
    vggtransformer_1,
    vggtransformer_2,
    vggtransformer_base,
    vggtransformer_enc_1,
)
from fairseq.models import ARCH_MODEL_REGISTRY, register_model, register_model_architecture
from fairseq.modules import ConvTBC, FairseqDropout, LinearizedConvolution, MultiheadAttention, TransformerDecoderLayer

from ..quant import (
    QuantConvTBC,
    QuantMultiheadAttention,
    Strategy,
    StrategyError,
    apply_range_updates,
    is_calibrated,
    quantize_model,
    register_quant_module,
)
from ..quant.quantizers import ActivationQuantizer, WeightQuantizer
from ..quant.spec import SpecError, spec_changes

logger = logging.getLogger(__name__)

register_quant_module(MultiheadAttention, QuantMultiheadAttention)
register_quant_module(ConvTBC, QuantConvTBC)  # LinearizedConvolution is a ConvTBC subclass
QUANTIZER_KEY = "_quantizer."
EXTRA_STATE_KEY = "_extra_state"  # torch's key for get_extra_state()
QUANT_FLAG_DEFAULTS = {"--quant-granularity": "channel", "--quant-weight-method": "lsq", "--quant-act-method": "minmax",
                       "--quant-act-granularity": "tensor"}


def add_quant_args(parser):
    group = parser.add_argument_group("quantization (fairseq_quant)")
    group.add_argument("--quant-strategy", type=str, metavar="FILE",
                       help="YAML per-layer strategy (see recipes/librispeech/strategies)")
    group.add_argument("--quant-weight-bits", type=str, metavar="N",
                       help="uniform weight bits 1..8 or fp32 (when no --quant-strategy)")
    group.add_argument("--quant-act-bits", type=str, metavar="M",
                       help="uniform activation bits 1..8 or 16, or 32/fp32 for weight-only (when no --quant-strategy)")
    group.add_argument("--quant-granularity", type=str, default=QUANT_FLAG_DEFAULTS["--quant-granularity"],
                       choices=("tensor", "channel", "group"))
    group.add_argument("--quant-group-size", type=int, default=None)
    group.add_argument("--quant-weight-method", type=str, default=QUANT_FLAG_DEFAULTS["--quant-weight-method"])
    group.add_argument("--quant-act-method", type=str, default=QUANT_FLAG_DEFAULTS["--quant-act-method"])
    group.add_argument("--quant-act-granularity", type=str, default=QUANT_FLAG_DEFAULTS["--quant-act-granularity"],
                       help="activation ranges: tensor (one per tensor), peg (one per group of channels, sorted by "
                            "range at calibration; with --quant-act-groups) or token (one per position, dynamic)")
    group.add_argument("--quant-act-groups", type=int, default=None, metavar="K",
                       help="--quant-act-granularity peg: channel groups per activation site (divides every width)")
    group.add_argument("--quant-co-weight-bits", type=str, default=None, metavar="B,B",
                       help="multi-precision co-training: further weight precisions of every module, e.g. 4,2,1 "
                            "(trained with the criterion's --co-precisions)")
    group.add_argument("--quant-act-momentum", type=float, default=None, metavar="M",
                       help="QAT: minmax activation ranges move toward each training batch's min/max by this "
                            "exponential-moving-average weight (default 0.01; 0: ranges stay where calibration put them)")
    group.add_argument("--quant-dropout", type=float, default=None, metavar="P",
                       help="QAT: the dropout probability of every dropout module (default: the architecture's)")
    # the resolved strategy, stored in the checkpoint's args so that decoding never needs the YAML file
    group.add_argument("--quant-strategy-inline", type=str, default=None, help=argparse.SUPPRESS)


def strategy_from_args(args) -> Strategy:
    inline = getattr(args, "quant_strategy_inline", None)
    if inline:
        source = f"{getattr(args, 'quant_strategy', None) or 'uniform'} (stored in checkpoint)"
        return Strategy.from_dict(yaml.safe_load(inline), source=source)
    path = getattr(args, "quant_strategy", None)
    wbits, abits = getattr(args, "quant_weight_bits", None), getattr(args, "quant_act_bits", None)
    if path:
        if wbits is not None or abits is not None:
            raise StrategyError("give either --quant-strategy or --quant-weight-bits/--quant-act-bits, not both")
        return Strategy.from_yaml(path)
    if wbits is None:
        raise StrategyError("quant_ architectures need --quant-strategy FILE or --quant-weight-bits N "
                            "[--quant-act-bits M]")

    def bits(value):
        return int(value) if str(value).isdigit() and int(value) != 32 else value

    flags = {"weight_bits": ("--quant-weight-bits", wbits), "act_bits": ("--quant-act-bits", abits),
             "granularity": ("--quant-granularity", args.quant_granularity),
             "group_size": ("--quant-group-size", args.quant_group_size),
             "weight_method": ("--quant-weight-method", args.quant_weight_method),
             "act_method": ("--quant-act-method", args.quant_act_method),
             "act_granularity": ("--quant-act-granularity", getattr(args, "quant_act_granularity", "tensor")),
             "act_groups": ("--quant-act-groups", getattr(args, "quant_act_groups", None)),
             "co_weight_bits": ("--quant-co-weight-bits", getattr(args, "quant_co_weight_bits", None))}
    given = " ".join(f"{flag} {value}" for flag, value in flags.values()
                     if value is not None and value != QUANT_FLAG_DEFAULTS.get(flag))
    try:
        return Strategy.uniform(bits(wbits), bits(abits if abits is not None else "fp32"), source=given,
                                granularity=args.quant_granularity, group_size=args.quant_group_size,
                                weight_method=args.quant_weight_method, act_method=args.quant_act_method,
                                act_granularity=flags["act_granularity"][1], act_groups=flags["act_groups"][1],
                                co_weight_bits=_co_bits(flags["co_weight_bits"][1]))
    except SpecError as err:
        flag, value = flags[err.field]
        raise StrategyError(f"{flag} {value}: {err}") from None


def _co_bits(value):
    """'4,2,1' -> [4, 2, 1] (the spec validates them); None stays None."""
    if value is None:
        return None
    try:
        return [int(b) for b in str(value).split(",")]
    except ValueError:
        raise SpecError("co_weight_bits", f"expected comma-separated precisions such as 4,2,1, got {value!r}") from None


class QuantTransformerDecoder(TransformerDecoder):
    """Upstream decoder whose forward also feeds ``incremental_state`` to quantized convolutions.

    Upstream dispatches on ``isinstance(layer, LinearizedConvolution)``; a swapped-in quantized
    convolution would silently lose its incremental state without this.
    """

    def forward(self, prev_output_tokens, encoder_out=None, incremental_state=None):
        target_padding_mask = (prev_output_tokens == self.padding_idx) if incremental_state is None else None
        if incremental_state is not None:
            prev_output_tokens = prev_output_tokens[:, -1:]
        x = self.embed_tokens(prev_output_tokens)
        x = self._transpose_if_training(x, incremental_state)
        for layer in self.conv_layers:
            if isinstance(layer, (LinearizedConvolution, QuantConvTBC)):
                x = layer(x, incremental_state)
            else:
                x = layer(x)
        x = self._transpose_if_inference(x, incremental_state)
        enc = encoder_out["encoder_out"] if encoder_out is not None else None
        enc_mask = encoder_out["encoder_padding_mask"] if encoder_out is not None else None
        for layer in self.layers:
            if isinstance(layer, TransformerDecoderLayer):
                x, *_ = layer(
                    x, enc, enc_mask.t() if enc_mask is not None else None, incremental_state,
                    self_attn_mask=self.buffered_future_mask(x) if incremental_state is None else None,
                    self_attn_padding_mask=target_padding_mask,
                )
            else:
                x = layer(x)
        return self.fc_out(x.transpose(0, 1)), None


class QuantModelMixin:
    """Quantizes the built model; loads fp32 and calibrated checkpoints; stores every module's spec in its
    checkpoints and refuses one quantized with another strategy. Calibration is a phase of its own
    (:mod:`fairseq_quant.calibration`, ``scripts/calibrate.py``), never a side effect of ``forward``."""

    def quantize(self, args):
        self.quant_strategy = strategy_from_args(args)
        args.quant_strategy_inline = yaml.safe_dump(self.quant_strategy.to_dict(), sort_keys=False)
        self.quant_report = quantize_model(self, self.quant_strategy)
        self.quant_specs = {name: spec.to_dict() for name, spec in self.quant_report.specs.items()}
        # set by the calibration phase and saved in checkpoints (kept for checkpoints that carry it)
        self.register_buffer("quant_calibrated", torch.tensor(False))
        self._ranges_deferred = False  # data parallel: running ranges are updated from all workers' batches
        momentum = getattr(args, "quant_act_momentum", None)
        if momentum is not None:
            if not 0.0 <= momentum <= 1.0:
                raise StrategyError(f"--quant-act-momentum must be in [0, 1], got {momentum}")
            for q in self.quantizers():
                if isinstance(q, ActivationQuantizer):
                    q.momentum = momentum
        dropout = getattr(args, "quant_dropout", None)
        if dropout is not None:
            if not 0.0 <= dropout < 1.0:
                raise StrategyError(f"--quant-dropout must be in [0, 1), got {dropout}")
            for m in self.modules():
                if isinstance(m, (torch.nn.Dropout, FairseqDropout)):
                    m.p = dropout
        logger.info("fairseq_quant: %s\n%s", self.quant_strategy, self.quant_report.format())

    def quantizers(self):
        return [m for m in self.modules() if isinstance(m, (WeightQuantizer, ActivationQuantizer))]

    def set_num_updates(self, num_updates):
        """fairseq's update count, kept for the co-training schedule (--co-schedule) of the criterion."""
        self.num_updates = num_updates
        super().set_num_updates(num_updates)

    def get_extra_state(self):
        """Saved in checkpoints as ``_extra_state``: the spec of every module, to compare at loading."""
        return {"quant_specs": self.quant_specs}

    def set_extra_state(self, state):
        pass  # the model's specs come from its strategy; load_state_dict compares the checkpoint's with them

    def load_state_dict(self, state_dict, strict=True, model_cfg=None, args=None):
        state_dict = dict(state_dict)
        stored = state_dict.pop(EXTRA_STATE_KEY, None)
        own = self.state_dict()
        quant_keys = {k for k in own if _is_quant_key(k)}
        given = {k for k in state_dict if _is_quant_key(k)}
        if not given:  # an fp32 checkpoint: quantizers start fresh; activations need the calibration phase
            for k in quant_keys:
                state_dict[k] = own[k]
            for q in self.quantizers():
                q.reset()
            logger.info("fairseq_quant: loading an fp32 checkpoint; its activation quantizers need calibration "
                        "(scripts/calibrate.py)")
        else:
            changed = self._changed_specs(stored)
            if changed:
                raise StrategyError(f"{_describe_changes(stored, changed)}; use the strategy it was quantized with, "
                                    "or re-quantize it with scripts/calibrate.py --checkpoint CKPT --strategy NEW "
                                    "(keeps the unchanged modules' quantizers, recalibrates the others)")
            if given != quant_keys:
                missing, extra = sorted(quant_keys - given), sorted(given - quant_keys)
                raise StrategyError(
                    f"{(stored or {}).get('path', 'the checkpoint')} was written with a different quantization "
                    f"strategy: missing quantizer state {missing[:3]}, unexpected {extra[:3]}"
                )
        state_dict[EXTRA_STATE_KEY] = own[EXTRA_STATE_KEY]
        return super().load_state_dict(state_dict, strict=strict, model_cfg=model_cfg, args=args)

    def _changed_specs(self, stored) -> list[tuple[str, str]]:
        """Modules whose spec in the checkpoint differs from the model's."""
        stored = stored or {}
        source = stored.get("path", "the checkpoint")
        theirs = stored.get("quant_specs")
        if theirs is None and stored.get("quant_strategy"):  # written before the specs were saved per module
            strategy = Strategy.from_dict(yaml.safe_load(stored["quant_strategy"]), source=source).bind(self.quant_specs)
            theirs = {name: strategy.spec_for(name).to_dict() for name in self.quant_specs}
        if theirs is None:
            logger.warning("fairseq_quant: %s stores no quantization strategy; its quantizer state is loaded "
                           "without comparing strategies", source)
            return []
        return spec_changes(theirs, self.quant_specs)

    def forward(self, *args, **kwargs):
        if self.training and not is_calibrated(self):
            raise StrategyError(
                "activation quantizers are not calibrated: quantization-aware training starts from a calibrated "
                "checkpoint. Run: python scripts/calibrate.py --checkpoint FP32.pt --data DATA --strategy "
                "STRATEGY.yaml --out calibrated.pt, then fairseq-train ... --finetune-from-model calibrated.pt")
        distributed = _data_parallel()
        if distributed and self.training and not self._ranges_deferred:
            for q in self.quantizers():
                if isinstance(q, ActivationQuantizer):
                    q.defer_range_updates = True  # applied below, reduced over the workers
            self._ranges_deferred = True
        out = super().forward(*args, **kwargs)
        if distributed and self.training:
            apply_range_updates(self, reduce_max=_all_reduce_max)
        return out


def _describe_changes(stored, changed) -> str:
    named = ", ".join(f"{name} ({change})" for name, change in changed[:3])
    more = f", ... ({len(changed) - 3} more)" if len(changed) > 3 else ""
    return (f"{(stored or {}).get('path', 'the checkpoint')} was quantized with another strategy: "
            f"{len(changed)} modules changed: {named}{more}")


def _is_quant_key(key: str) -> bool:
    return QUANTIZER_KEY in key or key == "quant_calibrated"


def _data_parallel() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _all_reduce_max(t):
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


@register_model("quant_asr_vggtransformer")
class QuantVGGTransformerModel(QuantModelMixin, VGGTransformerModel):
    """VGGTransformer (encoder-decoder) with every module quantized."""

    @staticmethod
    def add_args(parser):
        VGGTransformerModel.add_args(parser)
        add_quant_args(parser)

    @classmethod
    def build_decoder(cls, args, task):
        return QuantTransformerDecoder(
            dictionary=task.target_dictionary, embed_dim=args.tgt_embed_dim,
            transformer_config=eval(args.transformer_dec_config), conv_config=eval(args.conv_dec_config),
            encoder_output_dim=args.enc_output_dim,
        )

    @classmethod
    def build_model(cls, args, task):
        model = super().build_model(args, task)
        model.quantize(args)
        return model


@register_model("asr_vggtransformer_ctc")
class VGGTransformerCTCModel(VGGTransformerModel):
    """The upstream VGGTransformer with a CTC head on the encoder output, part of the model: trained by the
    criterion's CTC loss (``--ctc-weight``), quantized with the rest, exported, and used by joint CTC/attention
    beam search (:mod:`fairseq_quant_runtime.ctc`). ``forward`` returns the decoder output with
    ``{"ctc_logits": T x B x V, "encoder_padding_mask": T x B}`` as its second element. The blank is the
    padding symbol, which never occurs in a target."""

    @classmethod
    def build_model(cls, args, task):
        model = super().build_model(args, task)
        model.ctc_proj = torch.nn.Linear(args.enc_output_dim, len(task.target_dictionary))
        return model

    def forward(self, src_tokens, src_lengths, prev_output_tokens, **kwargs):
        encoder_out = self.encoder(src_tokens, src_lengths=src_lengths, **kwargs)
        logits, extra = self.decoder(prev_output_tokens, encoder_out=encoder_out)
        return logits, {**(extra or {}), **self.ctc_output(encoder_out)}

    def ctc_output(self, encoder_out) -> dict:
        return {"ctc_logits": self.ctc_proj(encoder_out["encoder_out"]),
                "encoder_padding_mask": encoder_out["encoder_padding_mask"]}

    def load_state_dict(self, state_dict, strict=True, model_cfg=None, args=None):
        """A checkpoint without the CTC head (a model trained with the criterion's head, or none) starts it fresh."""
        if "ctc_proj.weight" not in state_dict:
            logger.warning("the checkpoint has no CTC head (ctc_proj): it starts from random weights")
            state_dict = {**{k: v for k, v in self.state_dict().items() if k.startswith("ctc_proj.")}, **state_dict}
        return super().load_state_dict(state_dict, strict=strict, model_cfg=model_cfg, args=args)


@register_model("quant_asr_vggtransformer_ctc")
class QuantVGGTransformerCTCModel(QuantVGGTransformerModel, VGGTransformerCTCModel):
    """The CTC-headed VGGTransformer with every module quantized, the CTC head included."""


@register_model("quant_asr_vggtransformer_encoder")
class QuantVGGTransformerEncoderModel(QuantModelMixin, VGGTransformerEncoderModel):
    """Encoder-only (CTC) VGGTransformer with every module quantized."""

    @staticmethod
    def add_args(parser):
        VGGTransformerEncoderModel.add_args(parser)
        add_quant_args(parser)

    @classmethod
    def build_model(cls, args, task):
        model = super().build_model(args, task)
        model.quantize(args)
        return model


def float_model(model_cfg, task):
    """The fp32 model of a ``quant_`` architecture's config: the same layers, nothing quantized."""
    args = argparse.Namespace(**vars(model_cfg))
    args.arch = args._name = args.arch[len("quant_"):] if args.arch.startswith("quant_") else args.arch
    return ARCH_MODEL_REGISTRY[args.arch].build_model(args, task)


def _cpu_arch_defaults(args, vgg: str, width: int, ffn: int, enc_layers: int, dec_layers: int) -> None:
    """Defaults of the small CPU-trainable archs (a user's --*-config options still win)."""
    layer = f"(({width}, 4, {ffn}, True, 0.1, 0.1, 0.1),)"
    args.input_feat_per_channel = getattr(args, "input_feat_per_channel", 80)
    args.vggblock_enc_config = getattr(args, "vggblock_enc_config", vgg)
    args.transformer_enc_config = getattr(args, "transformer_enc_config", f"{layer} * {enc_layers}")
    args.enc_output_dim = getattr(args, "enc_output_dim", width)
    args.tgt_embed_dim = getattr(args, "tgt_embed_dim", width)
    args.conv_dec_config = getattr(args, "conv_dec_config", f"(({width}, 3, True),) * 2")
    args.transformer_dec_config = getattr(args, "transformer_dec_config", f"{layer} * {dec_layers}")
    base_architecture(args)


def vggtransformer_small(args):
    """A small VGGTransformer that trains on 2 CPU cores: two one-conv VGG blocks (16 channels, 4x
    subsampling), 2 encoder and 2 decoder transformer layers of 144 dims (about 1.5 M parameters with a
    300-token vocabulary). Measured on 2 cores: the two-conv VGG blocks of the larger archs took 60% of
    a training step, and a 4-layer encoder needed twice the updates to start aligning."""
    _cpu_arch_defaults(args, "[(16, 3, 2, 1, True), (16, 3, 2, 1, True)]", 144, 576, 2, 2)


def vggtransformer_ref(args):
    """The reference model shipped in recipes/librispeech/reference (about 2.4 M parameters with a
    256-piece vocabulary): two VGG blocks (16 and 32 channels, 4x subsampling), 4 encoder and 2 decoder
    transformer layers of width 128 (a multiple of 128, so deployment kernels take whole blocks), FFN
    1024, two LinearizedConvolution decoder layers. One conv per VGG block: measured on 2 cores, two
    convs per block made a training step 44% slower (462 vs 321 ms at batch 8, 2.5 s utterances) for
    the same transformer, and the transformer depth is what the per-layer strategies act on."""
    _cpu_arch_defaults(args, "[(16, 3, 2, 1, True), (32, 3, 2, 1, True)]", 128, 1024, 4, 2)


def vggtransformer_narrow(args):
    """The reference's depth at the size of its 2-bit version (about 189 k parameters, 0.76 MB in fp32 with a
    256-piece vocabulary, against 0.72 MB for the 2-bit w2a8 reference): VGG blocks of 8 and 16 channels, 4 encoder
    and 2 decoder transformer layers of width 40, FFN 160. The size-matched fp32 comparison: is a wide model at 2
    bits better than a narrow fp32 model of the same bytes?"""
    _cpu_arch_defaults(args, "[(8, 3, 2, 1, True), (16, 3, 2, 1, True)]", 40, 160, 4, 2)


register_model_architecture("asr_vggtransformer", "vggtransformer_small")(vggtransformer_small)
register_model_architecture("asr_vggtransformer", "vggtransformer_narrow")(vggtransformer_narrow)
register_model_architecture("asr_vggtransformer", "vggtransformer_ref")(vggtransformer_ref)

# every arch in four models: upstream's fp32 (the small ones registered above), fp32 with a CTC head (NAME_ctc),
# and the quantized versions of both (quant_NAME, quant_NAME_ctc)
for _name, _fn in (("vggtransformer_1", vggtransformer_1), ("vggtransformer_2", vggtransformer_2),
                   ("vggtransformer_base", vggtransformer_base), ("vggtransformer_small", vggtransformer_small),
                   ("vggtransformer_ref", vggtransformer_ref), ("vggtransformer_narrow", vggtransformer_narrow)):
    def _arch(args, _fn=_fn):
        _fn(args)
        base_architecture(args)

    register_model_architecture("quant_asr_vggtransformer", f"quant_{_name}")(_arch)
    register_model_architecture("asr_vggtransformer_ctc", f"{_name}_ctc")(_arch)
    register_model_architecture("quant_asr_vggtransformer_ctc", f"quant_{_name}_ctc")(_arch)


def _quant_enc_1(args):
    vggtransformer_enc_1(args)
    base_architecture_enconly(args)


register_model_architecture("quant_asr_vggtransformer_encoder", "quant_vggtransformer_enc_1")(_quant_enc_1)
