"""Train the reference fp32 VGGTransformer on the generated corpus and write its bundle.

    python -m recipes.librispeech.train_reference --workdir exp/ref --hours 1.7
    python -m recipes.librispeech.train_reference --workdir exp/ref --stages bundle \
        --bundle recipes/librispeech/reference

Stages (each resumable; a finished one is skipped):
- corpus: the --corpus corpus (generate_corpus.SIZES[--corpus]; seed --seed): `multisynth` (espeak-ng, flite and
  festival voices, and test-unseen-synth) by default, `reference` for the espeak-ng corpus of the 2026-12-03 bundle;
- prepare: manifests, a SentencePiece unigram model of --vocab-size pieces, dict.txt;
- train: fairseq-train of `vggtransformer_ref_ctc` (the model's CTC head trained by the CTC loss), until --hours of training
  time (fairseq's --stop-time-hours, which counts across resumes) or --max-update; an interrupted run
  resumes from checkpoint_last.pt. With --init-from BUNDLE the training continues from a bundle's
  weights (fairseq's --finetune-from-model: fresh optimizer, schedule and update count; the bundle's
  SentencePiece model and dictionary), so a reference can be trained further in later sessions;
  --schedule linear decays the learning rate linearly to lr/100 at --max-update instead of inverse_sqrt;
- average: the mean of the last --average interval checkpoints (fairseq keeps one every --save-every
  updates), without optimizer state;
- eval: WER of the averaged model on the dev and test sets, beam 5 (eval/: wer.json, per-utterance results);
- bundle: model.pt, the SentencePiece model, dict.txt and manifest.json (corpus parameters, the exact
  training command, commit, updates, wall time, machine, WER, sha256 of every file), written to a
  temporary directory and renamed into place.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from fairseq_quant_runtime.files import atomic_output, atomic_write
from recipes.librispeech.stages import done_marker, mark_done, run_logged, train_env

REPO = Path(__file__).resolve().parents[2]
ARCH = "vggtransformer_ref_ctc"  # with its CTC head: trained by the CTC loss, used by joint decoding
CORPUS_SIZE = "multisynth"
SPECAUGMENT_EXAMPLE = '{"freq_mask_N": 2, "freq_mask_F": 20, "time_mask_N": 2, "time_mask_T": 30, "time_mask_p": 0.2}'
STAGES = ("corpus", "prepare", "train", "average", "eval", "bundle")
logger = logging.getLogger("train_reference")


def training_command(data: Path, save_dir: Path, args: argparse.Namespace,
                     init_model: Path | None = None) -> list[str]:
    """The fairseq-train command line of the reference model (continuing from init_model's weights)."""
    return [
        sys.executable, "-m", "fairseq_cli.train", str(data), "--user-dir", str(REPO / "fairseq_quant"),
        *task_args(args), "--train-subset", "train", "--valid-subset", "dev-clean",
        "--arch", args.arch, "--criterion", "quant_cross_entropy_acc",
        "--ctc-weight", str(args.ctc_weight),
        "--optimizer", "adam", "--adam-betas", "(0.9, 0.98)", "--lr", str(args.lr), "--clip-norm", "10",
        *schedule_args(args),
        "--batch-size", str(args.batch_size), "--max-tokens", "10000000", "--required-batch-size-multiple", "1",
        "--max-update", str(args.max_update), "--stop-time-hours", str(args.hours),
        "--save-dir", str(save_dir), "--save-interval-updates", str(args.save_every),
        "--keep-interval-updates", str(max(args.average, 1) + 1), "--no-epoch-checkpoints",
        "--skip-invalid-size-inputs-valid-test", "--num-workers", "0",
        "--log-format", "simple", "--log-interval", "100", "--seed", str(args.train_seed),
        *(["--finetune-from-model", str(init_model)] if init_model is not None else []),
    ]


def task_args(args: argparse.Namespace) -> list[str]:
    """The fairseq task: speech_recognition, or with --specaugment its augmenting subclass."""
    if getattr(args, "specaugment", None):
        return ["--task", "speech_recognition_augment", "--specaugment", args.specaugment]
    return ["--task", "speech_recognition"]


def schedule_args(args: argparse.Namespace) -> list[str]:
    """fairseq's learning-rate scheduler options for --schedule."""
    if args.schedule == "linear":  # warm up, then decay linearly to lr/100 at --max-update
        return ["--lr-scheduler", "polynomial_decay", "--warmup-updates", str(args.warmup),
                "--total-num-update", str(args.max_update), "--end-learning-rate", str(args.lr / 100), "--power", "1"]
    return ["--lr-scheduler", "inverse_sqrt", "--warmup-updates", str(args.warmup)]


def start_checkpoint(init_dir: Path) -> Path:
    """The bundle's model as fairseq's --finetune-from-model needs it: with a criterion entry (a bundle keeps
    none; the criterion starts its CTC projection fresh) and no training time of its own (else the earlier
    training's hours count against this one's --hours), written once next to the copied bundle."""
    start = init_dir / "start.pt"
    if not start.is_file():
        import torch

        from fairseq_quant.compat import load_torch_file

        state = load_torch_file(init_dir / "model.pt")
        state.setdefault("criterion", {})
        # fairseq's --stop-time-hours counts the checkpoint's previous training time: --hours is this training's
        state.setdefault("extra_state", {})["previous_training_time"] = 0.0
        with atomic_output(start) as tmp:
            torch.save(state, tmp)
    return start


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--stages", default=",".join(STAGES))
    parser.add_argument("--corpus", default=CORPUS_SIZE, help="generate_corpus size of the training corpus")
    parser.add_argument("--arch", default=ARCH, help=f"the model (default {ARCH}; vggtransformer_narrow_ctc: the "
                                                     "size-matched fp32 comparison of the 2-bit models)")
    parser.add_argument("--seed", type=int, default=0, help="corpus seed")
    parser.add_argument("--train-seed", type=int, default=1)
    parser.add_argument("--vocab-size", type=int, default=256)
    parser.add_argument("--hours", type=float, default=1.7, help="training time limit (across resumes)")
    parser.add_argument("--max-update", type=int, default=100000)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--warmup", type=int, default=800)
    parser.add_argument("--ctc-weight", type=float, default=1.0)
    parser.add_argument("--save-every", type=int, default=1000, help="updates between interval checkpoints")
    parser.add_argument("--average", type=int, default=4, help="interval checkpoints averaged (0: the last)")
    parser.add_argument("--schedule", choices=("inverse_sqrt", "linear"), default="inverse_sqrt",
                        help="learning-rate schedule after warmup (linear: to lr/100 at --max-update)")
    parser.add_argument("--init-from", type=Path, default=None, metavar="BUNDLE",
                        help="continue from this reference bundle's weights, SentencePiece model and dictionary")
    parser.add_argument("--specaugment", default=None, metavar="JSON",
                        help="SpecAugment of the training features (task speech_recognition_augment), e.g. "
                             f"'{SPECAUGMENT_EXAMPLE}'")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--bundle", type=Path, default=REPO / "recipes" / "librispeech" / "reference")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s | %(name)s | %(message)s")
    stages = [s for s in args.stages.split(",") if s]
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        raise SystemExit(f"train_reference: unknown stages {unknown}; stages are {','.join(STAGES)}")
    work = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    corpus_root = work / "corpus" / "LibriSpeech"
    data = work / "data"
    save_dir = work / "train"
    from recipes.librispeech.generate_corpus import corpus_eval_subsets, size_params

    corpus_params = size_params(args.corpus, args.seed)
    eval_subsets = list(corpus_eval_subsets(corpus_params))
    init_model = None
    if args.init_from is not None:
        from recipes.librispeech.reference import copy_init_bundle

        init_dir = copy_init_bundle(args.init_from, work / "init")
        trained_on = json.loads((init_dir / "manifest.json").read_text())["corpus"]
        if trained_on != corpus_params:
            raise SystemExit(f"train_reference: {args.init_from} was trained on corpus {trained_on}, this run "
                             f"generates {corpus_params}; continue on the same corpus")
        init_model = start_checkpoint(init_dir)
    if "corpus" in stages:
        from recipes.librispeech.generate_corpus import generate_from_params

        generate_from_params(work / "corpus", corpus_params, jobs=args.threads)
    if "prepare" in stages:
        from recipes.librispeech.prepare_data import prepare

        given = ({"spm_model": init_model.with_name("spm.model"), "dictionary": init_model.with_name("dict.txt")}
                 if init_model is not None else {})
        prepare(corpus_root, data, ["train-clean-100"], eval_subsets,
                args.vocab_size, jobs=args.threads, **given)
    if "train" in stages:
        save_dir.mkdir(parents=True, exist_ok=True)
        cmd = training_command(data, save_dir, args, init_model)
        started = save_dir / "command.json"
        record = json.loads(started.read_text()) if started.exists() else None
        if record is None:  # the first start: the code the training began with
            from recipes.librispeech.reference import git_commit

            record = {"command": cmd, **git_commit(REPO)}
        runs = record.setdefault("runs", [record["command"]])
        if not done_marker(save_dir).exists() or runs[-1] != cmd:
            # a finished training continues when asked for more (--hours, --max-update): fairseq resumes from
            # checkpoint_last.pt, its time limit counts across resumes, and every run's command is recorded
            if runs[-1] != cmd:
                runs.append(cmd)
            atomic_write(started, json.dumps(record) + "\n")
            done_marker(save_dir).unlink(missing_ok=True)
            start = time.perf_counter()
            run_logged(cmd, save_dir / "train.log", train_env(args.threads))
            mark_done(save_dir, {"seconds_this_run": round(time.perf_counter() - start, 1)})
    if "average" in stages:
        from recipes.librispeech.reference import average_checkpoints

        average_checkpoints(save_dir, args.average, work / "model.pt")
    if "eval" in stages:
        import torch

        from fairseq_quant.evaluate import evaluate

        torch.set_num_threads(args.threads)
        for r in evaluate(work / "model.pt", data, eval_subsets, work / "eval", beam=5, device="cpu",
                          progress=False):
            logger.info("%s: WER %.2f%% over %d words (beam 5)", r.subset, r.wer, r.words)
        voices = corpus_root / "VOICES.json"
        if voices.is_file():  # the WER of each synthesizer family, with its best and worst speaker
            from recipes.librispeech.generate_corpus import read_voices
            from recipes.librispeech.report import family_table

            table = family_table(work / "eval", read_voices(corpus_root), eval_subsets)
            atomic_write(work / "eval" / "families.md", table)
            logger.info("WER per voice family:\n%s", table)
    if "bundle" in stages:
        from recipes.librispeech.reference import write_bundle

        write_bundle(args.bundle, work, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
