#!/usr/bin/env python
"""Export a fairseq checkpoint (QAT-quantized or fp32 VGGTransformer) to one ``.fqm`` file for the on-device
runtime (``python -m fairseq_quant_runtime``): bit-packed integer weights on the exact QAT grid, their scales,
float leftovers, the ONNX encoder and decoder-step graphs, the SentencePiece model and the feature settings.
Prints the size breakdown against the checkpoint's fp32 weights.

    python scripts/export_model.py --checkpoint exp/default/qat/qat-w2a8/checkpoint_best.pt \\
        --data exp/default/data --out exp/default/export/w2a8.fqm [--onnx-dir exp/default/export/w2a8.onnx]
"""
import argparse
import json
import logging
import sys
from pathlib import Path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="fairseq checkpoint (quant_vggtransformer_* or fp32)")
    parser.add_argument("--data", required=True, help="prepared data directory (dict.txt, spm.model)")
    parser.add_argument("--out", required=True, help="the .fqm file to write")
    parser.add_argument("--spm-model", help="SentencePiece model (default: the one in --data)")
    parser.add_argument("--fp32-floats", action="store_true",
                        help="store biases and normalisation in fp32 (default fp16, 2^-11 relative error; unquantized "
                             "weights are always fp32)")
    parser.add_argument("--fp16-scales", action="store_true",
                        help="store quantization scales in fp16 (smaller; weights then differ from the QAT grid "
                             "by at most 2^-11 relative)")
    parser.add_argument("--exact-activations", action="store_true",
                        help="also store graphs with the model's static activation grids (runtime "
                             "--activations exact: the fake-quantized model's function; with 8-bit grids the "
                             "runtime's int8-static kernel runs its linear layers in integers, the fastest path)")
    parser.add_argument("--onnx-dir", help="also write complete encoder.onnx and decoder.onnx here")
    parser.add_argument("--kernel", default="nbits", choices=("fp32", "nbits"),
                        help="weights of the --onnx-dir graphs: low-bit MatMulNBits or dequantized fp32")
    parser.add_argument("--qdq-dir", help="also write standard QDQ ONNX graphs here (encoder.qdq.onnx, "
                                          "decoder.qdq.onnx: QuantizeLinear/DequantizeLinear with the QAT scales, for "
                                          "int8 engines such as TensorRT; 8-bit static activation grids only)")
    parser.add_argument("--json", help="write the size breakdown as JSON here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")

    from fairseq_quant.export.exporter import ExportError, export_checkpoint, format_sizes

    try:
        sizes = export_checkpoint(args.checkpoint, args.data, args.out, spm_model=args.spm_model,
                                  float16=not args.fp32_floats, fp16_scales=args.fp16_scales,
                                  onnx_dir=args.onnx_dir, onnx_kernel=args.kernel,
                                  exact_activations=args.exact_activations)
    except (ExportError, FileNotFoundError, RuntimeError, ValueError) as err:
        print(f"export_model: {err}", file=sys.stderr)
        return 2
    print(format_sizes(sizes))
    if args.qdq_dir:
        from fairseq_quant.evaluate import load_checkpoint
        from fairseq_quant.export.qdq import export_qdq

        try:
            qdq = export_qdq(load_checkpoint(args.checkpoint, args.data)[0], args.qdq_dir)
        except ExportError as err:
            print(f"export_model: --qdq-dir: {err}", file=sys.stderr)
            return 2
        for graph, info in qdq["graphs"].items():
            print(f"QDQ {graph}: {info['path']} ({info['QuantizeLinear']} QuantizeLinear, {info['DequantizeLinear']} "
                  f"DequantizeLinear)")
        if qdq["float_sites"]:
            print(f"QDQ: activation sites kept float (16-bit rules): {', '.join(qdq['float_sites'])}")
    if args.json:
        Path(args.json).write_text(json.dumps(sizes, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
