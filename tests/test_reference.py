"""The shipped reference bundle: it matches its manifest, its corruption is one clear error, and the
model recognises freshly generated held-out utterances (a changed corpus generator that would invalidate
the shipped model fails here)."""
import json
import re
import shutil

import pytest
import sentencepiece as spm

from recipes.librispeech.generate_corpus import generate_from_params, size_params
from recipes.librispeech.reference import BUNDLE_FILES, DEFAULT_BUNDLE, BundleError, load_manifest

# Bounds on 20 fresh utterances per test subset (about 130 words each), beam 5 with joint CTC/attention decoding:
# above the model's measured WER on the full 500-utterance test sets (7.3 / 15.2 / 47.8, manifest.json) by more than
# the sampling noise of 20 utterances, and far below what a model that does not recognise this corpus scores (about
# 100%; the espeak-ng-only reference of 2026-12-03 scored about 88% on flite's voices).
MAX_WER = {"test-clean": 18.0, "test-other": 30.0, "test-unseen-synth": 70.0}
FRESH = 20


def test_bundle_matches_its_manifest():
    manifest = load_manifest(DEFAULT_BUNDLE)  # checks every file's sha256
    assert manifest["corpus"] == size_params("multisynth", manifest["corpus"]["seed"])
    assert manifest["arch"] == "vggtransformer_ref_ctc" and manifest["parameters"] >= 2_000_000
    assert manifest["wer"]["ctc_weight"] == 0.5 and manifest["wer"]["subsets"]["test-clean"]["wer"] <= 10.0
    assert manifest["wer"]["subsets"]["test-other"]["wer"] <= 25.0  # issue 7's targets (issue 20's are missed)
    assert manifest["wer"]["subsets"]["test-unseen-synth"]["wer"] <= 50.0
    training = manifest["training"]
    assert re.fullmatch(r"[0-9a-f]{40}", training["commit"])
    assert training["updates"] > 0 and training["wall_time_s"] > 0
    assert training["command"][training["command"].index("--arch") + 1] == manifest["arch"]
    sp = spm.SentencePieceProcessor(model_file=str(DEFAULT_BUNDLE / "spm.model"))
    assert sp.get_piece_size() == manifest["vocab_size"]
    pieces = [line.split()[0] for line in (DEFAULT_BUNDLE / "dict.txt").read_text().splitlines()]
    assert set(pieces) <= {sp.id_to_piece(i) for i in range(sp.get_piece_size())}
    assert set(manifest["sha256"]) == set(BUNDLE_FILES)


@pytest.fixture
def bundle_copy(tmp_path):
    copy = tmp_path / "bundle"
    shutil.copytree(DEFAULT_BUNDLE, copy)
    return copy


def test_corrupted_bundle_file_is_one_clear_error(bundle_copy):
    model = bundle_copy / "model.pt"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0x01
    model.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"model.pt: sha256 does not match manifest.json"):
        load_manifest(bundle_copy)


def test_incomplete_or_foreign_bundle_is_one_clear_error(bundle_copy, tmp_path):
    (bundle_copy / "dict.txt").unlink()
    with pytest.raises(BundleError, match=r"dict.txt is missing"):
        load_manifest(bundle_copy)
    manifest = json.loads((bundle_copy / "manifest.json").read_text())
    (bundle_copy / "manifest.json").write_text(json.dumps({**manifest, "bundle_version": 99}))
    with pytest.raises(BundleError, match=r"bundle version 99, expected 1"):
        load_manifest(bundle_copy)
    with pytest.raises(BundleError, match=r"no manifest.json"):
        load_manifest(tmp_path)


def test_reference_model_recognises_fresh_held_out_utterances(tmp_path):
    from fairseq_quant.evaluate import evaluate
    from recipes.librispeech.prepare_data import prepare

    manifest = load_manifest(DEFAULT_BUNDLE)
    params = size_params("multisynth", manifest["corpus"]["seed"], synth_train=1, synth_eval=FRESH)
    root = generate_from_params(tmp_path / "corpus", params, jobs=2)
    subsets = list(MAX_WER)
    prepare(root, tmp_path / "data", ["train-clean-100"], subsets, jobs=2,
            spm_model=DEFAULT_BUNDLE / "spm.model", dictionary=DEFAULT_BUNDLE / "dict.txt")
    results = evaluate(DEFAULT_BUNDLE / "model.pt", tmp_path / "data", subsets, tmp_path / "eval", beam=5,
                       progress=False, device="cpu", max_len_a=0.2, max_len_b=10)
    for r in results:
        assert r.utterances == FRESH
        assert r.wer <= MAX_WER[r.subset], (r.subset, r.wer, (tmp_path / "eval" / f"{r.subset}.hyp").read_text())


def test_a_finished_training_continues_when_asked_for_more_and_the_bundle_records_every_run(smoke, tmp_path):
    """train_reference resumes a finished run from checkpoint_last.pt when its limits grow (the way the shipped
    model was trained for longer), records each run's command, and skips a run that is already done."""
    import torch

    from recipes.librispeech.train_reference import main as train_reference

    work, _ = smoke
    ref = tmp_path / "ref"
    ref.mkdir()
    shutil.copytree(work / "data", ref / "data")
    common = ["--workdir", str(ref), "--corpus", "reference", "--threads", "1", "--batch-size", "8", "--warmup", "2",
              "--average", "0"]
    for updates in (2, 4, 4):
        assert train_reference(common + ["--stages", "train", "--max-update", str(updates)]) == 0
    record = json.loads((ref / "train" / "command.json").read_text())
    assert [run[run.index("--max-update") + 1] for run in record["runs"]] == ["2", "4"]
    state = torch.load(ref / "train" / "checkpoint_last.pt", map_location="cpu", weights_only=False)
    assert state["optimizer_history"][-1]["num_updates"] == 4
    log = (ref / "train" / "train.log").read_text()
    assert log.count("Loaded checkpoint") == 1 and log.count("done training") == 2

    bundle = tmp_path / "bundle"
    assert train_reference(common + ["--stages", "average,bundle", "--max-update", "4", "--bundle", str(bundle)]) == 0
    training = load_manifest(bundle)["training"]
    assert training["updates"] == 4
    assert training["command"][training["command"].index("--max-update") + 1] == "4"
    assert [run[run.index("--max-update") + 1] for run in training["earlier_runs"]] == ["2"]

    # a later session continues from the bundle's weights (fresh optimizer and schedule), in a new work directory
    cont = tmp_path / "cont"
    cont.mkdir()
    shutil.copytree(work / "data", cont / "data")
    more = ["--workdir", str(cont), "--corpus", "reference", "--threads", "1", "--batch-size", "8", "--warmup", "1",
            "--average", "0", "--init-from", str(bundle), "--schedule", "linear", "--max-update", "2"]
    with pytest.raises(SystemExit, match="continue on the same corpus"):
        train_reference(more + ["--stages", "train", "--seed", "1"])
    assert train_reference(more + ["--stages", "train,average,eval,bundle", "--bundle", str(tmp_path / "bundle2")]) == 0
    log = (cont / "train" / "train.log").read_text()
    assert f"Loaded checkpoint {cont / 'init' / 'start.pt'}" in log
    second = load_manifest(tmp_path / "bundle2")["training"]
    # --hours limits this training alone: fairseq's time limit would otherwise include the earlier training's
    start = torch.load(cont / "init" / "start.pt", map_location="cpu", weights_only=False)
    assert load_manifest(bundle)["training"]["wall_time_s"] > 0 and start["extra_state"]["previous_training_time"] == 0
    assert (second["updates"], second["updates_this_run"]) == (6, 2)
    assert second["continued_from"]["model_sha256"] == load_manifest(bundle)["sha256"]["model.pt"]
    assert second["continued_from"]["updates"] == 4
    wer = load_manifest(tmp_path / "bundle2")["wer"]  # the eval stage decoded every held-out set
    assert wer["beam"] == 5 and sorted(wer["subsets"]) == ["dev-clean", "dev-other", "test-clean", "test-other"]
    assert all(s["words"] > 0 and s["wer"] >= 0 for s in wer["subsets"].values())
    command = second["command"]
    assert command[command.index("--lr-scheduler") + 1] == "polynomial_decay"
    assert command[command.index("--finetune-from-model") + 1] == "$WORKDIR/init/start.pt"
    # a work directory continues from the bundle it started from, not from another one given later
    with pytest.raises(BundleError, match="holds a different bundle"):
        train_reference(more[:-6] + ["--init-from", str(tmp_path / "bundle2"), "--stages", "train"])


def test_averaging_includes_the_final_model_when_the_training_ends_at_an_epoch_end(tmp_path):
    """fairseq writes no interval checkpoint at an epoch's end: a training stopping there (12,000 updates of
    750-update epochs) has its final model only in checkpoint_last.pt, which the average must include."""
    import torch

    from recipes.librispeech.reference import average_checkpoints

    def save(name, updates, value):
        torch.save({"model": {"w": torch.full((2,), value), "step": torch.tensor(updates)},
                    "optimizer_history": [{"num_updates": updates}], "last_optimizer_state": {"m": 1},
                    "criterion": {"ctc_proj.weight": torch.zeros(1)}, "extra_state": {}}, tmp_path / name)

    save("checkpoint_14_10000.pt", 10000, 1.0)
    save("checkpoint_15_11000.pt", 11000, 2.0)
    save("checkpoint_last.pt", 12000, 6.0)
    out = average_checkpoints(tmp_path, 2, tmp_path / "model.pt")
    state = torch.load(out, map_location="cpu", weights_only=False)
    assert state["model"]["w"].tolist() == [4.0, 4.0]  # (2 + 6) / 2: checkpoints 11000 and 12000
    assert state["model"]["step"].item() == 12000  # integer tensors come from the newest
    assert state["extra_state"]["averaged_checkpoints"] == ["checkpoint_15_11000.pt", "checkpoint_last.pt"]
    assert "last_optimizer_state" not in state and "criterion" not in state

    save("checkpoint_last.pt", 11000, 2.0)  # stopped at an interval checkpoint: it is not counted twice
    state = torch.load(average_checkpoints(tmp_path, 2, tmp_path / "model.pt"), map_location="cpu",
                       weights_only=False)
    assert state["model"]["w"].tolist() == [1.5, 1.5]
    assert state["extra_state"]["averaged_checkpoints"] == ["checkpoint_14_10000.pt", "checkpoint_15_11000.pt"]


def test_the_size_matched_arch_takes_the_bytes_of_the_2_bit_reference(tmp_path):
    """vggtransformer_narrow_ctc: the reference's depth at 0.7-0.8 MB of fp32 weights with the reference's 256-piece
    vocabulary, the size of the 2-bit reference models (0.716 MB for w2a8)."""
    from fairseq import options, tasks

    import fairseq_quant  # noqa: F401

    (tmp_path / "dict.txt").write_text("".join(f"tok{i} {100 - i}\n" for i in range(252)))
    args = options.parse_args_and_arch(options.get_training_parser(), [
        str(tmp_path), "--task", "speech_recognition", "--arch", "vggtransformer_narrow_ctc",
        "--criterion", "cross_entropy_acc"])
    model = tasks.setup_task(args).build_model(args)
    params = sum(p.numel() for p in model.parameters())
    assert params == 188_800 and 0.7 < 4 * params / 1e6 < 0.8
    from fairseq.modules import TransformerEncoderLayer

    assert sum(isinstance(m, TransformerEncoderLayer) for m in model.encoder.transformer_layers) == 4
    assert len(model.decoder.layers) == 2 and model.ctc_proj.in_features == 40
