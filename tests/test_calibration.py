"""Calibration is a phase of its own: a quantized model refuses to train before it (unless nothing needs a range),
calibrating in eval mode sets every range, and the QAT options --quant-dropout / --quant-act-momentum reach every
module or are one clear error."""
import pytest
import torch
from conftest import build_tiny, calibrate_tiny, fbank_batch
from fairseq.modules import FairseqDropout

from fairseq_quant.quant import StrategyError, is_calibrated
from fairseq_quant.quant.quantizers import ActivationQuantizer


def train_step(model):
    model.train()
    x, lengths, prev = fbank_batch(4)
    out, _ = model(x, lengths, prev)
    out.sum().backward()


def test_training_before_calibration_is_refused_naming_the_calibrate_command(dict_dir):
    _, model, _ = build_tiny(dict_dir, extra=["--quant-weight-bits", "4", "--quant-act-bits", "8"])
    assert not is_calibrated(model)
    with pytest.raises(StrategyError, match=r"activation quantizers are not calibrated: .* scripts/calibrate.py"):
        train_step(model)
    calibrate_tiny(model)
    assert is_calibrated(model) and bool(model.quant_calibrated)
    train_step(model)  # trains once calibrated


def test_weight_only_models_need_no_calibration(dict_dir):
    _, model, _ = build_tiny(dict_dir, extra=["--quant-weight-bits", "4", "--quant-act-bits", "fp32"])
    assert is_calibrated(model)  # no activation quantizer needs a range
    train_step(model)


def test_qat_dropout_and_momentum_reach_every_module(dict_dir):
    _, model, _ = build_tiny(dict_dir, extra=["--quant-weight-bits", "8", "--quant-act-bits", "8",
                                              "--quant-dropout", "0", "--quant-act-momentum", "0"])
    dropouts = [m for m in model.modules() if isinstance(m, (torch.nn.Dropout, FairseqDropout))]
    assert dropouts and all(m.p == 0.0 for m in dropouts)
    quantizers = [m for m in model.modules() if isinstance(m, ActivationQuantizer)]
    assert quantizers and all(q.momentum == 0.0 for q in quantizers)
    _, default, _ = build_tiny(dict_dir, extra=["--quant-weight-bits", "8", "--quant-act-bits", "8"])
    assert {m.p for m in default.modules() if isinstance(m, FairseqDropout)} == {0.1}  # the arch's own
    assert {q.momentum for q in default.modules() if isinstance(q, ActivationQuantizer)} == {0.01}


@pytest.mark.parametrize("flag,value,message", [
    ("--quant-dropout", "1.5", r"--quant-dropout must be in \[0, 1\), got 1.5"),
    ("--quant-act-momentum", "-1", r"--quant-act-momentum must be in \[0, 1\], got -1.0"),
])
def test_bad_qat_options_are_one_clear_error(dict_dir, flag, value, message):
    with pytest.raises(StrategyError, match=message):
        build_tiny(dict_dir, extra=["--quant-weight-bits", "8", "--quant-act-bits", "8", flag, value])


def test_calibration_in_eval_mode_leaves_the_model_in_its_mode_and_ranges_fixed(dict_dir):
    _, model, _ = build_tiny(dict_dir, extra=["--quant-weight-bits", "8", "--quant-act-bits", "8"])
    model.train()
    calibrate_tiny(model, seeds=(0,))
    assert model.training
    ranges = {n: (float(q.lo), float(q.hi)) for n, q in model.named_modules()
              if isinstance(q, ActivationQuantizer) and q.method == "minmax"}
    assert ranges and all(lo <= 0.0 <= hi and hi > lo for lo, hi in ranges.values())
    model.eval()
    with torch.no_grad():
        model(*fbank_batch(7))
    assert ranges == {n: (float(q.lo), float(q.hi)) for n, q in model.named_modules()
                      if isinstance(q, ActivationQuantizer) and q.method == "minmax"}  # decoding never moves them
