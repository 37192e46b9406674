#!/usr/bin/env python
"""Show what a strategy does to a model before training: every quantizable module with its spec and
rule, the parameters left in fp32, average weight bits and size (MB) against fp32.

    python scripts/quant_report.py --checkpoint exp/default/fp32/checkpoint_best.pt \
        --data exp/default/data --strategy recipes/librispeech/strategies/mixed2a8.yaml
"""
import argparse
import sys


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="an fp32 (or quant) fairseq checkpoint")
    parser.add_argument("--data", required=True, help="its prepared data directory (for the dictionary)")
    parser.add_argument("--strategy", help="YAML strategy; without it, report the checkpoint as it is")
    args = parser.parse_args(argv)
    import fairseq_quant  # noqa: F401  (registers fairseq models)
    from fairseq_quant.evaluate import load_checkpoint
    from fairseq_quant.models.quant_vggtransformer import float_model
    from fairseq_quant.quant import FairseqQuantError, Strategy, build_report, quantize_model

    try:
        model, task, cfg = load_checkpoint(args.checkpoint, args.data, with_cfg=True)
        if args.strategy:
            strategy = Strategy.from_yaml(args.strategy)
            stored = getattr(model, "quant_strategy", None)
            if stored is not None:  # a QAT checkpoint: apply the strategy to its fp32 architecture instead
                print(f"quant_report: {args.checkpoint} is quantized with {stored.source}; reporting "
                      f"{args.strategy} on its fp32 architecture")
                model = float_model(cfg.model, task)
            report = quantize_model(model, strategy)
        else:
            report = getattr(model, "quant_report", None) or build_report(model)
    except (FairseqQuantError, FileNotFoundError, RuntimeError) as err:
        print(f"quant_report: error: {err}", file=sys.stderr)
        return 2
    print(report.format())
    return 0


if __name__ == "__main__":
    sys.exit(main())
