"""The corpus generator's synthesizer back-ends (espeak-ng, flite, festival) and the multi-synthesizer test design:
every voice makes 16 kHz mono speech in the LibriSpeech layout, and no test subset holds a training voice or
sentence; `test-unseen-synth` is spoken by a voice family that training never hears."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

import recipes.librispeech.generate_corpus as gc

TEXT = "THE OLD MAN WALKED SLOWLY TO THE RIVER"
VOICES = [
    gc.EspeakVoice("en-us", "m3", 50, 160, 1),
    gc.FliteVoice("kal", 110, 1.0, 1.0),
    gc.FliteVoice("kal16", 120, 1.1, 0.95),
    gc.FestivalVoice("kal_diphone", 100, 1.0, 1.0),
    gc.FestivalVoice("ked_diphone", 130, 0.9, 1.05),
    gc.FestivalVoice("cmu_us_slt_arctic_hts", 0, 1.1, 1.0),
    gc.FliteVoice("awb", 100, 1.0, 1.0),
    gc.FliteVoice("rms", 0, 1.0, 1.0),
    gc.FliteVoice("slt", 200, 1.0, 1.0),
]


def synthesise(voice: gc.Voice, out: Path, name: str = "1-2-0000") -> Path:
    """One utterance of TEXT by `voice`, clean conditions, written as the generator writes it."""
    path = out / f"{name}.flac"
    gc.synthesise(gc.Utterance(name, TEXT, voice, False, (0, 1), str(path)), str(out))
    return path


@pytest.mark.parametrize("voice", VOICES, ids=lambda v: f"{v.family}:{getattr(v, 'voice', 'espeak')}")
def test_every_voice_makes_16k_mono_speech(voice, tmp_path):
    path = synthesise(voice, tmp_path)
    info = sf.info(path)
    assert (info.samplerate, info.channels, info.subtype, info.format) == (16000, 1, "PCM_16", "FLAC")
    audio, _ = sf.read(path, dtype="float32")
    assert 1.0 < audio.size / 16000 < 5.0  # eight words, padded by 0.1-0.6 s
    # speech, not noise: the loudest 100 ms windows are far above the quietest (the noise floor)
    power = np.sort([np.mean(w ** 2) for w in np.array_split(audio, audio.size // 1600)])
    assert 10 * np.log10(power[-3] / power[2]) > 20


@pytest.mark.parametrize("voice", [VOICES[1], VOICES[5], VOICES[7]], ids=lambda v: v.voice)
def test_speed_perturbation_changes_the_duration(voice, tmp_path):
    """Speed s resamples as if recorded at s times the rate: the speech lasts 1/s as long (same padding)."""
    from dataclasses import replace

    slow = sf.info(synthesise(replace(voice, speed=0.9), tmp_path, "1-2-0000")).frames
    fast = sf.info(synthesise(replace(voice, speed=1.1), tmp_path, "1-2-0001")).frames
    assert slow / fast == pytest.approx(1.1 / 0.9, rel=0.08)


def test_a_missing_synthesizer_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(RuntimeError, match=r"festival is not installed \(text2wave not found\)"):
        synthesise(VOICES[3], tmp_path)


def test_multisynth_corpus_layout_and_voice_records(tmp_path):
    params = gc.generation_params(0, num_train=24, num_dev=6, num_test=6, synth_mix=0.5)
    assert params["format_version"] == 4 and params["synth_mix"] == 0.5
    root = gc.generate_from_params(tmp_path, params, jobs=2)
    subsets = sorted(p.name for p in root.iterdir() if p.is_dir())
    assert subsets == sorted(gc.SUBSETS + ("test-unseen-synth",))
    voices = gc.read_voices(root)
    by_subset: dict[str, list[dict]] = {}
    for record in voices.values():
        by_subset.setdefault(record["subset"], []).append(record)
    # 3 training speakers, half of them recorded voices (round(1.5) = 2); 2 speakers per evaluation subset
    assert sorted(r["family"] for r in by_subset["train-clean-100"]) == ["espeak-ng", "festival-diphone",
                                                                         "flite-diphone"]
    assert all(sorted(r["family"] for r in by_subset[s]) == ["espeak-ng", "flite-diphone"] for s in gc.EVAL_SUBSETS)
    assert sorted((r["backend"], r["family"], r["voice"]) for r in by_subset["test-unseen-synth"]) == [
        ("flite", "flite-clustergen", "awb"), ("flite", "flite-clustergen", "rms")]
    speakers_txt = (root / "SPEAKERS.TXT").read_text()
    for spk, record in voices.items():
        line = next(x for x in speakers_txt.splitlines() if x.startswith(f"{spk} "))
        assert line.split("|")[2].strip() == record["subset"]
        assert line.split("|")[4].strip().startswith("flite:" if record["backend"] == "flite" else
                                                     "festival:" if record["backend"] == "festival" else "en")
    flacs = sorted(root.glob("test-unseen-synth/*/*/*.flac"))
    assert len(flacs) == 6 and all(sf.info(f).samplerate == 16000 and sf.info(f).channels == 1 for f in flacs)
    assert json.loads((root / gc.MARKER).read_text()) == params


def test_benchmark_test_sets_hold_no_training_voice_or_sentence():
    """The multisynth corpus with the benchmark's 30 extra speakers per evaluation subset: 40 speakers in each test
    subset; no evaluation voice configuration, espeak-ng (accent, variant) pair or sentence occurs in training;
    test-unseen-synth is all flite clustergen, a family no training speaker uses; the trained recorded families
    are in every other evaluation subset."""
    speakers, utts = gc.plan_corpus(gc.size_params("multisynth", 0, extra_eval_speakers=30), Path("/corpus"))
    subsets = gc.EVAL_SUBSETS + ("test-unseen-synth",)
    assert {s: sum(sp.subset == s for sp in speakers) for s in subsets} == {s: 40 for s in subsets}
    train = [sp for sp in speakers if sp.subset == gc.TRAIN_SUBSET]
    held = [sp for sp in speakers if sp.subset != gc.TRAIN_SUBSET]
    assert len(train) == 400 and {sp.voice.family for sp in train} == {"espeak-ng", *gc.TRAINED_FAMILIES}
    assert not {sp.voice for sp in train} & {sp.voice for sp in held}
    assert len({sp.voice for sp in speakers}) == len(speakers)  # every configuration once in the whole corpus
    pairs = lambda group: {(sp.voice.base, sp.voice.variant) for sp in group if sp.voice.family == "espeak-ng"}
    assert not pairs(train) & pairs(held)
    assert {sp.voice.family for sp in speakers if sp.subset == "test-unseen-synth"} == {gc.HELD_OUT_FAMILY}
    assert gc.HELD_OUT_FAMILY not in {sp.voice.family for sp in train}
    assert {sp.voice.voice for sp in speakers if sp.subset == "test-unseen-synth"} == {"awb", "rms", "slt"}
    for subset in ("test-clean", "test-other"):
        assert {sp.voice.family for sp in held if sp.subset == subset} == {"espeak-ng", *gc.TRAINED_FAMILIES}
    train_texts = {u.text for u in utts if f"/{gc.TRAIN_SUBSET}/" in u.flac_path}
    held_texts = [u.text for u in utts if f"/{gc.TRAIN_SUBSET}/" not in u.flac_path]
    assert len(held_texts) == 300 * 2 + 500 * 3 + 5 * 30 * 25 and not set(held_texts) & train_texts
    assert len(set(held_texts)) == len(held_texts)
    assert len({sp.speaker_id for sp in speakers}) == len(speakers)


def test_the_espeak_only_corpora_are_unchanged():
    """Corpora without synth_mix (the shipped reference's, and its 40-speaker benchmark sets) plan exactly as
    before the flite and festival back-ends existed (fingerprints of commit a17b4c1's plans)."""
    expected = {0: "cd92edc2deff7b13e4a5c6a7f6df1461170b06f1568298bac728b4a2d9a70d24",
                30: "77e53614027fa1a5fb132a69cae4451b5a58487ce6af31166843fb06692cf688"}
    for extra, digest in expected.items():
        speakers, utts = gc.plan_corpus(gc.size_params("reference", 0, extra_eval_speakers=extra), Path("/r"))
        h = hashlib.sha256()
        for u in utts:
            h.update(f"{u.utt_id}|{u.text}|{u.voice.name()}|{u.other}|{u.seed}|{u.flac_path}\n".encode())
        for s in speakers:
            h.update(f"{s.speaker_id}|{s.subset}|{s.voice.name()}|{s.chapter_ids}|{s.other}\n".encode())
        assert h.hexdigest() == digest


def test_bad_synth_mix_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"synth_mix must be a fraction in \[0, 1\], got 1.5"):
        gc.generate_from_params(tmp_path, gc.generation_params(0, 24, 6, 6, synth_mix=1.5))
    assert not (tmp_path / "LibriSpeech").exists()


def test_the_family_table_splits_a_subset_by_synthesizer_family(tmp_path):
    from fairseq_quant_runtime.wer import format_utterances

    from recipes.librispeech.report import family_table

    rows = [("11-1-0000", "A B C D", "A B C D"), ("11-1-0001", "A B", "A X"),  # espeak speaker: 1 error / 6 words
            ("22-2-0000", "A B C D", "A"),  # a flite speaker: 3 errors / 4
            ("33-3-0000", "A B C D", "A B C D")]  # another: 0 / 4
    (tmp_path / "test-unseen-synth.utt.tsv").write_text(format_utterances(rows))
    voices = {"11": {"family": "espeak-ng"}, "22": {"family": "flite-clustergen"},
              "33": {"family": "flite-clustergen"}}
    table = family_table(tmp_path, voices, ["test-unseen-synth"]).splitlines()
    assert table[2] == "| test-unseen-synth | espeak-ng | 1 | 6 | 16.67% | 16.7 | 16.7 |"  # one speaker: no interval
    assert table[3].startswith("| test-unseen-synth | flite-clustergen | 2 | 8 | 37.50")
    assert table[3].endswith("| 0.0 | 75.0 |")


def test_the_recipe_writes_the_fp32_rows_family_table_only_for_a_generated_corpus(tmp_path):
    """The runner's report stage: families.md of the fp32 row when the corpus has a VOICES.json (the generated
    corpus), nothing for a corpus without one (real LibriSpeech) or a run without an fp32 row."""
    import json

    from fairseq_quant_runtime.wer import format_utterances

    from recipes.librispeech.report import ModelResult
    from recipes.librispeech.run import write_family_table

    eval_dir = tmp_path / "eval" / "fp32"
    eval_dir.mkdir(parents=True)
    (eval_dir / "test-clean.utt.tsv").write_text(format_utterances(
        [("11-1-0000", "A B C D", "A B C D"), ("22-2-0000", "A B C D", "A B")]))
    fp32 = ModelResult("fp32", "model.pt", 32.0, 9.6, eval_dir=str(eval_dir))
    other = ModelResult("qat-w2a8", "w2.pt", 2.0, 0.7, eval_dir=str(tmp_path / "eval" / "qat-w2a8"))
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    out = tmp_path / "families.md"
    assert write_family_table([fp32, other], corpus, ["test-clean"], out) == "" and not out.exists()  # no VOICES.json
    (corpus / "VOICES.json").write_text(json.dumps({"11": {"family": "espeak-ng"}, "22": {"family": "flite-diphone"}}))
    assert write_family_table([other], corpus, ["test-clean"], out) == "" and not out.exists()  # no fp32 row
    table = write_family_table([other, fp32], corpus, ["test-clean"], out)
    assert out.read_text() == table
    lines = table.splitlines()
    assert lines[2].startswith("| test-clean | espeak-ng | 1 | 4 | 0.00")
    assert lines[3].startswith("| test-clean | flite-diphone | 1 | 4 | 50.00")


def test_the_results_table_gives_the_unseen_synthesizer_its_own_column(tmp_path):
    """test-unseen-synth is a column of the table and has its own relative change; the pooled summary stays the
    test sets of the trained voice families."""
    from fairseq_quant_runtime.wer import format_utterances

    from recipes.librispeech.report import ModelResult, results_table

    subsets = ["test-clean", "test-other", "test-unseen-synth"]
    # (speaker, errors) per utterance of 4 words; the quantized model doubles the errors on the unseen voices only
    errors = {"fp32": {"test-clean": [0, 1], "test-other": [1, 1], "test-unseen-synth": [1, 1, 2, 0]},
              "qat-w2a8": {"test-clean": [0, 1], "test-other": [1, 1], "test-unseen-synth": [2, 2, 4, 0]}}
    results = []
    for name, by_subset in errors.items():
        eval_dir = tmp_path / name
        eval_dir.mkdir()
        for subset, errs in by_subset.items():
            rows = [(f"{10 + i}-1-0000", "A B C D", " ".join(["X"] * e + ["A B C D".split()[j] for j in range(e, 4)]))
                    for i, e in enumerate(errs)]
            (eval_dir / f"{subset}.utt.tsv").write_text(format_utterances(rows))
        results.append(ModelResult(name, "-", 32.0 if name == "fp32" else 2.0, 1.0,
                                   wer={s: 25.0 * sum(e) / len(e) for s, e in by_subset.items()},
                                   words={s: 4 * len(e) for s, e in by_subset.items()}, eval_dir=str(eval_dir)))
    lines = results_table(results, subsets).splitlines()
    assert "| WER test-clean+test-other [95% CI] |" in lines[0]
    assert lines[0].endswith("| test-unseen-synth: rel. change vs fp32 [95% CI] |")
    assert lines[2].endswith("| - | - |")
    cells = [c.strip() for c in lines[3].strip("|").split("|")]
    assert cells[6] == "18.75% [12.50, 25.00]"  # 3 errors in 16 words, as fp32
    assert cells[7].startswith("+0.0%") and cells[8].startswith("+100.0%")
    assert lines[-1].endswith("test-unseen-synth 4. Intervals: 95%, bootstrap resampling speakers within each subset "
                              "(cluster bootstrap, 1000 resamples, seed 0, paired for the relative change; n.s. = the "
                              "interval contains 0).")
