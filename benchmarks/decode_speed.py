#!/usr/bin/env python
"""Decoding speed, peak memory and file size: fairseq eager (fp32, torch dynamic int8) against the ONNX Runtime
decoder (fp32, 8-, 4- and 2-bit exports), on the same utterances and batches, side by side in one run.

Each row runs in its own process (peak memory = that process's maximum resident set), at 1 and 2 threads, in the
full environment (torch and fairseq installed; the runtime imports neither). Both engines decode with the same
DecodingConfig (joint CTC/attention beam search by default, as the runtime's CLI and scripts/evaluate.py) and
the same batches. End to end = audio read + features + encoder + beam search; the encoder and the decoder steps
are also timed apart. Ratios are against fairseq fp32 eager and against the runtime at fp32, at the same
thread count.

    python benchmarks/decode_speed.py --workdir exp/default --subsets test-clean,test-other --out exp/default/speed
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from fairseq_quant_runtime.decoding import BATCH_FRAMES, DecodingConfig, length_batches  # noqa: E402  (plain Python: no torch)
from fairseq_quant_runtime.wer import word_error_rate  # noqa: E402
BUNDLE = ROOT / "recipes/librispeech/reference"
# row -> (engine, checkpoint relative to the workdir or "reference", kernels)
ROWS = {
    "fairseq-fp32": ("fairseq", "reference", None),
    "fairseq-dynamic-int8": ("fairseq-int8", "reference", None),
    "runtime-fp32": ("runtime", "reference", ("fp32", "fp32")),
    # the runtime's defaults: fp32 encoder kernels, decoder kernels chosen by timing at load
    "runtime-w8a8": ("runtime", "qat/qat-w8a8/checkpoint_best.pt", ("fp32", "auto")),
    "runtime-w4a8": ("runtime", "qat/qat-w4a8/checkpoint_best.pt", ("fp32", "auto")),
    "runtime-mixed2a8": ("runtime", "qat/qat-mixed2a8/checkpoint_best.pt", ("fp32", "auto")),
    "runtime-w2a8": ("runtime", "qat/qat-w2a8/checkpoint_best.pt", ("fp32", "auto")),
    "runtime-searched": ("runtime", "qat/qat-searched/checkpoint_best.pt", ("fp32", "auto")),
    # the model's own activation grids (exported with --exact-activations), where `auto` is int8-static
    # (MatMulIntegerToFloat: the grids' integers times the stored ones): the QAT model's function, in integers
    "runtime-searched-exact": ("runtime", "qat/qat-searched/checkpoint_best.pt", ("auto", "auto")),
    # the same graphs with fp32 kernels: the same function to rounding (what int8-static's rounding changes)
    "runtime-searched-exact-fp32": ("runtime", "qat/qat-searched/checkpoint_best.pt", ("fp32", "fp32")),
    # the low-bit kernels forced: MatMulNBits in the decoder steps, and in the encoder too
    "runtime-w2a8-nbits-decoder": ("runtime", "qat/qat-w2a8/checkpoint_best.pt", ("fp32", "nbits")),
    "runtime-w2a8-nbits-all": ("runtime", "qat/qat-w2a8/checkpoint_best.pt", ("nbits", "nbits")),
    # int8 kernels (DynamicQuantizeMatMul: the stored integers as int8 weights, activations to uint8 at run time)
    "runtime-searched-int8-decoder": ("runtime", "qat/qat-searched/checkpoint_best.pt", ("fp32", "int8")),
    "runtime-searched-int8-all": ("runtime", "qat/qat-searched/checkpoint_best.pt", ("int8", "int8")),
}
EXACT_ROWS = {"runtime-searched-exact", "runtime-searched-exact-fp32"}  # decoded with --activations exact


def batches(manifests: list[Path], limit: int | None):
    """The utterances in the runtime's batches (sorted by length, up to BATCH_FRAMES padded frames): the same
    batches for every row, fairseq's included."""
    utts = []
    for manifest in manifests:
        entries = json.loads(manifest.read_text())["utts"]
        utts += [(u, e["input"]["path"], e["output"]["text"].strip(), e["input"]["length_ms"])
                 for u, e in entries.items()]
    if limit:
        utts = utts[:limit]
    return [[utts[i] for i in b] for b in length_batches([ms // 10 for *_, ms in utts], BATCH_FRAMES)]


# ---------------------------------------------------------------------------------------------------------
# workers (one process per row and thread count)
# ---------------------------------------------------------------------------------------------------------
def worker_fairseq(args, groups) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    import fairseq_quant  # noqa: F401
    from fairseq_quant.evaluate import load_checkpoint, sequence_generator
    from recipes.librispeech.prepare_data import load_features

    model, task = load_checkpoint(args.checkpoint, args.data)
    if args.engine == "fairseq-int8":
        from fairseq_quant.baselines import dynamic_int8

        model, _ = dynamic_int8(model)
    gen = sequence_generator(model, task, DecodingConfig.from_args(args))
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(Path(args.data) / "spm.model"))
    ready_at = time.time()  # imports, checkpoint, generator: the process's start-up ends here
    times = {"features": 0.0, "encoder": 0.0, "search": 0.0}
    hyps = []
    with torch.no_grad():
        for group in groups:
            t0 = time.perf_counter()
            feats = [load_features(p) for _, p, _, _ in group]
            lengths = torch.tensor([f.shape[0] for f in feats])
            x = torch.zeros(len(feats), int(lengths.max()), feats[0].shape[1])
            for i, f in enumerate(feats):
                x[i, : f.shape[0]] = f
            t1 = time.perf_counter()
            model.encoder(x, lengths)
            t2 = time.perf_counter()
            out = gen.generate([model], {"net_input": {"src_tokens": x, "src_lengths": lengths}})
            t3 = time.perf_counter()
            times["features"] += t1 - t0
            times["encoder"] += t2 - t1
            times["search"] += t3 - t2  # includes its own encoder pass
            for o in out:
                pieces = task.target_dictionary.string(o[0]["tokens"].int())
                hyps.append(sp.decode_pieces(pieces.split()).strip() if pieces else "")
    times["decoder"] = times["search"] - times["encoder"]
    times["total"] = times["features"] + times["search"]
    return {"times": times, "hyps": hyps, "ready_at": ready_at}


def worker_runtime(args, groups) -> dict:
    """With 2 threads or more, one core computes the features of the next batches in a worker process while
    ONNX Runtime decodes with the others (kaldi-native-fbank is single-threaded)."""
    from fairseq_quant_runtime.audio import features_ahead
    from fairseq_quant_runtime.recognizer import Recognizer

    enc_kernel, dec_kernel = args.kernels.split(",")
    feature_workers = 1 if args.threads > 1 else 0
    rec = Recognizer(args.model_file, enc_kernel, dec_kernel, threads=args.threads - feature_workers,
                     activations=args.activations)
    config = DecodingConfig.from_args(args)
    ready_at = time.time()  # imports, the .fqm file, the sessions (and `auto`'s timing): start-up ends here
    times = {"features": 0.0, "encoder": 0.0, "search": 0.0}
    hyps = []
    stream = features_ahead([[p for _, p, _, _ in group] for group in groups], feature_workers)
    for _ in groups:
        t0 = time.perf_counter()
        feats = next(stream)
        t1 = time.perf_counter()
        rec.encode(feats)
        t2 = time.perf_counter()
        texts = rec.decode(feats, config)
        t3 = time.perf_counter()
        times["features"] += t1 - t0  # with a feature worker: only the time spent waiting for it
        times["encoder"] += t2 - t1
        times["search"] += t3 - t2
        hyps += texts
    times["decoder"] = times["search"] - times["encoder"]
    # end to end: features (or the wait for them) and the search, which runs the encoder again itself
    # (the separate encoder pass above only times it)
    times["total"] = times["features"] + times["search"]
    return {"times": times, "hyps": hyps, "ready_at": ready_at, "kernels": rec.kernels, "feature_workers": feature_workers,
            "frameworks_loaded": sorted({k.split(".")[0] for k in sys.modules} & {"torch", "fairseq"})}


def peak_rss_mb() -> float:
    """This process's own peak resident set (VmHWM). getrusage's ru_maxrss is not: Linux carries the parent's peak
    over fork and execve, so a worker started by a driver that had exported a model with torch reported the
    driver's 0.7 GB (the runtime rows of the 2026-12-04 tables before this fix)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:  # not Linux
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_worker(args) -> int:
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    groups = batches([Path(m) for m in args.manifests.split(",")], args.limit)
    result = worker_runtime(args, groups) if args.engine == "runtime" else worker_fairseq(args, groups)
    # the process's peak, plus its feature worker's (a child) where there is one: an upper bound of the total
    result["peak_rss_mb"] = peak_rss_mb() + resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    result["refs"] = [ref for group in groups for _, _, ref, _ in group]
    result["utts"] = [utt for group in groups for utt, _, _, _ in group]
    result["decoding"] = DecodingConfig.from_args(args).to_dict()
    result["audio_s"] = sum(ms for group in groups for _, _, _, ms in group) / 1000
    Path(args.result).write_text(json.dumps(result))
    return 0


# ---------------------------------------------------------------------------------------------------------
# driver
# ---------------------------------------------------------------------------------------------------------
def export_path(row: str, out_dir: Path) -> Path:
    """The row's .fqm: one file per checkpoint and export kind (the kernel variants of a row share it)."""
    stem = row.removeprefix("runtime-").split("-nbits")[0].split("-exact")[0]
    return out_dir / f"{stem}{'-exact' if row in EXACT_ROWS else ''}.fqm"


def ensure_export(row: str, checkpoint: Path, data: Path, out_dir: Path) -> Path:
    from fairseq_quant.export.exporter import export_checkpoint

    path = export_path(row, out_dir)
    if not path.is_file():
        export_checkpoint(checkpoint, data, path, float16=row != "runtime-fp32", exact_activations=row in EXACT_ROWS)
    return path


def wer(refs, hyps) -> float:
    return word_error_rate(refs, hyps)["wer"]


def decoding_flags(args) -> list[str]:
    config = DecodingConfig.from_args(args)
    flags = ["--beam", str(config.beam), "--max-len-a", str(config.max_len_a), "--max-len-b", str(config.max_len_b),
             "--len-penalty", str(config.len_penalty)]
    return flags + (["--ctc-weight", str(config.ctc_weight)] if config.ctc_weight is not None else [])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="exp/default", help="the main job's workdir (data/, qat/)")
    parser.add_argument("--subsets", default="test-clean,test-other")
    parser.add_argument("--rows", default=",".join(ROWS))
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--limit", type=int, help="first N utterances only")
    DecodingConfig.add_arguments(parser)
    parser.add_argument("--out", help="default: WORKDIR/speed")
    parser.add_argument("--repeats", type=int, default=1,
                        help="runs of every row, rows interleaved; the table shows each row's medians (default 1)")
    parser.add_argument("--reuse", action="store_true",
                        help="keep the results of (row, threads) pairs already measured in --out")
    # worker mode
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--engine", help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--model-file", help=argparse.SUPPRESS)
    parser.add_argument("--kernels", help=argparse.SUPPRESS)
    parser.add_argument("--activations", default="kernel", help=argparse.SUPPRESS)
    parser.add_argument("--manifests", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        args.threads = int(args.threads)
        return run_worker(args)

    work = Path(args.workdir)
    data = work / "data"
    out = Path(args.out or work / "speed")
    out.mkdir(parents=True, exist_ok=True)
    manifests = ",".join(str(data / f"{s}.json") for s in args.subsets.split(","))
    results = {}
    plan = []  # (row, engine, checkpoint, file bytes, model file, kernels)
    for row in args.rows.split(","):
        engine, ckpt, kernels = ROWS[row]
        checkpoint = BUNDLE / "model.pt" if ckpt == "reference" else work / ckpt
        if not checkpoint.is_file():
            print(f"decode_speed: skipping {row}: no checkpoint {checkpoint}", file=sys.stderr)
            continue
        size = checkpoint.stat().st_size
        model_file = None
        if engine == "runtime":
            model_file = ensure_export(row, checkpoint, data, out / "exports")
            size = model_file.stat().st_size
        plan.append((row, engine, checkpoint, size, model_file, kernels))
    runs: dict[tuple[str, int], list[dict]] = {}
    reused = set()
    # with --repeats, every row runs once per round, rows interleaved, so that a slow spell of the machine falls on
    # all rows alike; each row's times are then the medians of its runs
    for rep in range(args.repeats):
        for row, engine, checkpoint, size, model_file, kernels in plan:
            for threads in (int(t) for t in args.threads.split(",")):
                combined = out / f"{row}.t{threads}.json"
                if args.reuse and combined.is_file():
                    if rep == 0:
                        runs[(row, threads)] = [json.loads(combined.read_text())]
                        reused.add((row, threads))
                    continue
                result_path = combined if args.repeats == 1 else out / f"{row}.t{threads}.run{rep}.json"
                cmd = [sys.executable, __file__, "--worker", "--engine", engine, "--threads", str(threads),
                       "--data", str(data), "--manifests", manifests, "--result", str(result_path),
                       "--checkpoint", str(checkpoint), *decoding_flags(args)]
                if model_file:
                    cmd += ["--model-file", str(model_file), "--kernels", ",".join(kernels),
                            "--activations", "exact" if row in EXACT_ROWS else "kernel"]
                if args.limit:
                    cmd += ["--limit", str(args.limit)]
                env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
                spawned = time.time()
                proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
                process_s = time.time() - spawned
                if proc.returncode:
                    print(f"decode_speed: {row} at {threads} thread(s) failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
                    return 1
                r = json.loads(result_path.read_text())
                # start-up: from the spawn to the model ready (interpreter, imports, loading); the whole process
                # includes its exit (the README's first measurement of the issue: one command, start to end)
                r.update({"startup_s": r["ready_at"] - spawned, "process_s": process_s})
                result_path.write_text(json.dumps(r))
                runs.setdefault((row, threads), []).append(r)
                print(f"{row:<28} {threads} thread(s), run {rep + 1}/{args.repeats}: total "
                      f"{r['times']['total']:.1f} s, WER {wer(r['refs'], r['hyps']):.2f}", flush=True)
    results = {}
    for row, engine, checkpoint, size, model_file, kernels in plan:
        for threads in (int(t) for t in args.threads.split(",")):
            r = combine_runs(runs[(row, threads)])
            if args.repeats > 1 and (row, threads) not in reused:
                (out / f"{row}.t{threads}.json").write_text(json.dumps(r))  # what --reuse reads
            r.update({"row": row, "threads": threads, "file_bytes": size, "wer": wer(r["refs"], r["hyps"]),
                      "checkpoint": str(checkpoint)})
            results[(row, threads)] = r
    table = format_table(results)
    print(table)
    (out / "decode_speed.md").write_text(table)
    (out / "decode_speed.json").write_text(json.dumps(
        [{k: v for k, v in r.items() if k not in ("hyps", "refs")} for r in results.values()], indent=2))
    return 0


def combine_runs(runs: list[dict]) -> dict:
    """One row's result from its repeated runs: the median of every time (each part, start-up, whole process), the
    largest peak memory, the first run's transcripts (the runs must agree on them: the same model and inputs), and
    each run's end-to-end total under "runs". One run is returned as it is."""
    if len(runs) == 1:
        return runs[0]
    if any(r["hyps"] != runs[0]["hyps"] for r in runs[1:]):
        raise ValueError("repeated runs of one row decoded different transcripts")
    out = dict(runs[0])
    out["times"] = {k: float(np.median([r["times"][k] for r in runs])) for k in runs[0]["times"]}
    for key in ("startup_s", "process_s"):
        if all(key in r for r in runs):
            out[key] = float(np.median([r[key] for r in runs]))
    out["peak_rss_mb"] = max(r["peak_rss_mb"] for r in runs)
    out["runs"] = [r["times"]["total"] for r in runs]
    return out


def whole_process(r: dict | None) -> float | None:
    """A worker's seconds from spawn to exit less its timing-only encoder pass (the worker runs the encoder once
    alone to time it, then again inside the search): what one command decoding the same files takes."""
    if not r or r.get("process_s") is None:
        return None
    return r["process_s"] - r["times"]["encoder"]


def wer_change(base: dict | None, r: dict) -> str:
    """``r``'s relative WER change against ``base`` (the same checkpoint decoded by the table's first row of it)
    with the paired 95% interval resampling speakers; "-" for the base row itself or results without ids."""
    if base is None or base is r or "utts" not in base or "utts" not in r:
        return "-"
    from fairseq_quant.stats import paired_relative_change, utterance_errors

    def errors(x):
        return [utterance_errors(list(zip(x["utts"], x["refs"], x["hyps"])))]

    change = paired_relative_change(errors(base), errors(r))
    return f"{change.format(signed=True)} vs {base['row']}" + ("" if change.excludes_zero else " (n.s.)")


def format_table(results: dict) -> str:
    lines = []
    for threads in sorted({t for _, t in results}):
        base = results.get(("fairseq-fp32", threads))
        rt = results.get(("runtime-fp32", threads))
        some = next(r for (_, t), r in results.items() if t == threads)
        lines += [f"\n**{threads} thread(s)**, {len(some['refs'])} utterances, {some['audio_s']:.0f} s of audio, "
                  f"beam {some['decoding']['beam']}, joint CTC/attention on both sides, batches of up to "
                  f"{BATCH_FRAMES} padded frames"
                  + (f"; times are medians of {len(some['runs'])} runs, rows interleaved" if "runs" in some else "")
                  + "\n",
                  "| row | kernels (encoder / decoder) | file MB | WER % | RTF | end-to-end speed-up vs fairseq fp32 | vs runtime fp32 | "
                  "encoder s | decoder steps s | decoder speed-up vs runtime fp32 | encoder vs runtime fp32 | "
                  "peak RSS MB | start-up s | whole process s (less the timing-only encoder pass) | whole process vs fairseq fp32 | "
                  "WER rel. change vs the same checkpoint's first row [95% CI, speakers] |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        first_of = {}  # checkpoint -> its first row at this thread count
        for (_, t), r in results.items():
            if t == threads:
                first_of.setdefault(r.get("checkpoint"), r)
        for (row, t), r in results.items():
            if t != threads:
                continue
            tm = r["times"]
            vs_base = base["times"]["total"] / tm["total"] if base else float("nan")
            vs_rt = rt["times"]["total"] / tm["total"] if rt else float("nan")
            dec = rt["times"]["decoder"] / tm["decoder"] if rt else float("nan")
            enc = tm["encoder"] / rt["times"]["encoder"] if rt else float("nan")
            startup, process, base_process = r.get("startup_s"), whole_process(r), whole_process(base)
            whole = f"x{base_process / process:.2f}" if process and base_process else "-"
            kernels = r.get("kernels")
            kernels = f"{kernels['encoder']} / {kernels['decoder']}" if kernels else "torch eager"
            lines.append(f"| {row} | {kernels} | {r['file_bytes'] / 1e6:.3f} | {r['wer']:.2f} | {tm['total'] / r['audio_s']:.4f} | "
                         f"x{vs_base:.2f} | x{vs_rt:.2f} | {tm['encoder']:.2f} | {tm['decoder']:.2f} | x{dec:.2f} | "
                         f"{enc:.2f} | {r['peak_rss_mb']:.0f} | "
                         f"{f'{startup:.2f}' if startup is not None else '-'} | "
                         f"{f'{process:.2f}' if process is not None else '-'} | {whole} | "
                         f"{wer_change(first_of.get(r.get('checkpoint')), r)} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
