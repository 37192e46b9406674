#!/usr/bin/env python
"""Where per-tensor activation quantization fails on the reference model, and what the seed's remedy buys: calibrated
post-training quantization at several activation widths, each with and without the outlier site at 16 bits, side by
side on dev subsets (speaker-level intervals, paired against fp32 and against the per-tensor row of the same bits).

    python benchmarks/act_remedies.py --data exp/benchmark/data --work exp/act_remedies

The outlier site is the input of the encoder's output projection (``encoder.transformer_layers.-1``: the
last quantizable module of the encoder's list, 5 in the reference arch): the un-normalised residual stream after the last pre-LN layer, whose range a few channels stretch
(``scripts/act_report.py``). Rows are built by ``scripts/calibrate.py`` (16 training batches) and decoded by
``scripts/evaluate.py``; finished rows are reused.
"""
import argparse
import logging
import sys
from dataclasses import replace
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from recipes.librispeech.report import results_table  # noqa: E402
from recipes.librispeech.rows import SIZES  # noqa: E402
from recipes.librispeech.run import calibrated_checkpoint, evaluate_model  # noqa: E402
from recipes.librispeech.stages import parallel  # noqa: E402

OUTLIER_SITE = "encoder.transformer_layers.-1"  # the encoder's output projection, at any depth
SETTINGS = {"w8a8": (8, 8), "w8a6": (8, 6), "w8a4": (8, 4), "w4a8": (4, 8), "w4a6": (4, 6)}


def strategy_dict(weight_bits: int, act_bits: int, remedy: bool) -> dict:
    out = {"description": f"w{weight_bits}a{act_bits}" + (f", {OUTLIER_SITE} input at 16 bits" if remedy else ""),
           "default": {"weight_bits": weight_bits, "act_bits": act_bits, "granularity": "channel",
                       "weight_method": "lsq", "act_method": "minmax"}}
    if remedy:
        out["rules"] = [{"match": OUTLIER_SITE, "act_bits": 16}]
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--checkpoint", type=Path, default=Path("recipes/librispeech/reference/model.pt"))
    parser.add_argument("--settings", default="w8a8,w8a6,w8a4,w4a8")
    parser.add_argument("--subsets", default="dev-clean,dev-other")
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s | %(name)s | %(message)s")
    settings = [s for s in args.settings.split(",") if s]
    unknown = [s for s in settings if s not in SETTINGS]
    if unknown:
        parser.error(f"unknown settings {unknown}; known: {', '.join(SETTINGS)}")
    subsets = tuple(s for s in args.subsets.split(",") if s)
    cfg = replace(SIZES["benchmark"], arch="vggtransformer_ref_ctc", eval_subsets=subsets, jobs=args.jobs)
    work, data, fp32 = args.work.resolve(), args.data.resolve(), args.checkpoint.resolve()
    (work / "strategies").mkdir(parents=True, exist_ok=True)

    def row(name, weight_bits, act_bits, remedy):
        path = work / "strategies" / f"{name}.yaml"
        path.write_text(yaml.safe_dump(strategy_dict(weight_bits, act_bits, remedy), sort_keys=False))
        ckpt = calibrated_checkpoint(data, work, path, fp32, cfg)
        return evaluate_model(name, ckpt, data, work / "eval" / name, cfg)

    calls = [(evaluate_model, "fp32", fp32, data, work / "eval" / "fp32", cfg)]
    for s in settings:
        w, a = SETTINGS[s]
        calls += [(row, f"ptq-{s}", w, a, False), (row, f"ptq-{s}-out16", w, a, True)]
    results = parallel(args.jobs, calls)
    sections = [f"## against fp32\n\n{results_table(results, subsets)}"]
    for i, s in enumerate(settings):
        pair = results[1 + 2 * i: 3 + 2 * i]
        sections.append(f"## ptq-{s}-out16 against ptq-{s}\n\n{results_table(pair, subsets)}")
    text = "\n".join(sections)
    (work / "results.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
