#!/usr/bin/env python
"""WER of a fairseq speech checkpoint (fp32 or quant) on prepared subsets.

    python scripts/evaluate.py --checkpoint exp/fp32/checkpoint_best.pt --data exp/data \
        --subsets dev-clean,dev-other,test-clean,test-other --beam 5 --out exp/eval/fp32
"""
import argparse
import logging
import sys
from pathlib import Path

import torch

from fairseq_quant_runtime.decoding import DecodingConfig, DecodingError


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", "--path", dest="checkpoint", required=True,
                        help="a fairseq checkpoint (fp32, calibrated PTQ or QAT; --path as fairseq-generate)")
    parser.add_argument("--data", required=True, help="prepared data directory (dict.txt, {subset}.json, spm model)")
    parser.add_argument("--subsets", "--gen-subset", dest="subsets", default="dev-clean,dev-other,test-clean,test-other",
                        help="comma-separated subsets (default dev-clean,dev-other,test-clean,test-other)")
    DecodingConfig.add_arguments(parser)
    parser.add_argument("--spm-model", default=None, help="default: the SentencePiece model in --data")
    parser.add_argument("--max-tokens", type=int, default=60000,
                        help="batch size in 10 ms feature frames (default 60000)")
    parser.add_argument("--out", required=True, help="directory for ref/hyp files, wer.json and wer.md")
    parser.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda when available)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--dynamic-int8", action="store_true",
                        help="baseline: decode with torch.ao dynamic int8 Linear layers (CPU; attention stays fp32)")
    args = parser.parse_args(argv)
    try:
        decoding = DecodingConfig.from_args(args)
    except DecodingError as err:
        parser.error(str(err))
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    if args.max_tokens < 1:
        parser.error(f"--max-tokens must be >= 1, got {args.max_tokens}")
    if Path(args.checkpoint).suffix == ".fqm":
        print(f"evaluate: error: {args.checkpoint} is an exported model file (.fqm) for the on-device runtime, not "
              "a fairseq checkpoint: decode it with python -m fairseq_quant_runtime --model FILE --manifest "
              "DATA/SUBSET.json", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s | %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    import fairseq_quant  # noqa: F401  (registers the quant_ models with fairseq)
    from fairseq_quant.evaluate import evaluate, format_table

    try:
        results = evaluate(args.checkpoint, args.data, [s for s in args.subsets.split(",") if s], args.out,
                           spm_model=args.spm_model, max_tokens=args.max_tokens, device=args.device,
                           dynamic_int8=args.dynamic_int8, **decoding.to_dict())
    except (FileNotFoundError, RuntimeError, ValueError) as err:
        print(f"evaluate: error: {err}", file=sys.stderr)
        return 2
    print(format_table(results), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
