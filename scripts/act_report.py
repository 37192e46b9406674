#!/usr/bin/env python
"""Per-site activation report of an fp32 checkpoint: range, peak over the 99.99th percentile, outlier channels (and
whether they repeat across layers), and the per-tensor quantization SQNR at the given bits; worst sites first.

    python scripts/act_report.py --checkpoint recipes/librispeech/reference/model.pt --data exp/default/data \
        --bits 8 --out exp/act_report
"""
import argparse
import json
import logging
import sys
from dataclasses import asdict
from pathlib import Path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="fp32 fairseq checkpoint")
    parser.add_argument("--data", required=True, help="prepared data directory")
    parser.add_argument("--bits", type=int, default=8, help="activation bits of the SQNR column (default 8)")
    parser.add_argument("--subset", default="train", help="the batches observed (default: training batches)")
    parser.add_argument("--batches", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--outlier-factor", type=float, default=6.0,
                        help="a channel is an outlier when its peak exceeds this many times the median channel peak")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", required=True, help="directory for act_report.md and act_report.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    import fairseq_quant  # noqa: F401  (registers the quant_ models with fairseq)
    from fairseq import checkpoint_utils, tasks

    from fairseq_quant.baselines import BaselineError, quantized_model_cfg
    from fairseq_quant.calibration import training_batches
    from fairseq_quant.evaluate import atomic_write_text
    from fairseq_quant.quant import Strategy
    from fairseq_quant.quant.act_report import collect_site_stats, format_site_table, repeated_outliers

    if not Path(args.checkpoint).is_file():
        print(f"act_report: error: checkpoint not found: {args.checkpoint}", file=sys.stderr)
        return 2
    try:
        state = checkpoint_utils.load_checkpoint_to_cpu(args.checkpoint, {"data": args.data})
        # activations observed in fp32 behind fp32 weights: the statistics belong to the trained model
        strategy = Strategy.from_dict({"default": {"weight_bits": "fp32", "act_bits": args.bits}}, source="act_report")
        model_cfg = quantized_model_cfg(state["cfg"].model, strategy, args.checkpoint)
    except (BaselineError, RuntimeError, ValueError, KeyError, EOFError) as err:
        print(f"act_report: error: {args.checkpoint}: {err}", file=sys.stderr)
        return 2
    task = tasks.setup_task(state["cfg"].task)
    model = task.build_model(model_cfg)
    model.load_state_dict(state["model"], strict=True, model_cfg=model_cfg)
    model.eval()
    batches = training_batches(task, args.subset, args.batches, args.batch_size)
    stats = collect_site_stats(model, batches, forward=lambda m, s: m(**s["net_input"]), bits=args.bits,
                               outlier_factor=args.outlier_factor)
    repeated = repeated_outliers(stats)
    lines = [f"Activation sites of {args.checkpoint} on {len(batches)} batches of {args.subset} (fp32 values; SQNR of "
             f"per-tensor min-max quantization at {args.bits} bits; outliers: channel peak > {args.outlier_factor:g}x "
             "the median channel peak).", "", format_site_table(stats)]
    if repeated:
        lines.append("Outlier channels that repeat across sites of one width:\n")
        for width, channels in repeated.items():
            for channel, sites in channels.items():
                lines.append(f"- width {width}, channel {channel}: {len(sites)} sites ({', '.join(sites[:4])}"
                             + (", ..." if len(sites) > 4 else "") + ")")
    text = "\n".join(lines) + "\n"
    out = Path(args.out)
    atomic_write_text(out / "act_report.md", text)
    atomic_write_text(out / "act_report.json", json.dumps(
        {"checkpoint": args.checkpoint, "bits": args.bits, "sites": [dict(asdict(s), peak_ratio=s.peak_ratio)
                                                                    for s in stats],
         "repeated_outliers": {str(w): {str(c): s for c, s in ch.items()} for w, ch in repeated.items()}},
        indent=2) + "\n")
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
