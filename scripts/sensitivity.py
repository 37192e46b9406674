#!/usr/bin/env python
"""Per-layer-group sensitivity of a trained fp32 checkpoint: each group's weights alone quantized after
training (MSE-optimal per-channel step, the rest fp32), WER on a dev subset against fp32 with the 95% paired
bootstrap interval of the relative change. Writes sensitivity.md, sensitivity.json and sensitivity.png.

    python scripts/sensitivity.py --checkpoint recipes/librispeech/reference/model.pt --data exp/default/data \
        --subset dev-clean --bits 2 --out exp/sensitivity
"""
import argparse
import json
import logging
import sys
from pathlib import Path

import torch

from fairseq_quant_runtime.decoding import DecodingConfig, DecodingError
from fairseq_quant_runtime.files import atomic_output


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="an fp32 fairseq checkpoint")
    parser.add_argument("--data", required=True, help="prepared data directory")
    parser.add_argument("--subset", default="dev-clean")
    parser.add_argument("--bits", type=int, default=2, help="weight bits of the quantized group")
    DecodingConfig.add_arguments(parser)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    try:
        decoding = DecodingConfig.from_args(args)
    except DecodingError as err:
        parser.error(str(err))
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s | %(message)s")
    torch.set_num_threads(args.threads)
    import fairseq_quant  # noqa: F401  (registers the quant_ models with fairseq)
    from fairseq_quant.baselines import ptq_checkpoint
    from fairseq_quant.evaluate import atomic_write_text, evaluate, load_checkpoint
    from fairseq_quant.sensitivity import group_strategy, layer_groups
    from fairseq_quant.stats import paired_relative_change, read_utterances

    out = Path(args.out)
    model, _ = load_checkpoint(args.checkpoint, args.data)
    groups = layer_groups(model)
    params = {g: sum(p.numel() for p in model.get_submodule(g).parameters()) for g in groups}
    del model

    def wer_of(name, ckpt):
        eval_dir = out / "eval" / name
        summary = eval_dir / "wer.json"
        if not (summary.exists() and json.loads(summary.read_text())["checkpoint"] == str(ckpt)):
            evaluate(ckpt, args.data, [args.subset], eval_dir, progress=False, device="cpu", **decoding.to_dict())
        result = json.loads(summary.read_text())["results"][0]
        return result["wer"], read_utterances(eval_dir / f"{args.subset}.utt.tsv")

    base_wer, base_utts = wer_of("fp32", Path(args.checkpoint))
    rows = []
    for i, group in enumerate(groups):
        ckpt = out / "ckpt" / f"{group}.pt"
        if not ckpt.exists():
            ptq_checkpoint(args.checkpoint, ckpt, group_strategy(group, args.bits))
        wer, utts = wer_of(group, ckpt)
        change = paired_relative_change([base_utts], [utts])
        rows.append({"group": group, "params": params[group], "wer": wer, "rel_change": change.value,
                     "ci": [change.lo, change.hi]})
        print(f"[{i + 1}/{len(groups)}] {group}: WER {wer:.2f} ({change.format(signed=True)})", flush=True)
        ckpt.unlink()  # a full-size copy of the model per group: keep only the results
    rows.sort(key=lambda r: -r["rel_change"])
    lines = [f"Sensitivity of {args.checkpoint} on {args.subset} (beam {args.beam}): one group's weights at "
             f"{args.bits} bits after training (per-channel, MSE-optimal step), the rest fp32. fp32 WER "
             f"{base_wer:.2f}%.", "",
             "| group | parameters | WER % | rel. change vs fp32 [95% CI] |", "|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['group']} | {r['params']} | {r['wer']:.2f} | {r['rel_change']:+.1f}% "
                     f"[{r['ci'][0]:+.1f}, {r['ci'][1]:+.1f}] |")
    atomic_write_text(out / "sensitivity.md", "\n".join(lines) + "\n")
    atomic_write_text(out / "sensitivity.json", json.dumps({"checkpoint": str(args.checkpoint), "subset": args.subset,
                                                             "bits": args.bits, "fp32_wer": base_wer,
                                                             "groups": rows}, indent=2) + "\n")
    plot(rows, args, out / "sensitivity.png")
    print("\n".join(lines))
    return 0


def plot(rows, args, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 0.35 * len(rows) + 1.5))
    names = [r["group"] for r in rows][::-1]
    values = [r["rel_change"] for r in rows][::-1]
    err = [[r["rel_change"] - r["ci"][0] for r in rows][::-1], [r["ci"][1] - r["rel_change"] for r in rows][::-1]]
    ax.barh(names, values, xerr=err, color="tab:blue", capsize=2)
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_xlabel(f"relative WER change on {args.subset}, % (95% CI)")
    ax.set_title(f"one group at {args.bits}-bit weights, the rest fp32", fontsize=9)
    fig.tight_layout()
    with atomic_output(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
