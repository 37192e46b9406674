"""Word errors, counted one way everywhere (fairseq evaluation, the runtime, the recipe, the statistics): jiwer's
alignment of each utterance, summed over a corpus (total errors over total reference words, not a mean of
utterance WERs); and the per-utterance results file every decoder writes. Plain Python (jiwer): the runtime and
the fairseq plugin share it."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import jiwer

UTT_HEADER = "utt_id\twords\tsub\tdel\tins\treference\thypothesis\n"


@dataclass(frozen=True)
class UttErrors:
    """Alignment counts of one utterance."""

    utt_id: str
    words: int
    substitutions: int
    deletions: int
    insertions: int

    @property
    def errors(self) -> int:
        return self.substitutions + self.deletions + self.insertions


def utterance_errors(rows: list[tuple[str, str, str]]) -> list[UttErrors]:
    """[(utt_id, reference, hypothesis)] -> per-utterance counts (an empty hypothesis is all deletions).
    An empty reference is an error: WER is undefined for it."""
    out = []
    for utt_id, ref, hyp in rows:
        if not ref.strip():
            raise ValueError(f"{utt_id}: empty reference transcript: WER is undefined for it")
        if hyp.strip():
            m = jiwer.process_words(ref, hyp)
            out.append(UttErrors(utt_id, m.hits + m.substitutions + m.deletions, m.substitutions, m.deletions,
                                 m.insertions))
        else:
            words = len(ref.split())
            out.append(UttErrors(utt_id, words, 0, words, 0))
    return out


def corpus_wer(utts: list[UttErrors]) -> dict:
    """Totals and the corpus WER in percent of a list of per-utterance counts."""
    if not utts:
        raise ValueError("no utterances to score")
    words = sum(u.words for u in utts)
    sub, dele, ins = (sum(getattr(u, k) for u in utts) for k in ("substitutions", "deletions", "insertions"))
    return {"utterances": len(utts), "words": words, "substitutions": sub, "deletions": dele, "insertions": ins,
            "wer": 100.0 * (sub + dele + ins) / words}


def word_error_rate(refs: list[str], hyps: list[str]) -> dict:
    """Corpus-level WER in percent of parallel lists: total errors over total reference words."""
    if len(refs) != len(hyps):
        raise ValueError(f"{len(refs)} references but {len(hyps)} hypotheses")
    totals = corpus_wer(utterance_errors([(f"utterance {i + 1}", r, h) for i, (r, h) in enumerate(zip(refs, hyps))]))
    return {k: totals[k] for k in ("words", "substitutions", "deletions", "insertions", "wer")}


def format_utterances(rows: list[tuple[str, str, str]], utts: list[UttErrors] | None = None) -> str:
    """The per-utterance results file: a TSV of id, word count, S, D, I, reference and hypothesis."""
    utts = utterance_errors(rows) if utts is None else utts
    lines = [UTT_HEADER]
    for (utt_id, ref, hyp), u in zip(rows, utts):
        lines.append(f"{utt_id}\t{u.words}\t{u.substitutions}\t{u.deletions}\t{u.insertions}\t{ref}\t{hyp}\n")
    return "".join(lines)


def read_utterances(path) -> list[UttErrors]:
    """Per-utterance counts from a file written by :func:`format_utterances`."""
    text = Path(path).read_text()
    if not text.startswith(UTT_HEADER):
        raise ValueError(f"{path}: not a per-utterance results file (expected header {UTT_HEADER.strip()!r})")
    out = []
    for n, line in enumerate(text.splitlines()[1:], start=2):
        fields = line.split("\t")
        if len(fields) != 7:
            raise ValueError(f"{path}:{n}: expected 7 tab-separated fields, got {len(fields)}")
        out.append(UttErrors(fields[0], *map(int, fields[1:5])))
    return out


__all__ = ["UTT_HEADER", "UttErrors", "corpus_wer", "format_utterances", "read_utterances", "utterance_errors",
           "word_error_rate"]
