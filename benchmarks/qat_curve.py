#!/usr/bin/env python
"""WER against QAT updates: one QAT run of a strategy (or a co-trained model collapsed to one precision) with an
interval checkpoint every --every updates, each decoded on the dev subsets, so a reader sees whether more training
would still help.

    python benchmarks/qat_curve.py --data exp/benchmark/data --work exp/qat_curve --strategy w2a8 \
        --updates 3000 --every 500 --subsets dev-clean,dev-other
    python benchmarks/qat_curve.py ... --strategy w8a8-co4-2-1 --co --deploy 2      # the co-trained model at 2 bits

The schedule is the recipe's QAT (the benchmark size's learning rate, warmup, cosine decay to --updates,
distillation from fp32), so a point before the end is a model whose learning rate has not yet decayed: the curve
is what a longer schedule buys, not what stopping early would. Resumable: fairseq resumes from checkpoint_last.pt,
interval checkpoints are all kept, evaluations are cached. Writes curve.md (WER with speaker-level 95% intervals
per checkpoint) and curve.png.
"""
import argparse
import json
import logging
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from recipes.librispeech.rows import SIZES, qat_command, strategy_path, threads_per_job  # noqa: E402
from recipes.librispeech.run import calibrated_checkpoint, collapsed_checkpoint, evaluate_model  # noqa: E402
from recipes.librispeech.stages import done_marker, mark_done, run_logged, train_env  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--checkpoint", type=Path, default=Path("recipes/librispeech/reference/model.pt"))
    parser.add_argument("--strategy", default="w2a8")
    parser.add_argument("--co", action="store_true", help="co-train the strategy (the benchmark's co options)")
    parser.add_argument("--deploy", type=int, default=None, help="--co: the precision each checkpoint is decoded at")
    parser.add_argument("--updates", type=int, default=3000)
    parser.add_argument("--every", type=int, default=500)
    parser.add_argument("--subsets", default="dev-clean,dev-other")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    if args.co and args.deploy is None:
        parser.error("--co needs --deploy BITS")
    if args.updates % args.every:
        parser.error("--updates must be a multiple of --every")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s | %(name)s | %(message)s")
    subsets = tuple(s for s in args.subsets.split(",") if s)
    base = SIZES["benchmark"]
    cfg = replace(base, arch="vggtransformer_ref_ctc", eval_subsets=subsets, jobs=1, threads=args.threads,
                  qat_updates=args.updates, qat_select=False,
                  extra_train_args=base.extra_train_args + ("--save-interval-updates", str(args.every),
                                                            "--keep-interval-updates", "-1")
                  + (base.co_options if args.co else ()))
    work, data, fp32 = args.work.resolve(), args.data.resolve(), args.checkpoint.resolve()
    strategy = strategy_path(args.strategy)
    start = calibrated_checkpoint(data, work, strategy, fp32, cfg)
    train = work / "qat" / strategy.stem
    train.mkdir(parents=True, exist_ok=True)
    if not done_marker(train).exists():
        run_logged(qat_command(data, train, strategy, fp32, cfg, True, start), train / "train.log",
                   train_env(threads_per_job(cfg)), tag=strategy.stem)
        mark_done(train, {"updates": args.updates})
    results = []
    for updates in range(0, args.updates + 1, args.every):
        ckpt = curve_checkpoint(train, updates, args.updates, start)
        if ckpt is None:
            logging.getLogger("recipe").warning("no checkpoint at %d updates: an epoch ended there, and fairseq writes "
                                                "no interval checkpoint then; the point is left out", updates)
            continue
        if args.co:
            ckpt = collapsed_checkpoint(f"{strategy.stem}-w{args.deploy}-{updates}", ckpt, work,
                                        precision=args.deploy)
        results.append((updates, evaluate_model(f"{updates} updates", ckpt, data, work / "eval" / str(updates), cfg)))
    fp32_result = evaluate_model("fp32", fp32, data, work / "eval" / "fp32", cfg)
    write_curve(work, strategy.stem + (f" co-trained, at {args.deploy} bits" if args.co else ""), fp32_result,
                results, subsets)
    return 0


def curve_checkpoint(train: Path, updates: int, total: int, start: Path) -> Path | None:
    """The checkpoint of the curve's point at ``updates``: the calibrated start at 0, fairseq's interval checkpoint
    checkpoint_EPOCH_UPDATES.pt, or checkpoint_last.pt at the end. None where an epoch ended at ``updates``
    (fairseq then writes no interval checkpoint), never the last checkpoint in its place (the 2026-12-04 curve
    reported the final model as its 2000-update point)."""
    if updates == 0:
        return start
    found = sorted(train.glob(f"checkpoint_*_{updates}.pt"))
    if found:
        return found[0]
    return train / "checkpoint_last.pt" if updates == total else None


def write_curve(work: Path, label: str, fp32, results, subsets) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fairseq_quant.stats import paired_relative_change, read_utterances, wer_interval

    def utts(r):
        return [read_utterances(Path(r.eval_dir) / f"{s}.utt.tsv") for s in subsets]

    lines = [f"## {label}: pooled {'+'.join(subsets)} WER against QAT updates", "",
             "| updates | WER % [95% CI] | rel. change vs fp32 [95% CI] |", "|---:|---:|---:|"]
    ref = wer_interval(utts(fp32))
    lines.append(f"| fp32 | {ref.format(digits=2)} | - |")
    xs, ys, lo, hi = [], [], [], []
    for updates, r in results:
        ci = wer_interval(utts(r))
        rel = paired_relative_change(utts(fp32), utts(r))
        lines.append(f"| {updates} | {ci.format(digits=2)} | {rel.format(signed=True)} |")
        xs.append(updates), ys.append(ci.value), lo.append(ci.value - ci.lo), hi.append(ci.hi - ci.value)
    (work / "curve.md").write_text("\n".join(lines) + "\n")
    (work / "curve.json").write_text(json.dumps({"label": label, "subsets": list(subsets), "fp32": ref.value,
                                                 "points": [[x, y] for x, y in zip(xs, ys)]}) + "\n")
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.errorbar(xs, ys, yerr=[lo, hi], fmt="o-", capsize=3, label=label)
    ax.axhline(ref.value, color="black", linestyle="--", label="fp32")
    ax.set_xlabel("QAT updates (16 utterances each)")
    ax.set_ylabel(f"WER % ({'+'.join(subsets)}), 95% CI")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(work / "curve.png", dpi=120)
    plt.close(fig)
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
