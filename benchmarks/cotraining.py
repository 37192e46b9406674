#!/usr/bin/env python
"""Multi-precision co-training against plain QAT: one co-trained model (its latent weights trained at several
precisions at once) collapsed to each precision, beside QAT checkpoints trained at one precision with the same
schedule, on the same evaluation subsets.

    python benchmarks/cotraining.py --data exp/benchmark/data --work exp/cotraining --variants co4-2-kd1 \
        --deploy 8,4,2 --baseline qat-w2a8=exp/benchmark/qat/qat-w2a8/checkpoint_best.pt --subsets dev-clean,dev-other

Each variant is calibrated from the fp32 checkpoint with its co-training strategy, trained with the recipe's QAT
schedule (the benchmark size's: updates, learning rate, distillation from fp32) plus its co-training options, then
collapsed (scripts/collapse_cotrained.py) to every --deploy precision it has. Tune on dev subsets; the table's
intervals resample speakers (paired for relative changes). Resumable: finished trainings, collapses and evaluations
are reused.
"""
import argparse
import logging
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from recipes.librispeech.report import results_table  # noqa: E402
from recipes.librispeech.rows import SIZES, strategy_path  # noqa: E402
from recipes.librispeech.run import evaluate_model, train_qat  # noqa: E402
from recipes.librispeech.stages import parallel  # noqa: E402

# name -> (co-training strategy, criterion options)
VARIANTS = {
    "co4-2-kd1": ("w8a8-co4-2", ("--co-precisions", "4,2", "--co-kd-weight", "1.0")),
    "co4-2-kd1-stoch": ("w8a8-co4-2", ("--co-precisions", "4,2", "--co-kd-weight", "1.0", "--co-stochastic")),
    "co4-2-nokd": ("w8a8-co4-2", ("--co-precisions", "4,2")),
    "co4-2-kd1-balanced-out16": ("w8a8-co4-2-balanced-out16", ("--co-precisions", "4,2", "--co-kd-weight", "1.0")),
    "co4-2-1-kd1": ("w8a8-co4-2-1", ("--co-precisions", "4,2,1", "--co-kd-weight", "1.0")),
    "co4-2-1-kd1-prog": ("w8a8-co4-2-1", ("--co-precisions", "4,2,1", "--co-kd-weight", "1.0",
                                          "--co-schedule", "2:100,1:200")),
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="prepared data of the recipe (run.py --stages prepare)")
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--checkpoint", type=Path, default=Path("recipes/librispeech/reference/model.pt"))
    parser.add_argument("--variants", default="co4-2-kd1")
    parser.add_argument("--deploy", default="8,4,2", help="precisions each co-trained model is collapsed to")
    parser.add_argument("--baseline", action="append", default=[], metavar="NAME=CKPT",
                        help="a checkpoint evaluated in the same table (e.g. plain QAT of the same schedule)")
    parser.add_argument("--subsets", default="dev-clean,dev-other")
    parser.add_argument("--updates", type=int, default=None, help="QAT updates (default: the benchmark size's)")
    parser.add_argument("--jobs", type=int, default=1)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s | %(name)s | %(message)s")
    names = [v for v in args.variants.split(",") if v]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}")
    deploy = [int(b) for b in args.deploy.split(",") if b]
    subsets = tuple(s for s in args.subsets.split(",") if s)
    base = replace(SIZES["benchmark"], arch="vggtransformer_ref_ctc", eval_subsets=subsets, jobs=args.jobs,
                   qat_select=False, **({"qat_updates": args.updates} if args.updates else {}))
    work, data, fp32 = args.work.resolve(), args.data.resolve(), args.checkpoint.resolve()
    from fairseq_quant.cotrained import collapse_checkpoint

    jobs = [(evaluate_model, "fp32", fp32, data, work / "eval" / "fp32", base)]
    for spec in args.baseline:
        name, _, path = spec.partition("=")
        jobs.append((evaluate_model, name, Path(path).resolve(), data, work / "eval" / name, base))
    for name in names:
        strategy, options = VARIANTS[name]
        cfg = replace(base, extra_train_args=base.extra_train_args + options)
        ckpt = train_qat(data, work / "qat" / name, strategy_path(strategy), fp32, cfg, kd=cfg.kd_weight > 0,
                         tag=name, work=work)
        for bits in deploy:
            out = work / "collapsed" / f"{name}-w{bits}.pt"
            if not out.exists():
                collapse_checkpoint(ckpt, out, precision=bits)
            jobs.append((evaluate_model, f"{name}-w{bits}a8", out, data, work / "eval" / f"{name}-w{bits}", base))
    results = parallel(args.jobs, jobs)
    table = results_table(results, subsets)
    out = f"## co-training against fp32 ({base.qat_updates} updates)\n\n{table}"
    (work / "results.md").write_text(out)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
