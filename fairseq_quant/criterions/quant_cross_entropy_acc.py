"""``quant_cross_entropy_acc``: upstream cross-entropy with accuracy, plus optional knowledge
distillation from an fp32 teacher checkpoint, an optional auxiliary CTC loss on the encoder, and
quantization statistics in the logs.

loss = (1 - kd_weight) * CE(student, target) + kd_weight * T^2 * KL(teacher_T || student_T)
       + ctc_weight * CTC(encoder) + kd_hidden_weight * sum_frames mean_layers ||LN(h_student) - LN(h_teacher)||^2 / C
summed over non-padding target tokens (T = --kd-temperature). The CTC projection is the model's own head
(an ``*_ctc`` arch, used by joint CTC/attention decoding) or, with ``--ctc-encoder-dim``, a training-only
head owned by the criterion (fairseq trains and checkpoints criterion parameters; decoding never uses it).

Layer-wise distillation (``--kd-hidden-weight``, TernaryBERT's and BinaryBERT's remedy for 2-bit transformers): the
output of every encoder and decoder transformer layer of the student is pulled towards the teacher's at the same
layer (the same architecture), each frame's vector normalised (layer norm without gain) on both sides so that the
pre-LN residual stream's outlier channels do not dominate; the mean over layers of the per-frame mean squared
difference, summed over the non-padding frames (encoder) and target tokens (decoder).

Multi-precision co-training (``--co-precisions``, on a model whose strategy gives ``co_weight_bits``): every step
also runs the batch at each listed weight precision (the same latent weights; :mod:`fairseq_quant.quant.coprecision`)
and, with ``--co-stochastic``, once more with each module's precision drawn at random; the loss is the sum of the
passes' losses plus ``--co-kd-weight`` times KL(own precision || lower precision) per lower pass (the own pass's
output detached: in-place distillation). ``--co-schedule`` lets precisions join later (progressive: 8 -> 4 -> 2).
"""
import logging
import math
import os

import torch
import torch.nn.functional as F
from examples.speech_recognition.criterions.cross_entropy_acc import CrossEntropyWithAccCriterion
from fairseq import checkpoint_utils, metrics
from fairseq.criterions import register_criterion
from fairseq.modules import TransformerDecoderLayer, TransformerEncoderLayer

from ..quant.coprecision import co_precisions, sample_allocation, weight_precision
from ..quant.errors import FairseqQuantError

logger = logging.getLogger(__name__)
DEFAULT_KD_WEIGHT = 0.5  # with --teacher-path and no --kd-weight


class TeacherError(FairseqQuantError, ValueError):
    """The teacher checkpoint is missing or does not fit the student's task."""


@register_criterion("quant_cross_entropy_acc")
class QuantCrossEntropyWithAccCriterion(CrossEntropyWithAccCriterion):
    def __init__(self, task, sentence_avg, teacher_path=None, kd_weight=None, kd_temperature=1.0,
                 ctc_weight=0.0, ctc_encoder_dim=0, kd_ctc_weight=0.0, co_precisions="", co_stochastic=False,
                 co_kd_weight=0.0, co_schedule="", kd_hidden_weight=0.0):
        super().__init__(task, sentence_avg)
        self.co_precisions = parse_precisions(co_precisions, "--co-precisions")
        self.co_schedule = parse_schedule(co_schedule, self.co_precisions)
        self.co_stochastic = bool(co_stochastic)
        if co_kd_weight < 0:
            raise TeacherError(f"--co-kd-weight must be >= 0, got {co_kd_weight}")
        if (co_kd_weight > 0 or self.co_stochastic) and not self.co_precisions:
            raise TeacherError("--co-kd-weight and --co-stochastic apply to co-training: give --co-precisions")
        self.co_kd_weight = co_kd_weight
        kd_weight = _kd_weight(teacher_path, kd_weight, kd_ctc_weight or kd_hidden_weight)
        if ctc_weight < 0:
            raise TeacherError(f"--ctc-weight must be >= 0, got {ctc_weight}")
        self.ctc_weight = ctc_weight
        if ctc_weight > 0 and ctc_encoder_dim > 0:
            # a training-only head for a model without its own (blank is the padding symbol, never a target);
            # without --ctc-encoder-dim the model's CTC head (an *_ctc arch) is trained
            self.ctc_proj = torch.nn.Linear(ctc_encoder_dim, len(task.target_dictionary))
        if not 0.0 <= kd_weight <= 1.0:
            raise TeacherError(f"--kd-weight must be in [0, 1], got {kd_weight}")
        if kd_temperature <= 0:
            raise TeacherError(f"--kd-temperature must be positive, got {kd_temperature}")
        if kd_weight > 0 and not teacher_path:
            raise TeacherError("--kd-weight > 0 needs --teacher-path (an fp32 checkpoint)")
        if kd_ctc_weight < 0:
            raise TeacherError(f"--kd-ctc-weight must be >= 0, got {kd_ctc_weight}")
        if kd_ctc_weight > 0 and not teacher_path:
            raise TeacherError("--kd-ctc-weight > 0 needs --teacher-path (an fp32 checkpoint with a CTC head)")
        if kd_hidden_weight < 0:
            raise TeacherError(f"--kd-hidden-weight must be >= 0, got {kd_hidden_weight}")
        if kd_hidden_weight > 0 and not teacher_path:
            raise TeacherError("--kd-hidden-weight > 0 needs --teacher-path (an fp32 checkpoint of the same architecture)")
        self.kd_weight, self.kd_temperature, self.kd_ctc_weight = kd_weight, kd_temperature, kd_ctc_weight
        self.kd_hidden_weight = kd_hidden_weight
        # kept out of the module tree: the teacher is neither trained nor saved in checkpoints
        wants_teacher = kd_weight > 0 or kd_ctc_weight > 0 or kd_hidden_weight > 0
        self._teacher = (load_teacher(teacher_path, task),) if teacher_path and wants_teacher else ()

    def load_state_dict(self, state_dict, strict=True, **kwargs):
        """A checkpoint without the CTC projection (a reference bundle keeps only the model) starts it fresh."""
        if hasattr(self, "ctc_proj") and not any(k.startswith("ctc_proj.") for k in state_dict):
            logger.warning("the checkpoint has no CTC projection (criterion state): it starts from random weights")
            state_dict = {**state_dict, **{f"ctc_proj.{k}": v for k, v in self.ctc_proj.state_dict().items()}}
        return super().load_state_dict(state_dict, strict=strict, **kwargs)

    @property
    def teacher(self):
        return self._teacher[0] if self._teacher else None

    @staticmethod
    def add_args(parser):
        parser.add_argument("--teacher-path", type=str, default=None, metavar="FILE",
                            help="fp32 checkpoint to distil from")
        parser.add_argument("--kd-weight", type=float, default=None, metavar="W",
                            help=f"weight of the distillation loss (default {DEFAULT_KD_WEIGHT} with --teacher-path, "
                                 "else 0; 0 disables distillation)")
        parser.add_argument("--kd-temperature", type=float, default=1.0, metavar="T",
                            help="softmax temperature of teacher and student for distillation")
        parser.add_argument("--kd-ctc-weight", type=float, default=0.0, metavar="W",
                            help="weight of distilling the teacher's CTC posteriors into the student's CTC head "
                                 "(KL per encoder frame at --kd-temperature; both models need a CTC head)")
        parser.add_argument("--kd-hidden-weight", type=float, default=0.0, metavar="W",
                            help="weight of layer-wise distillation: every encoder and decoder transformer layer's "
                                 "output pulled towards the teacher's (same architecture; squared difference of the "
                                 "layer-normalised vectors, mean over layers, summed over frames and tokens)")
        parser.add_argument("--ctc-weight", type=float, default=0.0, metavar="W",
                            help="weight of an auxiliary CTC loss on the encoder output (training only)")
        parser.add_argument("--ctc-encoder-dim", type=int, default=0, metavar="D",
                            help="encoder output dimension for the auxiliary CTC head (--enc-output-dim)")
        parser.add_argument("--co-precisions", type=str, default="", metavar="B,B",
                            help="multi-precision co-training: also train every step at these weight precisions "
                                 "(each among the strategy's co_weight_bits), e.g. 4,2,1")
        parser.add_argument("--co-stochastic", action="store_true",
                            help="co-training: one more pass per step with each module's precision drawn at random")
        parser.add_argument("--co-kd-weight", type=float, default=0.0, metavar="W",
                            help="co-training: weight of KL(own-precision output || lower-precision output)")
        parser.add_argument("--co-schedule", type=str, default="", metavar="B:U,B:U",
                            help="co-training: precision B joins at update U (progressive), e.g. 4:0,2:2000,1:4000; "
                                 "unlisted precisions train from the start")

    def active_co_precisions(self, model) -> list[int]:
        """The co-training precisions of this update (--co-schedule), checked against the model's."""
        if not self.co_precisions:
            return []
        inner = _unwrap(model)
        available = co_precisions(inner)
        missing = [b for b in self.co_precisions if b not in available]
        if missing:
            raise TeacherError(f"--co-precisions {missing} are not co-trained precisions of the model (its "
                               f"strategy's co_weight_bits give {available or 'none'})")
        update = getattr(inner, "num_updates", 0)
        return [b for b in self.co_precisions if update >= self.co_schedule.get(b, 0)]

    def forward(self, model, sample, reduction="sum", log_probs=True):
        """The loss of the model's own precision and, when co-training, of every other precision's pass."""
        passes = self.active_co_precisions(model)
        self._teacher_cache = {}  # the teacher's output of this batch, shared by the passes of this call
        try:
            return self._forward_passes(model, sample, reduction, log_probs, passes)
        finally:
            self._teacher_cache = None

    def _forward_passes(self, model, sample, reduction, log_probs, passes):
        loss, sample_size, logging_output, net_output = self.single_forward(model, sample, reduction, log_probs)
        if not self.co_precisions:
            return loss, sample_size, logging_output
        allocations = [(f"w{b}", b) for b in passes]
        if self.co_stochastic and model.training and passes:  # (before any precision joins: nothing to mix)
            allowed = set(passes)
            allocations.append(("wmix", sample_allocation(_unwrap(model), allowed=allowed)))
        own_logits = net_output[0].detach()
        target = model.get_targets(sample, net_output)
        # the other passes call the model inside fairseq's data-parallel wrapper (one wrapper forward per step, as
        # DistributedDataParallel expects); the summed loss's backward gives every parameter one summed gradient
        inner = _unwrap(model)
        for label, allocation in allocations:
            with weight_precision(inner, allocation):
                low_loss, _, low_log, low_out = self.single_forward(inner, sample, reduction, log_probs)
            loss = loss + low_loss
            logging_output[f"loss_{label}"] = low_loss.item()
            if self.co_kd_weight > 0:
                kd = self.logits_kl(low_out[0], own_logits, target)
                loss = loss + self.co_kd_weight * kd
                logging_output[f"cokd_{label}"] = kd.item()
        logging_output["loss"] = loss.item()
        return loss, sample_size, logging_output

    def logits_kl(self, student_logits, teacher_logits, target) -> torch.Tensor:
        """KL(teacher || student) of the decoder's output distributions, summed over non-padding target tokens."""
        mask = (target != self.padding_idx).unsqueeze(-1)
        kl = F.kl_div(F.log_softmax(student_logits.float(), dim=-1), F.log_softmax(teacher_logits.float(), dim=-1),
                      log_target=True, reduction="none")
        return (kl * mask).sum()

    def single_forward(self, model, sample, reduction="sum", log_probs=True):
        """One pass at the model's current precisions: (loss, sample size, logging output, net output)."""
        captured = {}
        hooks = []
        own_head = hasattr(self, "ctc_proj")
        if self.ctc_weight > 0 and own_head:
            hooks.append(_unwrap(model).encoder.register_forward_hook(lambda m, a, out: captured.update(out=out)))
        hidden = {}
        if self.kd_hidden_weight > 0 and self.teacher is not None and model.training:
            hooks += capture_layer_outputs(_unwrap(model), hidden)
        try:
            net_output = model(**sample["net_input"])
        finally:
            for hook in hooks:
                hook.remove()
        target = model.get_targets(sample, net_output)
        lprobs, ce_loss = self.compute_loss(model, net_output, target, reduction, log_probs)
        loss, kd_loss, ctc_loss, kd_ctc_loss, kd_hidden_loss = ce_loss, None, None, None, None
        if self.teacher is not None and model.training:
            teacher_out = self.teacher_output(sample, target)
            if self.kd_weight > 0:
                kd_loss = self.distillation_loss(model, net_output, sample, target, teacher_out)
                loss = (1 - self.kd_weight) * ce_loss + self.kd_weight * kd_loss
            if self.kd_ctc_weight > 0:
                kd_ctc_loss = self.ctc_distillation_loss(net_output, teacher_out)
                loss = loss + self.kd_ctc_weight * kd_ctc_loss
            if self.kd_hidden_weight > 0:
                kd_hidden_loss = hidden_distillation_loss(hidden, self.teacher_hidden(sample, target), target,
                                                          self.padding_idx)
                loss = loss + self.kd_hidden_weight * kd_hidden_loss
        if self.ctc_weight > 0:
            if isinstance(net_output[1], dict) and "ctc_logits" in net_output[1]:  # the model's head comes first
                ctc_out = net_output[1]
            elif own_head:
                ctc_out = {"ctc_logits": self.ctc_proj(captured["out"]["encoder_out"]),
                           "encoder_padding_mask": captured["out"]["encoder_padding_mask"]}
            else:
                raise TeacherError("--ctc-weight > 0 needs a model with a CTC head (an *_ctc arch) or "
                                   "--ctc-encoder-dim (a training-only head of the criterion)")
            ctc_loss = self.ctc_loss(ctc_out, sample)
            loss = loss + self.ctc_weight * ctc_loss
        sample_size, logging_output = self.get_logging_output(sample, target, lprobs, loss)
        logging_output["ce_loss"] = ce_loss.item()
        if kd_loss is not None:
            logging_output["kd_loss"] = kd_loss.item()
        if ctc_loss is not None:
            logging_output["ctc_loss"] = ctc_loss.item()
        if kd_ctc_loss is not None:
            logging_output["kd_ctc_loss"] = kd_ctc_loss.item()
        if kd_hidden_loss is not None:
            logging_output["kd_hidden_loss"] = kd_hidden_loss.item()
        report = getattr(_unwrap(model), "quant_report", None)
        if report is not None:
            logging_output["wbits"] = report.avg_weight_bits
            logging_output["model_mb"] = report.quant_mb
        return loss, sample_size, logging_output, net_output

    def ctc_loss(self, ctc_out, sample):
        return ctc_loss(ctc_out, sample["target"], self.padding_idx, self.task.target_dictionary.eos())

    def teacher_output(self, sample, target):
        return self._teacher_forward(sample, target)[0]

    def teacher_hidden(self, sample, target) -> dict:
        """The teacher's transformer layer outputs of this batch (see :func:`capture_layer_outputs`)."""
        return self._teacher_forward(sample, target)[1]

    def _teacher_forward(self, sample, target):
        cache = getattr(self, "_teacher_cache", None)  # a dict during forward(), else None
        key = (id(sample), id(self.teacher))
        if cache is not None and key in cache:
            return cache[key]
        teacher = self.teacher
        if next(teacher.parameters()).device != target.device:
            teacher.to(target.device)
        hidden = {}
        hooks = capture_layer_outputs(teacher, hidden) if self.kd_hidden_weight > 0 else []
        try:
            with torch.no_grad():
                out = teacher(**sample["net_input"])
        finally:
            for hook in hooks:
                hook.remove()
        if cache is not None:
            cache[key] = (out, hidden)
        return out, hidden

    def ctc_distillation_loss(self, net_output, teacher_out):
        """T^2 * KL(teacher || student) of the CTC heads' posteriors at temperature T, summed over the frames."""
        student, teacher = (o[1] if len(o) > 1 and isinstance(o[1], dict) else {} for o in (net_output, teacher_out))
        if "ctc_logits" not in student or "ctc_logits" not in teacher:
            raise TeacherError("--kd-ctc-weight needs a CTC head in the student and the teacher (*_ctc archs)")
        t = self.kd_temperature
        kl = F.kl_div(F.log_softmax(student["ctc_logits"].float() / t, dim=-1),
                      F.log_softmax(teacher["ctc_logits"].float() / t, dim=-1), log_target=True, reduction="none")
        mask = student["encoder_padding_mask"]  # T x B, True = padding
        kl = kl.sum(-1)
        return (kl.masked_fill(mask, 0.0) if mask is not None else kl).sum() * t * t

    def distillation_loss(self, model, net_output, sample, target, teacher_out=None):
        if teacher_out is None:
            teacher_out = self.teacher_output(sample, target)
        t = self.kd_temperature
        student_logits = net_output[0] / t
        teacher_logits = teacher_out[0] / t
        mask = (target != self.padding_idx).unsqueeze(-1)
        kl = F.kl_div(F.log_softmax(student_logits.float(), dim=-1), F.log_softmax(teacher_logits.float(), dim=-1),
                      log_target=True, reduction="none")
        return (kl * mask).sum() * t * t

    @staticmethod
    def aggregate_logging_outputs(logging_outputs):
        agg = CrossEntropyWithAccCriterion.aggregate_logging_outputs(logging_outputs)
        sample_size = agg["sample_size"]
        co_keys = sorted({k for log in logging_outputs for k in log if k.startswith(("loss_w", "cokd_w"))})
        for key in ("ce_loss", "kd_loss", "ctc_loss", "kd_ctc_loss", "kd_hidden_loss", *co_keys):
            if any(key in log for log in logging_outputs) and sample_size > 0:
                agg[key] = sum(log.get(key, 0) for log in logging_outputs) / sample_size / math.log(2)
        for key in ("wbits", "model_mb"):
            values = [log[key] for log in logging_outputs if key in log]
            if values:
                agg[key] = values[0]
        return agg

    @classmethod
    def reduce_metrics(cls, logging_outputs) -> None:
        agg = cls.aggregate_logging_outputs(logging_outputs)
        for key, value in agg.items():
            if key in ("ntokens", "nsentences", "sample_size", "nframes", "correct", "total"):
                metrics.log_scalar(key, value, round=0)
            else:
                metrics.log_scalar(key, value, round=3)

    @staticmethod
    def logging_outputs_can_be_summed() -> bool:
        return False


def ctc_loss(ctc_out: dict, target: torch.Tensor, pad: int, eos: int) -> torch.Tensor:
    """CTC of a CTC head's logits (``ctc_out["ctc_logits"]``, T x B x V) against the targets without EOS, summed
    over the batch; the blank is the padding symbol."""
    x = ctc_out["ctc_logits"]
    lprobs = F.log_softmax(x.float(), dim=-1)
    pad_mask = ctc_out["encoder_padding_mask"]  # T x B, True = padding
    input_lengths = (~pad_mask).long().sum(0) if pad_mask is not None else \
        torch.full((x.size(1),), x.size(0), dtype=torch.long, device=x.device)
    keep = (target != pad) & (target != eos)
    return F.ctc_loss(lprobs, target.masked_select(keep), input_lengths, keep.long().sum(1),
                      blank=pad, reduction="sum", zero_infinity=True)


def capture_layer_outputs(model, store: dict) -> list:
    """Forward hooks that put the output of every encoder and decoder transformer layer of ``model`` into
    ``store[name] = (kind, T x B x C)`` (a decoder layer's first output) and the encoder's padding mask into
    ``store[ENCODER_PADDING]``; returns the hook handles."""
    hooks = [model.encoder.register_forward_hook(
        lambda m, args, out: store.__setitem__(ENCODER_PADDING, out.get("encoder_padding_mask")))]
    for name, module in model.named_modules():
        if isinstance(module, (TransformerEncoderLayer, TransformerDecoderLayer)):
            kind = "encoder" if isinstance(module, TransformerEncoderLayer) else "decoder"

            def keep(m, args, out, name=name, kind=kind):
                store[name] = (kind, out[0] if isinstance(out, tuple) else out)
            hooks.append(module.register_forward_hook(keep))
    return hooks


ENCODER_PADDING = "<encoder_padding_mask>"


def hidden_distillation_loss(student: dict, teacher: dict, target, pad: int) -> torch.Tensor:
    """Mean over the transformer layers of the squared difference of the layer-normalised student and teacher
    outputs (per frame: mean over channels), summed over the non-padding encoder frames or target tokens."""
    layers = sorted(k for k in student if k != ENCODER_PADDING)
    if not layers or layers != sorted(k for k in teacher if k != ENCODER_PADDING):
        raise TeacherError("--kd-hidden-weight needs a student and a teacher with the same transformer layers "
                           f"(student {layers}, teacher {sorted(k for k in teacher if k != ENCODER_PADDING)})")
    masks = {"encoder": student.get(ENCODER_PADDING), "decoder": (target == pad).t()}  # T x B, True = padding
    total = 0.0
    for name in layers:
        kind, s = student[name]
        t = teacher[name][1]
        if s.shape != t.shape:
            raise TeacherError(f"--kd-hidden-weight: layer {name} gives {tuple(s.shape)} in the student and "
                               f"{tuple(t.shape)} in the teacher")
        c = s.size(-1)
        diff = (F.layer_norm(s.float(), (c,)) - F.layer_norm(t.float(), (c,))).pow(2).mean(-1)  # T x B
        if masks[kind] is not None:
            diff = diff.masked_fill(masks[kind], 0.0)
        total = total + diff.sum()
    return total / len(layers)


def parse_precisions(value, flag: str) -> list[int]:
    """'4,2,1' -> [4, 2, 1]: distinct weight precisions in 1..8, high to low; '' -> []."""
    if value is None or str(value).strip() == "":
        return []
    try:
        bits = [int(b) for b in str(value).split(",")]
    except ValueError:
        raise TeacherError(f"{flag} {value!r}: expected comma-separated precisions such as 4,2,1") from None
    if any(not 1 <= b <= 8 for b in bits) or len(set(bits)) != len(bits):
        raise TeacherError(f"{flag} {value!r}: precisions are distinct integers in 1..8")
    return sorted(bits, reverse=True)


def parse_schedule(value, precisions: list[int]) -> dict[int, int]:
    """'2:2000,1:4000' -> {2: 2000, 1: 4000}: the update at which each listed co-training precision joins."""
    if value is None or str(value).strip() == "":
        return {}
    schedule = {}
    for item in str(value).split(","):
        try:
            b, u = (int(x) for x in item.split(":"))
        except ValueError:
            raise TeacherError(f"--co-schedule {value!r}: expected B:U pairs such as 2:2000,1:4000") from None
        if b not in precisions or u < 0:
            raise TeacherError(f"--co-schedule {value!r}: {b} is not in --co-precisions {precisions} or {u} < 0")
        schedule[b] = u
    return schedule


def _kd_weight(teacher_path, kd_weight, kd_ctc_weight: float = 0.0) -> float:
    """The distillation weight to use: the default when a teacher is given without one; a teacher with weight
    0 is ignored, and the log says so."""
    if kd_weight is None:
        if teacher_path:
            logger.info("fairseq_quant: --teacher-path %s without --kd-weight: distilling with --kd-weight %g",
                        teacher_path, DEFAULT_KD_WEIGHT)
            return DEFAULT_KD_WEIGHT
        return 0.0
    if teacher_path and kd_weight == 0 and not kd_ctc_weight:
        logger.warning("fairseq_quant: --teacher-path %s is not used: --kd-weight 0 disables distillation",
                       teacher_path)
    return kd_weight


def _unwrap(model):
    """The model inside fairseq's data-parallel wrappers (a proxy around a DistributedDataParallel)."""
    while isinstance(getattr(model, "module", None), torch.nn.Module):
        model = model.module
    return model


def load_teacher(path: str, task):
    """Load an fp32 teacher checkpoint for distillation (eval mode, frozen)."""
    if not os.path.isfile(path):
        raise TeacherError(f"teacher checkpoint not found: {path}")
    try:
        models, _ = checkpoint_utils.load_model_ensemble([path], task=task)
    except Exception as err:  # fairseq raises many kinds here; name the file in one message
        raise TeacherError(f"cannot load teacher checkpoint {path}: {type(err).__name__}: {err}") from err
    teacher = models[0]
    if len(teacher.decoder.dictionary) != len(task.target_dictionary):
        raise TeacherError(f"teacher {path} has a {len(teacher.decoder.dictionary)}-token vocabulary, "
                           f"the task has {len(task.target_dictionary)}")
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    logger.info("fairseq_quant: distilling from %s (%d parameters)", path, sum(p.numel() for p in teacher.parameters()))
    return teacher
