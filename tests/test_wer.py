"""Corpus-level WER against hand-computed examples, and the files evaluation writes."""
import pytest

from fairseq_quant.evaluate import SubsetResult, atomic_write_text, format_table, word_error_rate


def test_wer_is_total_errors_over_total_reference_words():
    refs = ["THE CAT SAT ON THE MAT", "HELLO WORLD", "A B C D"]
    hyps = ["THE CAT SAT ON MAT", "HELLO THERE WORLD", "A X C D"]
    # 1 deletion (THE) / 1 insertion (THERE) / 1 substitution (B->X) over 6 + 2 + 4 = 12 words
    out = word_error_rate(refs, hyps)
    assert out == {"words": 12, "substitutions": 1, "deletions": 1, "insertions": 1, "wer": 25.0}


def test_wer_pools_words_instead_of_averaging_utterances():
    # per-utterance WERs are 100% and 0%; their mean would be 50%, the corpus WER is 1/5 = 20%
    out = word_error_rate(["ONE", "TWO THREE FOUR FIVE"], ["WON", "TWO THREE FOUR FIVE"])
    assert out["wer"] == pytest.approx(20.0)


def test_empty_hypothesis_counts_every_word_deleted_and_insertions_can_exceed_100_percent():
    assert word_error_rate(["A B C"], [""])["wer"] == pytest.approx(100.0)
    out = word_error_rate(["A"], ["A B C D"])
    assert out["insertions"] == 3 and out["wer"] == pytest.approx(300.0)


def test_wer_rejects_bad_input():
    with pytest.raises(ValueError, match="2 references but 1 hypotheses"):
        word_error_rate(["A", "B"], ["A"])
    with pytest.raises(ValueError, match="empty reference transcript"):
        word_error_rate(["A", " "], ["A", "B"])
    with pytest.raises(ValueError, match="no utterances"):
        word_error_rate([], [])


def test_atomic_write_leaves_no_partial_file(tmp_path):
    target = tmp_path / "out" / "wer.json"
    atomic_write_text(target, "first\n")
    assert target.read_text() == "first\n"


    with pytest.raises(TypeError):
        atomic_write_text(target, 12345)  # fails mid-write: the old content stays, no temporary file is left
    assert target.read_text() == "first\n"
    assert [p.name for p in target.parent.iterdir()] == ["wer.json"]


def test_atomic_writes_get_the_permissions_open_would_give(tmp_path):
    """Not mkstemp's 0600: a results file or model file is readable as any other file the user writes."""
    import os

    from fairseq_quant_runtime.files import atomic_output

    mask = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "wer.json", "{}\n")
        with atomic_output(tmp_path / "model.fqm") as tmp:
            tmp.write_bytes(b"x")
        plain = tmp_path / "plain.txt"
        plain.write_text("x")
    finally:
        os.umask(mask)
    for name in ("wer.json", "model.fqm"):
        assert (tmp_path / name).stat().st_mode & 0o777 == plain.stat().st_mode & 0o777 == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.fqm", "plain.txt", "wer.json"]


def test_markdown_table():
    table = format_table([SubsetResult("test-clean", 2, 10, 1, 0, 1, 20.0, 1.5)])
    assert table == ("| subset | utterances | words | sub | del | ins | WER % |\n|---|---:|---:|---:|---:|---:|---:|\n"
                     "| test-clean | 2 | 10 | 1 | 0 | 1 | 20.00 |\n")
