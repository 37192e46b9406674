#!/usr/bin/env python
"""Search a per-unit weight-bit allocation under a size budget, cheaply in decodes, resumably.

1. sizes and quantization errors of every unit at every width; Hutchinson Hessian and Fisher traces;
2. each unit alone quantized post-training (activations calibrated on training batches): the change of
   the teacher-forced dev loss and, in ``--mode full``, of the dev WER;
3. the k best allocations under the budget by an exact 0/1 integer program (HiGHS);
4. every candidate and the uniform allocations decoded on dev: a ranked table with intervals.

    python scripts/search_strategy.py --checkpoint recipes/librispeech/reference/model.pt \\
        --data exp/default/data --budget-bits 2.4 --out exp/search            # fast: proxy + a few decodes
    ... --mode full       # also decode every unit at every width (the objective is then the WER change)
    ... --mode proxy      # no decode at all (teacher-forced loss and Hessian/Fisher only)
    ... --ray-address auto   # measurements as Ray tasks on a cluster (pip install 'fairseq_quant[search]')

Outputs in --out: candidates.csv / candidates.md (ranked), strategies/*.yaml (each loadable by
--quant-strategy), search.png (dev WER against size, Pareto front, uniform allocations), sensitivity.csv,
summary.json, and state.json (every finished measurement; rerun the same command to resume).
"""
import argparse
import logging
import os
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parse_bits(text: str) -> tuple:
    try:
        return tuple(int(b) for b in text.split(",") if b.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 2,3,4,8, got {text!r}") from None


def parse_act(text: str):
    if text.lower() in ("fp32", "32", "none"):
        return None
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"activation bits are 1..8 or fp32, got {text!r}") from None
    if not 1 <= value <= 8:
        raise argparse.ArgumentTypeError(f"activation bits are 1..8 or fp32, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a trained fp32 fairseq checkpoint")
    p.add_argument("--data", required=True, help="prepared data directory (dict, spm model, manifests)")
    p.add_argument("--dev-subset", default="dev-clean")
    p.add_argument("--dev-utts", type=int, default=None, help="only the first N utterances of the dev subset")
    p.add_argument("--bits", type=parse_bits, default=(2, 3, 4, 8), help="candidate weight widths (default 2,3,4,8)")
    p.add_argument("--act-bits", type=parse_act, default=8, help="activation bits everywhere (default 8; fp32)")
    p.add_argument("--unit", choices=("layer", "block", "module"), default="layer")
    p.add_argument("--budget-bits", type=float, default=None, help="largest average weight bits")
    p.add_argument("--budget-mb", type=float, default=None, help="largest model size in MB (packed + scales + fp32)")
    p.add_argument("--mode", choices=("full", "fast", "proxy"), default="fast",
                   help="full: decode every unit at every width; fast: proxies, then decode the candidates; "
                        "proxy: no decodes")
    p.add_argument("--objective", choices=("wer", "loss", "hessian", "fisher"), default=None,
                   help="sensitivity the allocation minimises (default: wer in full mode, loss otherwise)")
    p.add_argument("--top-k", type=int, default=4, help="allocations refined by real dev WER")
    p.add_argument("--probes", type=int, default=8, help="Hutchinson probes per batch")
    p.add_argument("--proxy-batches", type=int, default=2, help="training batches for the Hessian/Fisher traces")
    p.add_argument("--calib-batches", type=int, default=4, help="training batches that calibrate activations")
    p.add_argument("--beam", type=int, default=5, help="dev decoding: beam size (default 5; decoding flags as "
                                                         "scripts/evaluate.py's, the CTC weight at its default)")
    p.add_argument("--max-len-a", type=float, default=0.2, help="(default 0.2)")
    p.add_argument("--max-len-b", type=int, default=10, help="(default 10)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=1, help="local worker processes")
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    p.add_argument("--ray-address", default=None,
                   help="run the measurements as Ray tasks on this cluster ('auto', 'HOST:PORT', or 'local')")
    p.add_argument("--greedy", action="store_true",
                   help="also run the greedy one-unit-at-a-time search that decodes every candidate (costly)")
    p.add_argument("--compare", action="append", default=[], metavar="YAML",
                   help="a strategy evaluated in the same table (repeatable), e.g. a hand-written one")
    p.add_argument("--co-trained", default=None, metavar="CKPT",
                   help="a multi-precision co-trained checkpoint (criterion --co-precisions): evaluate every candidate "
                        "on it at the candidate's precisions, without calibrating or retraining (--bits among its "
                        "precisions); --checkpoint (its fp32 start) still gives the costs and proxies")
    p.add_argument("--base-strategy", default=None, metavar="YAML",
                   help="a strategy every candidate builds on: its default's weight method (per channel, activations "
                        "--act-bits) and its rules' activation fields, kept at any weight width; e.g. "
                        "recipes/librispeech/strategies/w2a8-balanced-out16.yaml (balanced grids, the outlier site at "
                        "16 bits). Its weight bits are ignored: the search allocates them")
    p.add_argument("--out", required=True)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s | %(message)s")
    warnings.filterwarnings("ignore")
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    from fairseq_quant.search.runner import SearchConfig, run_search
    from fairseq_quant.quant.errors import FairseqQuantError
    from fairseq_quant.search import SearchError

    cfg = SearchConfig(checkpoint=args.checkpoint, data=args.data, out=args.out, dev_subset=args.dev_subset,
                       dev_utts=args.dev_utts, bits=args.bits, act_bits=args.act_bits, unit=args.unit,
                       budget_bits=args.budget_bits, budget_mb=args.budget_mb, mode=args.mode,
                       objective=args.objective, top_k=args.top_k, probes=args.probes,
                       proxy_batches=args.proxy_batches, calib_batches=args.calib_batches, beam=args.beam,
                       max_len_a=args.max_len_a, max_len_b=args.max_len_b, seed=args.seed, workers=args.workers,
                       threads=args.threads, ray_address=args.ray_address, greedy=args.greedy,
                       compare=tuple(args.compare), co_trained=args.co_trained)
    try:
        if args.base_strategy:
            if args.co_trained:
                raise SearchError("--base-strategy: a co-trained checkpoint keeps the quantizers it was trained with; "
                                  "put the settings in its strategy instead")
            from fairseq_quant.quant import Strategy

            cfg.base_strategy = Strategy.from_yaml(args.base_strategy).to_dict()
        run_search(cfg)
    except (FairseqQuantError, FileNotFoundError) as err:
        print(f"search_strategy: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
