#!/usr/bin/env python
"""WER of a fairseq speech checkpoint (fp32 or quant) on prepared subsets.

    python scripts/evaluate.py --checkpoint exp/fp32/checkpoint_best.pt --data exp/data \
        --subsets dev-clean,dev-other,test-clean,test-other --beam 5 --out exp/eval/fp32
"""
import argparse
import logging
import sys

import torch


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--data", required=True, help="prepared data directory (dict.txt, {subset}.json, spm model)")
    parser.add_argument("--subsets", default="dev-clean,dev-other,test-clean,test-other")
    parser.add_argument("--beam", type=int, default=5)
    parser.add_argument("--spm-model", default=None)
    parser.add_argument("--max-len-a", type=float, default=0.0,
                        help="hypothesis length limit per 10 ms input frame (0.2 = 20 tokens a second)")
    parser.add_argument("--max-len-b", type=int, default=200, help="hypothesis length limit: a * frames + b tokens")
    parser.add_argument("--max-tokens", type=int, default=60000, help="batch size in 10 ms feature frames")
    parser.add_argument("--out", required=True, help="directory for ref/hyp files, wer.json and wer.md")
    parser.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda when available)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--ctc-weight", type=float, default=None,
                        help="joint CTC/attention beam search with this CTC weight (default 0.5 for a model with a "
                             "CTC head; 0: the attention decoder alone)")
    parser.add_argument("--dynamic-int8", action="store_true",
                        help="baseline: decode with torch.ao dynamic int8 Linear layers (CPU; attention stays fp32)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s | %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    import fairseq_quant  # noqa: F401  (registers the quant_ models with fairseq)
    from fairseq_quant.evaluate import evaluate, format_table

    try:
        results = evaluate(args.checkpoint, args.data, [s for s in args.subsets.split(",") if s], args.out,
                           beam=args.beam, spm_model=args.spm_model, max_tokens=args.max_tokens,
                           max_len_a=args.max_len_a, max_len_b=args.max_len_b, device=args.device,
                           dynamic_int8=args.dynamic_int8, ctc_weight=args.ctc_weight)
    except (FileNotFoundError, RuntimeError, ValueError) as err:
        print(f"evaluate: error: {err}", file=sys.stderr)
        return 2
    print(format_table(results), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
