"""WER evaluation of any fairseq speech checkpoint (fp32 or quant_*): beam search with fairseq's
SequenceGenerator, SentencePiece detokenisation, and WER over a whole subset with jiwer
(total substitutions + deletions + insertions / total reference words).

Writes, per subset, ``{subset}.ref`` / ``{subset}.hyp`` (sclite trn lines ``TEXT (ID)``) and
``{subset}.utt.tsv`` (per utterance: words, substitutions, deletions, insertions, reference, hypothesis),
and for the run ``wer.json`` and ``wer.md``.
"""
import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import sentencepiece as spm
import torch
from fairseq import checkpoint_utils, utils
from fairseq.sequence_generator import EnsembleModel, SequenceGenerator
from tqdm import tqdm

from fairseq_quant_runtime.ctc import CTCPrefixScorer, joint_scores, pre_beam_size
from fairseq_quant_runtime.decoding import DEFAULT_CTC_WEIGHT, DecodingConfig  # noqa: F401  (re-exported)
from fairseq_quant_runtime.files import atomic_write
from fairseq_quant_runtime.wer import corpus_wer, format_utterances, utterance_errors, word_error_rate  # noqa: F401

logger = logging.getLogger(__name__)


@dataclass
class SubsetResult:
    subset: str
    utterances: int
    words: int
    substitutions: int
    deletions: int
    insertions: int
    wer: float  # percent
    seconds: float


def atomic_write_text(path: Path, text: str) -> None:
    """Write to a temporary name in the same directory, then rename: never a half-written file."""
    atomic_write(path, text)


def find_spm_model(data_dir: Path) -> Path:
    found = sorted(Path(data_dir).glob("spm*.model"))
    if len(found) != 1:
        raise FileNotFoundError(f"expected exactly one SentencePiece model spm*.model in {data_dir}, found "
                                f"{[p.name for p in found]}; pass --spm-model")
    return found[0]


def load_checkpoint(checkpoint: Path, data_dir: Path, with_cfg: bool = False):
    """(model, task) from a fairseq checkpoint, with the data directory overridden (and its config too)."""
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise FileNotFoundError(f"checkpoint not found: {checkpoint}")
    try:
        models, _cfg, task = checkpoint_utils.load_model_ensemble_and_task(
            [str(checkpoint)], arg_overrides={"data": str(data_dir)})
    except (RuntimeError, EOFError, KeyError) as err:
        raise RuntimeError(f"cannot load checkpoint {checkpoint}: {type(err).__name__}: {err}") from err
    model = models[0]
    model.eval()
    return (model, task, _cfg) if with_cfg else (model, task)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


_DEFAULT = DecodingConfig()  # one set of decoding defaults for every decoder (fairseq_quant_runtime.decoding)


def has_ctc_head(model) -> bool:
    return hasattr(model, "ctc_proj") and hasattr(model, "ctc_output")


class JointCTCModel(EnsembleModel):
    """fairseq's single-model EnsembleModel whose step scores are joint CTC/attention scores (ESPnet's
    one-pass joint decoding, with the prefix scorer of :mod:`fairseq_quant_runtime.ctc`, the same as the
    on-device runtime's): ``(1 - w) * log p_att(c | h) + w * (ctc(h + c) - ctc(h))`` for each hypothesis's
    ``pre_beam`` best tokens under the attention decoder (and EOS), -inf for the rest. fairseq's
    SequenceGenerator keeps the rest of beam search (candidates, EOS, length normalisation)."""

    def __init__(self, model, weight: float, pre_beam: int):
        super().__init__([model])
        if not 0.0 < weight <= 1.0:
            raise ValueError(f"the CTC weight of joint decoding must be in (0, 1], got {weight}")
        self.weight, self.pre_beam = weight, pre_beam
        self._reset()

    def _reset(self):
        self._log_probs = self._scorer = self._state = self._cands = self._order = None

    def forward_encoder(self, net_input):
        self._reset()
        encoder_outs = super().forward_encoder(net_input)
        ctc = self.single_model.ctc_output(encoder_outs[0])
        lprobs = torch.log_softmax(ctc["ctc_logits"].float(), dim=-1).transpose(0, 1)  # B x T x V
        mask = ctc["encoder_padding_mask"]
        lengths = (~mask).sum(0) if mask is not None else torch.full((lprobs.size(0),), lprobs.size(1))
        self._log_probs = (lprobs.cpu().numpy(), lengths.cpu().numpy())
        return encoder_outs

    def reorder_encoder_out(self, encoder_outs, new_order):
        order = new_order.cpu().numpy()
        if self._scorer is None:  # the first call repeats each utterance per beam
            lprobs, lengths = self._log_probs
            d = self.single_model.decoder.dictionary
            self._scorer = CTCPrefixScorer(lprobs[order], lengths[order], blank=d.pad(), eos=d.eos())
            self._state = self._scorer.initial_state()
        else:  # the rows of the next step: their tokens are known at the next forward_decoder
            self._order = order
            self._scorer = self._scorer.take(order)
        return super().reorder_encoder_out(encoder_outs, new_order)

    def forward_decoder(self, tokens, encoder_outs, incremental_states, temperature: float = 1.0):
        att, attn = super().forward_decoder(tokens, encoder_outs, incremental_states, temperature)
        if self._order is not None:
            self._state = CTCPrefixScorer.select(self._cands, self._order, tokens[:, -1].cpu().numpy())
            self._order = None
        eos = self.single_model.decoder.dictionary.eos()
        scores, self._cands = joint_scores(att.float().cpu().numpy(), self._scorer, self._state, tokens.size(1) - 1,
                                           tokens[:, -1].cpu().numpy(), self.weight, self.pre_beam, keep=(eos,))
        return torch.from_numpy(scores).to(att), attn


def sequence_generator(model, task, config: DecodingConfig) -> SequenceGenerator:
    """fairseq's beam search for ``config``: joint CTC/attention scores when the model has a CTC head (and the
    config's CTC weight is not 0), the attention decoder's alone otherwise; the runtime decodes the same way."""
    weight = config.joint_weight(has_ctc_head(model))
    scored = JointCTCModel(model, weight, pre_beam=pre_beam_size(config.beam)) if weight > 0 else [model]
    return SequenceGenerator(scored, task.target_dictionary, beam_size=config.beam, max_len_a=config.max_len_a,
                             max_len_b=config.max_len_b, len_penalty=config.len_penalty)


def decode_subset(model, task, subset: str, sp, beam: int = _DEFAULT.beam, max_tokens: int = 60000,
                  max_len_b: int = _DEFAULT.max_len_b, progress: bool = True, device: str = "cpu",
                  max_len_a: float = _DEFAULT.max_len_a, samples=None, ctc_weight: float | None = None,
                  len_penalty: float = _DEFAULT.len_penalty) -> list[tuple[str, str, str]]:
    """[(utterance id, reference, hypothesis)] for every utterance of ``subset``, in manifest order.

    The decoding options are :class:`~fairseq_quant_runtime.decoding.DecodingConfig`'s, validated there:
    ``ctc_weight`` is the weight of joint CTC/attention decoding when the model has a CTC head (default
    DEFAULT_CTC_WEIGHT; 0: the attention decoder alone); a model without a CTC head decodes attention-only.

    ``samples``: the subset's batches, already built (a caller that decodes it many times keeps them).

    Hypotheses stop at ``max_len_a * frames + max_len_b`` tokens (frames of 10 ms): with ``max_len_a``
    set, a model that has not learnt to stop does not decode every utterance to the absolute limit."""
    config = DecodingConfig(beam=beam, ctc_weight=ctc_weight, max_len_a=max_len_a, max_len_b=max_len_b,
                            len_penalty=len_penalty)
    generator = sequence_generator(model, task, config)
    task.load_dataset(subset)
    dataset = task.dataset(subset)
    manifest = json.loads((Path(task.args.data) / f"{subset}.json").read_text())["utts"]
    itr = samples if samples is not None else task.get_batch_iterator(
        dataset=dataset, max_tokens=max_tokens, max_positions=(1e9, 1e9),
        ignore_invalid_inputs=False).next_epoch_itr(shuffle=False)
    hyps: dict[str, str] = {}
    bar = tqdm(total=len(dataset), desc=f"decode {subset}", unit="utt", disable=not progress, leave=False)
    with torch.no_grad():
        for sample in itr:
            sample = utils.move_to_cuda(sample) if device.startswith("cuda") else sample
            outputs = generator.generate([model], sample)
            for index, out in zip(sample["id"].tolist(), outputs):
                pieces = task.target_dictionary.string(out[0]["tokens"].int().cpu())
                hyps[dataset.ids[index]] = sp.decode_pieces(pieces.split()).strip() if pieces else ""
            bar.update(len(outputs))
    bar.close()
    return [(utt, manifest[utt]["output"]["text"].strip(), hyps[utt]) for utt in manifest]


def model_size(model) -> dict:
    """Average weight bits and MB (packed integers plus scales; fp32 parameters at 4 bytes)."""
    from .quant import build_report

    report = build_report(model)  # as the model runs now (a co-trained one at its current precisions)
    return {"avg_weight_bits": round(report.avg_weight_bits, 4), "model_mb": round(report.quant_mb, 6)}


def evaluate(checkpoint, data_dir, subsets, out_dir, beam: int = _DEFAULT.beam, spm_model=None, max_tokens: int = 60000,
             max_len_b: int = _DEFAULT.max_len_b, progress: bool = True, device: str | None = None,
             max_len_a: float = _DEFAULT.max_len_a, dynamic_int8: bool = False, ctc_weight: float | None = None,
             len_penalty: float = _DEFAULT.len_penalty) -> list[SubsetResult]:
    """WER of ``checkpoint`` on each subset; ``device`` defaults to CUDA when there is one. A model with a CTC
    head decodes jointly with it (``ctc_weight``, default DEFAULT_CTC_WEIGHT; 0: the attention decoder alone).
    The decoding options are validated before the checkpoint is loaded (DecodingConfig).

    ``dynamic_int8``: decode with torch's dynamic int8 Linear layers instead (a baseline; CPU only)."""
    config = DecodingConfig(beam=beam, ctc_weight=ctc_weight, max_len_a=max_len_a, max_len_b=max_len_b,
                            len_penalty=len_penalty)
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    device = device or default_device()
    sp = spm.SentencePieceProcessor(model_file=str(spm_model or find_spm_model(data_dir)))
    model, task = load_checkpoint(checkpoint, data_dir)
    if dynamic_int8:
        from .baselines import dynamic_int8 as to_dynamic_int8

        if device != "cpu":
            raise ValueError("dynamic int8 quantization runs on CPU only: pass --device cpu")
        model, report = to_dynamic_int8(model)
        size = {k: round(report[k], 6) for k in ("avg_weight_bits", "model_mb")}
    else:
        size = model_size(model)
    model.to(device)
    results = []
    for subset in subsets:
        if not (data_dir / f"{subset}.json").is_file():
            raise FileNotFoundError(f"no manifest {data_dir / (subset + '.json')}; prepared subsets: "
                                    f"{sorted(p.stem for p in data_dir.glob('*.json'))}")
        start = time.perf_counter()
        rows = decode_subset(model, task, subset, sp, max_tokens=max_tokens, progress=progress, device=device,
                             **config.to_dict())
        seconds = time.perf_counter() - start
        utts = utterance_errors(rows)
        scores = corpus_wer(utts)
        atomic_write_text(out_dir / f"{subset}.ref", "".join(f"{r} ({u})\n" for u, r, _ in rows))
        atomic_write_text(out_dir / f"{subset}.hyp", "".join(f"{h} ({u})\n" for u, _, h in rows))
        atomic_write_text(out_dir / f"{subset}.utt.tsv", format_utterances(rows, utts))
        results.append(SubsetResult(subset, len(rows), scores["words"], scores["substitutions"],
                                    scores["deletions"], scores["insertions"], round(scores["wer"], 2),
                                    round(seconds, 1)))
        logger.info("%s: WER %.2f%% over %d words", subset, scores["wer"], scores["words"])
    joint = config.joint_weight(has_ctc_head(model))
    summary = {"checkpoint": str(checkpoint), **config.to_dict(), "ctc_weight": joint, "dynamic_int8": dynamic_int8, **size,
               "results": [asdict(r) for r in results]}
    atomic_write_text(out_dir / "wer.json", json.dumps(summary, indent=2) + "\n")
    atomic_write_text(out_dir / "wer.md", format_table(results))
    return results


def format_table(results: list[SubsetResult]) -> str:
    lines = ["| subset | utterances | words | sub | del | ins | WER % |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r.subset} | {r.utterances} | {r.words} | {r.substitutions} | {r.deletions} | "
                     f"{r.insertions} | {r.wer:.2f} |")
    return "\n".join(lines) + "\n"
