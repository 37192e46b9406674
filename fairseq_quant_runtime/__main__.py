"""Transcribe audio files with an exported model, or a whole manifest with its WER (no torch, no fairseq).

    python -m fairseq_quant_runtime --model w2a8.fqm a.flac b.wav
    python -m fairseq_quant_runtime --model w2a8.fqm --manifest exp/default/data/test-clean.json \\
        --out exp/default/runtime/w2a8     # writes test-clean.utt.tsv and wer.json, prints the WER
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

# numpy's matrices here are small (features, CTC scores): BLAS threads only contend with ONNX Runtime's (measured
# under load: the mel-bank product took 3.2 ms with OpenBLAS's default threads, 0.19 ms with one); set before
# numpy loads, and only where the user has not chosen
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from .decoding import BATCH_FRAMES, DecodingConfig, DecodingError, length_batches
from .fqm import ModelFileError
from .graphs import KERNELS


def read_manifest(path: Path) -> list[tuple[str, str, str]]:
    """(utterance id, audio path, reference text) from a prepared-data manifest (``{"utts": {...}}``)."""
    try:
        utts = json.loads(Path(path).read_text())["utts"]
        return [(u, e["input"]["path"], e["output"]["text"].strip()) for u, e in utts.items()]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"cannot read manifest {path}: {err}") from err


def note_resampling(paths) -> None:
    """Say on stderr which inputs are not at the model's 16 kHz (they are resampled, which a user should know:
    telephone audio at 8 kHz lacks the upper half of the model's mel bins)."""
    import soundfile

    from .audio import SAMPLE_RATE

    rates = {}
    for path in paths:
        try:
            rate = soundfile.info(str(path)).samplerate
        except (RuntimeError, soundfile.LibsndfileError, TypeError):
            continue  # unreadable files get their own error when they are decoded
        if rate != SAMPLE_RATE:
            rates.setdefault(rate, []).append(str(path))
    for rate, files in sorted(rates.items()):
        example = files[0] + (f" and {len(files) - 1} more" if len(files) > 1 else "")
        print(f"fairseq_quant_runtime: note: {example}: {rate} Hz audio, resampled to {SAMPLE_RATE} Hz"
              + (" (it carries nothing above 4 kHz, where the model's upper mel bins listen)" if rate <= 8000 else ""),
              file=sys.stderr)


def decode_manifest(recognizer, manifest: Path, config: DecodingConfig, batch_frames: int, feature_workers: int = 0,
                    rows=None):
    """[(id, ref, hyp)] in manifest order, plus seconds of audio and of decoding (features included).

    Utterances are batched by length (from the audio files' headers) up to ``batch_frames`` padded frames;
    with ``feature_workers`` the features of the next batches are computed in worker processes meanwhile."""
    import soundfile

    from .audio import AudioError, features_ahead

    rows = read_manifest(manifest) if rows is None else rows
    start = time.perf_counter()
    paths = {u: p for u, p, _ in rows}
    lengths = {}
    for u, p, _ in rows:
        try:
            lengths[u] = soundfile.info(p).frames // 160
        except (RuntimeError, soundfile.LibsndfileError) as err:
            raise AudioError(f"{p}: not a readable audio file ({err})") from err
    ids = list(lengths)
    batches = [[ids[i] for i in b] for b in length_batches([lengths[u] for u in ids], batch_frames)]
    hyps, frames = {}, 0
    for batch, feats in zip(batches, features_ahead([[paths[u] for u in b] for b in batches], feature_workers)):
        texts = recognizer.decode(feats, config)
        hyps.update(zip(batch, texts))
        frames += sum(f.shape[0] for f in feats)
    seconds = time.perf_counter() - start
    return [(u, ref, hyps[u]) for u, _, ref in rows], frames / 100.0, seconds


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fairseq_quant_runtime", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="an exported .fqm file (scripts/export_model.py)")
    parser.add_argument("audio", nargs="*", help="audio files (16 kHz mono; other rates are resampled)")
    parser.add_argument("--manifest", help="prepared-data manifest: decode every utterance and report the WER")
    parser.add_argument("--out", help="with --manifest: write {subset}.utt.tsv and wer.json here")
    DecodingConfig.add_arguments(parser)
    parser.add_argument("--batch-frames", type=int, default=BATCH_FRAMES,
                        help=f"--manifest: padded 10 ms frames per batch (default {BATCH_FRAMES})")
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime threads for the encoder (default 1)")
    parser.add_argument("--feature-workers", type=int, default=0,
                        help="--manifest: processes computing the next batches' features meanwhile (default 0)")
    parser.add_argument("--encoder-kernel", default="auto", choices=(*KERNELS, "auto"),
                        help="fp32: dequantized weights; nbits: MatMulNBits (the packed low-bit weights, float "
                             "activations); int8-static (with --activations exact): the model's own 8-bit activation "
                             "grids times the stored integers in integer arithmetic (MatMulIntegerToFloat), the QAT "
                             "model's function; nbits-int8: MatMulNBits with activations rounded to int8 per block, and "
                             "int8: DynamicQuantizeMatMul (int8 weights, activations rounded to uint8 per tensor at run "
                             "time): faster where they are, but not the model the QAT trained; auto: the faster of "
                             "fp32 and nbits here, timed at load; with --activations exact, int8-static wherever the "
                             "model has 8-bit activation grids (not timed: its rounding differs from fp32's, and "
                             "transcripts should not depend on a timing) (default auto)")
    parser.add_argument("--decoder-kernel", default="auto", choices=(*KERNELS, "auto"),
                        help="(default auto)")
    parser.add_argument("--activations", default="kernel", choices=("kernel", "exact"),
                        help="exact: the QAT model's static activation grids (export with --exact-activations), "
                             "where int8-static runs them fastest; kernel: float activations (default kernel)")
    args = parser.parse_args(argv)
    if not args.audio and not args.manifest:
        parser.error("give audio files or --manifest")
    if args.out and not args.manifest:
        parser.error("--out writes a manifest's per-utterance results and WER: give --manifest too")
    for flag, value, least in (("--threads", args.threads, 1), ("--batch-frames", args.batch_frames, 1),
                               ("--feature-workers", args.feature_workers, 0)):
        if value < least:
            parser.error(f"{flag} must be >= {least}, got {value}")
    try:
        config = DecodingConfig.from_args(args)
    except DecodingError as err:
        parser.error(str(err))
    from .audio import AudioError
    from .recognizer import Recognizer

    try:
        rows = read_manifest(Path(args.manifest)) if args.manifest else None  # checked before any decoding
        note_resampling(args.audio + [p for _, p, _ in rows or []])
        recognizer = Recognizer(args.model, args.encoder_kernel, args.decoder_kernel, args.threads, args.activations)
        config.joint_weight(recognizer.has_ctc)  # a CTC weight for a model without a CTC head: refused up front
        args.kernels_used = recognizer.kernels
        for path in args.audio:
            text = recognizer.transcribe([path], **config.to_dict())[0]
            print(f"{path}\t{text}")
        if args.manifest:
            rows, audio_s, seconds = decode_manifest(recognizer, Path(args.manifest), config, args.batch_frames,
                                                     args.feature_workers, rows=rows)
            report_manifest(rows, audio_s, seconds, args)
    except (ModelFileError, AudioError, ValueError) as err:
        print(f"fairseq_quant_runtime: {err}", file=sys.stderr)
        return 2
    return 0


def report_manifest(rows, audio_s: float, seconds: float, args) -> None:
    from .files import atomic_write
    from .wer import corpus_wer, format_utterances, utterance_errors

    utts = utterance_errors(rows)
    totals = corpus_wer(utts)
    errors = totals["substitutions"] + totals["deletions"] + totals["insertions"]
    wer, words = totals["wer"], totals["words"]
    subset = Path(args.manifest).stem
    print(f"{subset}: WER {wer:.2f}% ({errors} errors / {words} words, {len(rows)} utterances); "
          f"real-time factor {seconds / audio_s:.4f} ({seconds:.1f} s for {audio_s:.1f} s of audio, "
          f"{args.threads} thread(s))")
    if args.out:
        out_dir = Path(args.out)
        atomic_write(out_dir / f"{subset}.utt.tsv", format_utterances(rows, utts))
        atomic_write(out_dir / "wer.json", json.dumps({
            "model": str(args.model), "subset": subset, **DecodingConfig.from_args(args).to_dict(),
            "wer": round(wer, 2), "words": words, "utterances": len(rows), "audio_s": round(audio_s, 2),
            "decode_s": round(seconds, 2), "rtf": round(seconds / audio_s, 5), "threads": args.threads,
            "kernels": args.kernels_used}, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
