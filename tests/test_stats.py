"""Per-utterance error counts and bootstrap intervals, against hand-computed values and simulated test sets."""
import numpy as np
import pytest

from fairseq_quant.stats import (
    Interval,
    UttErrors,
    format_utterances,
    paired_relative_change,
    read_utterances,
    speaker_of,
    utterance_errors,
    wer_interval,
)


def test_utterance_errors_count_each_alignment():
    rows = [("u1", "THE CAT SAT", "THE CAT SAT DOWN"), ("u2", "A B C", ""), ("u3", "ONE TWO THREE FOUR", "ONE TOO FOUR")]
    assert utterance_errors(rows) == [
        UttErrors("u1", 3, 0, 0, 1),
        UttErrors("u2", 3, 0, 3, 0),
        UttErrors("u3", 4, 1, 1, 0),
    ]
    with pytest.raises(ValueError, match="u9: empty reference"):
        utterance_errors([("u9", " ", "X")])


def test_per_utterance_file_round_trips(tmp_path):
    rows = [("u1", "THE CAT SAT", "THE CAT SAT DOWN"), ("u2", "A B C", "")]
    path = tmp_path / "test.utt.tsv"
    path.write_text(format_utterances(rows))
    assert path.read_text().splitlines()[1] == "u1\t3\t0\t0\t1\tTHE CAT SAT\tTHE CAT SAT DOWN"
    assert read_utterances(path) == utterance_errors(rows)
    path.write_text("id ref hyp\n")
    with pytest.raises(ValueError, match="not a per-utterance results file"):
        read_utterances(path)


def utts(counts, speakers=None):
    """[(words, errors)] -> UttErrors with the errors as substitutions; ids SPEAKER-1-UTT, by default each
    utterance its own speaker."""
    speakers = range(len(counts)) if speakers is None else speakers
    return [UttErrors(f"{s}-1-{i:04d}", w, e, 0, 0) for i, ((w, e), s) in enumerate(zip(counts, speakers))]


def test_wer_interval_of_a_constant_set_is_a_point():
    ci = wer_interval([utts([(10, 2)] * 5)])
    assert (ci.value, ci.lo, ci.hi) == (20.0, 20.0, 20.0)


def test_wer_interval_pools_subsets_and_brackets_the_estimate():
    clean = utts([(10, 0), (10, 1), (10, 2), (10, 0)] * 10)
    other = utts([(5, 1), (5, 3)] * 10)
    ci = wer_interval([clean, other])
    assert ci.value == pytest.approx(100.0 * (30 + 40) / (400 + 100))
    assert ci.lo < ci.value < ci.hi
    assert wer_interval([clean, other]) == ci  # fixed seed: the same interval every time


def test_paired_relative_change_point_and_identical_systems():
    base = utts([(5, 1), (5, 0)])
    other = utts([(5, 2), (5, 1)])
    change = paired_relative_change([base], [other])
    assert change.value == pytest.approx(200.0)
    same = paired_relative_change([base * 20], [base * 20])
    assert (same.value, same.lo, same.hi) == (0.0, 0.0, 0.0)
    assert not same.excludes_zero


def test_paired_interval_is_narrower_than_unpaired_noise():
    # the other system makes one extra error on 2 of 100 utterances: a +4% change with a tight interval,
    # although each system's own WER interval is several points wide
    base = utts([(10, 1), (10, 0), (10, 0), (10, 4)] * 25)
    worse = [UttErrors(u.utt_id, u.words, u.substitutions + (i in (3, 7)), 0, 0) for i, u in enumerate(base)]
    change = paired_relative_change([base], [worse])
    assert change.value == pytest.approx(100.0 * 2 / 125)
    assert 0.0 <= change.lo and change.hi <= 5.0
    own = wer_interval([base])
    assert own.hi - own.lo > 5.0


def test_paired_comparison_rejects_different_utterances():
    with pytest.raises(ValueError, match="same utterances"):
        paired_relative_change([utts([(5, 1)])], [[UttErrors("x", 5, 1, 0, 0)]])
    with pytest.raises(ValueError, match="WER of 0"):
        paired_relative_change([utts([(5, 0)])], [utts([(5, 1)])])


def test_speaker_of_librispeech_ids():
    assert speaker_of("1234-5678-0003") == "1234"
    assert speaker_of("84-121123-0000") == "84"
    for bad in ("u1", "-5678-0003"):
        with pytest.raises(ValueError, match=f"{bad!r} names no speaker: expected the form SPEAKER-CHAPTER-UTT"):
            speaker_of(bad)
    plain = [UttErrors("u1", 5, 1, 0, 0)]
    with pytest.raises(ValueError, match="'u1' names no speaker"):
        wer_interval([plain])
    assert wer_interval([plain], unit="utterance").value == 20.0


def test_utterance_unit_reproduces_the_previous_numbers():
    # pinned from the utterance bootstrap before speakers were resampled (the ids do not matter to it)
    four = [100 + i % 4 for i in range(40)]
    clean = utts([(10, 0), (10, 1), (10, 2), (10, 0)] * 10, four)
    other = utts([(5, 1), (5, 3)] * 10, four)
    clean2 = utts([(10, i % 3) for i in range(40)], four)
    other2 = utts([(5, (i * 7) % 4) for i in range(20)], four)
    assert wer_interval([clean, other], unit="utterance") == Interval(14.0, 11.2, 17.0)
    assert wer_interval([clean, other], resamples=200, seed=3, unit="utterance") == Interval(
        14.0, 11.395000000000001, 16.205000000000002)
    assert paired_relative_change([clean, other], [clean2, other2], unit="utterance") == Interval(
        -1.4285714285714286, -23.171173559561684, 25.433296883542912)
    assert paired_relative_change([clean, other], [clean2, other2], resamples=300, seed=7, level=0.9,
                                  unit="utterance") == Interval(-1.4285714285714286, -21.351004016064255,
                                                                19.46458185264157)


def test_speaker_interval_is_wider_when_speakers_differ():
    # 10 speakers of 10 identical utterances each, making 0..9 errors in 10 words: 100 utterances look like a lot
    # of evidence, but there are only 10 voices
    counts = [(10, s) for s in range(10) for _ in range(10)]
    speakers = [s for s in range(10) for _ in range(10)]
    group = utts(counts, speakers)
    spk, utt = wer_interval([group]), wer_interval([group], unit="utterance")
    assert spk.value == utt.value == 45.0
    assert spk.hi - spk.lo > 2.5 * (utt.hi - utt.lo)
    assert spk.lo < 30.0 and spk.hi > 60.0 and utt.lo > 38.0 and utt.hi < 52.0


def test_speaker_bootstrap_is_the_utterance_bootstrap_of_speaker_totals():
    # utterances of speakers 3, 12 and 5 interleaved: each draw takes a speaker's summed errors and words
    group = utts([(10, 1), (8, 4), (6, 0), (10, 2), (8, 1), (6, 3), (9, 0)], [3, 12, 5, 3, 12, 5, 3])
    totals = [UttErrors("12-1-0000", 16, 5, 0, 0), UttErrors("3-1-0000", 29, 3, 0, 0),
              UttErrors("5-1-0000", 12, 3, 0, 0)]  # in the order of the sorted speaker ids
    for seed in (0, 1):
        assert wer_interval([group], seed=seed) == wer_interval([totals], seed=seed, unit="utterance")


def test_one_speaker_per_subset_gives_a_point_interval():
    clean = utts([(10, 0), (10, 3), (8, 1)], [7, 7, 7])
    other = utts([(5, 2), (5, 0)], [9, 9])
    ci = wer_interval([clean, other])
    assert ci.lo == ci.value == ci.hi == pytest.approx(100 * 6 / 38)
    assert wer_interval([clean, other], unit="utterance").hi > ci.value
    worse = [utts([(10, 1), (10, 3), (8, 1)], [7, 7, 7]), other]
    ch = paired_relative_change([clean, other], worse)
    assert ch.lo == ch.value == ch.hi == pytest.approx(100 / 6)


def test_paired_change_draws_the_same_speakers_for_both_systems():
    # the other system makes twice the errors on every utterance: +100% in every paired resample,
    # although the speakers' WERs differ widely
    speakers = [s for s in range(8) for _ in range(5)]
    base = utts([(10, s % 4 + u % 2) for s in range(8) for u in range(5)], speakers)
    double = [UttErrors(u.utt_id, u.words, 2 * u.substitutions, 0, 0) for u in base]
    ch = paired_relative_change([base], [double])
    assert (ch.value, ch.lo, ch.hi) == (100.0, 100.0, 100.0)


def test_unknown_unit_is_rejected():
    group = utts([(5, 1), (5, 2)])
    with pytest.raises(ValueError, match="unit 'bogus': expected one of 'speaker', 'utterance'"):
        wer_interval([group], unit="bogus")
    with pytest.raises(ValueError, match="unit 'bogus'"):
        paired_relative_change([group], [group], unit="bogus")


# simulated test sets with speaker effects: per subset 40 speakers of 20 utterances of 10 words; a speaker's error
# rate is drawn from Beta(mean, concentration 4) (per-speaker WERs from ~0 to ~50%, as on real test sets), its
# utterances' errors are binomial. The other system adds errors at a speaker's own extra rate (Beta, same
# concentration). With equal words everywhere the population WER is the mean of the subsets' mean rates.
SUBSETS = ((0.06, 0.01), (0.18, 0.03))  # (population error rate, extra error rate of the other system)


def simulated_test_set(rng, speakers=40, per_speaker=20, words=10, concentration=4.0):
    base, other = [], []
    for sub, (mean, extra) in enumerate(SUBSETS):
        p = rng.beta(mean * concentration, (1 - mean) * concentration, size=speakers)
        q = rng.beta(extra * concentration, (1 - extra) * concentration, size=speakers)
        err = rng.binomial(words, p[:, None], size=(speakers, per_speaker))
        more = rng.binomial(words, q[:, None], size=(speakers, per_speaker))
        ids = [f"{1000 * sub + s}-1-{u:04d}" for s in range(speakers) for u in range(per_speaker)]
        base.append([UttErrors(i, words, int(e), 0, 0) for i, e in zip(ids, err.ravel())])
        other.append([UttErrors(i, words, int(e), 0, 0) for i, e in zip(ids, (err + more).ravel())])
    return base, other


def test_speaker_intervals_cover_the_population_wer_and_utterance_intervals_do_not():
    true_wer = 100 * np.mean([m for m, _ in SUBSETS])
    true_change = 100 * sum(x for _, x in SUBSETS) / sum(m for m, _ in SUBSETS)
    rng = np.random.default_rng(0)
    covered = {k: 0 for k in ("wer speaker", "wer utterance", "change speaker", "change utterance")}
    trials = 200
    for _ in range(trials):
        base, other = simulated_test_set(rng)
        for unit in ("speaker", "utterance"):
            ci = wer_interval(base, resamples=400, unit=unit)
            covered[f"wer {unit}"] += ci.lo <= true_wer <= ci.hi
            ch = paired_relative_change(base, other, resamples=400, unit=unit)
            covered[f"change {unit}"] += ch.lo <= true_change <= ch.hi
    rate = {k: v / trials for k, v in covered.items()}
    assert 0.88 <= rate["wer speaker"] <= 0.99, rate
    assert rate["wer utterance"] < 0.6, rate
    assert 0.85 <= rate["change speaker"] <= 0.99, rate
    assert rate["change utterance"] < 0.6, rate
