"""Tests of the synthetic LibriSpeech generator and of the data preparation."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
import soundfile as sf

from recipes.librispeech import sentences
from recipes.librispeech.generate_corpus import (
    EVAL_SUBSETS,
    SUBSETS,
    TRAIN_SUBSET,
    generate_corpus,
    generate_from_params,
    plan_corpus,
    size_params,
)
from recipes.librispeech.prepare_data import load_features, prepare

NUM_TRAIN, NUM_DEV, NUM_TEST = 24, 6, 6
ID_RE = re.compile(r"^(\d+)-(\d+)-(\d{4})$")
TEXT_RE = re.compile(r"^[A-Z']+( [A-Z']+)*$")


def make_tiny(out: Path, seed: int = 0, jobs: int = 2) -> Path:
    """Generate the tiny corpus under `out`."""
    return generate_corpus(out, seed=seed, num_train=NUM_TRAIN, num_dev=NUM_DEV,
                           num_test=NUM_TEST, jobs=jobs)


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> Path:
    return make_tiny(tmp_path_factory.mktemp("corpus_seed0"))


def transcripts(root: Path, subset: str | None = None) -> dict[str, str]:
    """ID -> text of all trans.txt files (of one subset, or all)."""
    out = {}
    for trans in sorted(root.glob(f"{subset or '*'}/*/*/*.trans.txt")):
        for line in trans.read_text().splitlines():
            utt_id, _, text = line.partition(" ")
            out[utt_id] = text
    return out


def speakers_txt(root: Path) -> dict[str, list[tuple[str, str]]]:
    """Subset -> [(speaker id, voice name)] from SPEAKERS.TXT."""
    out: dict[str, list[tuple[str, str]]] = {}
    for line in (root / "SPEAKERS.TXT").read_text().splitlines():
        if line.startswith(";"):
            continue
        spk, _sex, subset, _minutes, name = [f.strip() for f in line.split("|")]
        out.setdefault(subset, []).append((spk, name))
    return out


# ------------------------------------------------------------------------------------------
# Sentences
# ------------------------------------------------------------------------------------------
def test_grammar_vocabulary_and_normalisation():
    texts = sentences.sentences(np.random.default_rng(0), 20000)
    vocab = {w for t in texts for w in t.split()}
    assert 2000 <= len(vocab) <= 4000
    assert len(set(texts)) == 20000
    assert all(TEXT_RE.match(t) and 4 <= len(t.split()) <= 16 for t in texts)
    assert sentences.number_words(258) == "two hundred and fifty eight"
    assert sentences.number_words(1905) == "one thousand nine hundred and five"
    assert sentences.year_words(1892) == "eighteen ninety two"
    assert sentences.verb("look for").past == "looked for"
    assert sentences.verb("stop").ing == "stopping"
    assert sentences.plural("knife") == "knives"
    assert sentences.normalise("  Don't  stop, Mr. Smith! ") == "DON'T STOP MR SMITH"


def test_closed_lexicon_grammar_of_the_reference_corpus():
    texts = sentences.sentences(np.random.default_rng(0), 5000, lexicon=4, max_words=9)
    vocab = {w for t in texts for w in t.split()}
    assert 250 <= len(vocab) <= 400
    assert all(TEXT_RE.match(t) and 4 <= len(t.split()) <= 9 for t in texts)
    with pytest.raises(ValueError, match="max_words must be at least 4"):
        sentences.Grammar(np.random.default_rng(0), max_words=3)


# ------------------------------------------------------------------------------------------
# Generator
# ------------------------------------------------------------------------------------------
def test_partial_synthesis_is_a_subset_of_the_full_corpus(tmp_path):
    full = size_params("reference", 0)
    planned = {u.utt_id: (Path(u.flac_path).relative_to(tmp_path).parts[0], u.text)
               for u in plan_corpus(full, tmp_path)[1]}
    root = generate_from_params(tmp_path / "partial", size_params("reference", 0, synth_train=3, synth_eval=2))
    made = transcripts(root)
    counts = {s: len(transcripts(root, s)) for s in SUBSETS}
    assert counts == {TRAIN_SUBSET: 3, **{s: 2 for s in EVAL_SUBSETS}}
    for utt_id, text in made.items():  # the same utterances (ids, texts, subsets) as in the full corpus
        subset = next(s for s in SUBSETS if utt_id in transcripts(root, s))
        assert planned[utt_id] == (subset, text)
    # held-out sentences: no evaluation text is a training text of the full corpus
    train_texts = {t for s, t in planned.values() if s == TRAIN_SUBSET}
    assert not {t for s, t in planned.values() if s != TRAIN_SUBSET} & train_texts
    with pytest.raises(ValueError, match="synth_eval must be in 1..300"):
        generate_from_params(tmp_path / "bad", size_params("reference", 0, synth_eval=301))


def test_extra_eval_speakers_are_new_voices_and_sentences_and_change_nothing_else(tmp_path):
    """The benchmark's 40-speaker evaluation subsets: the reference corpus plan unchanged, then 30 more speakers per
    evaluation subset whose (accent, variant) voice no subset uses and whose sentences occur nowhere else."""
    base_speakers, base_utts = plan_corpus(size_params("reference", 0), tmp_path)
    params = size_params("reference", 0, extra_eval_speakers=30)
    assert params == {**size_params("reference", 0), "extra_eval_speakers": 30}
    assert "extra_eval_speakers" not in size_params("reference", 0)  # bundles made without it keep their params
    speakers, utts = plan_corpus(params, tmp_path)
    assert [(u.utt_id, u.text, u.voice) for u in utts[:len(base_utts)]] == [(u.utt_id, u.text, u.voice)
                                                                            for u in base_utts]
    assert speakers[:len(base_speakers)] == base_speakers
    added = speakers[len(base_speakers):]
    assert {s: sum(sp.subset == s for sp in speakers) for s in EVAL_SUBSETS} == {s: 40 for s in EVAL_SUBSETS}
    assert len(utts) - len(base_utts) == 4 * 30 * 25
    train_voices = {(sp.voice.base, sp.voice.variant) for sp in speakers if sp.subset == TRAIN_SUBSET}
    old_voices = {(sp.voice.base, sp.voice.variant) for sp in base_speakers}
    new_voices = [(sp.voice.base, sp.voice.variant) for sp in added]
    assert len(set(new_voices)) == len(new_voices) and not set(new_voices) & old_voices
    assert not {(sp.voice.base, sp.voice.variant) for sp in speakers if sp.subset != TRAIN_SUBSET} & train_voices
    assert len({u.text for u in utts}) == len(utts) and len({u.utt_id for u in utts}) == len(utts)
    assert len({sp.speaker_id for sp in speakers}) == len(speakers)
    assert all(sp.other == sp.subset.endswith("other") for sp in added)
    with pytest.raises(ValueError, match="extra_eval_speakers 200: only .* voices are unused by the corpus"):
        plan_corpus(size_params("reference", 0, extra_eval_speakers=200), tmp_path)


def test_layout(tiny_corpus: Path):
    assert tiny_corpus.name == "LibriSpeech"
    assert sorted(p.name for p in tiny_corpus.iterdir() if p.is_dir()) == sorted(SUBSETS)
    expected = {TRAIN_SUBSET: NUM_TRAIN, "dev-clean": NUM_DEV, "dev-other": NUM_DEV,
                "test-clean": NUM_TEST, "test-other": NUM_TEST}
    for subset, count in expected.items():
        flacs = sorted((tiny_corpus / subset).glob("*/*/*.flac"))
        assert len(flacs) == count
        for flac in flacs:
            spk, chap, _utt = ID_RE.match(flac.stem).groups()
            assert (flac.parent.parent.name, flac.parent.name) == (spk, chap)
            info = sf.info(flac)
            assert (info.samplerate, info.channels, info.format, info.subtype) == (
                16000, 1, "FLAC", "PCM_16")
            assert 1.0 < info.duration < 12.0
        for chapter in {f.parent for f in flacs}:
            trans = chapter / f"{chapter.parent.name}-{chapter.name}.trans.txt"
            lines = trans.read_text().splitlines()
            ids = [line.split(" ", 1)[0] for line in lines]
            assert ids == sorted(ids) == sorted(f.stem for f in chapter.glob("*.flac"))
            for line in lines:
                text = line.split(" ", 1)[1]
                assert TEXT_RE.match(text) and 4 <= len(text.split()) <= 16
        for speaker in (tiny_corpus / subset).iterdir():
            assert 1 <= len(list(speaker.iterdir())) <= 3


def test_no_digital_silence(tiny_corpus: Path):
    """Every utterance has a noise floor: no 10 ms of exact zeros (they squash normalised fbank features)."""
    for flac in sorted(tiny_corpus.glob("*/*/*/*.flac")):
        samples, _ = sf.read(flac, dtype="int16")
        zero = np.concatenate([[0], (samples == 0).astype(np.int8), [0]])
        edges = np.flatnonzero(np.diff(zero))
        longest = int((edges[1::2] - edges[::2]).max()) if edges.size else 0
        assert longest < 160, (flac.name, longest)
        assert np.abs(samples[:400]).max() > 0  # leading pad is not silent either


def test_speakers_and_texts_disjoint_across_splits(tiny_corpus: Path):
    by_subset = speakers_txt(tiny_corpus)
    assert sorted(by_subset) == sorted(SUBSETS)
    assert len(by_subset[TRAIN_SUBSET]) == 3 and all(len(by_subset[s]) == 2 for s in EVAL_SUBSETS)
    for subset, speakers in by_subset.items():
        dirs = sorted(p.name for p in (tiny_corpus / subset).iterdir())
        assert dirs == sorted(spk for spk, _ in speakers)
    all_ids = [spk for sp in by_subset.values() for spk, _ in sp]
    voice_pairs = [name.split()[0] for sp in by_subset.values() for _, name in sp]
    assert len(set(all_ids)) == len(all_ids) == 11
    assert len(set(voice_pairs)) == len(voice_pairs)  # base+variant never shared by two speakers
    train_texts = set(transcripts(tiny_corpus, TRAIN_SUBSET).values())
    eval_texts = [t for s in EVAL_SUBSETS for t in transcripts(tiny_corpus, s).values()]
    assert len(set(eval_texts)) == len(eval_texts) == 24
    assert not train_texts & set(eval_texts)


def test_generation_is_deterministic(tiny_corpus: Path, tmp_path: Path):
    again = make_tiny(tmp_path / "again", seed=0, jobs=1)  # a different job count too
    files = sorted(p.relative_to(tiny_corpus) for p in tiny_corpus.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    for rel in files:
        if rel.suffix == ".flac":
            a, rate_a = sf.read(tiny_corpus / rel, dtype="int16")
            b, rate_b = sf.read(again / rel, dtype="int16")
            assert rate_a == rate_b == 16000 and np.array_equal(a, b), rel
        else:
            assert (tiny_corpus / rel).read_bytes() == (again / rel).read_bytes(), rel

    other = make_tiny(tmp_path / "seed1", seed=1)
    texts0 = set(transcripts(tiny_corpus).values())
    texts1 = set(transcripts(other).values())
    assert len(texts1) == 48 and len(texts0 & texts1) == 0
    assert set(transcripts(tiny_corpus)) != set(transcripts(other))


def test_generation_is_idempotent_and_refuses_other_parameters(tiny_corpus: Path, capsys):
    marker = tiny_corpus / ".complete"
    before = marker.stat().st_mtime_ns
    assert make_tiny(tiny_corpus.parent) == tiny_corpus
    assert "skipping generation" in capsys.readouterr().err
    assert marker.stat().st_mtime_ns == before
    with pytest.raises(FileExistsError, match="different parameters"):
        make_tiny(tiny_corpus.parent, seed=5)
    assert not list(tiny_corpus.parent.glob("LibriSpeech.tmp-*"))


# ------------------------------------------------------------------------------------------
# Preparation
# ------------------------------------------------------------------------------------------
def first_id(root: Path, subset: str, index: int = 0) -> str:
    return sorted(transcripts(root, subset))[index]


def flac_of(root: Path, subset: str, utt_id: str) -> Path:
    spk, chap, _ = utt_id.split("-")
    return root / subset / spk / chap / f"{utt_id}.flac"


def rewrite_line(root: Path, subset: str, utt_id: str, new_line: str | None) -> None:
    """Replace (or with None, delete) the transcript line of utt_id."""
    spk, chap, _ = utt_id.split("-")
    trans = root / subset / spk / chap / f"{spk}-{chap}.trans.txt"
    lines = []
    for line in trans.read_text().splitlines():
        if line.split(" ", 1)[0] != utt_id:
            lines.append(line)
        elif new_line is not None:
            lines.append(new_line)
    trans.write_text("".join(line + "\n" for line in lines))


@pytest.fixture(scope="module")
def broken_tree(tiny_corpus: Path, tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """A copy of the tiny corpus with one problem of each kind injected."""
    root = tmp_path_factory.mktemp("broken") / "LibriSpeech"
    shutil.copytree(tiny_corpus, root)
    bad = {
        "corrupt": first_id(root, TRAIN_SUBSET, 0),
        "no_line": first_id(root, TRAIN_SUBSET, 5),
        "empty": first_id(root, "dev-clean", 1),
        "short": first_id(root, "dev-other", 2),
        "no_audio": first_id(root, "test-clean", 3),
    }
    rng = np.random.default_rng(123)
    flac_of(root, TRAIN_SUBSET, bad["corrupt"]).write_bytes(rng.bytes(5000))
    rewrite_line(root, TRAIN_SUBSET, bad["no_line"], None)
    rewrite_line(root, "dev-clean", bad["empty"], bad["empty"])
    sf.write(flac_of(root, "dev-other", bad["short"]), np.zeros(100, np.int16), 16000,
             format="FLAC", subtype="PCM_16")
    flac_of(root, "test-clean", bad["no_audio"]).unlink()
    return root, bad


@pytest.fixture(scope="module")
def prepared(broken_tree, tmp_path_factory):
    root, bad = broken_tree
    data = tmp_path_factory.mktemp("data")
    summary = prepare(root, data, [TRAIN_SUBSET], list(EVAL_SUBSETS), vocab_size=5000, jobs=2)
    return root, bad, data, summary


def test_summary_counts_and_names_bad_inputs(prepared):
    root, bad, data, summary = prepared
    table = {s.subset: (s.split, s.kept, s.skipped) for s in summary.subsets}
    none = {"bad_audio": 0, "no_transcript": 0, "no_audio": 0}
    assert table == {
        TRAIN_SUBSET: ("train", 22, {**none, "bad_audio": 1, "no_transcript": 1}),
        "dev-clean": ("dev-clean", 5, {**none, "no_transcript": 1}),
        "dev-other": ("dev-other", 5, {**none, "bad_audio": 1}),
        "test-clean": ("test-clean", 5, {**none, "no_audio": 1}),
        "test-other": ("test-other", 6, none),
    }
    assert summary.subset(TRAIN_SUBSET).skipped_ids == {
        "bad_audio": [bad["corrupt"]], "no_transcript": [bad["no_line"]], "no_audio": []}
    assert summary.subset("dev-clean").skipped_ids["no_transcript"] == [bad["empty"]]
    assert summary.subset("dev-other").skipped_ids["bad_audio"] == [bad["short"]]
    assert "too short" in summary.subset("dev-other").errors[bad["short"]]
    assert summary.subset("test-clean").skipped_ids["no_audio"] == [bad["no_audio"]]
    text = summary.table()
    assert all(utt_id in text for utt_id in bad.values())
    assert summary.vocab_size_requested == 5000 and 50 < summary.vocab_size < 5000
    assert summary.spm_model == data / f"spm_unigram{summary.vocab_size}.model"
    assert 0 < summary.subset(TRAIN_SUBSET).hours < 0.1


def test_manifests_exclude_bad_ids_and_decode_back(prepared):
    root, bad, data, summary = prepared
    from fairseq.data import Dictionary

    spm_files = [summary.spm_model.name, summary.spm_model.with_suffix(".vocab").name]
    assert sorted(p.name for p in data.iterdir()) == sorted(
        ["train.json", "dict.txt"] + spm_files + [f"{s}.json" for s in EVAL_SUBSETS])
    dictionary = Dictionary.load(str(data / "dict.txt"))
    dict_lines = (data / "dict.txt").read_text().splitlines()
    assert len(dictionary) == 4 + len(dict_lines)
    counts = [(-int(c), p) for p, c in (line.split(" ") for line in dict_lines)]
    assert counts == sorted(counts)
    assert not {p for _, p in counts} & {"<unk>", "<s>", "</s>", "<pad>"}
    sp = spm.SentencePieceProcessor(model_file=str(summary.spm_model))
    assert sp.get_piece_size() == summary.vocab_size

    for split, subsets in [("train", [TRAIN_SUBSET])] + [(s, [s]) for s in EVAL_SUBSETS]:
        utts = json.loads((data / f"{split}.json").read_text())["utts"]
        expected = {u: t for s in subsets for u, t in transcripts(root, s).items()
                    if u not in set(bad.values())}
        assert sorted(utts) == sorted(expected), split
        unk = 0
        for utt_id, entry in utts.items():
            assert entry["output"]["text"] == expected[utt_id]
            ids = [int(i) for i in entry["output"]["tokenid"].split(", ")]
            pieces = entry["output"]["token"].split(" ")
            assert len(ids) == len(pieces)
            unk += sum(i == dictionary.unk() for i in ids)
            if dictionary.unk() not in ids:
                assert [dictionary[i] for i in ids] == pieces
                assert sp.decode(pieces) == expected[utt_id]
            path = Path(entry["input"]["path"])
            assert path.is_absolute() and path == flac_of(root, subsets[0], utt_id).absolute()
            assert entry["input"]["length_ms"] == sf.info(path).frames * 1000 // 16000
        if split == "train":
            assert unk == 0
        else:
            assert unk == summary.subset(split).unk_pieces


def test_rerun_is_byte_identical_and_leaves_no_tmp(prepared):
    root, _bad, data, summary = prepared
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in data.iterdir()}
    again = prepare(root, data, [TRAIN_SUBSET], list(EVAL_SUBSETS), vocab_size=5000, jobs=1)
    after = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in data.iterdir()}
    assert after == before  # same content, and unchanged files are not even rewritten
    assert again.vocab_size == summary.vocab_size
    assert not [p for p in data.iterdir() if ".tmp" in p.name]


def test_load_features_matches_fairseq_frontend(tiny_corpus: Path):
    flac = sorted((tiny_corpus / "dev-clean").glob("*/*/*.flac"))[0]
    feats = load_features(flac)
    samples = sf.info(flac).frames
    assert feats.shape == (1 + (samples - 400) // 160, 80)
    assert feats.mean(0).abs().max() < 1e-4
    assert (feats.std(0) - 1).abs().max() < 1e-3


def test_missing_subset_is_a_clear_error(tiny_corpus: Path, tmp_path: Path):
    with pytest.raises(FileNotFoundError, match=r"dev-typo does not exist.*dev-clean, dev-other"):
        prepare(tiny_corpus, tmp_path, [TRAIN_SUBSET], ["dev-typo"], vocab_size=100)
    assert not list(tmp_path.iterdir())


def test_training_batches_group_utterances_of_similar_length(prepared):
    """fairseq_quant orders AsrDataset by length (upstream pads each batch of a random mix)."""
    import fairseq_quant  # noqa: F401  (applies the compatibility fixes)
    from examples.speech_recognition.tasks.speech_recognition import get_asr_dataset_from_json
    from fairseq.data import Dictionary, data_utils

    _root, _bad, data, _summary = prepared
    dataset = get_asr_dataset_from_json(str(data / "train.json"), Dictionary.load(str(data / "dict.txt")))
    sizes = np.asarray(dataset.frame_sizes)
    assert len(sizes) == NUM_TRAIN - 2 and len(set(sizes.tolist())) > 10
    with data_utils.numpy_seed(1):
        order = dataset.ordered_indices()
    with data_utils.numpy_seed(1):
        again = dataset.ordered_indices()
    assert sorted(order.tolist()) == list(range(len(sizes)))
    assert np.all(np.diff(sizes[order]) >= 0)  # ascending frames
    assert np.array_equal(order, again)  # deterministic for fairseq's per-epoch seed
