#!/usr/bin/env python
"""Why QAT loses what calibrated PTQ keeps: QAT variants of one strategy side by side, each fine-tuned from the
same calibrated post-training-quantized checkpoint, with the fp32 model and that PTQ checkpoint as rows.

    python benchmarks/qat_recipe.py --data exp/benchmark/data --work exp/qat_recipe --strategy w8a8 \
        --variants lr5e-5,lr5e-5-nodrop,lr5e-5-frozen,lr5e-5-nodrop-frozen --subsets dev-clean,dev-other

``--baseline NAME=CKPT`` adds checkpoints trained elsewhere (the size-matched fp32 bundle, a longer schedule's
model) to the same table. Every variant changes one thing against the recipe's QAT schedule (400 updates of 16 utterances, cosine,
distillation 0.5 at T=2, CTC 1.0). Tune on dev subsets; the table's intervals resample speakers (paired for
relative changes). Resumable: finished trainings and evaluations are reused.
"""
import argparse
import logging
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from recipes.librispeech.report import results_table  # noqa: E402
from recipes.librispeech.rows import SIZES, strategy_path  # noqa: E402
from recipes.librispeech.run import calibrated_checkpoint, evaluate_model, train_qat  # noqa: E402
from recipes.librispeech.stages import parallel  # noqa: E402
from recipes.librispeech.train_reference import SPECAUGMENT_EXAMPLE  # noqa: E402

# name -> (strategy override or None, RecipeConfig changes)
VARIANTS = {
    "lr5e-4": (None, dict(qat_lr=5e-4)),  # the schedule of the README's 2026-12-02 rows
    "lr5e-5": (None, dict(qat_lr=5e-5)),
    "lr5e-5-nodrop": (None, dict(qat_lr=5e-5, qat_dropout=0.0)),
    "lr5e-5-frozen": (None, dict(qat_lr=5e-5, qat_act_momentum=0.0)),
    "lr5e-5-nodrop-frozen": (None, dict(qat_lr=5e-5, qat_dropout=0.0, qat_act_momentum=0.0)),
    "lr5e-5-nokd": (None, dict(qat_lr=5e-5, kd_weight=0.0)),
    "lr1e-5-nodrop-frozen": (None, dict(qat_lr=1e-5, qat_dropout=0.0, qat_act_momentum=0.0)),
    "out16-lr5e-5": ("w8a8-out16", dict(qat_lr=5e-5)),  # the outlier site at 16 bits (w8a8 strategies only)
    "out16-lr5e-5-nodrop": ("w8a8-out16", dict(qat_lr=5e-5, qat_dropout=0.0)),
    "out16-lr5e-5-nodrop-frozen": ("w8a8-out16", dict(qat_lr=5e-5, qat_dropout=0.0, qat_act_momentum=0.0)),
    "recipe": (None, {}),  # the recipe's QAT schedule unchanged
    # sub-channel steps (one per 32 or 64 input values of each output channel; w2a8 strategies)
    "w2a8-g32": ("w2a8-g32", {}),
    "w2a8-g64": ("w2a8-g64", {}),
    "w2a8-out16": ("w2a8-out16", {}),  # the outlier site at 16 bits (w2a8 strategies)
    "w2a8-balanced-out16": ("w2a8-balanced-out16", {}),  # and the balanced 2-bit grid
    "w2a8-balanced-out16-lr1e-3": ("w2a8-balanced-out16", dict(qat_lr=1e-3)),
    "w2-balanced": ("w2-balanced", {}),  # weight-only: the same 2-bit grid with fp32 activations
    # SpecAugment on the QAT batches (the 2-bit model fits its training voices, 97% training accuracy, far better
    # than dev): the masks of train_reference's example
    "w2a8-balanced-out16-specaug": ("w2a8-balanced-out16", dict(extra_train_args=(
        "--task", "speech_recognition_augment", "--specaugment", SPECAUGMENT_EXAMPLE))),
    # layer-wise distillation (TernaryBERT / BinaryBERT): every transformer layer's output pulled towards fp32's
    "w2a8-balanced-out16-kdh1": ("w2a8-balanced-out16", dict(extra_train_args=("--kd-hidden-weight", "1.0"))),
    "w2a8-balanced-out16-kdh10": ("w2a8-balanced-out16", dict(extra_train_args=("--kd-hidden-weight", "10.0"))),
    # dropout back on during QAT (the recipe turns it off; the 2-bit model fits its training voices far better than dev)
    "w2a8-balanced-out16-drop0.1": ("w2a8-balanced-out16", dict(qat_dropout=0.1)),
    # progressive: 400 updates at 4 bits, re-quantized to 2 bits (scripts/calibrate.py on the QAT checkpoint), then
    # 400 at 2 bits (the same 800 updates as the plain 2-bit variants at --updates 800); START_FROM below
    "w4a8-out16-400": ("w4a8-out16", dict(qat_updates=400)),
    "w2a8-balanced-out16-from-w4": ("w2a8-balanced-out16", dict(qat_updates=400)),
    "control-lr5e-5": ("fp32", dict(qat_lr=5e-5)),  # the same training with nothing quantized
    "control-lr5e-5-nodrop": ("fp32", dict(qat_lr=5e-5, qat_dropout=0.0)),
}

# variant -> the variant whose trained checkpoint it starts from (re-quantized to its own strategy and calibrated)
START_FROM = {"w2a8-balanced-out16-from-w4": "w4a8-out16-400"}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="prepared data of the recipe (run.py --stages prepare)")
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--checkpoint", type=Path, default=Path("recipes/librispeech/reference/model.pt"))
    parser.add_argument("--strategy", default="w8a8")
    parser.add_argument("--variants", default="lr5e-5,lr5e-5-nodrop,lr5e-5-frozen,lr5e-5-nodrop-frozen")
    parser.add_argument("--subsets", default="dev-clean,dev-other")
    parser.add_argument("--updates", type=int, default=None, help="QAT updates (default: the benchmark size's)")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--baseline", action="append", default=[], metavar="NAME=CKPT",
                        help="another checkpoint decoded in the same table (e.g. an fp32 bundle of the same bytes, a "
                             "longer schedule's checkpoint); repeatable")
    parser.add_argument("--against", default=None, metavar="NAME",
                        help="also a table of every row paired against this one (e.g. a --baseline)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s | %(name)s | %(message)s")
    names = [v for v in args.variants.split(",") if v]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}")
    subsets = tuple(s for s in args.subsets.split(",") if s)
    extra = []
    for spec in args.baseline:
        name, _, path = spec.partition("=")
        if not name or not Path(path).is_file():
            parser.error(f"--baseline {spec!r}: expected NAME=CHECKPOINT with an existing checkpoint file")
        extra.append((name, Path(path).resolve()))
    # the trained checkpoints themselves: the recipe's choice between them and their start is not under study here
    base = replace(SIZES["benchmark"], arch="vggtransformer_ref_ctc", eval_subsets=subsets, jobs=args.jobs,
                   qat_select=False,
                   **({"qat_updates": args.updates} if args.updates else {}))
    work, data, fp32 = args.work.resolve(), args.data.resolve(), args.checkpoint.resolve()
    strategy = strategy_path(args.strategy)
    ptq = calibrated_checkpoint(data, work, strategy, fp32, base)

    def trained(name):
        override, changes = VARIANTS[name]
        cfg = replace(base, **changes)
        variant_strategy = strategy_path(override) if override else strategy
        start = None
        if name in START_FROM:
            start = calibrated_checkpoint(data, work, variant_strategy, trained(START_FROM[name])[0], cfg,
                                          name=f"{name}-start")
        return train_qat(data, work / "qat" / name, variant_strategy, fp32, cfg, kd=cfg.kd_weight > 0, tag=name,
                         work=work, start=start), cfg

    def row(name):
        ckpt, cfg = trained(name)
        return evaluate_model(name, ckpt, data, work / "eval" / name, cfg)

    fixed = parallel(args.jobs, [(evaluate_model, "fp32", fp32, data, work / "eval" / "fp32", base),
                                 (evaluate_model, f"ptq-{strategy.stem}", ptq, data, work / "eval" / "ptq", base)])
    baselines = [(evaluate_model, name, path, data, work / "eval" / name, base) for name, path in extra]
    results = fixed + parallel(args.jobs, [(row, n) for n in names] + baselines)
    table = results_table(results, subsets)
    ptq_table = results_table(results[1:], subsets)
    out = f"## {strategy.stem}: against fp32\n\n{table}\n## against ptq-{strategy.stem} (the QAT start)\n\n{ptq_table}"
    if args.against:
        first = [r for r in results if r.name == args.against]
        if not first:
            parser.error(f"--against {args.against}: no such row ({', '.join(r.name for r in results)})")
        others = [r for r in results if r.name != args.against and not r.name.startswith("ptq-")]
        out += f"\n## against {args.against}\n\n{results_table(first + others, subsets)}"
    (work / "results.md").write_text(out)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
