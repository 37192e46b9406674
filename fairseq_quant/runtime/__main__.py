"""Transcribe audio files with an exported model, or a whole manifest with its WER (no torch, no fairseq).

    python -m fairseq_quant.runtime --model w2a8.fqm a.flac b.wav
    python -m fairseq_quant.runtime --model w2a8.fqm --manifest exp/default/data/test-clean.json \\
        --out exp/default/runtime/w2a8     # writes test-clean.utt.tsv and wer.json, prints the WER
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from .fqm import ModelFileError


def read_manifest(path: Path) -> list[tuple[str, str, str]]:
    """(utterance id, audio path, reference text) from a prepared-data manifest (``{"utts": {...}}``)."""
    try:
        utts = json.loads(Path(path).read_text())["utts"]
        return [(u, e["input"]["path"], e["output"]["text"].strip()) for u, e in utts.items()]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"cannot read manifest {path}: {err}") from err


def decode_manifest(recognizer, manifest: Path, beam: int, batch_frames: int, max_len_a: float, max_len_b: int,
                    feature_workers: int = 0, **decode_options):
    """[(id, ref, hyp)] in manifest order, plus seconds of audio and of decoding (features included).

    Utterances are batched by length (from the audio files' headers) up to ``batch_frames`` padded frames;
    with ``feature_workers`` the features of the next batches are computed in worker processes meanwhile."""
    import soundfile

    from .audio import AudioError, features_ahead

    rows = read_manifest(manifest)
    start = time.perf_counter()
    paths = {u: p for u, p, _ in rows}
    lengths = {}
    for u, p, _ in rows:
        try:
            lengths[u] = soundfile.info(p).frames // 160
        except (RuntimeError, soundfile.LibsndfileError) as err:
            raise AudioError(f"{p}: not a readable audio file ({err})") from err
    batches, batch = [], []
    for u in sorted(lengths, key=lambda u: lengths[u]):
        if batch and (len(batch) + 1) * max(lengths[u], 1) > batch_frames:
            batches.append(batch)
            batch = []
        batch.append(u)
    if batch:
        batches.append(batch)
    hyps, frames = {}, 0
    for batch, feats in zip(batches, features_ahead([[paths[u] for u in b] for b in batches], feature_workers)):
        texts = recognizer.transcribe_features(feats, beam, max_len_a=max_len_a, max_len_b=max_len_b, **decode_options)
        hyps.update(zip(batch, texts))
        frames += sum(f.shape[0] for f in feats)
    seconds = time.perf_counter() - start
    return [(u, ref, hyps[u]) for u, _, ref in rows], frames / 100.0, seconds


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fairseq_quant.runtime", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="an exported .fqm file (scripts/export_model.py)")
    parser.add_argument("audio", nargs="*", help="audio files (16 kHz mono; other rates are resampled)")
    parser.add_argument("--manifest", help="prepared-data manifest: decode every utterance and report the WER")
    parser.add_argument("--out", help="with --manifest: write {subset}.utt.tsv and wer.json here")
    parser.add_argument("--beam", type=int, default=5, help="beam size (1 = greedy)")
    parser.add_argument("--max-len-a", type=float, default=0.2)
    parser.add_argument("--max-len-b", type=int, default=10)
    parser.add_argument("--ctc-weight", type=float, default=None,
                        help="joint CTC/attention beam search with this CTC weight (default 0.5 for a model with a "
                             "CTC head; 0: the attention decoder alone)")
    parser.add_argument("--batch-frames", type=int, default=6000, help="frames per batch in --manifest mode")
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime threads for the encoder")
    parser.add_argument("--feature-workers", type=int, default=0,
                        help="--manifest: processes computing the next batches' features meanwhile")
    parser.add_argument("--encoder-kernel", default="fp32", choices=("fp32", "nbits", "auto"),
                        help="fp32: dequantized weights; nbits: MatMulNBits; auto: the faster here, timed at load")
    parser.add_argument("--decoder-kernel", default="auto", choices=("fp32", "nbits", "auto"))
    parser.add_argument("--activations", default="kernel", choices=("kernel", "exact"),
                        help="exact: the QAT model's static activation grids (export with --exact-activations)")
    args = parser.parse_args(argv)
    if not args.audio and not args.manifest:
        parser.error("give audio files or --manifest")
    from .audio import AudioError
    from .recognizer import Recognizer

    try:
        recognizer = Recognizer(args.model, args.encoder_kernel, args.decoder_kernel, args.threads, args.activations)
        args.kernels_used = recognizer.kernels
        for path in args.audio:
            text = recognizer.transcribe([path], args.beam, max_len_a=args.max_len_a, max_len_b=args.max_len_b,
                                         ctc_weight=args.ctc_weight)[0]
            print(f"{path}\t{text}")
        if args.manifest:
            rows, audio_s, seconds = decode_manifest(recognizer, Path(args.manifest), args.beam, args.batch_frames,
                                                     args.max_len_a, args.max_len_b, args.feature_workers,
                                                     ctc_weight=args.ctc_weight)
            report_manifest(rows, audio_s, seconds, args)
    except (ModelFileError, AudioError, ValueError) as err:
        print(f"fairseq_quant.runtime: {err}", file=sys.stderr)
        return 2
    return 0


def report_manifest(rows, audio_s: float, seconds: float, args) -> None:
    import jiwer

    refs, hyps = [r for _, r, _ in rows], [h for _, _, h in rows]
    out = jiwer.process_words(refs, hyps)
    words = sum(len(r.split()) for r in refs)
    errors = out.substitutions + out.deletions + out.insertions
    wer = 100.0 * errors / max(words, 1)
    subset = Path(args.manifest).stem
    print(f"{subset}: WER {wer:.2f}% ({errors} errors / {words} words, {len(rows)} utterances); "
          f"real-time factor {seconds / audio_s:.4f} ({seconds:.1f} s for {audio_s:.1f} s of audio, "
          f"{args.threads} thread(s))")
    if args.out:
        out_dir = Path(args.out)
        out_dir.mkdir(parents=True, exist_ok=True)
        lines = ["utt_id\twords\tsub\tdel\tins\treference\thypothesis"]
        for u, r, h in rows:
            m = jiwer.process_words(r, h) if r else None
            sub, dele, ins = (m.substitutions, m.deletions, m.insertions) if m else (0, 0, len(h.split()))
            lines.append(f"{u}\t{len(r.split())}\t{sub}\t{dele}\t{ins}\t{r}\t{h}")
        _atomic(out_dir / f"{subset}.utt.tsv", "\n".join(lines) + "\n")
        _atomic(out_dir / "wer.json", json.dumps({
            "model": str(args.model), "subset": subset, "beam": args.beam, "wer": round(wer, 2), "words": words,
            "utterances": len(rows), "audio_s": round(audio_s, 2), "decode_s": round(seconds, 2),
            "rtf": round(seconds / audio_s, 5), "threads": args.threads,
            "kernels": args.kernels_used}, indent=2) + "\n")


def _atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


if __name__ == "__main__":
    sys.exit(main())
