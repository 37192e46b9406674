"""What the recipe runs: the rows of the results table, the run sizes (``RecipeConfig``), and the command lines
of every stage (fairseq-train for fp32 and QAT, calibration, the search, evaluation, export, the runtime)."""
import sys
from dataclasses import dataclass, replace
from pathlib import Path

from recipes.librispeech.generate_corpus import EVAL_SUBSETS, UNSEEN_SYNTH_SUBSET, corpus_eval_subsets, size_params

STRATEGY_DIR = Path(__file__).parent / "strategies"


@dataclass(frozen=True)
class Row:
    """One model of the results table and how it is made from the fp32 checkpoint."""

    name: str
    kind: str  # "fp32", "ptq" (post-training weight quantization), "ptq_calibrated" (a strategy's weights and
    #           activations post-training, ranges calibrated on training batches), "dynamic_int8" (torch.ao), "qat",
    #           "runtime" (the qat-<strategy> row's checkpoint exported and decoded by the ONNX Runtime decoder),
    #           "search_qat" (scripts/search_strategy.py picks the strategy under a budget, then QAT as for "qat"),
    #           "coqat" (the multi-precision co-trained model of a co strategy, collapsed to `deploy` bits),
    #           "co_search" (the search over that co-trained model under a budget, its best allocation collapsed),
    #           "fp32_bundle" (another fp32 model trained on the reference's corpus, shipped as a bundle)
    strategy: str | None = None  # qat, ptq_calibrated, coqat: a strategy name in strategies/ or a YAML path;
    #                              search_qat: "BUDGET" or "BUDGET:BASE" (a strategy whose weight method and
    #                              activation rules every candidate keeps: search_strategy.py --base-strategy);
    #                              co_search: "BUDGET:CO_STRATEGY"
    ptq: tuple | None = None  # ptq: (weight bits, granularity, weight method); activations stay fp32
    kd: bool = True  # qat: distillation from the fp32 model
    exact: bool = False  # runtime: export and decode with the model's static activation grids (--activations exact)
    deploy: int | None = None  # coqat: the precision the co-trained model is collapsed to
    updates_factor: int = 1  # qat, search_qat: this row's QAT updates as a multiple of the run size's qat_updates
    search_from: str | None = None  # search_qat: the row whose strategy search this row reuses (same budget and base)
    bundle: str | None = None  # fp32_bundle: another fp32 model shipped as a bundle (a folder beside this file)
    finetune: bool = False  # co_search: QAT of the collapsed allocation from the collapsed checkpoint (the run size's
    #                         qat_updates, then the better of the two on dev); search_from names the row whose
    #                         search and collapse it shares


def _ptq_rows():
    for method, gran, label in (("minmax", "tensor", "minmax-tensor"), ("symmetric", "channel", "sym-channel")):
        for bits in (8, 4, 2):
            yield Row(f"ptq-w{bits}-{label}", "ptq", ptq=(bits, gran, method))


ROWS = {r.name: r for r in [
    Row("fp32", "fp32"),
    # the size-matched comparison: a narrow fp32 model whose weights take the bytes of the 2-bit reference (make
    # reference-narrow), trained on the reference's corpus with the reference's two-phase schedule
    Row("fp32-narrow", "fp32_bundle", bundle="reference-narrow"),
    *_ptq_rows(),
    Row("ptq-w8a8", "ptq_calibrated", "w8a8"),
    # the shipped reference's outlier site costs +16.7% at 8 bits post-training (dev; 16.7 dB SQNR), nothing at 16
    Row("ptq-w8a8-out16", "ptq_calibrated", "w8a8-out16"),
    Row("ptq-w4a8", "ptq_calibrated", "w4a8"),
    # per-tensor activations below 8 bits, and the seed's remedy: the outlier site (the encoder's output projection
    # input) at 16 bits (strategies *-out16; scripts/act_report.py finds the site)
    Row("ptq-w8a6", "ptq_calibrated", "w8a6"),
    Row("ptq-w8a6-out16", "ptq_calibrated", "w8a6-out16"),
    Row("ptq-w8a4", "ptq_calibrated", "w8a4"),
    Row("ptq-w8a4-out16", "ptq_calibrated", "w8a4-out16"),
    # the other two remedies: per-embedding-group ranges at the outlier site, per-token dynamic ranges everywhere
    Row("ptq-w8a6-peg", "ptq_calibrated", "w8a6-peg"),
    Row("ptq-w8a6-token", "ptq_calibrated", "w8a6-token"),
    Row("ptq-w8a4-peg", "ptq_calibrated", "w8a4-peg"),
    Row("ptq-w8a4-token", "ptq_calibrated", "w8a4-token"),
    Row("dynamic-int8", "dynamic_int8"),
    Row("qat-fp32", "qat", "fp32"),  # control: the QAT schedule with nothing quantized
    Row("qat-w8a8", "qat", "w8a8"),
    Row("qat-w8a6", "qat", "w8a6"),
    Row("qat-w8a6-out16", "qat", "w8a6-out16"),
    Row("qat-w4", "qat", "w4"),  # weight-only: what the weights cost, apart from the activations
    Row("qat-w2", "qat", "w2"),
    Row("qat-w2-balanced", "qat", "w2-balanced"),  # weight-only on the recipe's 2-bit grid: the papers' setting
    Row("qat-w4a8-nokd", "qat", "w4a8", kd=False),
    Row("qat-w4a8", "qat", "w4a8"),
    Row("qat-w2a8-nokd", "qat", "w2a8", kd=False),
    Row("qat-w2a8", "qat", "w2a8"),
    Row("qat-w2a8-out16", "qat", "w2a8-out16"),  # the same with the outlier site's input at 16 bits
    Row("qat-w2a8-balanced-out16", "qat", "w2a8-balanced-out16"),  # and balanced 2-bit grids (the recipe's 2 bits)
    # the longer schedule: 4x the run size's updates (the benchmark's 1600; on dev, 800 updates gave +28.8%, 1600
    # +20.1%, 3200 +17.1% against fp32, and 1600 to 3200 was n.s.) for the recipe's two 2-bit rows
    Row("qat-w2a8-balanced-out16-4x", "qat", "w2a8-balanced-out16", updates_factor=4),
    # binary body weights (first and last layers at 8 bits, as the 1-bit papers keep them), with and without
    # quantized activations
    Row("qat-w1a8", "qat", "w1a8"),
    Row("qat-w1", "qat", "w1"),
    # multi-precision co-training (one model trained at 8, 4, 2 and 1 bits at once), collapsed to one precision;
    # the weight-only rows are the papers' setting
    Row("co-w4a8", "coqat", "w8a8-co4-2-1", deploy=4),
    Row("co-w2a8", "coqat", "w8a8-co4-2-1", deploy=2),
    Row("co-w1a8", "coqat", "w8a8-co4-2-1", deploy=1),
    Row("co-w2", "coqat", "w8-co4-2-1", deploy=2),
    Row("co-w1", "coqat", "w8-co4-2-1", deploy=1),
    Row("co-searched", "co_search", "2.3:w8a8-co4-2-1"),  # the search over the co-trained a8 model at 2.3 bits
    # ... and that allocation briefly fine-tuned from its collapsed checkpoint
    Row("co-searched-ft", "co_search", "2.3:w8a8-co4-2-1", finetune=True, search_from="co-searched"),
    Row("qat-mixed2a8", "qat", "mixed2a8"),
    # fast search at 2.3 average weight bits, then QAT of its best; every candidate has balanced weight grids and
    # the outlier site's input at 16 bits (w2a8-balanced-out16)
    Row("qat-searched", "search_qat", "2.3:w2a8-balanced-out16"),
    Row("qat-searched-4x", "search_qat", "2.3:w2a8-balanced-out16", updates_factor=4, search_from="qat-searched"),
    Row("runtime-w8a8", "runtime", "w8a8"),
    Row("runtime-w4a8", "runtime", "w4a8"),
    Row("runtime-mixed2a8", "runtime", "mixed2a8"),
    Row("runtime-searched", "runtime", "searched"),  # the best low-bit row, exported and decoded on the runtime
    # the remedied model on the runtime with its own activation grids (6 bits, the outlier site at 16): the runtime's
    # default kernels keep activations in float, which would hide what the remedy does
    Row("runtime-w8a6-out16-exact", "runtime", "w8a6-out16", exact=True),
]}
# the main job's essential rows (at most 30 min on 2 cores: 17.6 min measured fresh; with ptq-w4-sym-channel, qat-w4a8
# and qat-mixed2a8 added it took 34.4 min): the reference model, what users get without the
# plugin (post-training 2-bit weights, PyTorch's dynamic int8), calibrated 8-bit PTQ with the outlier remedy, the QAT
# control, uniform and searched ~2-bit QAT (balanced grids, the outlier site at 16 bits), and the searched model
# exported and decoded without torch; `--size benchmark` runs every row
DEMO_ROWS = ("fp32", "ptq-w2-sym-channel", "dynamic-int8", "ptq-w8a8-out16", "qat-fp32", "qat-w2a8-balanced-out16",
             "qat-searched", "runtime-searched")
TEST_SUBSETS = ("test-clean", "test-other")
# the test sets of the multi-synthesizer corpus: new voices of the trained synthesizer families, and a family that
# training never heard (generate_corpus.HELD_OUT_FAMILY)
SYNTH_TEST_SUBSETS = TEST_SUBSETS + (UNSEEN_SYNTH_SUBSET,)
CONTROL_ROW = "qat-fp32"


@dataclass(frozen=True)
class RecipeConfig:
    """Everything a run size decides: corpus, model, the fp32 and QAT schedules, the table's rows."""

    corpus_size: str | None  # generate_corpus size, None for a real LibriSpeech tree
    reference: bool = False  # start from the shipped reference bundle instead of training fp32 here
    synth_train: int | None = None  # synthesise only this many training utterances (QAT data)
    extra_eval_speakers: int = 0  # new-voice speakers added to each evaluation subset (generate_corpus)
    arch: str = "vggtransformer_small_ctc"  # *_ctc: a CTC head in the model, decoded jointly with the attention decoder
    encoder_dim: int = 144  # --enc-output-dim of the arch: a training-only CTC head for an arch without its own
    ctc_weight: float = 1.0  # CTC loss weight in fp32 training and QAT (0 disables); speeds up alignment
    vocab_size: int = 300
    batch_size: int = 8  # utterances per update (0: let --max-tokens decide)
    fp32_updates: int = 5000
    fp32_lr: float = 3e-3
    warmup: int = 300
    qat_updates: int = 250
    qat_lr: float = 5e-4
    kd_weight: float = 0.5
    kd_temperature: float = 2.0
    # multi-precision co-training (coqat rows): the criterion's options and the schedule's length; every update
    # runs one pass per precision, so an update costs about as much as four of plain QAT
    co_options: tuple = ("--co-precisions", "4,2,1", "--co-kd-weight", "1.0")
    co_updates: int | None = None  # None: qat_updates
    calib_batches: int = 16  # training batches (of batch_size utterances) that calibrate activation ranges
    qat_dropout: float | None = None  # QAT: dropout of every dropout module (None: the architecture's)
    qat_act_momentum: float | None = None  # QAT: EMA weight of minmax activation ranges (0: calibrated ranges kept)
    qat_select: bool = True  # QAT's last step: keep its calibrated start instead when that decodes dev better
    beam: int = 5
    max_len_a: float = 0.2  # longest hypothesis: a * frames + b tokens (0.2: 20 tokens a second of audio)
    max_len_b: int = 10
    train_subsets: tuple = ("train-clean-100",)
    eval_subsets: tuple = EVAL_SUBSETS
    rows: tuple = DEMO_ROWS
    extra_train_args: tuple = ()
    threads: int = 2  # CPU threads in all: fp32 training uses them all, parallel jobs share them
    jobs: int = 2  # QAT trainings and evaluations run this many at a time (independent processes)
    num_workers: int = 0  # data-loading worker processes of fairseq-train (fbank is computed on the fly)


# QAT without dropout: on the 40-speaker dev sets, w8a8 QAT lost +3.3% against its calibrated start with the arch's
# dropout and +1.4% without (n.s., both; benchmarks/qat_recipe.py); the dev selection then guards the rest
REFERENCE = dict(corpus_size="multisynth", reference=True, arch="vggtransformer_ref_ctc", encoder_dim=128,
                 vocab_size=256, batch_size=16, qat_updates=400, qat_dropout=0.0)
SIZES = {
    # a smoke run for CI: tiny corpus, a few updates; checks the plumbing, not accuracy
    "smoke": RecipeConfig(corpus_size="tiny", vocab_size=60, fp32_updates=30, warmup=10,
                          qat_updates=6, calib_batches=2, beam=2, max_len_a=0.0, max_len_b=40,
                          rows=("fp32", "ptq-w2-sym-channel", "ptq-w8a8", "dynamic-int8", "qat-w4a8", "qat-mixed2a8",
                                "runtime-mixed2a8")),
    # a few minutes: the plumbing from the reference model, far too short to mean anything
    "quick": RecipeConfig(**{**REFERENCE, "qat_updates": 20}, synth_train=400, calib_batches=4,
                          eval_subsets=SYNTH_TEST_SUBSETS,
                          rows=("fp32", "ptq-w2-sym-channel", "qat-w2a8-balanced-out16")),
    # the main job (README): the reference model, its baselines and QAT, test sets, at most 30 min on 2 cores
    "default": RecipeConfig(**REFERENCE, synth_train=4000, eval_subsets=SYNTH_TEST_SUBSETS),
    # every row (make benchmark): the main job's corpus with 30 new-voice speakers added to each evaluation subset
    # (40 per subset: intervals that hold for new voices), dev and test sets. The distillation ablation (the -nokd
    # rows: +7.5% / +57.5% against +8.2% / +59.1% with distillation, 2026-12-02) is left to --rows: 2 cores cannot
    # fit it beside the other QAT rows in one session
    "benchmark": RecipeConfig(**REFERENCE, synth_train=4000, extra_eval_speakers=30,
                              eval_subsets=EVAL_SUBSETS + (UNSEEN_SYNTH_SUBSET,),
                              rows=tuple(name for name in ROWS if not name.endswith("-nokd"))),
    # the paper's vggtransformer_2 on real LibriSpeech (GPU cluster; see README)
    "paper": RecipeConfig(corpus_size=None, arch="vggtransformer_2_ctc", encoder_dim=1024, vocab_size=5000, batch_size=0,
                          ctc_weight=0.3, threads=8, jobs=1, num_workers=4,
                          fp32_updates=300000, fp32_lr=1e-4, warmup=8000, qat_updates=20000, qat_lr=5e-5,
                          train_subsets=("train-clean-100", "train-clean-360", "train-other-500"),
                          # not the fp32 bundles: they were trained on the generated corpus
                          rows=tuple(name for name, row in ROWS.items() if row.kind != "fp32_bundle"),
                          # 200 s of audio per batch, 400 s per update: QAT with distillation peaks at about
                          # 40 GB of an 80 GB GPU (--dry-run prints the estimate; recipes/librispeech/memory.py)
                          extra_train_args=("--max-tokens", "20000", "--update-freq", "2")),
}
LONGEST_UTTERANCE_FRAMES = 3500  # LibriSpeech segments are at most 35 s (10 ms frames)
TOKENS_PER_FRAME = 0.05  # upper bound: 5 SentencePiece pieces a second of speech


def bundle_dir(row: Row) -> Path:
    """The folder of an fp32_bundle row's model."""
    return Path(__file__).parent / row.bundle


def row_config(row: Row, cfg: RecipeConfig) -> RecipeConfig:
    """The run size's configuration as one row trains it: its QAT updates times the row's factor."""
    return cfg if row.updates_factor == 1 else replace(cfg, qat_updates=cfg.qat_updates * row.updates_factor)


def shared_search_problem(row: Row) -> str | None:
    """Why ``row.search_from`` cannot be shared (another search row of the same kind, budget and base: search_qat,
    or co_search for a fine-tuning co_search row), or None."""
    if row.search_from is None:
        return None
    source = ROWS.get(row.search_from)
    kind = "co_search" if row.kind == "co_search" else "search_qat"
    if (row.kind != kind or (kind == "co_search" and not row.finetune) or source is None or source.kind != kind
            or source.strategy != row.strategy or source.search_from is not None):
        return (f"row {row.name}: search_from {row.search_from!r} must name a {kind} row with the same budget "
                f"and base ({row.strategy!r})" + (" (and fine-tune: finetune=True)" if kind == "co_search" else ""))
    return None


def search_dir(row: Row, work: Path) -> Path:
    """Where a search row's strategy search runs (a row with ``search_from`` shares that row's)."""
    return work / "search" / (row.search_from or row.name)


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
    if "--max-tokens" not in cfg.extra_train_args:
        args += ["--max-tokens", "10000000"]
    if cfg.batch_size:
        args += ["--batch-size", str(cfg.batch_size)]
    return args + list(cfg.extra_train_args)


def ctc_args(cfg: RecipeConfig) -> list[str]:
    """The CTC loss: of the model's own head (*_ctc archs), else of a training-only head of the criterion."""
    if cfg.ctc_weight <= 0:
        return []
    own_head = cfg.arch.endswith("_ctc")
    return ["--ctc-weight", str(cfg.ctc_weight), *([] if own_head else ["--ctc-encoder-dim", str(cfg.encoder_dim)])]


def fp32_command(data: Path, out: Path, cfg: RecipeConfig) -> list[str]:
    return common_train_args(data, out, cfg, cfg.fp32_updates, cfg.fp32_lr) + [
        "--arch", cfg.arch, "--criterion", "quant_cross_entropy_acc", *ctc_args(cfg),
        "--lr-scheduler", "inverse_sqrt", "--warmup-updates", str(cfg.warmup),
    ]


def strategy_path(name: str) -> Path:
    return Path(name) if name.endswith(".yaml") else STRATEGY_DIR / f"{name}.yaml"


def calibrate_command(ckpt: Path, data: Path, strategy: Path, out: Path, cfg: RecipeConfig) -> list[str]:
    """The calibration phase: ``ckpt`` quantized with ``strategy``, activation ranges from training batches."""
    return [sys.executable, str(Path(__file__).parents[2] / "scripts" / "calibrate.py"), "--checkpoint", str(ckpt),
            "--data", str(data), "--strategy", str(strategy), "--batches", str(cfg.calib_batches),
            "--batch-size", str(cfg.batch_size or 16), "--threads", str(threads_per_job(cfg)), "--out", str(out)]


def qat_command(data: Path, out: Path, strategy: Path, fp32_ckpt: Path, cfg: RecipeConfig, kd: bool = True,
                start: Path | None = None) -> list[str]:
    """fairseq-train of the quantized model from ``start`` (the calibrated PTQ checkpoint; default: ``fp32_ckpt``,
    for strategies without activation quantizers), distilling from ``fp32_ckpt``."""
    cmd = common_train_args(data, out, cfg, cfg.qat_updates, cfg.qat_lr) + [
        "--arch", f"quant_{cfg.arch}", "--quant-strategy", str(strategy),
        "--finetune-from-model", str(start or fp32_ckpt),
        "--criterion", "quant_cross_entropy_acc",
        # the quantized CTC head is trained with the rest (joint decoding uses it); a head-less arch has none
        *(ctc_args(cfg) if cfg.arch.endswith("_ctc") else []),
        "--lr-scheduler", "cosine", "--warmup-updates", str(min(50, cfg.qat_updates // 5)),
    ]
    if cfg.qat_dropout is not None:
        cmd += ["--quant-dropout", str(cfg.qat_dropout)]
    if cfg.qat_act_momentum is not None:
        cmd += ["--quant-act-momentum", str(cfg.qat_act_momentum)]
    if kd:
        cmd += ["--teacher-path", str(fp32_ckpt), "--kd-weight", str(cfg.kd_weight),
                "--kd-temperature", str(cfg.kd_temperature)]
    return cmd


SELECTED = "checkpoint_selected.pt"


def prepared_subsets(cfg: RecipeConfig) -> tuple:
    """The evaluation subsets the prepare stage writes: its generated corpus's (with `test-unseen-synth` where the
    corpus has several synthesizers), or LibriSpeech's four."""
    return EVAL_SUBSETS if cfg.corpus_size is None else corpus_eval_subsets(size_params(cfg.corpus_size))


def dev_subsets() -> tuple:
    return tuple(s for s in EVAL_SUBSETS if s.startswith("dev"))


def co_train_dir(strategy: str, work: Path) -> Path:
    """Where the co-trained model of a co strategy trains (shared by the rows that collapse it)."""
    return work / "qat" / f"co-{strategy_path(strategy).stem}"


def co_qat_command(data: Path, strategy: str, fp32_ckpt: Path, start: Path, work: Path, cfg: RecipeConfig) -> list[str]:
    """fairseq-train of the co-trained model: the QAT command with the co-training options and schedule."""
    co_cfg = replace(cfg, qat_updates=cfg.co_updates or cfg.qat_updates,
                     extra_train_args=cfg.extra_train_args + cfg.co_options)
    return qat_command(data, co_train_dir(strategy, work), strategy_path(strategy), fp32_ckpt, co_cfg, True, start)


def search_command(row: Row, data: Path, out: Path, fp32_ckpt: Path, cfg: RecipeConfig,
                   co_trained: Path | None = None) -> list[str]:
    """The fast strategy search of a ``search_qat`` row: teacher-forced and Hessian/Fisher sensitivities of every
    layer at 2, 3, 4 and 8 bits, the 3 best allocations under the budget decoded on dev-clean (resumable). With
    ``co_trained`` (a ``co_search`` row) the candidates are that model at its precisions (8, 4, 2, 1)."""
    budget, _, base = row.strategy.partition(":")
    if co_trained is not None:
        start = ["--co-trained", str(co_trained), "--bits", "1,2,4,8"]
    else:
        start = ["--base-strategy", str(strategy_path(base))] if base else []
    return [sys.executable, str(Path(__file__).parents[2] / "scripts" / "search_strategy.py"),
            "--checkpoint", str(fp32_ckpt), "--data", str(data), "--dev-subset", "dev-clean", *start,
            "--budget-bits", budget, "--mode", "fast", "--top-k", "3", "--beam", str(cfg.beam),
            "--max-len-a", str(cfg.max_len_a), "--max-len-b", str(cfg.max_len_b),
            "--calib-batches", str(cfg.calib_batches), "--threads", str(threads_per_job(cfg)), "--out", str(out)]


def eval_command(ckpt: Path, data: Path, out: Path, cfg: RecipeConfig, dynamic_int8: bool = False) -> list[str]:
    cmd = [sys.executable, str(Path(__file__).parents[2] / "scripts" / "evaluate.py"), "--checkpoint", str(ckpt),
           "--data", str(data), "--subsets", ",".join(cfg.eval_subsets), "--beam", str(cfg.beam),
           "--max-len-a", str(cfg.max_len_a), "--max-len-b", str(cfg.max_len_b), "--out", str(out),
           "--threads", str(threads_per_job(cfg))]
    return cmd + (["--dynamic-int8", "--device", "cpu"] if dynamic_int8 else [])


def export_command(ckpt: Path, data: Path, model_file: Path, out: Path, exact: bool = False) -> list[str]:
    return [sys.executable, str(Path(__file__).parents[2] / "scripts" / "export_model.py"), "--checkpoint", str(ckpt),
            "--data", str(data), "--out", str(model_file), "--json", str(out / "export.json"),
            *(["--exact-activations"] if exact else [])]


def runtime_command(model_file: Path, data: Path, subset: str, out: Path, cfg: RecipeConfig,
                    exact: bool = False) -> list[str]:
    return [sys.executable, "-m", "fairseq_quant_runtime", "--model", str(model_file), "--manifest",
            str(data / f"{subset}.json"), "--out", str(out / subset), "--beam", str(cfg.beam),
            "--max-len-a", str(cfg.max_len_a), "--max-len-b", str(cfg.max_len_b), "--threads", str(threads_per_job(cfg)),
            *(["--activations", "exact"] if exact else [])]


def runtime_model_file(row: Row, work: Path) -> Path:
    return work / "export" / f"{row.strategy}{'-exact' if row.exact else ''}.fqm"


def runtime_source(row: Row, work: Path) -> tuple[Row, Path]:
    """The QAT row a runtime row exports, and that row's checkpoint."""
    source = ROWS[f"qat-{row.strategy}"]
    return source, work / "qat" / source.name / SELECTED


def co_training(row: Row) -> str | None:
    """The co strategy whose one co-training a coqat or co_search row collapses (shared by every such row)."""
    if row.kind == "coqat":
        return row.strategy
    if row.kind == "co_search":
        return row.strategy.split(":", 1)[1]
    return None


def longest_first(rows: list[Row]) -> list[int]:
    """The order in which to start the rows so that parallel jobs finish together: a strategy search and its
    QAT first, then QAT trainings (longer schedules first), then rows that only evaluate (stable within a kind);
    indices into rows. Of the rows that collapse one co-training, only the first starts early: the others would
    hold a job slot waiting for that training, so they start last, when it is done."""
    cost = {"co_search": 0, "coqat": 0, "search_qat": 0, "qat": 1}
    order = sorted(range(len(rows)), key=lambda i: (cost.get(rows[i].kind, 2), -rows[i].updates_factor))
    seen, early, late = set(), [], []
    for i in order:
        shared = co_training(rows[i])
        (late if shared is not None and shared in seen else early).append(i)
        seen.add(shared)
    return early + late


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
