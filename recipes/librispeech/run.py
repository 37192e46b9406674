"""The LibriSpeech recipe, end to end: corpus -> prepare -> fp32 VGGTransformer (the shipped reference
model, or trained here) -> baselines, calibration (a calibrated post-training-quantized checkpoint per strategy)
and QAT from it -> WER evaluation with speaker-level confidence intervals -> results table and plot.

    python -m recipes.librispeech.run --size default --workdir exp/default     # from the reference bundle
    python -m recipes.librispeech.run --size benchmark --workdir exp/default   # every row (reuses the demo's)
    python -m recipes.librispeech.run --librispeech-root /data/LibriSpeech --size paper --workdir exp/ls
    python -m recipes.librispeech.run ... --dry-run   # the command lines and memory per batch; runs nothing

Every stage is idempotent: a finished stage leaves a ``.done`` marker and is skipped on the next run;
an interrupted fairseq-train resumes from its ``checkpoint_last.pt``.
"""
import argparse
import json
import logging
import os
import shlex
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

from fairseq_quant_runtime.files import atomic_output, atomic_write
from recipes.librispeech.report import ModelResult, family_table, plot_results, pooled_wer, results_table
from recipes.librispeech.rows import (
    EVAL_SUBSETS, ROWS, RecipeConfig, Row, SELECTED, SIZES, STRATEGY_DIR, bundle_dir, calibrate_command, co_qat_command,
    co_training,
    co_train_dir, dev_subsets, eval_command, export_command, fp32_command, longest_first, memory_lines, prepared_subsets,
    qat_command, row_config, runtime_command, runtime_model_file, runtime_source, search_command, search_dir,
    shared_search_problem, strategy_path, threads_per_job,
)
from recipes.librispeech.stages import done_marker, file_lock, logger, mark_done, parallel, run_logged, train_env


def train_fp32(data: Path, out: Path, cfg: RecipeConfig) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    ckpt = out / "checkpoint_best.pt"
    if done_marker(out).exists():
        logger.info("fp32: already trained (%s)", ckpt)
        return ckpt
    cmd = fp32_command(data, out, cfg)
    start = time.perf_counter()
    run_logged(cmd, out / "train.log", train_env(cfg.threads))
    mark_done(out, {"seconds": round(time.perf_counter() - start, 1), "updates": cfg.fp32_updates})
    return ckpt


def calibrated_checkpoint(data: Path, work: Path, strategy: Path, fp32_ckpt: Path, cfg: RecipeConfig,
                          name: str | None = None) -> Path:
    """The calibrated post-training-quantized checkpoint of ``strategy`` (cached in work/calib/NAME.pt): a PTQ row
    evaluates it, a QAT row starts from it."""
    out = work / "calib" / f"{name or strategy.stem}.pt"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        run_logged(calibrate_command(fp32_ckpt, data, strategy, out, cfg), out.with_suffix(".log"),
                   train_env(threads_per_job(cfg)), tag=f"calibrate {out.stem}")
    return out


def train_qat(data: Path, out: Path, strategy: Path, fp32_ckpt: Path, cfg: RecipeConfig, kd: bool = True,
              tag: str = "", work: Path | None = None, start: Path | None = None) -> Path:
    """QAT of ``strategy``: calibrated first (in work/calib), fine-tuned from the calibrated checkpoint, then (with
    ``cfg.qat_select``) the better of the two on dev (:func:`select_on_dev`). Returns the checkpoint the row uses.
    ``start``: a calibrated checkpoint of ``strategy`` to fine-tune instead (e.g. a higher precision's QAT model
    re-quantized: progressive QAT); ``fp32_ckpt`` stays the teacher."""
    out.mkdir(parents=True, exist_ok=True)
    ckpt = out / "checkpoint_best.pt"
    if done_marker(out).exists():
        logger.info("QAT %s: already trained (%s)", tag or strategy.stem, ckpt)
    # the shipped strategies' calibrated checkpoints are shared with their ptq-* rows
    shared = strategy.parent.resolve() == STRATEGY_DIR.resolve() or not tag
    if start is None:
        start = calibrated_checkpoint(data, work or out.parents[1], strategy, fp32_ckpt, cfg,
                                      name=None if shared else f"{tag}-start")
    if not done_marker(out).exists():
        cmd = qat_command(data, out, strategy, fp32_ckpt, cfg, kd, start)
        began = time.perf_counter()
        run_logged(cmd, out / "train.log", train_env(threads_per_job(cfg)), tag=tag or strategy.stem)
        mark_done(out, {"seconds": round(time.perf_counter() - began, 1), "updates": cfg.qat_updates,
                        "strategy": str(strategy), "kd": kd})
    if not cfg.qat_select:
        return ckpt
    return select_on_dev(tag or strategy.stem, start, ckpt, out, data, work or out.parents[1], cfg)


def select_on_dev(name: str, start: Path, trained: Path, out: Path, data: Path, work: Path, cfg: RecipeConfig) -> Path:
    """QAT's last step: of its calibrated start (the PTQ model) and the trained checkpoint, keep the one with the
    lower pooled dev WER (a tie keeps the trained one), copied to ``out/checkpoint_selected.pt``; the choice and
    both WERs go to ``out/selection.json``. QAT then never keeps a model that decodes dev worse than PTQ did."""
    chosen, record = out / SELECTED, out / "selection.json"
    if chosen.exists() and record.exists():
        return chosen
    dev = dev_subsets()
    dev_cfg = replace(cfg, eval_subsets=dev)
    base = evaluate_model(f"{name} start", start, data, work / "select" / start.stem, dev_cfg)
    tuned = evaluate_model(f"{name} trained", trained, data, out / "select", dev_cfg)
    wers = {"start": pooled_wer(base, dev), "trained": pooled_wer(tuned, dev)}
    pick = "trained" if wers["trained"] <= wers["start"] else "start"
    with atomic_output(chosen) as tmp:
        shutil.copyfile(trained if pick == "trained" else start, tmp)
    record.write_text(json.dumps({"chosen": pick, "dev_subsets": list(dev), "dev_wer": wers, "start": str(start),
                                  "trained": str(trained)}, indent=2) + "\n")
    logger.info("select %s: dev WER start %.2f, trained %.2f -> %s", name, wers["start"], wers["trained"], pick)
    return chosen


def make_checkpoint(row: Row, data: Path, work: Path, fp32_ckpt: Path, cfg: RecipeConfig) -> Path:
    """The checkpoint a row evaluates: fp32 itself, a post-training quantized copy, or a QAT run."""
    if row.kind in ("fp32", "dynamic_int8"):
        return fp32_ckpt
    if row.kind == "fp32_bundle":
        return bundle_checkpoint(row, data)
    if row.kind == "ptq":
        from fairseq_quant.baselines import ptq_checkpoint
        from fairseq_quant.quant import Strategy

        bits, granularity, method = row.ptq
        out = work / "ptq" / f"{row.name}.pt"
        if not out.exists():
            ptq_checkpoint(fp32_ckpt, out, Strategy.uniform(bits, "fp32", granularity=granularity,
                                                            weight_method=method))
        return out
    if row.kind == "ptq_calibrated":
        return calibrated_checkpoint(data, work, strategy_path(row.strategy), fp32_ckpt, cfg)
    if row.kind == "qat":
        return train_qat(data, work / "qat" / row.name, strategy_path(row.strategy), fp32_ckpt, row_config(row, cfg),
                         row.kd, tag=row.name, work=work)
    if row.kind == "search_qat":
        out = search_dir(row, work)
        with file_lock(out):  # two rows sharing one search (search_from) run it once
            if not (out / "summary.json").exists():
                run_logged(search_command(row, data, out, fp32_ckpt, cfg), out / "search.log",
                           train_env(threads_per_job(cfg)), tag=f"search {out.name}")
        return train_qat(data, work / "qat" / row.name, out / "strategies" / "best.yaml", fp32_ckpt,
                         row_config(row, cfg), row.kd, tag=row.name, work=work)
    if row.kind == "coqat":
        return collapsed_checkpoint(row.name, co_trained_checkpoint(row.strategy, data, work, fp32_ckpt, cfg), work,
                                    precision=row.deploy)
    if row.kind == "co_search":
        co_ckpt = co_trained_checkpoint(co_training(row), data, work, fp32_ckpt, cfg)
        base = row.search_from or row.name  # the row whose search and collapsed checkpoint this one shares
        out = work / "search" / base
        out.mkdir(parents=True, exist_ok=True)
        with file_lock(out):  # co-searched and co-searched-ft run one search
            if not (out / "summary.json").exists():
                run_logged(search_command(ROWS[base], data, out, fp32_ckpt, cfg, co_trained=co_ckpt),
                           out / "search.log", train_env(threads_per_job(cfg)), tag=f"search {base}")
            best = out / "strategies" / "best.yaml"
            collapsed = collapsed_checkpoint(base, co_ckpt, work, strategy=best)
        if not row.finetune:
            return collapsed
        return train_qat(data, work / "qat" / row.name, best, fp32_ckpt, row_config(row, cfg), row.kd, tag=row.name,
                         work=work, start=collapsed)
    raise ValueError(f"unknown row kind {row.kind!r}")


def bundle_checkpoint(row: Row, data: Path) -> Path:
    """An fp32_bundle row's model, after checking that it writes the tokens of the prepared data's dictionary."""
    from recipes.librispeech.reference import BundleError

    bundle = bundle_dir(row)
    if (bundle / "dict.txt").read_text() != (data / "dict.txt").read_text():
        raise BundleError(f"{bundle}: its dict.txt differs from {data / 'dict.txt'}; row {row.name} would decode "
                          "other token ids (train it with the reference's SentencePiece model)")
    return bundle / "model.pt"


def co_trained_checkpoint(strategy: str, data: Path, work: Path, fp32_ckpt: Path, cfg: RecipeConfig) -> Path:
    """The multi-precision co-trained model of ``strategy``: calibrated, then trained with the co-training options
    (once; the rows that collapse it share it; a lock keeps two parallel rows from training it twice)."""
    out = co_train_dir(strategy, work)
    with file_lock(out):
        if not done_marker(out).exists():
            start = calibrated_checkpoint(data, work, strategy_path(strategy), fp32_ckpt, cfg)
            began = time.perf_counter()
            run_logged(co_qat_command(data, strategy, fp32_ckpt, start, work, cfg), out / "train.log",
                       train_env(threads_per_job(cfg)), tag=out.name)
            mark_done(out, {"seconds": round(time.perf_counter() - began, 1),
                            "updates": cfg.co_updates or cfg.qat_updates, "options": list(cfg.co_options)})
    return out / "checkpoint_best.pt"


def collapsed_checkpoint(name: str, co_ckpt: Path, work: Path, precision: int | None = None,
                         strategy: Path | None = None) -> Path:
    """The convert phase of a co-trained row: its allocation as an ordinary checkpoint (cached)."""
    from fairseq_quant.cotrained import collapse_checkpoint
    from fairseq_quant.quant import Strategy

    out = work / "co" / f"{name}.pt"
    if not out.exists() or out.stat().st_mtime < co_ckpt.stat().st_mtime:
        collapse_checkpoint(co_ckpt, out, precision=precision,
                            strategy=Strategy.from_yaml(strategy) if strategy is not None else None)
    return out


def evaluate_model(name: str, ckpt: Path, data: Path, out: Path, cfg: RecipeConfig,
                   dynamic_int8: bool = False) -> ModelResult:
    """WER on every evaluation subset (cached in ``out/wer.json``), with size and bits of the model."""
    summary = out / "wer.json"
    cached = json.loads(summary.read_text()) if summary.exists() else {}
    if (cached.get("checkpoint") != str(ckpt) or cached.get("dynamic_int8", False) != dynamic_int8
            or {r["subset"] for r in cached.get("results", [])} != set(cfg.eval_subsets)):
        out.mkdir(parents=True, exist_ok=True)
        cmd = eval_command(ckpt, data, out, cfg, dynamic_int8)
        run_logged(cmd, out / "evaluate.log", train_env(threads_per_job(cfg)), tag=f"eval {name}")
        cached = json.loads(summary.read_text())
        logger.info("eval %s: %s", name, " ".join(f"{r['subset']} {r['wer']:.2f}" for r in cached["results"]))
    results = cached["results"]
    return ModelResult(
        name=name, checkpoint=str(ckpt), avg_weight_bits=cached["avg_weight_bits"], model_mb=cached["model_mb"],
        wer={r["subset"]: r["wer"] for r in results}, words={r["subset"]: r["words"] for r in results},
        errors={r["subset"]: r["substitutions"] + r["deletions"] + r["insertions"] for r in results},
        eval_dir=str(out),
    )


def export_and_decode(row: Row, data: Path, work: Path, fp32_ckpt: Path, cfg: RecipeConfig) -> ModelResult:
    """The qat-<strategy> checkpoint exported to .fqm and decoded by the on-device runtime (cached)."""
    ckpt = make_checkpoint(runtime_source(row, work)[0], data, work, fp32_ckpt, cfg)
    out = work / "eval" / row.name
    summary = out / "wer.json"
    cached = json.loads(summary.read_text()) if summary.exists() else {}
    if (cached.get("checkpoint") != str(ckpt) or cached.get("exact", False) != row.exact
            or {r["subset"] for r in cached.get("results", [])} != set(cfg.eval_subsets)):
        out.mkdir(parents=True, exist_ok=True)
        model_file = runtime_model_file(row, work)
        run_logged(export_command(ckpt, data, model_file, out, row.exact), out / "export.log", tag=f"export {row.name}")
        export = json.loads((out / "export.json").read_text())
        results = []
        for subset in cfg.eval_subsets:
            run_logged(runtime_command(model_file, data, subset, out, cfg, row.exact), out / f"{subset}.log",
                       train_env(threads_per_job(cfg)), tag=f"runtime {row.name}")
            os.replace(out / subset / f"{subset}.utt.tsv", out / f"{subset}.utt.tsv")
            w = json.loads((out / subset / "wer.json").read_text())
            from fairseq_quant.stats import read_utterances

            utts = read_utterances(out / f"{subset}.utt.tsv")
            results.append({"subset": subset, "utterances": w["utterances"], "words": w["words"],
                            "substitutions": sum(u.substitutions for u in utts),
                            "deletions": sum(u.deletions for u in utts),
                            "insertions": sum(u.insertions for u in utts), "wer": w["wer"], "rtf": w["rtf"]})
        cached = {"checkpoint": str(ckpt), "model_file": str(model_file), "exact": row.exact, "beam": cfg.beam,
                  "avg_weight_bits": round(export["avg_weight_bits"], 4), "model_mb": export["total"] / 1e6,
                  "results": results}
        summary.write_text(json.dumps(cached, indent=2) + "\n")
        logger.info("runtime %s: %s", row.name, " ".join(f"{r['subset']} {r['wer']:.2f} (RTF {r['rtf']:.4f})"
                                                           for r in results))
    return ModelResult(
        name=row.name, checkpoint=str(ckpt), avg_weight_bits=cached["avg_weight_bits"], model_mb=cached["model_mb"],
        wer={r["subset"]: r["wer"] for r in cached["results"]}, words={r["subset"]: r["words"] for r in cached["results"]},
        errors={r["subset"]: r["substitutions"] + r["deletions"] + r["insertions"] for r in cached["results"]},
        eval_dir=str(out))


def run_row(row: Row, data: Path, work: Path, fp32_ckpt: Path, cfg: RecipeConfig) -> ModelResult:
    start = time.perf_counter()
    if row.kind == "runtime":
        result = export_and_decode(row, data, work, fp32_ckpt, cfg)
        result.seconds = round(time.perf_counter() - start, 1)
        return result
    ckpt = make_checkpoint(row, data, work, fp32_ckpt, cfg)
    result = evaluate_model(row.name, ckpt, data, work / "eval" / row.name, cfg,
                            dynamic_int8=row.kind == "dynamic_int8")
    result.seconds = round(time.perf_counter() - start, 1)
    return result


def reference_fp32(bundle: Path, corpus_params: dict) -> Path:
    """The bundle's checkpoint, after checking its checksums and that it was trained on this corpus."""
    from recipes.librispeech.reference import BundleError, load_manifest

    manifest = load_manifest(bundle)
    # which utterances are synthesised, and held-out speakers added after the plan: not what the model trained on
    partial = ("synth_train", "synth_eval", "extra_eval_speakers")
    trained_on = {k: v for k, v in manifest["corpus"].items() if k not in partial}
    wanted = {k: v for k, v in corpus_params.items() if k not in partial}
    if trained_on != wanted:
        raise BundleError(f"{bundle}: the reference model was trained on corpus {trained_on}, but this run "
                          f"generates {wanted}; its test sets would not be held out. Use --train-fp32.")
    return bundle / "model.pt"


def dry_run(work: Path, root: Path | None, stages: set, cfg: RecipeConfig, seed: int, fp32_ckpt: Path) -> str:
    """Every stage's command lines (the corpus and prepare stages as their equivalent command lines; they run
    in this process) and the estimated memory of the largest training batch; nothing runs, nothing is written."""
    data = work / "data"
    plan = []
    if root is None and "corpus" in stages:
        plan.append(("corpus", [sys.executable, "-m", "recipes.librispeech.generate_corpus", "--out", str(work / "corpus"),
                                "--seed", str(seed), "--size", cfg.corpus_size, "--jobs", str(cfg.threads)]
                     + (["--synth-train", str(cfg.synth_train)] if cfg.reference and cfg.synth_train else [])
                     + (["--extra-eval-speakers", str(cfg.extra_eval_speakers)] if cfg.extra_eval_speakers else [])))
    if "prepare" in stages:
        plan.append(("prepare", [sys.executable, "-m", "recipes.librispeech.prepare_data", "--librispeech-root",
                                 str(root or work / "corpus" / "LibriSpeech"), "--out", str(data),
                                 "--train-subsets", ",".join(cfg.train_subsets), "--eval-subsets", ",".join(prepared_subsets(cfg)),
                                 "--vocab-size", str(cfg.vocab_size), "--jobs", str(cfg.threads)]))
    if "fp32" in stages and not cfg.reference:
        plan.append(("fp32", fp32_command(data, work / "fp32", cfg)))
    if "rows" in stages:
        for row in (ROWS[name] for name in cfg.rows):
            ckpt = fp32_ckpt
            if row.kind in ("qat", "ptq_calibrated"):
                strategy = strategy_path(row.strategy)
                start = work / "calib" / f"{strategy.stem}.pt"
                plan.append((f"calibrate {row.name}", calibrate_command(fp32_ckpt, data, strategy, start, cfg)))
                ckpt = start
            if row.kind == "qat":
                trained = work / "qat" / row.name / "checkpoint_best.pt"
                plan.append((f"qat {row.name}", qat_command(data, trained.parent, strategy, fp32_ckpt,
                                                            row_config(row, cfg), row.kd, start)))
                plan += select_plan(row.name, start, trained, data, work, cfg)
                ckpt = trained.parent / SELECTED
            elif row.kind == "search_qat":
                ckpt = work / "qat" / row.name / "checkpoint_best.pt"
                search_out = search_dir(row, work)
                best = search_out / "strategies" / "best.yaml"
                start = work / "calib" / f"{row.name}-start.pt"
                if not any(stage == f"search {search_out.name}" for stage, _ in plan):
                    plan.append((f"search {search_out.name}", search_command(row, data, search_out, fp32_ckpt, cfg)))
                plan.append((f"calibrate {row.name}", calibrate_command(fp32_ckpt, data, best, start, cfg)))
                plan.append((f"qat {row.name}", qat_command(data, ckpt.parent, best, fp32_ckpt, row_config(row, cfg),
                                                            row.kd, start)))
                plan += select_plan(row.name, start, ckpt, data, work, cfg)
                ckpt = ckpt.parent / SELECTED
            elif row.kind in ("coqat", "co_search"):
                strategy = co_training(row)
                start = work / "calib" / f"{strategy_path(strategy).stem}.pt"
                co_ckpt = co_train_dir(strategy, work) / "checkpoint_best.pt"
                if not any(stage == f"co-train {strategy}" for stage, _ in plan):
                    plan.append((f"calibrate {strategy}", calibrate_command(fp32_ckpt, data, strategy_path(strategy),
                                                                              start, cfg)))
                    plan.append((f"co-train {strategy}", co_qat_command(data, strategy, fp32_ckpt, start, work, cfg)))
                ckpt = work / "co" / f"{row.search_from or row.name}.pt"
                if row.kind == "co_search":
                    out = work / "search" / (row.search_from or row.name)
                    best = ["--strategy", str(out / "strategies" / "best.yaml")]
                else:
                    best = ["--bits", str(row.deploy)]
                if row.kind == "co_search" and row.search_from:  # its search and collapse are those of the row above
                    qat_ckpt = work / "qat" / row.name / "checkpoint_best.pt"
                    plan.append((f"qat {row.name}", qat_command(data, qat_ckpt.parent, Path(best[1]), fp32_ckpt,
                                                                row_config(row, cfg), row.kd, ckpt)))
                    plan += select_plan(row.name, ckpt, qat_ckpt, data, work, cfg)
                    ckpt = qat_ckpt.parent / SELECTED
                else:
                    if row.kind == "co_search":
                        plan.append((f"search {row.name}", search_command(row, data, out, fp32_ckpt, cfg, co_ckpt)))
                    plan.append((f"collapse {row.name}", [sys.executable, str(Path(__file__).resolve().parents[2] / "scripts" / "collapse_cotrained.py"),
                                                          "--checkpoint", str(co_ckpt), *best, "--out", str(ckpt)]))
            elif row.kind == "ptq":
                ckpt = work / "ptq" / f"{row.name}.pt"
            elif row.kind == "fp32_bundle":
                ckpt = bundle_dir(row) / "model.pt"
            elif row.kind == "runtime":
                out = work / "eval" / row.name
                model_file = runtime_model_file(row, work)
                plan.append((f"export {row.name}", export_command(runtime_source(row, work)[1], data, model_file, out,
                                                                  row.exact)))
                plan += [(f"runtime {row.name} {subset}", runtime_command(model_file, data, subset, out, cfg, row.exact))
                         for subset in cfg.eval_subsets]
                continue
            plan.append((f"eval {row.name}", eval_command(ckpt, data, work / "eval" / row.name, cfg,
                                                          row.kind == "dynamic_int8")))
    lines = [f"# stage {stage}\n{shlex.join(cmd)}" for stage, cmd in plan]
    return "\n".join(lines + memory_lines(cfg)) + "\n"


def select_plan(name: str, start: Path, trained: Path, data: Path, work: Path, cfg: RecipeConfig) -> list:
    """The dry-run stages of ``select_on_dev``: the start and the trained checkpoint decoded on the dev subsets."""
    if not cfg.qat_select:
        return []
    dev_cfg = replace(cfg, eval_subsets=dev_subsets())
    return [(f"select {name} start", eval_command(start, data, work / "select" / start.stem, dev_cfg)),
            (f"select {name} trained", eval_command(trained, data, trained.parent / "select", dev_cfg))]


def write_family_table(results: list[ModelResult], root, subsets, path: Path) -> str:
    """The fp32 row's WER per synthesizer voice family of each subset, with its best and worst speaker
    (:func:`recipes.librispeech.report.family_table`), written to ``path``, for a generated corpus (its
    ``VOICES.json``); "" (nothing written) for a corpus without one, such as real LibriSpeech, or without an fp32
    row."""
    fp32 = next((r for r in results if r.name == "fp32" and r.eval_dir), None)
    if root is None or fp32 is None or not (Path(root) / "VOICES.json").is_file():
        return ""
    from recipes.librispeech.generate_corpus import read_voices

    table = family_table(Path(fp32.eval_dir), read_voices(Path(root)), subsets)
    atomic_write(path, table)
    return table


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="default")
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--librispeech-root", type=Path, default=None,
                        help="an official LibriSpeech tree (default: generate a corpus in its layout)")
    parser.add_argument("--rows", default=None,
                        help=f"comma-separated table rows (default: the size's); 'all' for every row: {','.join(ROWS)}")
    parser.add_argument("--stages", default="corpus,prepare,fp32,rows")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-fp32", action="store_true",
                        help="train the fp32 reference here instead of using the shipped bundle "
                             "(python -m recipes.librispeech.train_reference; about 2 hours on 2 cores)")
    parser.add_argument("--bundle", type=Path, default=None, help="reference bundle (default: the shipped one)")
    parser.add_argument("--fp32-updates", type=int, default=None)
    parser.add_argument("--qat-updates", type=int, default=None)
    parser.add_argument("--jobs", type=int, default=None,
                        help="QAT trainings / evaluations run at a time (default 2; they share --threads)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads in all (default 2)")
    parser.add_argument("--num-workers", type=int, default=None,
                        help="fairseq-train data-loading workers (default 0; raise it on GPU machines)")
    parser.add_argument("--dry-run", action="store_true",
                        help="print every stage's command lines and the estimated memory per training batch; "
                             "run nothing")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s | %(name)s | %(message)s")
    # per-layer quantization reports are in each train.log; keep the console to progress and results
    logging.getLogger("fairseq_quant.models.quant_vggtransformer").setLevel(logging.WARNING)
    cfg = SIZES[args.size]
    overrides = {"fp32_updates": args.fp32_updates, "qat_updates": args.qat_updates, "jobs": args.jobs,
                 "threads": args.threads, "num_workers": args.num_workers}
    cfg = replace(cfg, **{k: v for k, v in overrides.items() if v is not None})
    if args.rows:
        names = list(ROWS) if args.rows == "all" else [r for r in args.rows.split(",") if r]
        unknown = [r for r in names if r not in ROWS]
        if unknown:
            parser.error(f"unknown rows {unknown}; rows are {','.join(ROWS)}")
        if names[0] != "fp32":
            names = ["fp32"] + [n for n in names if n != "fp32"]
        cfg = replace(cfg, rows=tuple(names))
    stages = set(args.stages.split(","))
    work = args.workdir.resolve()
    root = args.librispeech_root
    if root is None and cfg.corpus_size is None:
        parser.error(f"--size {args.size} needs --librispeech-root")
    if root is not None and not root.is_dir():
        parser.error(f"--librispeech-root {root}: not a directory; expected the LibriSpeech directory that holds "
                     f"{', '.join(cfg.train_subsets + EVAL_SUBSETS)}")
    for row in (ROWS[name] for name in cfg.rows):
        if row.kind in ("qat", "coqat"):
            strategy = row.strategy
        elif row.kind in ("co_search", "search_qat"):  # "BUDGET:STRATEGY" (search_qat: the strategy is optional)
            strategy = row.strategy.partition(":")[2]
        else:
            strategy = None
        if strategy and not strategy_path(strategy).is_file():
            parser.error(f"strategy not found: {strategy_path(strategy)}")
        problem = shared_search_problem(row)
        if problem:
            parser.error(problem)
    from_reference = cfg.reference and not args.train_fp32
    bundle_rows = [name for name in cfg.rows if ROWS[name].kind == "fp32_bundle"]
    if bundle_rows and not from_reference:
        parser.error(f"rows {', '.join(bundle_rows)} are fp32 models trained on the shipped reference's corpus: they "
                     f"compare only in a run from that reference (--size default or benchmark, without --train-fp32)")
    if from_reference and root is not None:
        parser.error(f"--size {args.size} starts from the reference model of the generated corpus; "
                     "with --librispeech-root use --size paper (or --train-fp32)")
    if args.dry_run:  # the rows start from the reference bundle's model, or from the fp32 model trained here
        from recipes.librispeech.reference import DEFAULT_BUNDLE

        start = ((args.bundle or DEFAULT_BUNDLE).resolve() / "model.pt" if from_reference
                 else work / "fp32" / "checkpoint_best.pt")
        print(dry_run(work, root and root.resolve(), stages, cfg, args.seed, start), end="")
        return 0
    if bundle_rows:  # before anything runs: each bundle shipped, intact, and trained on this corpus
        from recipes.librispeech.generate_corpus import size_params
        from recipes.librispeech.reference import BundleError

        for name in bundle_rows:
            try:
                reference_fp32(bundle_dir(ROWS[name]), size_params(cfg.corpus_size, args.seed))
            except BundleError as err:
                parser.exit(2, f"run: error: row {name}: {err}\n")
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    timings = {}

    def timed(stage, fn, *a, **kw):
        t = time.perf_counter()
        out = fn(*a, **kw)
        timings[stage] = timings.get(stage, 0.0) + time.perf_counter() - t
        return out

    data = work / "data"
    if root is None:
        from recipes.librispeech.generate_corpus import generate_from_params, size_params

        params = size_params(cfg.corpus_size, args.seed, cfg.synth_train if from_reference else None,
                             extra_eval_speakers=cfg.extra_eval_speakers)
        logger.info("stage corpus: %s", params)
        if "corpus" in stages:
            try:
                root = timed("corpus", generate_from_params, work / "corpus", params, cfg.threads)
            except FileExistsError as err:  # a workdir of another size or seed
                parser.exit(2, f"run: error: {err}\n")
        else:
            root = work / "corpus" / "LibriSpeech"
    fp32_ckpt = work / "fp32" / "checkpoint_best.pt"
    if from_reference:
        from recipes.librispeech.reference import DEFAULT_BUNDLE

        bundle = args.bundle or DEFAULT_BUNDLE
        fp32_ckpt = reference_fp32(bundle, params)
        arch = json.loads((bundle / "manifest.json").read_text()).get("arch") or cfg.arch
        cfg = replace(cfg, arch=arch)  # QAT builds quant_<the bundle's arch>
        logger.info("fp32: the reference model %s (%s)", fp32_ckpt, arch)
        spm_dict = {"spm_model": bundle / "spm.model", "dictionary": bundle / "dict.txt"}
    else:
        spm_dict = {}
    if "prepare" in stages:
        from recipes.librispeech.prepare_data import prepare

        logger.info("stage prepare: %s -> %s", root, data)
        try:
            timed("prepare", prepare, root, data, list(cfg.train_subsets), list(prepared_subsets(cfg)), cfg.vocab_size,
                  cfg.threads, **spm_dict)
        except (FileNotFoundError, ValueError) as err:
            parser.exit(2, f"run: error: {err}\n")
    if "fp32" in stages and not from_reference:
        if cfg.reference:  # --train-fp32 of a reference-sized run: the reference recipe, here
            from recipes.librispeech.train_reference import main as train_reference

            logger.info("stage fp32: train_reference in %s", work / "reference")
            timed("fp32", train_reference, ["--workdir", str(work / "reference"), "--seed", str(args.seed),
                                            "--stages", "corpus,prepare,train,average"])
            fp32_ckpt, data = work / "reference" / "model.pt", work / "reference" / "data"
        else:
            logger.info("stage fp32: %s, %d updates", cfg.arch, cfg.fp32_updates)
            fp32_ckpt = timed("fp32", train_fp32, data, work / "fp32", cfg)
    if "rows" in stages:
        rows = [ROWS[name] for name in cfg.rows]
        logger.info("stage rows: %s on %s, beam %d, %d at a time", ", ".join(cfg.rows),
                    ", ".join(cfg.eval_subsets), cfg.beam, cfg.jobs)
        # runtime rows export a QAT row's checkpoint: they run after the rows that train it
        first = [row for row in rows if row.kind != "runtime"]
        order = longest_first(first)
        started_rows = timed("rows", parallel, cfg.jobs, [(run_row, first[i], data, work, fp32_ckpt, cfg)
                                                          for i in order])
        results = [None] * len(first)
        for i, result in zip(order, started_rows):
            results[i] = result
        results += timed("runtime rows", parallel, 1, [(run_row, row, data, work, fp32_ckpt, cfg)
                                                       for row in rows if row.kind == "runtime"])
        table = results_table(results, cfg.eval_subsets)
        atomic_write(work / "results.md", table)
        plot = plot_results(results, cfg.eval_subsets, work / "results.png")
        atomic_write(work / "results.json", json.dumps({
            "size": args.size, "config": cfg.__dict__, "timings_s": {k: round(v, 1) for k, v in timings.items()},
            "results": [r.__dict__ for r in results]}, indent=2, default=str) + "\n")
        print("\n" + table)
        print(f"plot: {plot}")
        families = write_family_table(results, root, cfg.eval_subsets, work / "families.md")
        if families:
            print(f"\nfp32 WER per voice family ({work / 'families.md'}):\n{families}")
    total = time.perf_counter() - started
    print("stage times: " + ", ".join(f"{k} {v / 60:.1f} min" for k, v in timings.items())
          + f"; total {total / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())

