"""The runtime CLI's bad inputs: every invalid value or missing file is one clear error (exit 2, one line naming
the flag or file) before anything is decoded; resampled inputs are said; the decoding flags share one validated
configuration with scripts/evaluate.py."""
import numpy as np
import pytest
import soundfile as sf

from conftest import ROOT
from fairseq_quant_runtime.__main__ import main
from fairseq_quant_runtime.decoding import DEFAULT_CTC_WEIGHT, DecodingConfig, DecodingError


@pytest.fixture(scope="module")
def model_file(tiny_model_file):
    return tiny_model_file


@pytest.fixture(scope="module")
def wavs(tmp_path_factory):
    root = tmp_path_factory.mktemp("audio")
    noise = np.random.default_rng(0).normal(0, 0.1, 16000).astype(np.float32)
    sf.write(root / "a16k.wav", noise, 16000, subtype="PCM_16")
    sf.write(root / "b8k.wav", noise[:8000], 8000, subtype="PCM_16")
    return root


def error_of(capsys, argv):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""  # nothing decoded
    return captured.err.strip().splitlines()[-1]


@pytest.mark.parametrize("flags,message", [
    (["--beam", "0"], "--beam must be an integer >= 1 (1: greedy search), got 0"),
    (["--beam", "-3"], "--beam must be an integer >= 1 (1: greedy search), got -3"),
    (["--ctc-weight", "1.5"], "--ctc-weight must be in [0, 1] (0: the attention decoder alone), got 1.5"),
    (["--beam", "1", "--ctc-weight", "0.5"], "--beam 1 is greedy search with the attention decoder alone: joint CTC "
                                             "decoding (--ctc-weight 0.5) needs --beam >= 2"),
    (["--max-len-a", "-1"], "--max-len-a must be a number >= 0 (tokens per 10 ms frame), got -1.0"),
    (["--max-len-b", "0"], "--max-len-b must be an integer >= 1 (tokens), got 0"),
    (["--len-penalty", "nan"], "--len-penalty must be a finite number, got nan"),
    (["--threads", "-1"], "--threads must be >= 1, got -1"),
    (["--threads", "0"], "--threads must be >= 1, got 0"),
    (["--batch-frames", "0"], "--batch-frames must be >= 1, got 0"),
    (["--feature-workers", "-2"], "--feature-workers must be >= 0, got -2"),
    (["--out", "somewhere"], "--out writes a manifest's per-utterance results and WER: give --manifest too"),
])
def test_invalid_values_are_one_clear_error(capsys, wavs, flags, message):
    line = error_of(capsys, ["--model", "missing.fqm", str(wavs / "a16k.wav"), *flags])
    assert line.endswith(f"error: {message}"), line


def test_a_missing_manifest_is_noticed_before_any_file_is_decoded(capsys, model_file, wavs, tmp_path):
    missing = tmp_path / "nowhere.json"
    assert main(["--model", str(model_file), str(wavs / "a16k.wav"), "--manifest", str(missing)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.strip().splitlines()[-1].startswith(f"fairseq_quant_runtime: cannot read manifest {missing}")


def test_a_ctc_weight_for_a_model_without_ctc_head_is_refused(capsys, model_file, wavs):
    assert main(["--model", str(model_file), str(wavs / "a16k.wav"), "--ctc-weight", "0.3"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.strip().splitlines()[-1] == ("fairseq_quant_runtime: --ctc-weight 0.3: the model has no CTC "
                                                     "head; pass 0")


def test_resampled_inputs_are_said_and_decoded(capsys, model_file, wavs):
    a, b = str(wavs / "a16k.wav"), str(wavs / "b8k.wav")
    assert main(["--model", str(model_file), a, b, "--beam", "2", "--max-len-b", "3"]) == 0
    captured = capsys.readouterr()
    assert [line.split("\t")[0] for line in captured.out.splitlines()] == [a, b]
    assert captured.err.strip().splitlines() == [
        f"fairseq_quant_runtime: note: {b}: 8000 Hz audio, resampled to 16000 Hz (it carries nothing above 4 kHz, "
        "where the model's upper mel bins listen)"]


def test_one_configuration_with_one_set_of_defaults():
    import argparse

    config = DecodingConfig()
    assert (config.beam, config.ctc_weight, config.max_len_a, config.max_len_b, config.len_penalty) == (5, None, 0.2,
                                                                                                       10, 1.0)
    assert config.joint_weight(has_ctc=True) == DEFAULT_CTC_WEIGHT == 0.5 and config.joint_weight(has_ctc=False) == 0
    assert DecodingConfig(beam=1).joint_weight(has_ctc=True) == 0.0  # greedy: the attention decoder alone
    assert config.max_len(frames=300) == 70
    with pytest.raises(DecodingError, match="--beam must be an integer >= 1"):
        DecodingConfig(beam=2.5)
    parser = argparse.ArgumentParser()
    DecodingConfig.add_arguments(parser)
    assert DecodingConfig.from_args(parser.parse_args([])) == config
    assert "(default 0.2: 20 tokens a second)" in " ".join(parser.format_help().split())


def test_evaluate_takes_fairseq_names_and_explains_an_fqm(model_file, tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("evaluate_script", ROOT / "scripts/evaluate.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main(["--path", str(model_file), "--data", str(tmp_path), "--gen-subset", "test-clean",
                        "--out", str(tmp_path / "eval")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"evaluate: error: {model_file} is an exported model file (.fqm) for the on-device runtime")
    with pytest.raises(SystemExit):
        script.main(["--path", "x.pt", "--data", str(tmp_path), "--out", str(tmp_path), "--beam", "0"])
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(
        "error: --beam must be an integer >= 1 (1: greedy search), got 0")
    with pytest.raises(SystemExit):
        script.main(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    for shown in ("--checkpoint CHECKPOINT, --path CHECKPOINT", "--subsets SUBSETS, --gen-subset SUBSETS",
                  "beam size; 1: greedy search (default 5)", "(default 0.2: 20 tokens a second)", "(default 10)"):
        assert shown in help_text


def test_int8_static_without_the_models_activation_grids_is_one_clear_error(capsys, model_file, wavs):
    """int8-static multiplies the model's own activation grids: without --activations exact it is refused, and
    --activations exact on a file exported without the grids names the export flag; nothing is decoded."""
    wav = str(wavs / "a16k.wav")
    assert main(["--model", str(model_file), wav, "--encoder-kernel", "int8-static"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.strip().splitlines()[-1] == (
        "fairseq_quant_runtime: kernel int8-static multiplies the model's own activation grids in integers: decode "
        "with --activations exact (Recognizer(activations='exact')), from a file exported with --exact-activations")
    assert main(["--model", str(model_file), wav, "--activations", "exact", "--decoder-kernel", "int8-static"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.strip().splitlines()[-1].endswith(
        "exported without --exact-activations (no activation-quantized graphs)")
