#!/usr/bin/env python
"""Convert: a multi-precision co-trained checkpoint at one allocation -> an ordinary quantized checkpoint.

    python scripts/collapse_cotrained.py --checkpoint exp/co/checkpoint_best.pt --bits 2 --out exp/co/w2.pt
    python scripts/collapse_cotrained.py --checkpoint CO.pt --strategy searched.yaml --out exp/co/searched.pt

A co-trained checkpoint (fairseq-train ... --criterion quant_cross_entropy_acc --co-precisions 4,2,1 on a strategy
with co_weight_bits) holds one set of weights and a learned step for each precision. This writes the model at
--bits (every module that has that precision; the others keep their own) or at the weight bits a strategy gives
each module (scripts/search_strategy.py --co-trained writes such strategies), keeping the co-trained weights,
steps and activation ranges. The output evaluates (scripts/evaluate.py), exports (scripts/export_model.py) and
fine-tunes like any quantized checkpoint.
"""
import argparse
import json
import logging
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a co-trained checkpoint")
    parser.add_argument("--bits", type=int, default=None, help="one precision for every module that has it")
    parser.add_argument("--strategy", default=None, help="a strategy YAML whose weight bits choose each module's")
    parser.add_argument("--out", required=True, help="the ordinary quantized checkpoint to write")
    args = parser.parse_args(argv)
    if (args.bits is None) == (args.strategy is None):
        parser.error("give either --bits N or --strategy FILE")
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s | %(message)s")
    import fairseq_quant  # noqa: F401  (registers the quant_ models with fairseq)
    from fairseq_quant.cotrained import collapse_checkpoint
    from fairseq_quant.quant import Strategy
    from fairseq_quant.quant.errors import FairseqQuantError

    try:
        strategy = Strategy.from_yaml(args.strategy) if args.strategy else None
        summary = collapse_checkpoint(args.checkpoint, args.out, precision=args.bits, strategy=strategy)
    except (FairseqQuantError, FileNotFoundError) as err:
        print(f"collapse_cotrained: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
