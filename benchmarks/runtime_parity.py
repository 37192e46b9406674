#!/usr/bin/env python
"""Parity of the exported runtime with the fake-quantized fairseq model it came from, per bit width.

For every QAT row of the main job (WORKDIR/qat/qat-ROW/checkpoint_best.pt, decoded by fairseq in
WORKDIR/eval/qat-ROW/): export it, decode the same test sets with the runtime in its two activation modes
(``kernel``: the low-bit kernels' own int8 activations, the default; ``exact``: the model's static activation
grids, fp32 kernels), and report WER [95% CI], the paired relative change against fairseq [95% CI], the share
of identical transcripts, and teacher-forced probability differences. A reference line: fairseq against
itself when only the batching changes (batches of 10 here, of 60000 frames in the main job).

    python benchmarks/runtime_parity.py --workdir exp/default --out exp/default/parity
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROWS = ("w8a8", "w4a8", "mixed2a8", "w2a8")
BATCH = 10
LOGIT_UTTS = 20


def decode_runtime(recognizer, feats: dict, ids: list[str]) -> dict[str, str]:
    order = sorted(ids, key=lambda u: feats[u].shape[0])
    hyps = {}
    for i in range(0, len(order), BATCH):
        batch = order[i:i + BATCH]
        hyps.update(zip(batch, recognizer.decode([feats[u] for u in batch], DecodingConfig())))
    return hyps


def decode_fairseq(model, task, sp, feats: dict, ids: list[str]) -> dict[str, str]:
    import torch

    from fairseq_quant.evaluate import sequence_generator
    from fairseq_quant_runtime.decoding import DecodingConfig

    generator = sequence_generator(model, task, DecodingConfig())  # joint CTC/attention, as the runtime
    order = sorted(ids, key=lambda u: feats[u].shape[0])
    hyps = {}
    for i in range(0, len(order), BATCH):
        batch = order[i:i + BATCH]
        lengths = torch.tensor([feats[u].shape[0] for u in batch])
        x = torch.zeros(len(batch), int(lengths.max()), 80)
        for j, u in enumerate(batch):
            x[j, : feats[u].shape[0]] = torch.from_numpy(feats[u])
        with torch.no_grad():
            out = generator.generate([model], {"net_input": {"src_tokens": x, "src_lengths": lengths}})
        for u, o in zip(batch, out):
            pieces = task.target_dictionary.string(o[0]["tokens"].int())
            hyps[u] = sp.decode_pieces(pieces.split()).strip() if pieces else ""
    return hyps


def logit_differences(model, recognizer, feats, manifest, ids) -> tuple[float, float]:
    """Max and mean |p_runtime - p_fairseq| (probabilities of every token) over teacher-forced steps of the
    reference transcripts."""
    import torch

    diffs = []
    for u in ids[:LOGIT_UTTS]:
        f = feats[u]
        tokens = [2] + [int(t) for t in manifest[u]["output"]["tokenid"].split(", ")]
        x = torch.from_numpy(f).unsqueeze(0)
        lengths = torch.tensor([f.shape[0]])
        with torch.no_grad():
            enc = model.encoder(x, lengths)
            state, expected = {}, []
            prev = torch.tensor([tokens])
            for t in range(len(tokens)):
                logits, _ = model.decoder(prev[:, : t + 1], enc, incremental_state=state)
                expected.append(torch.log_softmax(logits[0, -1], dim=-1).numpy())
        enc_rt = recognizer.encode([f])
        rt_state = recognizer._initial_state(1)
        for t, tok in enumerate(tokens):
            lp, rt_state = recognizer._step(np.array([tok]), enc_rt, rt_state)
            diffs.append(np.abs(np.exp(lp[0]) - np.exp(expected[t])))
    d = np.concatenate(diffs)
    return float(d.max()), float(d.mean())


def utt_rows(ids, refs, hyps):
    from fairseq_quant.stats import utterance_errors

    return utterance_errors([(u, refs[u], hyps[u]) for u in ids])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="exp/default")
    parser.add_argument("--subsets", default="test-clean,test-other")
    parser.add_argument("--rows", default=",".join(ROWS))
    parser.add_argument("--out", help="default: WORKDIR/parity")
    args = parser.parse_args(argv)
    import sentencepiece as spm
    import torch

    torch.set_num_threads(1)
    import fairseq_quant  # noqa: F401
    from fairseq_quant.evaluate import load_checkpoint
    from fairseq_quant.export.exporter import export_checkpoint
    from fairseq_quant_runtime.audio import features
    from fairseq_quant_runtime.recognizer import Recognizer
    from fairseq_quant.stats import paired_relative_change, wer_interval

    work = Path(args.workdir)
    data = work / "data"
    out = Path(args.out or work / "parity")
    out.mkdir(parents=True, exist_ok=True)
    subsets = args.subsets.split(",")
    manifests = {s: json.loads((data / f"{s}.json").read_text())["utts"] for s in subsets}
    manifest = {u: e for m in manifests.values() for u, e in m.items()}
    refs = {u: e["output"]["text"].strip() for u, e in manifest.items()}
    t0 = time.perf_counter()
    feats = {u: features(e["input"]["path"]) for u, e in manifest.items()}
    print(f"features of {len(feats)} utterances: {time.perf_counter() - t0:.1f} s", flush=True)
    sp = spm.SentencePieceProcessor(model_file=str(data / "spm.model"))
    ids = {s: list(m) for s, m in manifests.items()}
    lines = ["| row | decoder | WER % [95% CI] | rel. change vs fairseq [95% CI] | identical transcripts | "
             "max / mean abs probability diff |", "|---|---|---:|---:|---:|---:|"]
    report = []
    for row in args.rows.split(","):
        ckpt = work / "qat" / f"qat-{row}" / "checkpoint_best.pt"
        if not ckpt.is_file():
            print(f"runtime_parity: skipping {row}: no {ckpt}", file=sys.stderr)
            continue
        model, task = load_checkpoint(ckpt, data)
        fairseq = decode_fairseq(model, task, sp, feats, list(manifest))
        systems = {"fairseq fake-quant (batches of 10)": (fairseq, None)}
        model_file = out / f"{row}.fqm"
        export_checkpoint(ckpt, data, model_file, exact_activations=True)
        for mode, kernels in (("kernel", ("fp32", "nbits")), ("exact", ("fp32", "fp32"))):
            rec = Recognizer(model_file, *kernels, activations=mode)
            hyps = decode_runtime(rec, feats, list(manifest))
            systems[f"runtime, activations {mode} (encoder {kernels[0]}, decoder {kernels[1]})"] = (
                hyps, logit_differences(model, rec, feats, manifest, list(manifest)))
        base = [utt_rows(ids[s], refs, fairseq) for s in subsets]
        # the main job's fairseq decode (other batching) as a reference for what re-batching alone changes
        main_tsv = work / "eval" / f"qat-{row}"
        main_hyps = {}
        for s in subsets:
            for line in (main_tsv / f"{s}.utt.tsv").read_text().splitlines()[1:]:
                fields = line.split("\t")
                main_hyps[fields[0]] = fields[6]
        systems = {"fairseq fake-quant (main job's batches)": (main_hyps, None), **systems}
        for name, (hyps, logits) in systems.items():
            groups = [utt_rows(ids[s], refs, hyps) for s in subsets]
            ci = wer_interval(groups)
            same = sum(hyps[u] == fairseq[u] for u in manifest)
            change = "-" if hyps is fairseq else paired_relative_change(base, groups).format(signed=True)
            logit = "-" if logits is None else f"{logits[0]:.3f} / {logits[1]:.5f}"
            lines.append(f"| {row} | {name} | {ci.format(digits=2)} | {change} | {same}/{len(manifest)} "
                         f"({100 * same / len(manifest):.1f}%) | {logit} |")
            report.append({"row": row, "system": name, "wer": ci.value, "wer_ci": [ci.lo, ci.hi],
                           "identical": same, "utterances": len(manifest), "logit_diff": logits})
        print("\n".join(lines[-len(systems):]), flush=True)
    words = sum(len(refs[u].split()) for u in manifest)
    table = "\n".join(lines) + f"\n\n{len(manifest)} utterances ({', '.join(subsets)}), {words} words, beam 5, joint CTC/attention "
                                   "decoding (CTC weight 0.5) on both sides.\n"
    (out / "parity.md").write_text(table)
    (out / "parity.json").write_text(json.dumps(report, indent=2))
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
