"""The on-device runtime end to end: the smoke run's exported row, the CLI with torch and fairseq unimportable,
and beam-search parity with fairseq on the shipped reference model."""
import json
import sys

import numpy as np
import torch
from conftest import ROOT, run

from fairseq_quant.stats import read_utterances

SUBSETS = ("dev-clean", "dev-other", "test-clean", "test-other")
BLOCK = ("import sys; sys.modules['torch'] = None; sys.modules['fairseq'] = None; sys.modules['torchaudio'] = None; "
         "sys.modules['onnx'] = None; ")


def test_the_main_job_exports_and_decodes_with_the_runtime(smoke):
    work, _ = smoke
    out = work / "eval" / "runtime-mixed2a8"
    summary = json.loads((out / "wer.json").read_text())
    export = json.loads((out / "export.json").read_text())
    qat = json.loads((work / "eval" / "qat-mixed2a8" / "wer.json").read_text())
    assert summary["checkpoint"] == str(work / "qat" / "qat-mixed2a8" / "checkpoint_selected.pt")  # QAT's dev choice
    assert abs(summary["avg_weight_bits"] - qat["avg_weight_bits"]) < 0.01
    assert export["total"] == (work / "export" / "mixed2a8.fqm").stat().st_size == round(summary["model_mb"] * 1e6)
    assert export["ratio"] > 8  # a tiny model: biases and the graphs weigh more than at reference size
    for subset in SUBSETS:
        manifest = json.loads((work / "data" / f"{subset}.json").read_text())["utts"]
        utts = read_utterances(out / f"{subset}.utt.tsv")
        assert [u.utt_id for u in utts] == list(manifest)
        result = next(r for r in summary["results"] if r["subset"] == subset)
        assert result["words"] == sum(u.words for u in utts)
        assert result["wer"] == round(100 * sum(u.errors for u in utts) / result["words"], 2)
        assert 0 < result["rtf"] < 1


def test_the_runtime_cli_decodes_without_torch_fairseq_or_onnx(smoke):
    work, _ = smoke
    model = work / "export" / "mixed2a8.fqm"
    manifest = json.loads((work / "data" / "test-clean.json").read_text())["utts"]
    audio = next(iter(manifest.values()))["input"]["path"]
    # fixed kernels: "auto" times them at load and two processes may choose differently
    args = ["--model", str(model), audio, "--beam", "2", "--max-len-a", "0", "--max-len-b", "40",
            "--decoder-kernel", "nbits"]
    blocked = run([sys.executable, "-c", BLOCK + "from fairseq_quant_runtime.__main__ import main; "
                   f"assert 'torch' not in {{k for k, v in sys.modules.items() if v is not None}}; "
                   f"sys.exit(main({args!r}))"])
    assert blocked.returncode == 0, blocked.stderr[-2000:]
    plain = run([sys.executable, "-m", "fairseq_quant_runtime", *args])
    assert plain.returncode == 0, plain.stderr[-2000:]
    assert blocked.stdout == plain.stdout and blocked.stdout.startswith(f"{audio}\t")
    damaged = work / "damaged.fqm"
    damaged.write_bytes(model.read_bytes()[:-10])
    proc = run([sys.executable, "-m", "fairseq_quant_runtime", "--model", str(damaged), audio])
    assert proc.returncode == 2
    # one line and nothing else: the runtime imports nothing that logs (fairseq did, through the plugin)
    assert proc.stderr.strip().splitlines() == [
        f"fairseq_quant_runtime: {damaged}: checksum mismatch (the file is truncated or corrupted)"]


def test_beam_search_equals_fairseq_on_the_reference_model(smoke, tmp_path):
    """fp32 export of the shipped reference model: the runtime's beam search (fp32 kernels) returns fairseq's
    SequenceGenerator tokens on real audio, batched with padding, attention-only and joint with the CTC head."""
    from fairseq.sequence_generator import SequenceGenerator

    from fairseq_quant.evaluate import DEFAULT_CTC_WEIGHT, JointCTCModel, load_checkpoint
    from fairseq_quant.export.exporter import export_checkpoint
    from fairseq_quant_runtime.audio import features
    from fairseq_quant_runtime.ctc import pre_beam_size
    from fairseq_quant_runtime.recognizer import Recognizer

    work, _ = smoke
    bundle = ROOT / "recipes" / "librispeech" / "reference"
    sizes = export_checkpoint(bundle / "model.pt", bundle, tmp_path / "fp32.fqm", float16=False)
    assert sizes["avg_weight_bits"] == 32.0 and sizes["quantized_values"] == 0
    model, task = load_checkpoint(bundle / "model.pt", bundle)
    paths = [u["input"]["path"] for s in ("test-clean", "test-other")
             for u in json.loads((work / "data" / f"{s}.json").read_text())["utts"].values()]
    feats = [features(p) for p in paths]
    lengths = torch.tensor([f.shape[0] for f in feats])
    x = torch.zeros(len(feats), int(lengths.max()), 80)
    for i, f in enumerate(feats):
        x[i, : f.shape[0]] = torch.from_numpy(f)
    generator = SequenceGenerator([model], task.target_dictionary, beam_size=5, max_len_a=0.2, max_len_b=10)
    with torch.no_grad():
        expected = [o[0]["tokens"].tolist()[:-1] for o in
                    generator.generate([model], {"net_input": {"src_tokens": x, "src_lengths": lengths}})]
    recognizer = Recognizer(tmp_path / "fp32.fqm", "fp32", "fp32")
    got = recognizer.beam_search(feats, beam=5, ctc_weight=0.0)  # the attention decoder alone
    assert [h.tokens for h in got] == expected
    # joint CTC/attention decoding (the default for a model with a CTC head, as the reference has)
    joint = SequenceGenerator(JointCTCModel(model, DEFAULT_CTC_WEIGHT, pre_beam=pre_beam_size(5)),
                              task.target_dictionary, beam_size=5, max_len_a=0.2, max_len_b=10)
    with torch.no_grad():
        expected_joint = [o[0]["tokens"].tolist()[:-1] for o in
                          joint.generate([model], {"net_input": {"src_tokens": x, "src_lengths": lengths}})]
    assert [h.tokens for h in recognizer.beam_search(feats, beam=5)] == expected_joint
    assert expected_joint != expected  # the CTC head changes the hypotheses
    # greedy search is fairseq's beam search of width 1
    greedy = SequenceGenerator([model], task.target_dictionary, beam_size=1, max_len_a=0.2, max_len_b=10)
    with torch.no_grad():
        expected = [o[0]["tokens"].tolist()[:-1] for o in
                    greedy.generate([model], {"net_input": {"src_tokens": x, "src_lengths": lengths}})]
    assert [h.tokens for h in recognizer.greedy_search(feats)] == expected
    assert all(len(t) > 2 for t in expected)  # the model transcribes (it does not stop at once)
    assert np.isfinite([h.score for h in got]).all()


def test_manifest_mode_with_a_feature_worker_gives_the_same_results(smoke, tmp_path):
    work, _ = smoke
    model = work / "export" / "mixed2a8.fqm"
    outs = []
    for workers in ("0", "1"):
        out = tmp_path / f"w{workers}"
        proc = run([sys.executable, "-m", "fairseq_quant_runtime", "--model", str(model), "--manifest",
                    str(work / "data" / "test-other.json"), "--out", str(out), "--beam", "2", "--max-len-a", "0",
                    "--max-len-b", "40", "--feature-workers", workers, "--batch-frames", "1500",
                    "--decoder-kernel", "fp32"])
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert proc.stdout.startswith("test-other: WER ")
        outs.append((out / "test-other.utt.tsv").read_text())
    assert outs[0] == outs[1]  # the same batches, decoded while features come from another process
