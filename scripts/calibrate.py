#!/usr/bin/env python
"""Calibrate: a checkpoint plus a strategy -> a calibrated post-training-quantized checkpoint.

    python scripts/calibrate.py --checkpoint recipes/librispeech/reference/model.pt --data exp/default/data \
        --strategy recipes/librispeech/strategies/w8a8.yaml --out exp/ptq/w8a8.pt
    python scripts/calibrate.py ... --weight-bits 4 --act-bits 8        # a uniform strategy instead of a file

The output decodes (scripts/evaluate.py), exports (scripts/export_model.py) and is where quantization-aware
training starts (fairseq-train --arch quant_ARCH --quant-strategy SAME.yaml --finetune-from-model OUT). Given a
checkpoint quantized with another strategy, the modules whose spec is unchanged keep their quantizer state and the
others are re-initialised and recalibrated.
"""
import argparse
import json
import logging
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="fp32 fairseq checkpoint (or a quantized one to re-quantize)")
    parser.add_argument("--data", required=True, help="prepared data directory (dict.txt, {subset}.json)")
    parser.add_argument("--strategy", default=None, help="strategy YAML (see recipes/librispeech/strategies)")
    parser.add_argument("--weight-bits", default=None, help="uniform weight bits 1..8 (instead of --strategy)")
    parser.add_argument("--act-bits", default="fp32", help="uniform activation bits 1..8 or fp32 (default fp32)")
    parser.add_argument("--act-method", default="minmax", help="activation range estimator (with --weight-bits)")
    parser.add_argument("--weight-method", default="lsq", help="weight quantizer (with --weight-bits)")
    parser.add_argument("--subset", default="train", help="the subset whose batches calibrate (default train)")
    parser.add_argument("--batches", type=int, default=16, help="calibration batches (default 16)")
    parser.add_argument("--batch-size", type=int, default=16, help="utterances per calibration batch (default 16)")
    parser.add_argument("--seed", type=int, default=0, help="which batches (a seeded shuffle of the subset)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", required=True, help="the calibrated checkpoint to write")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s | %(message)s")
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    import fairseq_quant  # noqa: F401  (registers the quant_ models with fairseq)
    from fairseq_quant.calibration import calibrate_checkpoint
    from fairseq_quant.quant import Strategy, StrategyError
    from fairseq_quant.quant.errors import FairseqQuantError

    if (args.strategy is None) == (args.weight_bits is None):
        parser.error("give either --strategy FILE or --weight-bits N [--act-bits M]")
    try:
        if args.strategy:
            strategy = Strategy.from_yaml(args.strategy)
        else:
            def bits(v):
                return int(v) if str(v).isdigit() and int(v) != 32 else v

            strategy = Strategy.uniform(bits(args.weight_bits), bits(args.act_bits), weight_method=args.weight_method,
                                        act_method=args.act_method)
        summary = calibrate_checkpoint(args.checkpoint, args.data, strategy, args.out, batches=args.batches,
                                       subset=args.subset, batch_size=args.batch_size, seed=args.seed)
    except (StrategyError, FairseqQuantError, FileNotFoundError, ValueError) as err:
        print(f"calibrate: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
