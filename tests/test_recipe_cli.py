"""The recipe runner's command line off the happy path: --dry-run (every stage's command lines and the memory
estimate, nothing run or written), the paper preset's batch size, a wrong --librispeech-root, how many
processes prepare uses, and the README's real-LibriSpeech commands."""
import json
import re
import shlex
import shutil
import sys

import pytest
from conftest import ROOT, run

from recipes.librispeech.memory import arch_config, batch_memory
from recipes.librispeech.rows import ROWS, SIZES, Row, longest_first, row_config, shared_search_problem

MEMORY = re.compile(r"^#   (fp32|qat) vggtransformer_2_ctc: (\d+) x 35 s: activations ([\d.]+) GB \+ model state "
                    r"\([^)]*\) ([\d.]+) GB = ([\d.]+) GB$")


def runner(*args, timeout=300):
    return run([sys.executable, "-m", "recipes.librispeech.run", *map(str, args)], timeout=timeout)


def test_dry_run_of_the_paper_recipe_prints_every_stage_and_fits_an_80_gb_gpu(tmp_path):
    root = tmp_path / "LibriSpeech"
    root.mkdir()
    work = tmp_path / "exp"
    proc = runner("--librispeech-root", root, "--size", "paper", "--workdir", work, "--dry-run")
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    stages = [line[len("# stage "):] for line in lines if line.startswith("# stage ")]
    expected = ["prepare", "fp32"]
    for row in ROWS.values():  # every row of the paper preset: its QAT run, if any, then its evaluation
        if row.kind == "fp32_bundle":  # fp32 models of the generated corpus: not in a real-LibriSpeech run
            continue
        if row.kind == "runtime":  # export a QAT row's checkpoint, decode each subset with the runtime
            expected += [f"export {row.name}"] + [f"runtime {row.name} {s}" for s in
                                                  ("dev-clean", "dev-other", "test-clean", "test-other")]
            continue
        if row.kind in ("coqat", "co_search"):  # a co strategy is calibrated and co-trained once, then collapsed
            strategy = row.strategy if row.kind == "coqat" else row.strategy.split(":")[1]
            if f"co-train {strategy}" not in expected:
                expected += [f"calibrate {strategy}", f"co-train {strategy}"]
            if row.finetune:  # the search and collapse of search_from's row, then QAT from that checkpoint
                expected += [f"qat {row.name}", f"select {row.name} start", f"select {row.name} trained",
                             f"eval {row.name}"]
                continue
            expected += ([f"search {row.name}"] if row.kind == "co_search" else []) + [f"collapse {row.name}",
                                                                                         f"eval {row.name}"]
            continue
        # QAT starts from the calibrated post-training checkpoint (the calibration phase), which PTQ rows evaluate
        # and ends with the better of the two on dev (its start and its trained checkpoint, decoded on dev)
        select = [f"select {row.name} start", f"select {row.name} trained"]
        expected += {"qat": [f"calibrate {row.name}", f"qat {row.name}", *select],
                     "ptq_calibrated": [f"calibrate {row.name}"],
                     # a row with search_from reuses that row's search (run once, above it)
                     "search_qat": [*([] if row.search_from else [f"search {row.name}"]), f"calibrate {row.name}",
                                    f"qat {row.name}", *select]}.get(
            row.kind, []) + [f"eval {row.name}"]
    assert stages == expected
    assert "eval ptq-w2-sym-channel" in stages and "qat qat-w4a8-nokd" in stages and "eval ptq-w8a8" in stages
    commands = {stage: shlex.split(lines[lines.index(f"# stage {stage}") + 1]) for stage in stages}
    prepare = commands["prepare"]
    assert prepare[1:3] == ["-m", "recipes.librispeech.prepare_data"]
    assert prepare[prepare.index("--librispeech-root") + 1] == str(root)
    assert prepare[prepare.index("--jobs") + 1] == "8"  # the preset's threads, not a fixed 2
    for stage in ("fp32", "qat qat-w2a8"):
        cmd = commands[stage]
        assert cmd[1:3] == ["-m", "fairseq_cli.train"]
        assert cmd.count("--max-tokens") == 1 and cmd[cmd.index("--max-tokens") + 1] == "20000"
        assert cmd[cmd.index("--update-freq") + 1] == "2"
    assert commands["fp32"][commands["fp32"].index("--arch") + 1] == "vggtransformer_2_ctc"
    assert commands["qat qat-w2a8"][commands["qat qat-w2a8"].index("--arch") + 1] == "quant_vggtransformer_2_ctc"
    for stage in ("fp32", "qat qat-w2a8"):  # the model's CTC head is trained in both, by the preset's weight
        cmd = commands[stage]
        assert cmd[cmd.index("--ctc-weight") + 1] == "0.3" and "--ctc-encoder-dim" not in cmd
    assert "--teacher-path" in commands["qat qat-w2a8"] and "--teacher-path" not in commands["qat qat-w2a8-nokd"]
    calibrate, qat = commands["calibrate qat-w2a8"], commands["qat qat-w2a8"]
    assert calibrate[1].endswith("scripts/calibrate.py") and calibrate[calibrate.index("--strategy") + 1].endswith(
        "strategies/w2a8.yaml")
    start = calibrate[calibrate.index("--out") + 1]
    assert start == str(work.resolve() / "calib" / "w2a8.pt") and qat[qat.index("--finetune-from-model") + 1] == start
    assert commands["eval ptq-w8a8"][commands["eval ptq-w8a8"].index("--checkpoint") + 1] == str(
        work.resolve() / "calib" / "w8a8.pt")
    select = commands["select qat-w2a8 start"]
    assert select[select.index("--checkpoint") + 1] == start and select[select.index("--subsets") + 1] == \
        "dev-clean,dev-other"
    for stage, updates in (("qat qat-w2a8", "20000"), ("qat qat-w2a8-balanced-out16-4x", "80000"),
                           ("qat qat-searched", "20000"), ("qat qat-searched-4x", "80000")):
        assert commands[stage][commands[stage].index("--max-update") + 1] == updates
    # both searched rows train the one searched allocation
    assert commands["calibrate qat-searched-4x"][commands["calibrate qat-searched-4x"].index("--strategy") + 1] == \
        str(work.resolve() / "search" / "qat-searched" / "strategies" / "best.yaml")
    co_train = commands["co-train w8a8-co4-2-1"]  # one co-trained model for the four a8 co rows and the search
    assert stages.count("co-train w8a8-co4-2-1") == 1 and co_train[co_train.index("--co-precisions") + 1] == "4,2,1"
    co_ckpt = str(work.resolve() / "qat" / "co-w8a8-co4-2-1" / "checkpoint_best.pt")
    collapse = commands["collapse co-w1a8"]
    assert collapse[1].endswith("scripts/collapse_cotrained.py") and collapse[collapse.index("--bits") + 1] == "1"
    assert collapse[collapse.index("--checkpoint") + 1] == co_ckpt
    search = commands["search co-searched"]
    assert search[search.index("--co-trained") + 1] == co_ckpt and search[search.index("--budget-bits") + 1] == "2.3"
    # co-searched-ft: QAT of that search's allocation from its collapsed checkpoint, distilled from fp32
    collapsed = str(work.resolve() / "co" / "co-searched.pt")
    tune = commands["qat co-searched-ft"]
    assert collapsed == commands["collapse co-searched"][commands["collapse co-searched"].index("--out") + 1]
    assert tune[tune.index("--finetune-from-model") + 1] == collapsed and "--teacher-path" in tune
    assert tune[tune.index("--quant-strategy") + 1] == str(work.resolve() / "search" / "co-searched" / "strategies" /
                                                           "best.yaml")
    assert commands["eval co-searched-ft"][commands["eval co-searched-ft"].index("--checkpoint") + 1] == str(
        work.resolve() / "qat" / "co-searched-ft" / "checkpoint_selected.pt")
    evaluated = commands["eval qat-w2a8"]
    assert evaluated[evaluated.index("--checkpoint") + 1] == str(work.resolve() / "qat" / "qat-w2a8" /
                                                                  "checkpoint_selected.pt")

    arch = arch_config("vggtransformer_2")
    memory = {m.group(1): m for m in map(MEMORY.match, lines) if m}
    assert set(memory) == {"fp32", "qat"}
    for stage, qat in (("fp32", False), ("qat", True)):
        expected = batch_memory(arch, 5000, 20000, 3500, 0.05, qat=qat, distill=qat)
        utterances, activations, state, total = memory[stage].groups()[1:]
        assert int(utterances) == expected.utterances == 5
        assert (float(activations), float(state), float(total)) == (
            round(expected.activations_gb, 1), round(expected.model_state_gb, 1), round(expected.total_gb, 1))
        assert expected.total_gb < 0.6 * 80  # headroom for the allocator and transient backward buffers
    assert not work.exists()  # nothing written


def test_the_old_paper_batch_would_not_fit():
    """--max-tokens 5000000 frames (about 14 hours of audio) was the preset before."""
    memory = batch_memory(arch_config("vggtransformer_2"), 5000, 5_000_000, 3500, 0.05, qat=True, distill=True)
    assert memory.utterances == 1428 and memory.total_gb > 1000


@pytest.mark.parametrize("make_root,message", [
    (lambda tmp: tmp / "missing", "not a directory; expected the LibriSpeech directory that holds train-clean-100, "
                                  "train-clean-360, train-other-500, dev-clean, dev-other, test-clean, test-other"),
    (lambda tmp: tmp, "subset directory {root}/train-clean-100 does not exist; subsets found in {root}: none"),
])
def test_a_wrong_librispeech_root_is_one_line(tmp_path, make_root, message):
    root = make_root(tmp_path)
    if root == tmp_path:
        root = tmp_path / "empty"
        root.mkdir()
    proc = runner("--librispeech-root", root, "--size", "paper", "--workdir", tmp_path / "exp", "--stages", "prepare")
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].endswith(message.format(root=root)), proc.stderr[-2000:]
    proc = run([sys.executable, "-m", "recipes.librispeech.prepare_data", "--librispeech-root", str(root),
                "--out", str(tmp_path / "data")])
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("prepare_data: error: ")


def test_prepare_uses_the_runners_threads(smoke, tmp_path):
    work, _ = smoke
    proc = runner("--size", "smoke", "--workdir", tmp_path, "--librispeech-root", work / "corpus" / "LibriSpeech",
                  "--stages", "prepare", "--threads", "3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "checking audio (3 processes)" in proc.stderr
    assert sorted(p.name for p in (tmp_path / "data").glob("*.json")) == [
        "dev-clean.json", "dev-other.json", "test-clean.json", "test-other.json", "train.json"]


def readme_block(title):
    text = (ROOT / "README.md").read_text()
    section = text[text.index(f"## {title}\n"):]
    block = section[section.index("```bash\n") + len("```bash\n"):]
    block = block[:block.index("```")]
    return [shlex.split(cmd, comments=True) for cmd in block.replace("\\\n", " ").splitlines() if cmd.strip()
            and not cmd.lstrip().startswith("#")]


def test_readme_real_librispeech_commands_prepare_the_data_once(tmp_path):
    root = tmp_path / "LibriSpeech"
    root.mkdir()
    prepared = 0
    for cmd in readme_block("Real LibriSpeech"):
        cmd = [str(root) if a == "/data/LibriSpeech" else a.replace("exp/ls", str(tmp_path / "exp")) for a in cmd]
        assert cmd[0] == "python" and cmd[1] == "-m", cmd
        if cmd[2] == "recipes.librispeech.prepare_data":
            prepared += 1
            continue
        assert cmd[2] == "recipes.librispeech.run", cmd
        proc = runner(*cmd[3:], *([] if "--dry-run" in cmd else ["--dry-run"]))
        assert proc.returncode == 0, (cmd, proc.stderr[-2000:])
        if "--dry-run" not in cmd:  # a preview prepares nothing
            prepared += proc.stdout.count("# stage prepare\n")
    assert prepared == 1


def test_a_workdir_with_another_corpus_is_one_line(tmp_path):
    """A workdir whose generated corpus has other parameters (another size, or an older generator) was a
    traceback from the corpus stage."""
    corpus = tmp_path / "exp" / "corpus" / "LibriSpeech"
    corpus.mkdir(parents=True)
    (corpus / ".complete").write_text(json.dumps({"format_version": 1, "seed": 0}))
    proc = runner("--size", "smoke", "--workdir", tmp_path / "exp", "--stages", "corpus")
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(
        f"run: error: {corpus} was generated with different parameters {{'format_version': 1, 'seed': 0}}")


def test_rows_start_longest_first_and_the_table_keeps_its_order():
    rows = [ROWS[name] for name in SIZES["default"].rows if ROWS[name].kind != "runtime"]
    order = longest_first(rows)
    assert [rows[i].name for i in order] == ["qat-searched", "qat-fp32", "qat-w2a8-balanced-out16", "fp32",
                                             "ptq-w2-sym-channel", "dynamic-int8", "ptq-w8a8-out16"]
    assert sorted(order) == list(range(len(rows)))
    rows = [ROWS[name] for name in ("fp32", "qat-w2a8-balanced-out16", "qat-w2a8-balanced-out16-4x", "qat-searched",
                                    "qat-searched-4x")]
    assert [rows[i].name for i in longest_first(rows)] == ["qat-searched-4x", "qat-searched",
                                                           "qat-w2a8-balanced-out16-4x", "qat-w2a8-balanced-out16",
                                                           "fp32"]
    # rows collapsing one co-training: the first starts early, the others (which would hold a job slot waiting
    # for that training) last; the two co-trainings of the benchmark start side by side
    rows = [ROWS[name] for name in ("fp32", "qat-w2a8", "co-w4a8", "co-w2a8", "co-w2", "co-w1", "co-searched")]
    assert [rows[i].name for i in longest_first(rows)] == ["co-w4a8", "co-w2", "qat-w2a8", "fp32", "co-w2a8",
                                                           "co-w1", "co-searched"]


def test_a_row_shares_only_the_search_of_a_search_row_of_the_same_budget_and_base():
    assert shared_search_problem(ROWS["qat-searched-4x"]) is None and shared_search_problem(ROWS["qat-searched"]) is None
    for bad in (Row("x", "search_qat", "2.3", search_from="qat-searched"),  # another base
                Row("x", "search_qat", "2.3:w2a8-balanced-out16", search_from="qat-w2a8"),  # not a search row
                Row("x", "search_qat", "2.3:w2a8-balanced-out16", search_from="nope")):
        assert shared_search_problem(bad) == (f"row x: search_from {bad.search_from!r} must name a search_qat row with "
                                              f"the same budget and base ({bad.strategy!r})")
    # the co-trained model's search is shared by the row that fine-tunes its allocation
    assert shared_search_problem(ROWS["co-searched-ft"]) is None
    bad = Row("y", "co_search", "2.3:w8a8-co4-2-1", search_from="co-searched")  # shares, but does not fine-tune
    assert shared_search_problem(bad) == ("row y: search_from 'co-searched' must name a co_search row with the same "
                                          "budget and base ('2.3:w8a8-co4-2-1') (and fine-tune: finetune=True)")
    assert row_config(ROWS["qat-searched-4x"], SIZES["benchmark"]).qat_updates == 1600
    assert row_config(ROWS["qat-searched"], SIZES["benchmark"]) is SIZES["benchmark"]


def test_a_bundle_row_is_checked_before_anything_runs(tmp_path, monkeypatch, capsys):
    from recipes.librispeech import run as recipe
    from recipes.librispeech.reference import DEFAULT_BUNDLE

    bundle = tmp_path / "narrow"
    work = tmp_path / "exp"
    monkeypatch.setitem(ROWS, "fp32-narrow", Row("fp32-narrow", "fp32_bundle", bundle=str(bundle)))

    def error(*rows):
        with pytest.raises(SystemExit) as exit_:
            recipe.main(["--size", *rows, "--workdir", str(work)])
        assert exit_.value.code == 2 and not work.exists()  # nothing generated, nothing written
        return capsys.readouterr().err.strip().splitlines()[-1]

    quick = ("quick", "--rows", "fp32,fp32-narrow")
    assert error(*quick) == (f"run: error: row fp32-narrow: {bundle}: no manifest.json (not a reference bundle; "
                             "train one with python -m recipes.librispeech.train_reference)")
    shutil.copytree(DEFAULT_BUNDLE, bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["corpus"]["seed"] = 7
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    assert "the reference model was trained on corpus {" in error(*quick) and "'seed': 7" in error(*quick)
    with open(bundle / "model.pt", "r+b") as f:  # a corrupted model file
        f.seek(1000)
        f.write(b"\0" * 8)
    assert error(*quick) == (f"run: error: row fp32-narrow: {bundle / 'model.pt'}: sha256 does not match "
                             "manifest.json (corrupted or replaced file)")
    assert "compare only in a run from that reference" in error("smoke", "--rows", "fp32,fp32-narrow")


def test_every_row_kind_has_a_colour_and_a_legend_entry_in_the_plot():
    from recipes.librispeech.report import KIND_COLORS, KIND_LABELS

    assert {row.kind for row in ROWS.values()} <= set(KIND_COLORS)  # fp32_bundle had none: the plot crashed
    assert set(KIND_LABELS) == set(KIND_COLORS)


def test_the_plots_axis_stops_at_three_times_fp32s_wer():
    """A post-training 2-bit row at 300% WER would squeeze every row that matters into the bottom tenth."""
    from recipes.librispeech.report import y_top

    assert y_top([12.0, 18.0, 300.0], fp32=11.0) == pytest.approx(33.0)
    assert y_top([12.0, 18.0], fp32=11.0) == pytest.approx(18.9)  # all on the scale: just above the highest
    assert y_top([12.0, 300.0], fp32=None) == pytest.approx(315.0)  # no fp32 row: nothing to cut at


def test_the_benchmark_runs_every_row_but_the_distillation_ablation_and_the_demo_a_subset_from_fp32():
    # the -nokd rows (QAT without distillation) stay available through --rows
    assert set(SIZES["benchmark"].rows) == set(ROWS) - {"qat-w4a8-nokd", "qat-w2a8-nokd"}
    demo = SIZES["default"].rows
    assert demo[0] == "fp32" and set(demo) < set(ROWS)


def test_the_demo_and_the_benchmark_report_the_unseen_synthesizer(tmp_path):
    """Both start from the multi-synthesizer reference: its corpus is generated, test-unseen-synth prepared and
    every row decoded on it."""
    proc = runner("--size", "default", "--workdir", tmp_path, "--dry-run")
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert "--size multisynth" in lines[lines.index("# stage corpus") + 1]
    prepare = lines[lines.index("# stage prepare") + 1]
    assert "--eval-subsets dev-clean,dev-other,test-clean,test-other,test-unseen-synth " in prepare
    # the rows start from the shipped bundle's model (the preview named a checkpoint the demo never trains)
    fp32_eval = lines[lines.index("# stage eval fp32") + 1]
    assert f"--checkpoint {ROOT / 'recipes/librispeech/reference/model.pt'} " in fp32_eval
    # the searched row's candidates have balanced grids and the outlier site's input at 16 bits
    search = lines[lines.index("# stage search qat-searched") + 1]
    assert f"--base-strategy {ROOT / 'recipes/librispeech/strategies/w2a8-balanced-out16.yaml'} --budget-bits 2.3 " \
        in search
    assert SIZES["default"].eval_subsets == ("test-clean", "test-other", "test-unseen-synth")
    assert SIZES["benchmark"].eval_subsets == ("dev-clean", "dev-other", "test-clean", "test-other",
                                               "test-unseen-synth")
    assert SIZES["smoke"].eval_subsets == ("dev-clean", "dev-other", "test-clean", "test-other")


def test_a_stage_log_follows_its_command_while_it_runs(tmp_path):
    """Each line a stage prints is in its log file at once (the search's log stayed empty until it ended)."""
    import threading

    from recipes.librispeech.stages import run_logged

    flag, log = tmp_path / "flag", tmp_path / "stage.log"
    child = ("import os, sys, time\nprint('[search] sensitivity 4: w2 loss 0.65', flush=True)\n"
             f"while not os.path.exists({str(flag)!r}): time.sleep(0.05)\n")
    thread = threading.Thread(target=run_logged, args=([sys.executable, "-c", child], log))
    thread.start()
    try:
        for _ in range(600):  # the child waits for the flag, so the line can only come from a live log
            if log.exists() and "sensitivity 4" in log.read_text():
                break
            thread.join(0.1)
        assert "sensitivity 4" in log.read_text()
    finally:
        flag.touch()
        thread.join()


def _cached_eval(directory, checkpoint, errors):
    """A finished evaluation (what evaluate_model reads back instead of decoding): ``errors`` per dev subset over
    1000 words each."""
    directory.mkdir(parents=True, exist_ok=True)
    results = [{"subset": s, "utterances": 10, "words": 1000, "substitutions": e, "deletions": 0, "insertions": 0,
                "wer": e / 10, "seconds": 1.0} for s, e in zip(("dev-clean", "dev-other"), errors)]
    (directory / "wer.json").write_text(json.dumps({"checkpoint": str(checkpoint), "avg_weight_bits": 8.0,
                                                    "model_mb": 2.5, "results": results}))


@pytest.mark.parametrize("start_errors,trained_errors,chosen", [
    ((50, 100), (60, 80), "trained"),  # 7.0% against 7.5%: training helped on dev
    ((50, 100), (40, 110), "trained"),  # a tie (7.5% both) keeps the trained model
    ((50, 100), (80, 90), "start"),    # 8.5% against 7.5%: QAT made dev worse, the calibrated start is kept
])
def test_qat_keeps_its_calibrated_start_when_training_decodes_dev_worse(tmp_path, start_errors, trained_errors,
                                                                       chosen):
    from recipes.librispeech.run import select_on_dev

    work, out = tmp_path / "work", tmp_path / "work" / "qat" / "qat-w8a8"
    start, trained = work / "calib" / "w8a8.pt", out / "checkpoint_best.pt"
    for path, content in ((start, b"start"), (trained, b"trained")):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
    _cached_eval(work / "select" / "w8a8", start, start_errors)
    _cached_eval(out / "select", trained, trained_errors)
    selected = select_on_dev("qat-w8a8", start, trained, out, tmp_path, work, SIZES["benchmark"])
    assert selected == out / "checkpoint_selected.pt" and selected.read_bytes() == chosen.encode()
    record = json.loads((out / "selection.json").read_text())
    assert record["chosen"] == chosen and record["dev_subsets"] == ["dev-clean", "dev-other"]
    assert record["dev_wer"] == {"start": sum(start_errors) / 20, "trained": sum(trained_errors) / 20}
    assert not list(out.glob(".*.tmp"))
