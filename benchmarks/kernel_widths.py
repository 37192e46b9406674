#!/usr/bin/env python
"""Where ONNX Runtime's low-bit kernels beat fp32 on this CPU: a transformer feed-forward block
(``x [N, d] -> MatMul [d, 4d] -> Relu -> MatMul [4d, d]``) at widths d = 128 ... 1024, run as fp32 MatMul,
``MatMulNBits`` at 4 and 2 bits as the runtime builds it (``fairseq_quant_runtime.graphs``): ``nbits`` at accuracy
level 1 (float activations: the model's own function) and ``nbits-int8`` at level 4 (activations rounded to int8
per block), the runtime's ``int8-static`` (``MatMulIntegerToFloat`` on static uint8 activation grids, as files
exported with exact activations run), and ONNX Runtime's dynamic int8 quantization (``MatMulInteger``), for
N = 10 rows (one decoder step: 2 utterances x beam 5) and N = 400 rows (an encoder batch). Median of repeated
runs at 1 thread, side by side in one process; ratios are fp32 time over the kernel's time (> 1: faster).

    python benchmarks/kernel_widths.py --out exp/kernel_widths
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fairseq_quant_runtime.fqm import QuantTensor  # noqa: E402
from fairseq_quant_runtime.graphs import matmul_int8_static, matmul_nbits  # noqa: E402

WIDTHS = (128, 256, 512, 1024)
ROWS = (10, 400)


def ffn(d: int, weights: dict[str, np.ndarray]) -> onnx.ModelProto:
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "w2"], ["y"], name="fc2")]
    graph = helper.make_graph(nodes, f"ffn{d}", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", d])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", d])],
                              [numpy_helper.from_array(w, name) for name, w in weights.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def quantized(w: np.ndarray, bits: int) -> QuantTensor:
    """[in, out] float weight -> per-output-channel symmetric integers in the exporter's [out, in] layout."""
    wt = w.T
    qmax = (1 << (bits - 1)) - 1
    scale = np.abs(wt).max(axis=1) / max(qmax, 1)
    q = np.clip(np.round(wt / scale[:, None]), -qmax - 1, qmax).astype(np.int32)
    return QuantTensor(shape=wt.shape, bits=bits, qmin=-qmax - 1, q=q, scale=scale.astype(np.float32))


def nbits_model(d: int, weights: dict[str, np.ndarray], bits: int, accuracy_level: int = 1) -> onnx.ModelProto:
    """The block with MatMulNBits at ``accuracy_level`` 1 (the runtime's nbits: float activations) or 4 (its
    nbits-int8: activations rounded to int8 per block)."""
    model = ffn(d, weights)
    graph = model.graph
    inits = []
    for i, node in enumerate(list(graph.node)):
        if node.op_type == "MatMul":
            new, new_inits = matmul_nbits(node, node.input[1], quantized(weights[node.input[1]], bits), accuracy_level)
            graph.node.remove(node)
            # the runtime builds its nodes with its own protobuf classes (no onnx import): same wire format
            graph.node.insert(i, onnx.NodeProto.FromString(new.SerializeToString()))
            inits += [onnx.TensorProto.FromString(t.SerializeToString()) for t in new_inits]
    kept = [t for t in graph.initializer if t.name not in weights]
    del graph.initializer[:]
    graph.initializer.extend(kept + inits)
    model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return model


def int8_static_model(d: int, weights: dict[str, np.ndarray], bits: int, scales: tuple[float, float]) -> onnx.ModelProto:
    """The block as a file exported with exact activations runs it under the runtime's int8-static kernel: each
    MatMul's input on a static uint8 grid (QuantizeLinear; ``scales`` of x, zero point 128, and of the Relu output,
    zero point 0), the stored ``bits``-bit integers as int8 weights, MatMulIntegerToFloat built by
    ``fairseq_quant_runtime.graphs.matmul_int8_static``."""
    sx, sr = scales
    consts = [numpy_helper.from_array(np.array(v, dtype=dt), name) for name, v, dt in
              (("sx", sx, np.float32), ("zx", 128, np.uint8), ("sr", sr, np.float32), ("zr", 0, np.uint8))]
    nodes = [helper.make_node("QuantizeLinear", ["x", "sx", "zx"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "sx", "zx"], ["xd"]),
             helper.make_node("MatMul", ["xd", "w1"], ["h"], name="fc1"), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("QuantizeLinear", ["r", "sr", "zr"], ["rq"]),
             helper.make_node("DequantizeLinear", ["rq", "sr", "zr"], ["rd"]),
             helper.make_node("MatMul", ["rd", "w2"], ["y"], name="fc2")]
    producers = {out: node for node in nodes for out in node.output}
    graph_nodes, inits = [], list(consts)
    for node in nodes:
        if node.op_type == "MatMul":
            new, new_inits = matmul_int8_static(node, node.input[1], quantized(weights[node.input[1]], bits), producers)
            # the runtime builds its nodes with its own protobuf classes (no onnx import): same wire format
            graph_nodes.append(onnx.NodeProto.FromString(new.SerializeToString()))
            inits += [onnx.TensorProto.FromString(t.SerializeToString()) for t in new_inits]
        elif node.op_type != "DequantizeLinear":
            graph_nodes.append(node)
    graph = helper.make_graph(graph_nodes, f"ffn{d}_int8_static",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", d])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", d])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])


def int8_model(d: int, weights: dict[str, np.ndarray]) -> onnx.ModelProto:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        onnx.save(ffn(d, weights), src)
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8)
        return onnx.load(dst)


def median_seconds(model: onnx.ModelProto, x: np.ndarray, repeats: int) -> float:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    for _ in range(3):
        sess.run(None, {"x": x})
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        sess.run(None, {"x": x})
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--widths", default=",".join(map(str, WIDTHS)))
    parser.add_argument("--rows", default=",".join(map(str, ROWS)))
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--out", default=None, help="directory for kernel_widths.md and .json")
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    results = []
    lines = ["| width d | rows N | fp32 ms | int8 dynamic vs fp32 | 4-bit nbits vs fp32 | 2-bit nbits vs fp32 | "
             "4-bit nbits-int8 vs fp32 | 2-bit nbits-int8 vs fp32 | 2-bit int8-static vs fp32 |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for d in (int(w) for w in args.widths.split(",")):
        weights = {"w1": (rng.standard_normal((d, 4 * d)) / np.sqrt(d)).astype(np.float32),
                   "w2": (rng.standard_normal((4 * d, d)) / np.sqrt(4 * d)).astype(np.float32)}
        models = {"fp32": ffn(d, weights), "int8": int8_model(d, weights), "nbits4": nbits_model(d, weights, 4),
                  "nbits2": nbits_model(d, weights, 2), "nbits4_int8": nbits_model(d, weights, 4, 4),
                  "nbits2_int8": nbits_model(d, weights, 2, 4),
                  # x ~ N(0, 1) on [-4, 4); the Relu output (std ~0.7 here) on [0, 4)
                  "static2": int8_static_model(d, weights, 2, (4 / 128, 4 / 255))}
        for n in (int(r) for r in args.rows.split(",")):
            x = rng.standard_normal((n, d)).astype(np.float32)
            t = {k: median_seconds(m, x, args.repeats) for k, m in models.items()}
            results.append({"width": d, "rows": n, **{f"{k}_s": v for k, v in t.items()}})
            lines.append(f"| {d} | {n} | {1000 * t['fp32']:.3f} | x{t['fp32'] / t['int8']:.2f} | "
                         f"x{t['fp32'] / t['nbits4']:.2f} | x{t['fp32'] / t['nbits2']:.2f} | "
                         f"x{t['fp32'] / t['nbits4_int8']:.2f} | x{t['fp32'] / t['nbits2_int8']:.2f} | "
                         f"x{t['fp32'] / t['static2']:.2f} |")
            print(lines[-1], flush=True)
    table = "\n".join(lines) + (f"\n\nONNX Runtime {ort.__version__}, 1 thread, median of {args.repeats} runs; "
                                "a feed-forward block x -> [d, 4d] -> Relu -> [4d, d].\n")
    print(table)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "kernel_widths.md").write_text(table)
        (out / "kernel_widths.json").write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
