"""Per-utterance error counts and bootstrap intervals, against hand-computed values."""
import pytest

from fairseq_quant.stats import (
    UttErrors,
    format_utterances,
    paired_relative_change,
    read_utterances,
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


def utts(counts):
    """[(words, errors)] -> UttErrors with the errors as substitutions."""
    return [UttErrors(f"u{i}", w, e, 0, 0) for i, (w, e) in enumerate(counts)]


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
