"""The measurements of a search, on a fairseq checkpoint: each is a *task* (a JSON-able dict) that a worker
process (local or a Ray task) runs with :func:`run_task`, returning a JSON-able result with its own cost.

Task kinds:

- ``costs``: every unit's weight elements, bytes and squared quantization error at every width;
- ``proxy``: Hutchinson Hessian traces and empirical Fisher traces per unit (fp32 model, training batches);
- ``eval``: a strategy applied post-training, activation ranges calibrated on the first training batches (the
  calibration phase of ``scripts/calibrate.py``), then the teacher-forced loss on the dev subset and (``decode``) the dev WER by beam
  search with fairseq's SequenceGenerator, per utterance. With a co-trained checkpoint (config ``co_trained``)
  the strategy's weight bits instead choose each module's precision of the co-trained model (its own
  activation ranges, nothing calibrated or retrained).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

_EVALUATORS: dict[str, "Evaluator"] = {}


class Evaluator:
    """Holds what every task of one search shares: paths, decoding settings, calibration batches."""

    def __init__(self, config: dict):
        import logging
        import warnings

        import fairseq_quant  # noqa: F401  (registers the quant_ models with fairseq)

        for name in ("fairseq", "fairseq_quant", "examples"):
            logging.getLogger(name).setLevel(logging.WARNING)  # one line per measurement comes from the driver
        warnings.filterwarnings("ignore")
        self.config = config
        torch.set_num_threads(int(config.get("threads", 1)))
        self.checkpoint = Path(config["checkpoint"])
        self.data = Path(config["data"])
        self._state = self._task = None
        self._co = None  # (model, task) of the co-trained checkpoint
        self._batches: dict = {}

    # -- models (the checkpoint, task and batches are loaded once per worker) ----------------------------
    def _setup(self):
        if self._state is None:
            from fairseq import checkpoint_utils, tasks

            if not self.checkpoint.is_file():
                raise FileNotFoundError(f"checkpoint not found: {self.checkpoint}")
            self._state = checkpoint_utils.load_checkpoint_to_cpu(str(self.checkpoint), {"data": str(self.data)})
            self._task = tasks.setup_task(self._state["cfg"].task)
        return self._state, self._task

    def _build(self, model_cfg):
        state, task = self._setup()
        model = task.build_model(model_cfg)
        model.load_state_dict(state["model"], strict=True, model_cfg=model_cfg)
        model.eval()
        return model

    def fp32_model(self):
        import copy

        state, task = self._setup()
        return self._build(copy.deepcopy(state["cfg"].model)), task

    def quant_model(self, strategy_dict: dict):
        """The checkpoint's weights quantized post-training with the strategy, activation ranges calibrated on the
        first training batches (as ``scripts/calibrate.py`` writes it); with a co-trained checkpoint, that model at
        the strategy's weight bits."""
        from ..baselines import quantized_model_cfg
        from ..calibration import calibrate_model
        from ..quant import Strategy

        strategy = Strategy.from_dict(strategy_dict, source="search")
        if self.config.get("co_trained"):
            return (*self.co_trained_model(strategy), 0)
        state, task = self._setup()
        model = self._build(quantized_model_cfg(state["cfg"].model, strategy, self.checkpoint))
        batches = self.calibration_batches(task)
        if batches:  # the calibration phase of scripts/calibrate.py, on training batches, never on the dev set
            calibrate_model(model, batches)
        return model, task, len(batches)

    def _co_trained(self):
        """(model, task) of the co-trained checkpoint, loaded once per worker."""
        if self._co is None:
            from ..evaluate import load_checkpoint

            self._co = load_checkpoint(Path(self.config["co_trained"]), self.data)
        return self._co

    def co_trained_model(self, strategy):
        """The co-trained model (loaded once) with each module at the precision the strategy gives its weights; a
        module the strategy leaves in float (the other units of a one-unit sensitivity pass) runs at its highest
        co-trained precision: a co-trained model has no float weights."""
        from ..quant.coprecision import weight_quantizers

        model, task = self._co_trained()
        quantizers = weight_quantizers(model)
        strategy = strategy.bind(quantizers)
        for name, q in quantizers.items():
            bits = strategy.spec_for(name).weight_bits
            if bits is None:
                bits = max(q.precisions)
            if bits not in q.precisions:
                raise ValueError(f"{name}: {bits}-bit weights are not a precision of the co-trained checkpoint "
                                 f"{self.config['co_trained']} ({q.precisions}); search over --bits among them")
            q.active_bits = bits
        return model, task

    # -- data -----------------------------------------------------------------------------------------
    def batches(self, task, subset: str, limit: int | None = None, shuffle: bool = False,
                max_sentences: int | None = 16):
        """The first ``limit`` batches of ``subset`` (features computed once and kept)."""
        key = (subset, limit, shuffle, max_sentences)
        if key in self._batches:
            return self._batches[key]
        task.load_dataset(subset)
        dataset = task.dataset(subset)
        itr = task.get_batch_iterator(dataset=dataset, max_tokens=60000, max_sentences=max_sentences,
                                      max_positions=(1e9, 1e9), ignore_invalid_inputs=False,
                                      seed=int(self.config.get("seed", 0))).next_epoch_itr(shuffle=shuffle)
        out = []
        for sample in itr:
            out.append(sample)
            if limit is not None and len(out) >= limit:
                break
        self._batches[key] = out
        return out

    def calibration_batches(self, task):
        n = int(self.config.get("calib_batches", 4))
        return self.batches(task, self.config.get("calib_subset", "train"), n, shuffle=True) if n else []

    # -- tasks ----------------------------------------------------------------------------------------
    def run(self, task: dict) -> dict:
        start = time.perf_counter()
        torch.manual_seed(int(self.config.get("seed", 0)))
        kind = task["kind"]
        if kind == "costs":
            out = self._costs(task)
        elif kind == "proxy":
            out = self._proxy(task)
        elif kind == "eval":
            out = self._eval(task)
        else:
            raise ValueError(f"unknown task kind {kind!r}")
        out["seconds"] = round(time.perf_counter() - start, 3)
        return out

    def _costs(self, task):
        from .space import model_units, unit_costs

        model, _ = self.fp32_model()
        units = model_units(model, task["unit"])
        costs = unit_costs(lambda: self.fp32_model()[0], units, task["bits"], task["act_bits"],
                           task.get("weight_method", "lsq"))
        out = {"units": [[u.name, list(u.modules)] for u in units], "costs": costs.to_dict()}
        if task.get("co_widths"):  # each unit's widths: those every module of it was co-trained at
            from ..quant.coprecision import weight_quantizers
            from ..quant.strategy import enclosing_scopes

            quantizers = weight_quantizers(self._co_trained()[0])
            out["widths"] = {u.name: [b for b in task["bits"]
                                      if all(b in q.precisions for name, q in quantizers.items()
                                             if set(enclosing_scopes(name)) & set(u.modules))]
                             for u in units}
        return out

    def _proxy(self, task):
        from .proxy import fisher_traces, hutchinson_traces

        model, ftask = self.fp32_model()
        model.eval()  # no dropout: the loss is a deterministic function of the weights
        batches = self.batches(ftask, self.config.get("calib_subset", "train"), task["batches"], shuffle=True)
        units = {u: tuple(m) for u, m in task["units"]}

        def mean_loss(m, sample):
            total, tokens = teacher_forced_nll(m, sample)
            return total / tokens

        hessian, hvps = hutchinson_traces(model, mean_loss, batches, units, probes=task["probes"], seed=task["seed"])
        fisher, grads = fisher_traces(model, mean_loss, batches, units)
        return {"hessian_trace": hessian, "fisher_trace": fisher, "hvps": hvps, "grad_passes": grads,
                "batches": len(batches)}

    def _eval(self, task):
        from ..evaluate import decode_subset, find_spm_model, model_size
        from ..stats import utterance_errors

        subset = self.config["dev_subset"]
        if task.get("strategy") is None:
            model, ftask = self.fp32_model()
            calib = 0
            size = {"avg_weight_bits": 32.0, "model_mb": model_size(model)["model_mb"]}
        else:
            model, ftask, calib = self.quant_model(task["strategy"])
            size = model_size(model)
        model.eval()
        total, tokens = 0.0, 0
        with torch.no_grad():
            for sample in self.batches(ftask, subset):
                t, n = teacher_forced_nll(model, sample)
                total, tokens = total + float(t), tokens + n
        out = {"loss": total / tokens, "tokens": tokens, "tf_passes": 1, "calib_batches": calib, "decodes": 0, **size}
        if task.get("decode"):
            import sentencepiece as spm

            sp = spm.SentencePieceProcessor(model_file=str(find_spm_model(self.data)))
            rows = decode_subset(model, ftask, subset, sp, beam=int(self.config.get("beam", 5)),
                                 max_len_a=float(self.config.get("max_len_a", 0.2)),
                                 max_len_b=int(self.config.get("max_len_b", 10)), progress=False, device="cpu",
                                 samples=self.batches(ftask, subset, max_sentences=None))  # as evaluate.py batches
            utts = utterance_errors(rows)
            out.update(decodes=1, utts=[[u.utt_id, u.words, u.errors] for u in utts],
                       errors=sum(u.errors for u in utts), words=sum(u.words for u in utts))
            out["wer"] = 100.0 * out["errors"] / out["words"]
        return out


def teacher_forced_nll(model, sample) -> tuple[torch.Tensor, int]:
    """(summed negative log-likelihood, target tokens) of ``sample`` with teacher forcing: of the attention
    decoder, and for a model with a CTC head the weighted sum that joint decoding scores,
    ``(1 - w) * attention NLL + w * CTC NLL`` (w = evaluate.DEFAULT_CTC_WEIGHT)."""
    from ..evaluate import DEFAULT_CTC_WEIGHT
    from .proxy import ctc_nll

    net_output = model(**sample["net_input"])
    lprobs = model.get_normalized_probs(net_output, log_probs=True)
    if not getattr(lprobs, "batch_first", True):
        lprobs = lprobs.transpose(0, 1)
    target = sample["target"]
    d = model.decoder.dictionary
    nll = F.nll_loss(lprobs.reshape(-1, lprobs.size(-1)), target.reshape(-1), ignore_index=d.pad(), reduction="sum")
    extra = net_output[1] if len(net_output) > 1 else None
    if isinstance(extra, dict) and "ctc_logits" in extra:
        # labels come first in each target row (then EOS, then padding); ctc_nll has the second derivative that
        # the Hessian proxy needs
        mask = extra["encoder_padding_mask"]
        logits = extra["ctc_logits"]
        frames = (~mask).long().sum(0) if mask is not None else torch.full((logits.size(1),), logits.size(0))
        labels = ((target != d.pad()) & (target != d.eos())).long().sum(1)
        ctc = ctc_nll(torch.log_softmax(logits.float(), dim=-1), target, frames, labels, blank=d.pad())
        nll = (1 - DEFAULT_CTC_WEIGHT) * nll + DEFAULT_CTC_WEIGHT * ctc
    return nll, int((target != d.pad()).sum())


def run_task(config: dict, task: dict) -> dict:
    """Entry point of a worker (a local process or a Ray task): one evaluator per process and config."""
    key = json.dumps(config, sort_keys=True)
    if key not in _EVALUATORS:
        _EVALUATORS[key] = Evaluator(config)
    return _EVALUATORS[key].run(task)
