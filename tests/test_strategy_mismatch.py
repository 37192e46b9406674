"""A checkpoint quantized with one strategy and used with another: fairseq-train (fine-tuning from it, or resuming
with a changed --quant-strategy) refuses it with one line naming the modules and the way out; the calibration phase
(scripts/calibrate.py) re-quantizes it, keeping the unchanged modules' quantizer state and recalibrating the rest.
QAT starts from a calibrated checkpoint: from an uncalibrated fp32 one it is refused, unless nothing needs a range."""
import shutil
import sys

import torch
from conftest import ROOT, run

STRATEGIES = ROOT / "recipes" / "librispeech" / "strategies"


def qat_train(work, save_dir, strategy, *extra, updates=2):
    strategy = STRATEGIES / f"{strategy}.yaml" if isinstance(strategy, str) else strategy
    return run([sys.executable, "-m", "fairseq_cli.train", str(work / "data"), "--user-dir", "fairseq_quant",
                "--task", "speech_recognition", "--arch", "quant_vggtransformer_small_ctc",
                "--quant-strategy", str(strategy),
                "--criterion", "quant_cross_entropy_acc", "--optimizer", "adam", "--lr", "1e-4",
                "--batch-size", "8", "--required-batch-size-multiple", "1", "--max-update", str(updates),
                "--save-dir", str(save_dir), "--no-epoch-checkpoints", "--num-workers", "0",
                "--log-format", "simple", "--train-subset", "train", "--valid-subset", "dev-clean", "--seed", "1",
                *extra])


def calibrate(work, checkpoint, strategy, out):
    strategy = STRATEGIES / f"{strategy}.yaml" if isinstance(strategy, str) else strategy
    return run([sys.executable, "scripts/calibrate.py", "--checkpoint", str(checkpoint), "--data", str(work / "data"),
                "--strategy", str(strategy), "--batches", "2", "--batch-size", "4", "--out", str(out)])


def load_state(path):
    return torch.load(path, map_location="cpu", weights_only=False)["model"]


def relative_weight_errors(ckpt, data):
    """|Q(w) - w| / |w| of every quantized weight of a checkpoint, by module."""
    from fairseq import checkpoint_utils

    from fairseq_quant.quant import QuantModule

    models, _ = checkpoint_utils.load_model_ensemble([str(ckpt)], arg_overrides={"data": str(data)})
    errors = {}
    with torch.no_grad():
        for name, module in models[0].named_modules():
            if isinstance(module, QuantModule):
                w = module.weight_layout()
                errors[name] = float((module.weight_quantizer(w) - w).norm() / w.norm())
    return errors


EXPECTED_CHANGE = ("encoder.conv_layers.0.layers.0 (w4a8 -> w2a8), encoder.conv_layers.1.layers.0 (w4a8 -> w2a8), "
                   "encoder.transformer_layers.0 (w4a8 -> w2a8)")
WAY_OUT = ("use the strategy it was quantized with, or re-quantize it with scripts/calibrate.py --checkpoint CKPT "
           "--strategy NEW (keeps the unchanged modules' quantizers, recalibrates the others)")


def test_finetuning_from_a_checkpoint_of_another_strategy_is_refused(smoke, tmp_path):
    work, _ = smoke
    source = work / "qat" / "qat-w4a8" / "checkpoint_best.pt"
    proc = qat_train(work, tmp_path / "w2a8", "w2a8", "--finetune-from-model", str(source))
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last == (f"fairseq_quant: error: {source} was quantized with another strategy: 47 modules changed: "
                    f"{EXPECTED_CHANGE}, ... (44 more); {WAY_OUT}"), last
    assert not (tmp_path / "w2a8" / "checkpoint_last.pt").exists()


def test_calibrate_requantizes_only_the_changed_modules(smoke, tmp_path):
    """w4a8 QAT checkpoint -> the first encoder transformer layer at 2 bits: that layer's quantizers are fitted to
    2 bits and its input ranges recalibrated; every other quantizer keeps its trained state bit for bit; QAT then
    starts from the result."""
    work, _ = smoke
    source = work / "qat" / "qat-w4a8" / "checkpoint_best.pt"
    strategy = tmp_path / "w4a8_layer0_w2.yaml"
    strategy.write_text(f"{(STRATEGIES / 'w4a8.yaml').read_text()}"
                        "rules:\n  - match: encoder.transformer_layers.0\n    weight_bits: 2\n")
    out = tmp_path / "requantized.pt"
    proc = calibrate(work, source, strategy, out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    before, after = load_state(source), load_state(out)
    assert after.keys() == before.keys()
    layer0 = "encoder.transformer_layers.0."
    quant_keys = [k for k in before if "_quantizer." in k]
    kept = [k for k in quant_keys if not k.startswith(layer0)]
    changed_steps = [k for k in quant_keys if k.startswith(layer0) and k.endswith("weight_quantizer.step")]
    assert kept and changed_steps
    assert all(torch.equal(after[k], before[k]) for k in kept)
    assert all(not torch.equal(after[k], before[k]) for k in changed_steps)
    floats = [k for k in before if "_quantizer." not in k and k not in ("quant_calibrated", "_extra_state")]
    assert all(torch.equal(after[k], before[k]) for k in floats)  # calibration never changes a weight
    errors = relative_weight_errors(out, work / "data")
    assert errors["encoder.transformer_layers.0"] < 0.45  # the input projection, now at 2 bits
    proc = qat_train(work, tmp_path / "qat", strategy, "--finetune-from-model", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_calibrate_turns_fp32_into_a_checkpoint_that_evaluates(smoke, tmp_path):
    work, _ = smoke
    out = tmp_path / "ptq.pt"
    proc = calibrate(work, work / "fp32" / "checkpoint_best.pt", "w8a8", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = load_state(out)
    assert bool(state["quant_calibrated"])
    ranges = [k for k in state if k.endswith("_quantizer.hi")]
    assert ranges and all(float(state[k]) > float(state[k.replace(".hi", ".lo")]) for k in ranges)
    proc = run([sys.executable, "scripts/evaluate.py", "--checkpoint", str(out), "--data", str(work / "data"),
                "--subsets", "dev-clean", "--beam", "2", "--max-len-b", "20", "--out", str(tmp_path / "eval"),
                "--device", "cpu"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| dev-clean | 6 |" in proc.stdout


def test_calibrate_refuses_bad_input_with_one_line(smoke, tmp_path):
    work, _ = smoke
    missing = calibrate(work, tmp_path / "nope.pt", "w8a8", tmp_path / "out.pt")
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert missing.stderr.strip().splitlines()[-1] == f"calibrate: error: checkpoint not found: {tmp_path / 'nope.pt'}"
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    proc = calibrate(work, garbage, "w8a8", tmp_path / "out.pt")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(f"calibrate: error: cannot load checkpoint {garbage}: ")
    assert not (tmp_path / "out.pt").exists()


def test_qat_from_an_uncalibrated_checkpoint_is_refused_unless_weight_only(smoke, tmp_path):
    work, _ = smoke
    fp32 = work / "fp32" / "checkpoint_best.pt"
    proc = qat_train(work, tmp_path / "w8a8", "w8a8", "--finetune-from-model", str(fp32))
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert ("fairseq_quant: error: activation quantizers are not calibrated: quantization-aware training starts from "
            "a calibrated checkpoint. Run: python scripts/calibrate.py") in proc.stderr
    weight_only = tmp_path / "w4.yaml"
    weight_only.write_text("default: {weight_bits: 4, act_bits: fp32}\n")
    proc = qat_train(work, tmp_path / "w4", weight_only, "--finetune-from-model", str(fp32))
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_resuming_with_a_changed_strategy_is_refused(smoke, tmp_path):
    work, _ = smoke
    resumed = tmp_path / "resumed"
    shutil.copytree(work / "qat" / "qat-w4a8", resumed)
    before = (resumed / "checkpoint_last.pt").read_bytes()
    proc = qat_train(work, resumed, "w2a8", updates=10)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        f"fairseq_quant: error: {resumed / 'checkpoint_last.pt'} was quantized with another strategy: 47 modules "
        f"changed: {EXPECTED_CHANGE}, ... (44 more); {WAY_OUT}")
    assert (resumed / "checkpoint_last.pt").read_bytes() == before
