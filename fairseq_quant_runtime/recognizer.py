"""Speech recognition from an exported ``.fqm`` model with ONNX Runtime: encoder, batched beam search
(fairseq's ``SequenceGenerator`` rules) and greedy search, in numpy. No torch, no fairseq."""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import sentencepiece as spm

from .ctc import CTCPrefixScorer, joint_scores, pre_beam_size
from .decoding import BATCH_FRAMES, DecodingConfig, length_batches
from .fqm import ModelFile, ModelFileError, read
from .graphs import AUTO_KERNELS, EXACT_AUTO_KERNELS, KERNELS, LOW_BIT_OPS, count_kernels, materialize
from .segment import SegmentConfig, segments


REQUIRED_CONFIG = ("model", "layout", "graphs", "dictionary", "eos", "pad", "unk")


def check_config(config: dict, source: str) -> None:
    missing = [k for k in REQUIRED_CONFIG if k not in config]
    if missing:
        raise ModelFileError(f"{source}: not a VGGTransformer model file (config lacks {', '.join(missing)})")
    if config["model"] != "vggtransformer":
        raise ModelFileError(f"{source}: architecture {config['model']!r}; this runtime decodes 'vggtransformer'")
    layout = config["layout"]
    if len(config["dictionary"]) != layout.get("vocab_size"):
        raise ModelFileError(f"{source}: dictionary of {len(config['dictionary'])} symbols for an output layer "
                             f"of {layout.get('vocab_size')}")


@dataclass
class Hypothesis:
    tokens: list[int]  # without the final EOS
    score: float  # sum of token log-probabilities / length (EOS included)


class Recognizer:
    """Load once, then :meth:`transcribe_features` (batches of fbank matrices) or :meth:`transcribe` (files).

    ``encoder_kernel``/``decoder_kernel``: "fp32" (dequantized float weights, ONNX Runtime's MatMul),
    "nbits" (MatMulNBits low-bit kernels where the grid allows, float activations), "nbits-int8" (the same with
    activations rounded to int8 per block) or "int8" (DynamicQuantizeMatMul: the stored integers as int8 weights,
    activations quantized to uint8 per tensor at run time), or, with exact activations, "int8-static"
    (MatMulIntegerToFloat: the model's own static 8-bit activation grids times the stored integers, in integers).
    ``activations``: "kernel" (no activation quantization in the graph) or "exact" (the QAT model's
    static activation grids, from a file exported with ``--exact-activations``). Measured on a 2-core AVX2 CPU
    without VNNI (2026-12-04, 500 test-clean utterances): MatMulNBits loses to fp32 at this model's widths, while
    int8 ran the encoder 1.37x and the decoder steps up to 1.26x faster under load, but rounds every activation
    to uint8 with a range of its own, which the QAT model never saw (on the shipped reference's searched model
    n.s. on dev, +7.3% relative WER on test). Hence the defaults: ``auto`` for both graphs, the faster of the two kernels that compute the
    model's own function (fp32 and nbits, each timed on a typical call when the model loads; ``self.kernels``
    says which); with exact activations ``auto`` is int8-static where the graph has 8-bit activation grids, without
    timing (its integer products round differently from fp32's sums, and a model that requantizes its activations
    carries such a difference to its transcripts, so a timed choice would make them vary from load to load);
    int8 only when asked for.
    """

    def __init__(self, model: str | os.PathLike | ModelFile, encoder_kernel: str = "auto",
                 decoder_kernel: str = "auto", threads: int = 1, activations: str = "kernel"):
        for kernel in (encoder_kernel, decoder_kernel):
            if kernel not in (*KERNELS, "auto"):
                raise ValueError(f"unknown kernel {kernel!r}; expected one of {(*KERNELS, 'auto')}")
        source = str(model) if not isinstance(model, ModelFile) else "model"
        self.file = model if isinstance(model, ModelFile) else read(model)
        check_config(self.file.config, source)
        cfg = self.file.config
        self.layout = cfg["layout"]
        self.symbols: list[str] = cfg["dictionary"]
        self.eos, self.pad, self.unk = int(cfg["eos"]), int(cfg["pad"]), int(cfg["unk"])
        self.bos = self.eos  # fairseq's SequenceGenerator starts every hypothesis from EOS
        self.n_layers = len(self.layout["decoder_layers"])
        self.convs = [op for op in self.layout["decoder_convs"] if op["op"] == "conv"]
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        providers = ["CPUExecutionProvider"]
        if activations not in ("kernel", "exact"):
            raise ValueError(f"activations must be 'kernel' or 'exact', got {activations!r}")
        suffix = "_actq" if activations == "exact" else ""
        if suffix and "encoder_actq" not in cfg["graphs"]:
            raise ModelFileError(f"{source}: exported without --exact-activations (no activation-quantized graphs)")
        self.feature_dim = self.layout["in_channels"] * self.layout["input_dim"]

        # the decoder step runs on one thread: its matrices are a few rows, and splitting them made the steps
        # slower here (2 threads: 4.31 s against 3.73 s for the same 1000 utterances)
        step_options = ort.SessionOptions()
        step_options.intra_op_num_threads = 1
        step_options.inter_op_num_threads = 1
        step_options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL

        self.kernels = {}
        if not suffix and "int8-static" in (encoder_kernel, decoder_kernel):
            raise ValueError("kernel int8-static multiplies the model's own activation grids in integers: decode with "
                             "--activations exact (Recognizer(activations='exact')), from a file exported with "
                             "--exact-activations")
        for graph, kernel in (("encoder", encoder_kernel), ("decoder", decoder_kernel)):
            # exact activations: auto is the first of EXACT_AUTO_KERNELS that applies (int8-static wherever a linear
            # layer's input has an 8-bit grid, else fp32), not timed
            auto = EXACT_AUTO_KERNELS if suffix else AUTO_KERNELS
            candidates = []
            for k in (auto if kernel == "auto" else (kernel,)):
                proto = materialize(self.file, graph + suffix, k)
                if kernel == "auto" and k != "fp32" and not set(count_kernels(proto)) & LOW_BIT_OPS:
                    continue  # no weight this kernel can take (an fp32 export): the fp32 graph again, nothing to time
                candidates.append((k, proto))
                if kernel == "auto" and suffix:
                    break
            opts = options if graph == "encoder" else step_options
            best = None  # (seconds, kernel, proto, session): the fastest so far; the others are freed at once,
            for k, proto in candidates:  # so that at most two sessions of a graph are alive (peak memory)
                sess = ort.InferenceSession(proto.SerializeToString(), opts, providers=providers)
                seconds = self._time(graph, k, sess) if len(candidates) > 1 else 0.0
                if best is None or seconds < best[0]:
                    best = (seconds, k, proto, sess)
                del proto, sess
            _, self.kernels[graph], proto, sess = best
            setattr(self, f"{graph}_graph", proto)
            setattr(self, graph, sess)
        self.decoder_inputs = [i.name for i in self.decoder.get_inputs()]
        self.decoder_outputs = [o.name for o in self.decoder.get_outputs()]
        self.sp = spm.SentencePieceProcessor(model_proto=self.file.blobs["spm.model"])

    def _time(self, graph: str, kernel: str, sess) -> float:
        """Median seconds of a typical call of ``sess`` (``graph`` with ``kernel``; ``auto``)."""
        feed = self._typical_feed(graph, sess)
        times = []
        for _ in range(7):
            start = time.perf_counter()
            sess.run(None, feed)
            times.append(time.perf_counter() - start)
        return float(np.median(times[2:]))

    def _typical_feed(self, graph: str, sess) -> dict[str, np.ndarray]:
        """Inputs of a typical call: the encoder on 2 x 4 s of audio, the decoder step for 10 hypotheses
        (2 utterances, beam 5) over 100 encoder frames with 10 cached steps."""
        rng = np.random.default_rng(0)
        if graph == "encoder":
            feed = {"features": rng.standard_normal((2, 400, self.feature_dim), dtype=np.float32),
                    "lengths": np.array([400, 380], dtype=np.int64)}
        else:
            heads, dim = self.layout["heads"], self.layout["embed_dim"] // self.layout["heads"]
            feed = {}
            for inp in sess.get_inputs():
                if inp.name == "tokens":
                    feed[inp.name] = np.full(10, self.eos, dtype=np.int64)
                elif inp.name == "enc_bias":
                    feed[inp.name] = np.zeros((10, 100), np.float32)
                elif inp.name.startswith("cross"):
                    feed[inp.name] = rng.standard_normal((10, heads, 100, dim), dtype=np.float32)
                elif inp.name.startswith("self"):
                    feed[inp.name] = rng.standard_normal((10, heads, 10, dim), dtype=np.float32)
                else:
                    op = self.convs[int(inp.name.split("_")[1])]
                    feed[inp.name] = np.zeros((10, op["kernel"] - 1, op["in"]), np.float32)
        return feed

    # ------------------------------------------------------------------------------------------
    def encode(self, features: list[np.ndarray]) -> dict[str, np.ndarray]:
        """Pad a batch of [frames, 80] matrices with zeros (as fairseq's collater does) and run the encoder."""
        for f in features:
            if f.ndim != 2 or f.shape[1] != self.feature_dim:
                raise ValueError(f"features must be [frames, {self.feature_dim}], got {list(f.shape)}")
        lengths = np.array([f.shape[0] for f in features], dtype=np.int64)
        batch = np.zeros((len(features), int(lengths.max()), self.feature_dim), dtype=np.float32)
        for i, f in enumerate(features):
            batch[i, : f.shape[0]] = f
        names = [o.name for o in self.encoder.get_outputs()]
        return dict(zip(names, self.encoder.run(None, {"features": batch, "lengths": lengths})))

    def _initial_state(self, n: int) -> dict[str, np.ndarray]:
        heads, dim = self.layout["heads"], self.layout["embed_dim"] // self.layout["heads"]
        state = {f"conv_{i}": np.zeros((n, op["kernel"] - 1, op["in"]), np.float32) for i, op in enumerate(self.convs)}
        for i in range(self.n_layers):
            state[f"self_k_{i}"] = np.zeros((n, heads, 0, dim), np.float32)
            state[f"self_v_{i}"] = np.zeros((n, heads, 0, dim), np.float32)
        return state

    def _step(self, tokens: np.ndarray, enc: dict, state: dict) -> tuple[np.ndarray, dict]:
        feed = {"tokens": tokens.astype(np.int64), **{k: enc[k] for k in enc}, **state}
        outputs = self.decoder.run(None, {name: feed[name] for name in self.decoder_inputs})
        new_state = {name.removesuffix("_out"): value for name, value in zip(self.decoder_outputs[1:], outputs[1:])}
        return outputs[0], new_state

    @staticmethod
    def _take(arrays: dict, rows: np.ndarray) -> dict:
        return {k: np.take(v, rows, axis=0) for k, v in arrays.items()}

    def max_len(self, frames: int, max_len_a: float, max_len_b: int) -> int:
        return int(max_len_a * frames + max_len_b)

    # ------------------------------------------------------------------------------------------
    @property
    def has_ctc(self) -> bool:
        return bool(self.layout.get("ctc"))

    def _ctc_weight(self, ctc_weight: float | None, beam: int = 5) -> float:
        return DecodingConfig(beam=max(beam, 2), ctc_weight=ctc_weight).joint_weight(self.has_ctc)

    def beam_search(self, features: list[np.ndarray], beam: int = 5, max_len_a: float = 0.2,
                    max_len_b: int = 10, len_penalty: float = 1.0, ctc_weight: float | None = None) -> list[Hypothesis]:
        """Best hypothesis per utterance, by fairseq's beam search: 2*beam candidates per step, EOS among the
        first ``beam`` candidates finalises a hypothesis (score normalised by its length), a sentence is done
        when it has ``beam`` finalised hypotheses; finished sentences leave the batch.

        With a CTC head (``ctc_weight`` > 0; default DEFAULT_CTC_WEIGHT for such models) the step scores are
        joint CTC/attention scores (:func:`fairseq_quant_runtime.ctc.joint_scores`), as fairseq_quant.evaluate's."""
        weight = self._ctc_weight(ctc_weight, beam)
        bsz = len(features)
        enc = self.encode(features)
        max_len = self.max_len(max(f.shape[0] for f in features), max_len_a, max_len_b)
        vocab = self.layout["vocab_size"]
        rows = np.repeat(np.arange(bsz), beam)
        enc = self._take(enc, rows)
        ctc = None
        if weight > 0:
            scorer = CTCPrefixScorer(enc.pop("ctc_log_probs"), (enc["enc_bias"] == 0).sum(axis=1),
                                     blank=self.pad, eos=self.eos)
            ctc = [scorer, scorer.initial_state(), None]  # scorer, state of each row, last step's candidates
        else:
            enc.pop("ctc_log_probs", None)
        state = self._initial_state(bsz * beam)
        tokens = np.full((bsz * beam, 1), self.bos, dtype=np.int64)
        scores = np.zeros((bsz * beam,), dtype=np.float32)
        finalized: list[list[Hypothesis]] = [[] for _ in range(bsz)]
        active = list(range(bsz))  # original sentence index of each remaining batch slot
        for step in range(max_len + 1):
            lprobs, state = self._step(tokens[:, -1], enc, state)
            lprobs = lprobs.astype(np.float32)
            if ctc is not None:
                lprobs, ctc[2] = joint_scores(lprobs, ctc[0], ctc[1], step, tokens[:, -1], weight,
                                              pre_beam_size(beam), keep=(self.eos,))
            lprobs[np.isnan(lprobs)] = -math.inf
            lprobs[:, self.pad] = -math.inf
            if step >= max_len:
                lprobs[:, : self.eos] = -math.inf
                lprobs[:, self.eos + 1:] = -math.inf
            if step < 1:  # min_len 1
                lprobs[:, self.eos] = -math.inf
            n_sent = len(active)
            lp = lprobs.reshape(n_sent, beam, vocab)
            if step == 0:
                cand = lp[:, 0, :]
            else:
                cand = (lp + scores.reshape(n_sent, beam, 1)).reshape(n_sent, beam * vocab)
            k = min(2 * beam, cand.shape[1] - 1)
            # top-k in descending order; ties broken by lower index, as torch.topk on CPU
            order = np.argsort(-cand, axis=1, kind="stable")[:, :k]
            cand_scores = np.take_along_axis(cand, order, axis=1)
            cand_tokens = order % vocab
            cand_beams = order // vocab if step > 0 else np.zeros_like(order)
            eos_mask = (cand_tokens == self.eos) & (cand_scores != -math.inf)
            finished_now = []
            for s in range(n_sent):
                for c in range(beam):
                    if eos_mask[s, c] and len(finalized[active[s]]) < beam:
                        row = s * beam + cand_beams[s, c]
                        finalized[active[s]].append(Hypothesis(
                            tokens[row, 1:].tolist(), float(cand_scores[s, c]) / (step + 1) ** len_penalty))
                if len(finalized[active[s]]) == beam or step == max_len:
                    finished_now.append(s)
            if step == max_len or len(finished_now) == n_sent:
                break
            # the first `beam` candidates that are not EOS continue
            keep_slots = [s for s in range(n_sent) if s not in finished_now]
            new_rows, new_tokens, new_scores = [], [], []
            for s in keep_slots:
                picks = [c for c in range(k) if not eos_mask[s, c]][:beam]
                for c in picks:
                    new_rows.append(s * beam + cand_beams[s, c])
                    new_tokens.append(cand_tokens[s, c])
                    new_scores.append(cand_scores[s, c])
            new_rows = np.array(new_rows, dtype=np.int64)
            tokens = np.concatenate([tokens[new_rows], np.array(new_tokens, dtype=np.int64)[:, None]], axis=1)
            scores = np.array(new_scores, dtype=np.float32)
            state = self._take(state, new_rows)
            if ctc is not None:
                ctc[1] = CTCPrefixScorer.select(ctc[2], new_rows, tokens[:, -1])
            if finished_now:
                slot_rows = np.concatenate([np.arange(s * beam, (s + 1) * beam) for s in keep_slots])
                enc = self._take(enc, slot_rows)
                if ctc is not None:
                    ctc[0] = ctc[0].take(slot_rows)
            active = [active[s] for s in keep_slots]
        return [max(hyps, key=lambda h: h.score) if hyps else Hypothesis([], -math.inf) for hyps in finalized]

    def greedy_search(self, features: list[np.ndarray], max_len_a: float = 0.2, max_len_b: int = 10) -> list[Hypothesis]:
        """Most probable token at every step until EOS (one decoder row per utterance)."""
        bsz = len(features)
        enc = self.encode(features)
        enc.pop("ctc_log_probs", None)  # greedy search is the attention decoder's alone
        max_len = self.max_len(max(f.shape[0] for f in features), max_len_a, max_len_b)
        state = self._initial_state(bsz)
        last = np.full((bsz,), self.bos, dtype=np.int64)
        out: list[list[int]] = [[] for _ in range(bsz)]
        total = np.zeros(bsz)
        done = np.zeros(bsz, dtype=bool)
        for step in range(max_len + 1):
            lprobs, state = self._step(last, enc, state)
            lprobs[:, self.pad] = -math.inf
            if step < 1:
                lprobs[:, self.eos] = -math.inf
            if step >= max_len:
                lprobs[:, : self.eos] = -math.inf
                lprobs[:, self.eos + 1:] = -math.inf
            last = lprobs.argmax(axis=1)
            for i in np.flatnonzero(~done):
                total[i] += lprobs[i, last[i]]
                if last[i] == self.eos:
                    done[i] = True
                    total[i] /= len(out[i]) + 1
                else:
                    out[i].append(int(last[i]))
            if done.all():
                break
        return [Hypothesis(tokens, float(score)) for tokens, score in zip(out, total)]

    # ------------------------------------------------------------------------------------------
    def text(self, tokens: list[int]) -> str:
        pieces = [self.symbols[t] for t in tokens if t not in (self.eos, self.pad)]
        return self.sp.decode_pieces(pieces).strip() if pieces else ""

    def transcribe_features(self, features: list[np.ndarray], beam: int = 5, ctc_weight: float | None = None,
                            **kwargs) -> list[str]:
        """Transcripts of feature matrices; the options are :class:`~.decoding.DecodingConfig`'s (validated)."""
        return self.decode(features, DecodingConfig(beam=beam, ctc_weight=ctc_weight, **kwargs))

    def decode(self, features: list[np.ndarray], config: DecodingConfig) -> list[str]:
        """Transcripts of feature matrices with ``config``: greedy search at beam 1, else beam search (joint
        CTC/attention with the model's CTC head unless ``config.ctc_weight`` is 0)."""
        if config.beam == 1:
            hyps = self.greedy_search(features, max_len_a=config.max_len_a, max_len_b=config.max_len_b)
        else:
            hyps = self.beam_search(features, config.beam, max_len_a=config.max_len_a, max_len_b=config.max_len_b,
                                    len_penalty=config.len_penalty, ctc_weight=config.ctc_weight)
        return [self.text(h.tokens) for h in hyps]

    def transcribe(self, paths: list[str | os.PathLike], beam: int = 5, **kwargs) -> list[str]:
        """Transcripts of audio files (long ones in segments); the options are DecodingConfig's."""
        return self.transcribe_batch([Path(p) for p in paths], DecodingConfig(beam=beam, **kwargs))

    def transcribe_samples(self, samples, sample_rate: int, config: DecodingConfig | None = None,
                           segment: SegmentConfig | None = None) -> str:
        """The transcript of samples an application holds: floats in [-1, 1] or int16 PCM, mono or [samples,
        channels], at any ``sample_rate`` (resampled to 16 kHz); long inputs are decoded in segments."""
        return self.transcribe_batch([(samples, sample_rate)], config, segment)[0]

    def transcribe_batch(self, inputs: list, config: DecodingConfig | None = None,
                         segment: SegmentConfig | None = None, batch_frames: int = BATCH_FRAMES) -> list[str]:
        """Transcripts of several inputs (audio file paths, or ``(samples, sample_rate)`` pairs), decoded together
        in batches of up to ``batch_frames`` padded 10 ms frames. An input longer than ``segment.max_seconds`` is
        cut at its quiet frames (:mod:`.segment`) and its segments' transcripts are joined: time linear in its
        length, memory bounded by the segment length."""
        from .audio import apply_mv_norm, fbank, prepare_samples, read_audio

        config = config or DecodingConfig()
        segment = segment or SegmentConfig()
        pieces = []  # (input index, features) for every segment of every input, in order
        for i, item in enumerate(inputs):
            if isinstance(item, tuple):
                samples = prepare_samples(item[0], item[1], name=f"input {i}")
            else:
                samples = read_audio(item)
            for start, end in segments(samples, segment):
                pieces.append((i, apply_mv_norm(fbank(samples[start:end]))))
        texts = [""] * len(pieces)
        for batch in length_batches([feats.shape[0] for _, feats in pieces], batch_frames):
            for j, text in zip(batch, self.decode([pieces[j][1] for j in batch], config)):
                texts[j] = text
        joined = [[] for _ in inputs]
        for (i, _), text in zip(pieces, texts):
            if text:
                joined[i].append(text)
        return [" ".join(t) for t in joined]


__all__ = ["Hypothesis", "Recognizer", "check_config"]
