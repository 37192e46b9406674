"""End to end on a tiny generated corpus: the recipe's smoke run (real espeak-ng audio, SentencePiece,
fairseq-train fp32 and QAT from the fp32 checkpoint with distillation, beam search, jiwer WER), then
fairseq-generate on a quant checkpoint and resuming QAT with its quantizer state."""
import json
import re
import shutil
import sys

import torch
import pytest
from conftest import ROOT, SMOKE_ROWS, run

from fairseq_quant.stats import read_utterances

ROWS = SMOKE_ROWS
SUBSETS = ("dev-clean", "dev-other", "test-clean", "test-other")


def test_recipe_produces_results_table(smoke):
    work, stdout = smoke
    results = json.loads((work / "results.json").read_text())["results"]
    assert [r["name"] for r in results] == list(ROWS)
    bits = {r["name"]: r["avg_weight_bits"] for r in results}
    size = {r["name"]: r["model_mb"] for r in results}
    assert bits["fp32"] == 32.0 and bits["qat-w4a8"] == 4.0 and bits["ptq-w2-sym-channel"] == 2.0
    assert 2.0 < bits["qat-mixed2a8"] <= 2.5
    assert 8.0 < bits["dynamic-int8"] < 32.0 and size["dynamic-int8"] < size["fp32"]  # attention stays fp32
    assert size["qat-w4a8"] < size["fp32"] / 6 and size["qat-mixed2a8"] < size["qat-w4a8"]
    for r in results:
        assert set(r["wer"]) == set(SUBSETS)
        assert all(0.0 <= w < 1000.0 for w in r["wer"].values())
    table = (work / "results.md").read_text()
    assert table in stdout  # the run prints the table it wrote
    lines = table.splitlines()
    assert len(lines) == 2 + len(ROWS) + 2
    assert lines[2].endswith("| - |")  # fp32 is the base of the relative change
    assert all("% [" in line for line in lines[3:2 + len(ROWS)])  # every other row has its interval
    assert lines[-1].startswith("Reference words: dev-clean 60, dev-other 60, test-clean ")
    assert (work / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_evaluation_scores_every_utterance_against_its_transcript(smoke):
    work, _ = smoke
    for subset in SUBSETS:
        manifest = json.loads((work / "data" / f"{subset}.json").read_text())["utts"]
        refs = (work / "eval" / "qat-w4a8" / f"{subset}.ref").read_text().splitlines()
        hyps = (work / "eval" / "qat-w4a8" / f"{subset}.hyp").read_text().splitlines()
        assert len(refs) == len(hyps) == len(manifest) == 6
        assert refs == [f"{u['output']['text']} ({utt})" for utt, u in manifest.items()]
        summary = json.loads((work / "eval" / "qat-w4a8" / "wer.json").read_text())
        assert summary["ctc_weight"] == 0.5  # the recipe's models have a CTC head: joint decoding
        words = sum(len(u["output"]["text"].split()) for u in manifest.values())
        result = next(r for r in summary["results"] if r["subset"] == subset)
        assert result["words"] == words
        per_utt = read_utterances(work / "eval" / "qat-w4a8" / f"{subset}.utt.tsv")
        assert [u.utt_id for u in per_utt] == list(manifest)
        assert sum(u.words for u in per_utt) == words
        assert sum(u.errors for u in per_utt) == result["substitutions"] + result["deletions"] + result["insertions"]


def subsets_without_unk(data):
    """Evaluation subsets whose reference pieces are all in the dictionary (fairseq-generate scores the
    reference pieces, scripts/evaluate.py the transcripts: they agree only there)."""
    unk = 3  # fairseq Dictionary: <s> <pad> </s> <unk>
    return [s for s in SUBSETS if all(unk not in map(int, u["output"]["tokenid"].split(", "))
                                      for u in json.loads((data / f"{s}.json").read_text())["utts"].values())]


def test_fairseq_generate_scores_words_like_evaluate(smoke, tmp_path):
    """The README's fairseq-generate command: with --post-process sentencepiece its WER is word WER, the
    value scripts/evaluate.py reports for the same checkpoint, beam and length limits and the same decoder
    (fairseq-generate searches with the attention decoder alone: evaluate.py with --ctc-weight 0)."""
    work, _ = smoke
    subsets = subsets_without_unk(work / "data")
    assert subsets
    ckpt = work / "qat" / "qat-w4a8" / "checkpoint_selected.pt"
    proc = run([sys.executable, "scripts/evaluate.py", "--checkpoint", str(ckpt), "--data", str(work / "data"),
                "--subsets", ",".join(subsets), "--beam", "2", "--max-len-a", "0", "--max-len-b", "40",
                "--ctc-weight", "0", "--device", "cpu", "--out", str(tmp_path / "eval")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    expected = {r["subset"]: r["wer"] for r in json.loads((tmp_path / "eval" / "wer.json").read_text())["results"]}
    for subset in subsets:
        proc = run([sys.executable, "-m", "fairseq_cli.generate", str(work / "data"), "--user-dir", "fairseq_quant",
                    "--task", "speech_recognition", "--path", str(ckpt),
                    "--gen-subset", subset, "--beam", "2", "--max-len-a", "0", "--max-len-b", "40",
                    "--max-tokens", "60000", "--required-batch-size-multiple", "1",
                    "--scoring", "wer", "--post-process", "sentencepiece"])
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert proc.stdout.count("\nH-") + proc.stdout.startswith("H-") == 6
        wer = float(re.search(rf"Generate {subset} with beam=2: WER: ([\d.]+)", proc.stdout).group(1))
        assert wer == expected[subset], subset


def quantizer_state(state_dict):
    return {k: v for k, v in state_dict.items() if "_quantizer." in k or k == "quant_calibrated"}


def test_qat_checkpoint_holds_calibrated_quantizer_state_that_loads_exactly(smoke):
    import fairseq_quant  # noqa: F401
    from fairseq import checkpoint_utils

    work, _ = smoke
    ckpt = work / "qat" / "qat-mixed2a8" / "checkpoint_last.pt"
    saved = quantizer_state(torch.load(ckpt, map_location="cpu", weights_only=False)["model"])
    assert bool(saved["quant_calibrated"])
    assert any(k.endswith("weight_quantizer.step") for k in saved)  # LSQ steps were learned and saved
    models, _ = checkpoint_utils.load_model_ensemble([str(ckpt)], arg_overrides={"data": str(work / "data")})
    loaded = quantizer_state(models[0].state_dict())
    assert loaded.keys() == saved.keys()
    for key, value in saved.items():
        assert torch.equal(loaded[key], value), key


def test_resuming_qat_restores_quantizers_instead_of_recalibrating(smoke, tmp_path):
    work, _ = smoke
    resumed = tmp_path / "resumed"
    shutil.copytree(work / "qat" / "qat-w4a8", resumed)
    log = (resumed / "train.log").read_text()
    start = work / "calib" / "w4a8.pt"  # QAT started from the calibrated post-training checkpoint
    assert f"loading pretrained model from {start}: " in log and "loading an fp32 checkpoint" not in log
    before = quantizer_state(torch.load(resumed / "checkpoint_last.pt", map_location="cpu", weights_only=False)["model"])
    proc = run([sys.executable, "-m", "fairseq_cli.train", str(work / "data"), "--user-dir", "fairseq_quant",
                "--task", "speech_recognition", "--arch", "quant_vggtransformer_small_ctc",
                "--quant-strategy", str(ROOT / "recipes/librispeech/strategies/w4a8.yaml"),
                "--finetune-from-model", str(start),
                "--criterion", "quant_cross_entropy_acc", "--optimizer", "adam", "--lr", "1e-4",
                "--batch-size", "8", "--required-batch-size-multiple", "1", "--max-update", "8",
                "--save-dir", str(resumed), "--no-epoch-checkpoints", "--num-workers", "0", "--log-format", "simple",
                "--train-subset", "train", "--valid-subset", "dev-clean", "--seed", "1"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    assert "checkpoint_last.pt" in out and "num_updates 8" in out
    assert "loading an fp32 checkpoint" not in out
    after = quantizer_state(torch.load(resumed / "checkpoint_last.pt", map_location="cpu", weights_only=False)["model"])
    assert after.keys() == before.keys()
    assert bool(after["quant_calibrated"])
    steps = [k for k in after if k.endswith("weight_quantizer.step")]
    assert any(not torch.equal(after[k], before[k]) for k in steps)  # training went on from the restored state


def test_bad_strategy_is_one_clear_error(smoke, tmp_path):
    work, _ = smoke
    strategy = tmp_path / "other_model.yaml"
    strategy.write_text("default: {weight_bits: 4}\nrules:\n  - match: 'encoder.layers.*.fc1'\n    weight_bits: 2\n")
    proc = run([sys.executable, "-m", "fairseq_cli.train", str(work / "data"), "--user-dir", "fairseq_quant",
                "--task", "speech_recognition", "--arch", "quant_vggtransformer_small_ctc",
                "--quant-strategy", str(strategy), "--criterion", "cross_entropy_acc", "--optimizer", "adam",
                "--batch-size", "8", "--max-update", "1", "--save-dir", str(tmp_path / "ckpt")])
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert ("fairseq_quant: error: " + str(strategy) + ": rule 1 pattern 'encoder.layers.*.fc1' matches no module; "
            "modules look like 'encoder.conv_layers.0.layers.0'") in proc.stderr


def test_post_training_checkpoint_holds_the_fp32_weights_on_a_2_bit_grid(smoke):
    import fairseq_quant  # noqa: F401
    from fairseq import checkpoint_utils
    from fairseq_quant.quant.modules import QuantModule

    work, _ = smoke
    fp32 = torch.load(work / "fp32" / "checkpoint_best.pt", map_location="cpu", weights_only=False)["model"]
    models, _ = checkpoint_utils.load_model_ensemble([str(work / "ptq" / "ptq-w2-sym-channel.pt")],
                                                     arg_overrides={"data": str(work / "data")})
    model = models[0]
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in fp32.items())  # no training: the fp32 weights as they were
    checked = 0
    for module in model.modules():
        if isinstance(module, QuantModule):
            for weight, quantizer in module.quantized_weights():
                rows = quantizer(weight.detach()).reshape(weight.shape[0], -1)
                assert all(len(torch.unique(r)) <= 4 for r in rows)  # 2-bit symmetric: levels -2..1
                checked += 1
    assert checked >= 15


def test_post_training_weight_only_refuses_quantized_activations(smoke, tmp_path):
    from fairseq_quant.baselines import BaselineError, ptq_checkpoint
    from fairseq_quant.quant import Strategy

    work, _ = smoke
    with pytest.raises(BaselineError, match=r"uniform w4a8: quantizes activations \(w4a8\); their ranges need the "
                                            r"calibration phase: scripts/calibrate.py"):
        ptq_checkpoint(work / "fp32" / "checkpoint_best.pt", tmp_path / "x.pt", Strategy.uniform(4, 8))
    assert not (tmp_path / "x.pt").exists()


def test_post_training_refuses_a_quantized_checkpoint(smoke, tmp_path):
    from fairseq_quant.baselines import BaselineError, ptq_checkpoint
    from fairseq_quant.quant import Strategy

    work, _ = smoke
    with pytest.raises(BaselineError, match="already a quantized checkpoint"):
        ptq_checkpoint(work / "qat" / "qat-w4a8" / "checkpoint_best.pt", tmp_path / "x.pt", Strategy.uniform(2, "fp32"))
    assert not (tmp_path / "x.pt").exists()


def test_bad_uniform_flag_is_one_clear_error(smoke, tmp_path):
    work, _ = smoke
    proc = run([sys.executable, "-m", "fairseq_cli.train", str(work / "data"), "--user-dir", "fairseq_quant",
                "--task", "speech_recognition", "--arch", "quant_vggtransformer_small_ctc", "--quant-weight-bits", "4",
                "--quant-act-method", "kl", "--criterion", "cross_entropy_acc", "--optimizer", "adam",
                "--batch-size", "8", "--max-update", "1", "--save-dir", str(tmp_path / "ckpt")])
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        "fairseq_quant: error: --quant-act-method kl: unknown act_method 'kl'; "
        "expected one of ('minmax', 'percentile', 'mse', 'pact', 'lsq')")


def quant_report(*args):
    proc = run([sys.executable, "scripts/quant_report.py", *map(str, args)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return "".join(line for line in proc.stdout.splitlines(keepends=True) if not line.startswith("| dictionary"))


def test_quant_report_applies_the_strategy_to_a_qat_checkpoint(smoke):
    work, _ = smoke
    strategy = ROOT / "recipes/librispeech/strategies/mixed2a8.yaml"
    qat = work / "qat" / "qat-w4a8" / "checkpoint_best.pt"
    from_qat = quant_report("--checkpoint", qat, "--data", work / "data", "--strategy", strategy)
    from_fp32 = quant_report("--checkpoint", work / "fp32" / "checkpoint_best.pt", "--data", work / "data",
                             "--strategy", strategy)
    first, *rest = from_qat.splitlines()
    assert first == (f"quant_report: {qat} is quantized with {ROOT / 'recipes/librispeech/strategies/w4a8.yaml'} "
                     f"(stored in checkpoint); reporting {strategy} on its fp32 architecture")
    assert rest == from_fp32.splitlines()  # what the strategy does, whatever the checkpoint was trained with
    assert "average weight bits 2.05" in from_qat  # 2.04 before the CTC head (8,784 weights at 4 bits)
    assert "ctc_proj                                         QuantLinear              w4a8       rule 4: ctc_proj" \
        in from_qat
    assert "decoder.fc_out                                   QuantLinear              w4a8       rule 3: decoder.fc_out" \
        in from_qat
