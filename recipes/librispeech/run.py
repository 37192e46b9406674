"""The LibriSpeech recipe, end to end: corpus -> prepare -> fp32 VGGTransformer -> QAT per strategy ->
WER evaluation -> results table.

    python -m recipes.librispeech.run --size default --workdir exp/default           # generated corpus
    python -m recipes.librispeech.run --librispeech-root /data/LibriSpeech --size paper --workdir exp/ls
    python -m recipes.librispeech.run ... --dry-run   # the command lines and memory per batch; runs nothing

Every stage is idempotent: a finished stage leaves a ``.done`` marker and is skipped on the next run;
an interrupted fairseq-train resumes from its ``checkpoint_last.pt``.
"""
import argparse
import json
import logging
import os
import re
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

STRATEGY_DIR = Path(__file__).parent / "strategies"
DEFAULT_STRATEGIES = ("w8a8", "w4a8", "w2a8", "mixed2a8")
EVAL_SUBSETS = ("dev-clean", "dev-other", "test-clean", "test-other")
LOG_LINE = re.compile(r"\| (train_inner|valid on|train \||.*valid on|.*: WER )")

logger = logging.getLogger("recipe")


@dataclass(frozen=True)
class RecipeConfig:
    """Everything a run size decides: corpus, model, and the fp32 and QAT schedules."""

    corpus_size: str | None  # generate_corpus size, None for a real LibriSpeech tree
    arch: str = "vggtransformer_small"
    encoder_dim: int = 144  # --enc-output-dim of the arch, for the auxiliary CTC head
    ctc_weight: float = 1.0  # auxiliary CTC loss during fp32 training (0 disables); speeds up alignment
    vocab_size: int = 300
    batch_size: int = 8  # utterances per update (0: let --max-tokens decide)
    fp32_updates: int = 5000
    fp32_lr: float = 3e-3
    warmup: int = 300
    qat_updates: int = 250
    qat_lr: float = 5e-4
    kd_weight: float = 0.5
    kd_temperature: float = 2.0
    calib_batches: int = 8
    beam: int = 5
    max_len_a: float = 0.2  # longest hypothesis: a * frames + b tokens (0.2: 20 tokens a second of audio)
    max_len_b: int = 10
    train_subsets: tuple = ("train-clean-100",)
    extra_train_args: tuple = ()
    threads: int = 2  # CPU threads in all: fp32 training uses them all, parallel jobs share them
    jobs: int = 2  # QAT trainings and evaluations run this many at a time (independent processes)
    num_workers: int = 0  # data-loading worker processes of fairseq-train (fbank is computed on the fly)


SIZES = {
    # a smoke run for CI: tiny corpus, a few updates; checks the plumbing, not accuracy
    "smoke": RecipeConfig(corpus_size="tiny", vocab_size=60, fp32_updates=30, warmup=10,
                          qat_updates=6, calib_batches=2, beam=2, max_len_a=0.0, max_len_b=40),
    # a few minutes: the plumbing on a real-sized corpus, far too short to learn much
    "quick": RecipeConfig(corpus_size="quick", fp32_updates=600, qat_updates=40),
    # the main job: about 30 minutes on 2 CPU cores (README)
    "default": RecipeConfig(corpus_size="default"),
    # the paper's vggtransformer_2 on real LibriSpeech (GPU cluster; see README)
    "paper": RecipeConfig(corpus_size=None, arch="vggtransformer_2", encoder_dim=1024, vocab_size=5000, batch_size=0,
                          ctc_weight=0.3, threads=8, jobs=1, num_workers=4,
                          fp32_updates=300000, fp32_lr=1e-4, warmup=8000, qat_updates=20000, qat_lr=5e-5,
                          train_subsets=("train-clean-100", "train-clean-360", "train-other-500"),
                          # 200 s of audio per batch, 400 s per update: QAT with distillation peaks at about
                          # 40 GB of an 80 GB GPU (--dry-run prints the estimate; recipes/librispeech/memory.py)
                          extra_train_args=("--max-tokens", "20000", "--update-freq", "2")),
}
LONGEST_UTTERANCE_FRAMES = 3500  # LibriSpeech segments are at most 35 s (10 ms frames)
TOKENS_PER_FRAME = 0.05  # upper bound: 5 SentencePiece pieces a second of speech


@dataclass
class ModelResult:
    name: str
    checkpoint: str
    avg_weight_bits: float
    model_mb: float
    wer: dict = field(default_factory=dict)  # subset -> WER %
    words: dict = field(default_factory=dict)  # subset -> reference words
    errors: dict = field(default_factory=dict)  # subset -> S + D + I


def done_marker(path: Path) -> Path:
    return path / ".done"


def mark_done(path: Path, info: dict) -> None:
    tmp = path / ".done.tmp"
    tmp.write_text(json.dumps(info, indent=2) + "\n")
    os.replace(tmp, done_marker(path))


def run_logged(cmd: list[str], log_path: Path, env=None, tag: str = "") -> None:
    """Run a command, keep its whole output in ``log_path`` and echo progress lines (prefixed by ``tag``)."""
    logger.info("%s$ %s", f"[{tag}] " if tag else "", " ".join(cmd))
    with open(log_path, "a") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        for line in proc.stdout:
            log.write(line)
            if LOG_LINE.search(line):
                print(f"   {tag + ': ' if tag else ''}" + line.split(" | ", 2)[-1].strip()[:160], flush=True)
        if proc.wait() != 0:
            raise RuntimeError(f"command failed with exit code {proc.returncode}; see {log_path}")


def train_env(threads: int) -> dict:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = str(threads)
    return env


def threads_per_job(cfg: RecipeConfig) -> int:
    return max(1, cfg.threads // max(1, cfg.jobs))


def common_train_args(data: Path, save_dir: Path, cfg: RecipeConfig, updates: int, lr: float) -> list[str]:
    args = [
        sys.executable, "-m", "fairseq_cli.train", str(data), "--user-dir", str(Path(__file__).parents[2] / "fairseq_quant"),
        "--task", "speech_recognition", "--train-subset", "train", "--valid-subset", "dev-clean",
        "--optimizer", "adam", "--adam-betas", "(0.9, 0.98)", "--lr", str(lr), "--clip-norm", "10",
        "--max-update", str(updates), "--save-dir", str(save_dir), "--num-workers", str(cfg.num_workers),
        "--no-epoch-checkpoints", "--log-format", "simple", "--log-interval", "25", "--seed", "1",
        "--skip-invalid-size-inputs-valid-test",
        # fairseq drops a last batch that is not a multiple of this (default 8): keep every utterance
        "--required-batch-size-multiple", "1",
    ]
    if cfg.batch_size:
        args += ["--batch-size", str(cfg.batch_size)]
    if "--max-tokens" not in cfg.extra_train_args:
        args += ["--max-tokens", "10000000"]
    return args + list(cfg.extra_train_args)


def fp32_command(data: Path, out: Path, cfg: RecipeConfig) -> list[str]:
    return common_train_args(data, out, cfg, cfg.fp32_updates, cfg.fp32_lr) + [
        "--arch", cfg.arch, "--criterion", "quant_cross_entropy_acc",
        "--ctc-weight", str(cfg.ctc_weight), "--ctc-encoder-dim", str(cfg.encoder_dim),
        "--lr-scheduler", "inverse_sqrt", "--warmup-updates", str(cfg.warmup),
    ]


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


def qat_command(data: Path, out: Path, strategy: Path, fp32_ckpt: Path, cfg: RecipeConfig) -> list[str]:
    return common_train_args(data, out, cfg, cfg.qat_updates, cfg.qat_lr) + [
        "--arch", f"quant_{cfg.arch}", "--quant-strategy", str(strategy),
        "--quant-calib-batches", str(cfg.calib_batches), "--finetune-from-model", str(fp32_ckpt),
        "--criterion", "quant_cross_entropy_acc", "--teacher-path", str(fp32_ckpt),
        "--kd-weight", str(cfg.kd_weight), "--kd-temperature", str(cfg.kd_temperature),
        "--lr-scheduler", "cosine", "--warmup-updates", str(min(50, cfg.qat_updates // 5)),
    ]


def train_qat(data: Path, out: Path, strategy: Path, fp32_ckpt: Path, cfg: RecipeConfig) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    ckpt = out / "checkpoint_best.pt"
    if done_marker(out).exists():
        logger.info("QAT %s: already trained (%s)", strategy.stem, ckpt)
        return ckpt
    cmd = qat_command(data, out, strategy, fp32_ckpt, cfg)
    start = time.perf_counter()
    run_logged(cmd, out / "train.log", train_env(threads_per_job(cfg)), tag=strategy.stem)
    mark_done(out, {"seconds": round(time.perf_counter() - start, 1), "updates": cfg.qat_updates,
                    "strategy": str(strategy)})
    return ckpt


def eval_command(ckpt: Path, data: Path, out: Path, cfg: RecipeConfig) -> list[str]:
    return [sys.executable, str(Path(__file__).parents[2] / "scripts" / "evaluate.py"), "--checkpoint", str(ckpt),
            "--data", str(data), "--subsets", ",".join(EVAL_SUBSETS), "--beam", str(cfg.beam),
            "--max-len-a", str(cfg.max_len_a), "--max-len-b", str(cfg.max_len_b), "--out", str(out),
            "--threads", str(threads_per_job(cfg))]


def evaluate_model(name: str, ckpt: Path, data: Path, out: Path, cfg: RecipeConfig) -> ModelResult:
    """WER on every subset (cached in ``out/wer.json``) plus size and bits of the checkpoint's model."""
    from fairseq_quant.evaluate import load_checkpoint
    from fairseq_quant.quant import build_report

    summary = out / "wer.json"
    if not summary.exists() or json.loads(summary.read_text()).get("checkpoint") != str(ckpt):
        out.mkdir(parents=True, exist_ok=True)
        cmd = eval_command(ckpt, data, out, cfg)
        run_logged(cmd, out / "evaluate.log", train_env(threads_per_job(cfg)), tag=f"eval {name}")
        logger.info("eval %s: %s", name, " ".join(f"{r['subset']} {r['wer']:.2f}"
                                                   for r in json.loads(summary.read_text())["results"]))
    results = json.loads(summary.read_text())["results"]
    model, _ = load_checkpoint(ckpt, data)
    report = getattr(model, "quant_report", None) or build_report(model)
    return ModelResult(
        name=name, checkpoint=str(ckpt), avg_weight_bits=report.avg_weight_bits, model_mb=report.quant_mb,
        wer={r["subset"]: r["wer"] for r in results}, words={r["subset"]: r["words"] for r in results},
        errors={r["subset"]: r["substitutions"] + r["deletions"] + r["insertions"] for r in results},
    )


def pooled_wer(result: ModelResult, subsets) -> float:
    words = sum(result.words[s] for s in subsets)
    return 100.0 * sum(result.errors[s] for s in subsets) / words


def results_table(results: list[ModelResult]) -> str:
    """Markdown: strategy, bits, MB, WER per subset, relative test WER change against fp32 (first row)."""
    base = results[0]
    tests = [s for s in EVAL_SUBSETS if s.startswith("test")]
    base_test = pooled_wer(base, tests)
    head = ("| model | avg weight bits | model MB | " + " | ".join(EVAL_SUBSETS)
            + " | test WER (pooled) | rel. change vs fp32 |")
    lines = [head, "|" + "---|" * (5 + len(EVAL_SUBSETS))]
    for r in results:
        test = pooled_wer(r, tests)
        rel = "-" if r is base else f"{100.0 * (test - base_test) / base_test:+.1f}%"
        lines.append(f"| {r.name} | {r.avg_weight_bits:.2f} | {r.model_mb:.3f} | "
                     + " | ".join(f"{r.wer[s]:.2f}" for s in EVAL_SUBSETS) + f" | {test:.2f} | {rel} |")
    return "\n".join(lines) + "\n"


def parallel(jobs: int, calls: list[tuple]) -> list:
    """Run ``fn(*args)`` for each ``(fn, *args)`` in ``calls``, ``jobs`` at a time; results in order.

    Each call runs its work in a child process, so threads are enough here; the first failure is raised."""
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        futures = [pool.submit(fn, *args) for fn, *args in calls]
        return [f.result() for f in futures]


def dry_run(work: Path, root: Path | None, stages: set, strategies: list[Path], cfg: RecipeConfig, seed: int) -> str:
    """Every stage's command lines (the corpus and prepare stages as their equivalent command lines; they run
    in this process) and the estimated memory of the largest training batch; nothing runs, nothing is written."""
    data, fp32_ckpt = work / "data", work / "fp32" / "checkpoint_best.pt"
    plan = []
    if root is None and "corpus" in stages:
        plan.append(("corpus", [sys.executable, "-m", "recipes.librispeech.generate_corpus", "--out", str(work / "corpus"),
                                "--seed", str(seed), "--size", cfg.corpus_size, "--jobs", str(cfg.threads)]))
    if "prepare" in stages:
        plan.append(("prepare", [sys.executable, "-m", "recipes.librispeech.prepare_data", "--librispeech-root",
                                 str(root or work / "corpus" / "LibriSpeech"), "--out", str(data),
                                 "--train-subsets", ",".join(cfg.train_subsets), "--eval-subsets", ",".join(EVAL_SUBSETS),
                                 "--vocab-size", str(cfg.vocab_size), "--jobs", str(cfg.threads)]))
    if "fp32" in stages:
        plan.append(("fp32", fp32_command(data, work / "fp32", cfg)))
    if "qat" in stages:
        plan += [(f"qat {s.stem}", qat_command(data, work / "qat" / s.stem, s, fp32_ckpt, cfg)) for s in strategies]
    if "eval" in stages:
        models = {"fp32": fp32_ckpt, **{s.stem: work / "qat" / s.stem / "checkpoint_best.pt" for s in strategies}}
        plan += [(f"eval {n}", eval_command(c, data, work / "eval" / n, cfg)) for n, c in models.items()]
    lines = [f"# stage {stage}\n{shlex.join(cmd)}" for stage, cmd in plan]
    return "\n".join(lines + memory_lines(cfg)) + "\n"


def memory_lines(cfg: RecipeConfig) -> list[str]:
    """Estimated peak memory of the largest fp32 and QAT training batch (recipes/librispeech/memory.py)."""
    from recipes.librispeech.memory import arch_config, batch_memory

    arch = arch_config(cfg.arch)
    train_args = common_train_args(Path("DATA"), Path("OUT"), cfg, 0, 0.0)
    max_tokens = int(train_args[len(train_args) - 1 - train_args[::-1].index("--max-tokens") + 1])
    lines = [f"# memory per training batch (batches of up to {max_tokens} frames, utterances up to "
             f"{LONGEST_UTTERANCE_FRAMES / 100:g} s, {cfg.vocab_size} tokens):"]
    for stage, qat in (("fp32", False), ("qat", True)):
        m = batch_memory(arch, cfg.vocab_size, max_tokens, LONGEST_UTTERANCE_FRAMES, TOKENS_PER_FRAME, qat=qat,
                         distill=qat and cfg.kd_weight > 0, batch_size=cfg.batch_size)
        state = "weights, gradients, Adam moments" + (", fp32 teacher" if qat and cfg.kd_weight > 0 else "")
        lines.append(f"#   {stage} {cfg.arch}: {m.utterances} x {m.frames / 100:g} s: activations "
                     f"{m.activations_gb:.1f} GB + model state ({state}) {m.model_state_gb:.1f} GB "
                     f"= {m.total_gb:.1f} GB")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="default")
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--librispeech-root", type=Path, default=None,
                        help="an official LibriSpeech tree (default: generate a corpus in its layout)")
    parser.add_argument("--strategies", default=",".join(DEFAULT_STRATEGIES),
                        help="names in recipes/librispeech/strategies or paths to YAML files")
    parser.add_argument("--stages", default="corpus,prepare,fp32,qat,eval")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fp32-updates", type=int, default=None)
    parser.add_argument("--qat-updates", type=int, default=None)
    parser.add_argument("--jobs", type=int, default=None,
                        help="QAT trainings / evaluations run at a time (default 2; they share --threads)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads in all (default 2)")
    parser.add_argument("--num-workers", type=int, default=None,
                        help="fairseq-train data-loading workers (default 0; raise it on GPU machines)")
    parser.add_argument("--dry-run", action="store_true",
                        help="print every stage's command lines and the memory estimate per batch; run nothing")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s | %(name)s | %(message)s")
    # per-layer quantization reports are in each train.log; keep the console to progress and results
    logging.getLogger("fairseq_quant.models.quant_vggtransformer").setLevel(logging.WARNING)
    cfg = SIZES[args.size]
    if args.fp32_updates:
        cfg = replace(cfg, fp32_updates=args.fp32_updates)
    if args.qat_updates:
        cfg = replace(cfg, qat_updates=args.qat_updates)
    if args.jobs:
        cfg = replace(cfg, jobs=args.jobs)
    if args.threads:
        cfg = replace(cfg, threads=args.threads)
    if args.num_workers is not None:
        cfg = replace(cfg, num_workers=args.num_workers)
    stages = set(args.stages.split(","))
    work = args.workdir.resolve()
    root = args.librispeech_root
    if root is None and cfg.corpus_size is None:
        parser.error(f"--size {args.size} needs --librispeech-root")
    if root is not None and not root.is_dir():
        parser.error(f"--librispeech-root {root}: not a directory; expected the LibriSpeech directory that holds "
                     f"{', '.join(cfg.train_subsets + EVAL_SUBSETS)}")
    strategies = [Path(s) if s.endswith(".yaml") else STRATEGY_DIR / f"{s}.yaml" for s in args.strategies.split(",") if s]
    for strategy in strategies:
        if not strategy.is_file():
            parser.error(f"strategy not found: {strategy}")
    if args.dry_run:
        print(dry_run(work, root and root.resolve(), stages, strategies, cfg, args.seed), end="")
        return 0
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    timings = {}

    def timed(stage, fn, *a):
        t = time.perf_counter()
        out = fn(*a)
        timings[stage] = timings.get(stage, 0.0) + time.perf_counter() - t
        return out

    if root is None:
        from recipes.librispeech.generate_corpus import SIZES as CORPUS_SIZES, generate_corpus

        corpus = CORPUS_SIZES[cfg.corpus_size]
        logger.info("stage corpus: %d train, %d per dev/test subset (seed %d)", corpus["num_train"],
                    corpus["num_dev"], args.seed)
        if "corpus" in stages:
            root = timed("corpus", lambda: generate_corpus(work / "corpus", args.seed, jobs=cfg.threads, **corpus))
        else:
            root = work / "corpus" / "LibriSpeech"
    data = work / "data"
    if "prepare" in stages:
        from recipes.librispeech.prepare_data import prepare

        logger.info("stage prepare: %s -> %s", root, data)
        try:
            timed("prepare", prepare, root, data, list(cfg.train_subsets), list(EVAL_SUBSETS), cfg.vocab_size,
                  cfg.threads)
        except (FileNotFoundError, ValueError) as err:
            parser.exit(2, f"run: error: {err}\n")

    fp32_ckpt = work / "fp32" / "checkpoint_best.pt"
    if "fp32" in stages:
        logger.info("stage fp32: %s, %d updates", cfg.arch, cfg.fp32_updates)
        fp32_ckpt = timed("fp32", train_fp32, data, work / "fp32", cfg)
    qat_ckpts = {s.stem: work / "qat" / s.stem / "checkpoint_best.pt" for s in strategies}
    if "qat" in stages:
        logger.info("stage qat: %s, %d updates each, %d at a time", ", ".join(qat_ckpts), cfg.qat_updates, cfg.jobs)
        timed("qat", parallel, cfg.jobs, [(train_qat, data, work / "qat" / s.stem, s, fp32_ckpt, cfg)
                                          for s in strategies])
    if "eval" in stages:
        logger.info("stage eval: %s on %s, beam %d, %d at a time", ", ".join(["fp32", *qat_ckpts]),
                    ", ".join(EVAL_SUBSETS), cfg.beam, cfg.jobs)
        models = {"fp32": fp32_ckpt, **qat_ckpts}
        results = timed("eval", parallel, cfg.jobs, [(evaluate_model, name, ckpt, data, work / "eval" / name, cfg)
                                                     for name, ckpt in models.items()])
        table = results_table(results)
        (work / "results.md").write_text(table)
        (work / "results.json").write_text(json.dumps({
            "size": args.size, "config": cfg.__dict__, "timings_s": {k: round(v, 1) for k, v in timings.items()},
            "results": [r.__dict__ for r in results]}, indent=2, default=str) + "\n")
        print("\n" + table)
    total = time.perf_counter() - started
    print("stage times: " + ", ".join(f"{k} {v / 60:.1f} min" for k, v in timings.items())
          + f"; total {total / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
