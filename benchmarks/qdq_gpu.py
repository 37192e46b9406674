#!/usr/bin/env python
"""The QDQ export on an int8 GPU engine: ONNX Runtime with TensorRT (int8 from the graph's Q/DQ scales) or CUDA,
the fp32 encoder against the QDQ encoder, side by side in one run (median of repeated batches). On a machine
without a GPU execution provider it says so and measures nothing.

    python scripts/export_model.py --checkpoint QAT_W8A8.pt --data DATA --out m.fqm --onnx-dir onnx \\
        --kernel fp32 --qdq-dir onnx
    python benchmarks/qdq_gpu.py --onnx-dir onnx
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")


def median_ms(sess, feed, repeats: int) -> float:
    for _ in range(3):
        sess.run(None, feed)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        sess.run(None, feed)
        times.append(time.perf_counter() - start)
    return 1000 * float(np.median(times))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--onnx-dir", required=True, help="encoder.onnx (fp32) and encoder.qdq.onnx")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--frames", type=int, default=1000, help="10 ms frames per utterance")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args(argv)
    available = ort.get_available_providers()
    gpu = [p for p in GPU_PROVIDERS if p in available]
    if not gpu:
        print(f"qdq_gpu: no GPU execution provider in this onnxruntime ({', '.join(available)}): nothing measured. "
              "Install onnxruntime-gpu (with TensorRT for int8) on a GPU machine and run again.")
        return 0
    onnx_dir = Path(args.onnx_dir)
    feed = {"features": np.random.default_rng(0).standard_normal((args.batch, args.frames, 80), dtype=np.float32),
            "lengths": np.full(args.batch, args.frames, dtype=np.int64)}
    rows = []
    for provider in gpu:
        options = {"trt_int8_enable": True} if provider == "TensorrtExecutionProvider" else {}
        for name, path in (("fp32", onnx_dir / "encoder.onnx"), ("qdq int8", onnx_dir / "encoder.qdq.onnx")):
            sess = ort.InferenceSession(str(path), providers=[(provider, options if "qdq" in name else {})])
            rows.append((provider, name, median_ms(sess, feed, args.repeats)))
    print(f"| provider | encoder | ms per batch of {args.batch} x {args.frames / 100:.0f} s | speed-up vs fp32 |")
    print("|---|---|---:|---:|")
    for provider, name, ms in rows:
        base = next(m for p, n, m in rows if p == provider and n == "fp32")
        print(f"| {provider} | {name} | {ms:.2f} | x{base / ms:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
