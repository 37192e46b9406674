"""A QAT checkpoint loaded under another strategy (fine-tuning from it, or resuming with a changed
--quant-strategy): refused with one line naming the modules, or, with --quant-strategy-mismatch reinit, the
changed modules' quantizers are re-initialised from the loaded weights and recalibrated, and the log says so."""
import shutil
import sys

import torch
from conftest import ROOT, run

STRATEGIES = ROOT / "recipes" / "librispeech" / "strategies"


def qat_train(work, save_dir, strategy, *extra, updates=2):
    strategy = STRATEGIES / f"{strategy}.yaml" if isinstance(strategy, str) else strategy
    return run([sys.executable, "-m", "fairseq_cli.train", str(work / "data"), "--user-dir", "fairseq_quant",
                "--task", "speech_recognition", "--arch", "quant_vggtransformer_small_ctc",
                "--quant-strategy", str(strategy), "--quant-calib-batches", "2",
                "--criterion", "quant_cross_entropy_acc", "--optimizer", "adam", "--lr", "1e-4",
                "--batch-size", "8", "--required-batch-size-multiple", "1", "--max-update", str(updates),
                "--save-dir", str(save_dir), "--no-epoch-checkpoints", "--num-workers", "0",
                "--log-format", "simple", "--train-subset", "train", "--valid-subset", "dev-clean", "--seed", "1",
                *extra])


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


def test_finetuning_from_a_checkpoint_of_another_strategy_is_refused_by_default(smoke, tmp_path):
    work, _ = smoke
    source = work / "qat" / "qat-w4a8" / "checkpoint_best.pt"
    proc = qat_train(work, tmp_path / "w2a8", "w2a8", "--finetune-from-model", str(source))
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"fairseq_quant: error: {source} was quantized with another strategy: 47 modules changed: "
                           f"{EXPECTED_CHANGE}, ... (44 more); "), last
    assert last.endswith("pass --quant-strategy-mismatch reinit to re-initialise and recalibrate their quantizers")
    assert not (tmp_path / "w2a8" / "checkpoint_last.pt").exists()


def test_finetuning_with_reinit_recalibrates_the_changed_modules(smoke, tmp_path):
    work, _ = smoke
    source = work / "qat" / "qat-w4a8" / "checkpoint_best.pt"
    out = tmp_path / "w2a8"
    proc = qat_train(work, out, "w2a8", "--finetune-from-model", str(source), "--quant-strategy-mismatch", "reinit")
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = proc.stdout + proc.stderr
    assert (f"{source} was quantized with another strategy: 47 modules changed: {EXPECTED_CHANGE}, ... (44 more); "
            "their quantizers are re-initialised from the loaded weights and recalibrated") in log
    assert "activation ranges calibrated on 2 batches" in log
    errors = relative_weight_errors(out / "checkpoint_last.pt", work / "data")
    assert len(errors) == 41  # 47 modules (the CTC head included): 6 attentions hold no weight of their own
    # 2-bit weights with step sizes fitted to them; the 4-bit steps of the source checkpoint give 0.5 and more
    assert max(errors.values()) < 0.45, sorted(errors.items(), key=lambda kv: -kv[1])[:3]


def test_resuming_with_a_changed_strategy_is_refused_by_default(smoke, tmp_path):
    work, _ = smoke
    resumed = tmp_path / "resumed"
    shutil.copytree(work / "qat" / "qat-w4a8", resumed)
    before = (resumed / "checkpoint_last.pt").read_bytes()
    proc = qat_train(work, resumed, "w2a8", updates=10)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(
        f"fairseq_quant: error: {resumed / 'checkpoint_last.pt'} was quantized with another strategy: 47 modules "
        f"changed: {EXPECTED_CHANGE}, ... (44 more); ")
    assert (resumed / "checkpoint_last.pt").read_bytes() == before


def test_resuming_with_reinit_asks_for_reset_optimizer_when_quantizer_parameters_change(smoke, tmp_path):
    work, _ = smoke
    resumed = tmp_path / "resumed"
    shutil.copytree(work / "qat" / "qat-w4a8", resumed)
    minmax = tmp_path / "w4a8_minmax.yaml"  # minmax weights learn no step sizes: Adam's state no longer fits
    minmax.write_text("default: {weight_bits: 4, act_bits: 8, weight_method: minmax}\n")
    proc = qat_train(work, resumed, minmax, "--quant-strategy-mismatch", "reinit", updates=10)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        f"fairseq_quant: error: {resumed / 'checkpoint_last.pt'}: the re-initialised modules' quantizer parameters "
        "differ from the checkpoint's, so its optimizer state cannot be resumed; add --reset-optimizer")
