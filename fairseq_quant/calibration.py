"""The calibration phase of a fairseq checkpoint: prepare -> calibrate -> evaluate, export or fine-tune.

``calibrate_checkpoint`` turns a checkpoint (fp32, or quantized with another strategy) plus a strategy into a
calibrated post-training-quantized (PTQ) checkpoint: the ``quant_`` architecture with the strategy stored inline,
weight quantizers initialised from the weights (LSQ steps at their MSE-optimal scale), and every activation
quantizer's range estimated on N training batches with the model in eval mode (no dropout), by the same
estimator that decoding later uses. The result decodes with ``scripts/evaluate.py``, exports with
``scripts/export_model.py`` and is the starting point of QAT (``fairseq-train --finetune-from-model``): QAT
starts where PTQ ends. A checkpoint quantized with another strategy keeps the quantizer state of the modules
whose spec did not change (learned steps and ranges) and re-initialises and recalibrates the others: this is
the policy for a strategy change, kept out of the model class.
"""
from __future__ import annotations

import copy
import logging
from pathlib import Path

import torch

from fairseq_quant_runtime.files import atomic_output

from .quant import Strategy
from .quant.calibrate import calibrate, is_calibrated
from .quant.coprecision import co_precisions, weight_precision
from .quant.errors import FairseqQuantError
from .quant.quantizers import ActivationQuantizer, WeightQuantizer
from .quant.spec import spec_changes

logger = logging.getLogger(__name__)
DEFAULT_CALIB_BATCHES = 16
DEFAULT_CALIB_BATCH_SIZE = 16


class CalibrationError(FairseqQuantError, ValueError):
    """A checkpoint or data that cannot be calibrated; the message names the input."""


def training_batches(task, subset: str, count: int, batch_size: int = DEFAULT_CALIB_BATCH_SIZE, seed: int = 0):
    """The first ``count`` batches of ``subset`` in a seeded shuffled order (what calibration observes)."""
    task.load_dataset(subset)
    dataset = task.dataset(subset)
    itr = task.get_batch_iterator(dataset=dataset, max_tokens=10_000_000, max_sentences=batch_size,
                                  max_positions=(1e9, 1e9), ignore_invalid_inputs=False,
                                  seed=seed).next_epoch_itr(shuffle=True)
    out = []
    for sample in itr:
        out.append(sample)
        if len(out) >= count:
            break
    return out


def calibrate_model(model, batches, quantizers=None) -> int:
    """Observe ``batches`` (fairseq samples) with ``model`` in eval mode (fp32 activations, no dropout) and fix the
    range of every activation quantizer (or of ``quantizers`` only); mark the model calibrated. Returns the number
    of batches."""
    was_training = model.training
    model.eval()
    try:
        seen = calibrate(model, batches, forward=lambda m, s: m(**s["net_input"]), quantizers=quantizers)
    finally:
        model.train(was_training)
    if hasattr(model, "quant_calibrated"):
        model.quant_calibrated.fill_(True)
    return seen


def _quant_state_owner(key: str) -> str:
    """'encoder.fc1.weight_quantizer.step' -> 'encoder.fc1'."""
    return key.rsplit(".", 2)[0]


def calibrate_checkpoint(checkpoint, data, strategy: Strategy, out, batches: int = DEFAULT_CALIB_BATCHES,
                         subset: str = "train", batch_size: int = DEFAULT_CALIB_BATCH_SIZE, seed: int = 0) -> dict:
    """Write ``out``: ``checkpoint`` quantized with ``strategy`` and calibrated on ``batches`` batches of
    ``subset``; returns a summary (modules kept, re-initialised, activation quantizers calibrated)."""
    from fairseq import checkpoint_utils, tasks

    from .baselines import quantized_model_cfg

    checkpoint, out = Path(checkpoint), Path(out)
    if not checkpoint.is_file():
        raise CalibrationError(f"checkpoint not found: {checkpoint}")
    if batches < 1:
        raise CalibrationError(f"--batches must be at least 1, got {batches}")
    try:
        state = checkpoint_utils.load_checkpoint_to_cpu(str(checkpoint), {"data": str(data)})
    except Exception as err:  # fairseq and torch raise many kinds here; name the file in one message
        raise CalibrationError(f"cannot load checkpoint {checkpoint}: {type(err).__name__}: {err}") from err
    cfg = state.get("cfg")
    if cfg is None or getattr(cfg, "model", None) is None:
        raise CalibrationError(f"{checkpoint}: no model configuration (not a fairseq checkpoint?)")
    model_cfg = copy.deepcopy(cfg.model)
    arch = getattr(model_cfg, "arch", "")
    weights = dict(state["model"])
    stored_specs = (weights.pop("_extra_state", None) or {}).get("quant_specs")
    if arch.startswith("quant_"):  # re-quantize: its float weights under the fp32 architecture's name
        for attr in ("arch", "_name"):
            setattr(model_cfg, attr, arch[len("quant_"):])
    model_cfg = quantized_model_cfg(model_cfg, strategy, checkpoint)
    task = tasks.setup_task(cfg.task)
    model = task.build_model(model_cfg)
    own = model.state_dict()
    changed = set(model.quant_specs)
    if stored_specs is not None:
        changed = {name for name, _ in spec_changes(stored_specs, model.quant_specs)}
    kept = {k: v for k, v in weights.items() if "_quantizer." in k}
    floats = {k: v for k, v in weights.items() if k not in kept and k != "quant_calibrated"}
    merged = {**{k: v for k, v in own.items() if "_quantizer." in k or k in ("quant_calibrated", "_extra_state")},
              **floats}
    for k, v in kept.items():
        if _quant_state_owner(k) not in changed and k in own and own[k].shape == v.shape:
            merged[k] = v
    missing = sorted(set(own) - set(merged))
    if missing:
        raise CalibrationError(f"{checkpoint}: does not fit architecture {model_cfg.arch}: missing {missing[:3]}")
    torch.nn.Module.load_state_dict(model, merged, strict=False)
    for name, module in model.named_modules():
        if isinstance(module, (WeightQuantizer, ActivationQuantizer)) and name.rsplit(".", 1)[0] in changed:
            module.reset()
    reinit = [q for n, q in model.named_modules()
              if isinstance(q, ActivationQuantizer) and q.enabled and n.rsplit(".", 1)[0] in changed]
    samples = training_batches(task, subset, batches, batch_size, seed)
    if not samples:
        raise CalibrationError(f"{data}: subset {subset!r} has no utterances to calibrate on")
    seen = calibrate_model(model, samples, reinit) if reinit else 0
    if not is_calibrated(model):
        raise CalibrationError(f"{checkpoint}: activation quantizers left without a range after calibration")
    with torch.no_grad():  # weight quantizers initialise from the weights (LSQ: MSE-optimal steps) on a forward
        model.eval()
        model(**samples[0]["net_input"])
        for bits in co_precisions(model):  # and a co-trained model's steps of its other precisions
            with weight_precision(model, bits):
                model(**samples[0]["net_input"])
    model.quant_calibrated.fill_(True)
    new_state = {"cfg": copy.deepcopy(cfg), "model": model.state_dict(), "args": None,
                 "optimizer_history": state.get("optimizer_history", []), "extra_state": {}}
    new_state["cfg"].model = model_cfg
    new_state["extra_state"]["calibration"] = {
        "source": str(checkpoint), "strategy": str(strategy), "subset": subset, "batches": seen,
        "batch_size": batch_size, "seed": seed, "reinitialised_modules": len(changed),
        "kept_modules": len(model.quant_specs) - len(changed)}
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(out) as tmp:
        torch.save(new_state, tmp)
    summary = dict(new_state["extra_state"]["calibration"], out=str(out),
                   activation_quantizers=len(reinit))
    logger.info("calibrated %s -> %s: %d activation quantizers on %d batches of %s (%d modules kept)",
                checkpoint, out, len(reinit), seen, subset, summary["kept_modules"])
    return summary
