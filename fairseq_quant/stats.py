"""Word error counts per utterance and paired bootstrap confidence intervals for WER comparisons.

WER over a set is total errors / total reference words. Comparing two systems on the same utterances,
the paired bootstrap (Bisani and Ney 2004; Koehn 2004) resamples the test set with replacement, recomputes
both corpus WERs on each resample and reads the interval of the statistic off the resampled values.
Subsets (test-clean, test-other) are resampled separately and pooled, so each keeps its weight.
By default the resampled unit is the speaker, not the utterance (a cluster bootstrap, Bisani and Ney 2004):
a drawn speaker brings all its utterances. WER varies far more between voices than within one, so utterance
resampling gives intervals that are too narrow for the question "how would it do on new speakers".
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

# the per-utterance counts and results file are shared with the runtime (one way of counting words)
from fairseq_quant_runtime.wer import (  # noqa: F401
    UTT_HEADER, UttErrors, format_utterances, read_utterances, utterance_errors,
)

DEFAULT_RESAMPLES = 1000
DEFAULT_SEED = 0
UNITS = ("speaker", "utterance")


@dataclass(frozen=True)
class Interval:
    """A point estimate with a (lo, hi) confidence interval, in percent."""

    value: float
    lo: float
    hi: float

    def format(self, signed: bool = False, digits: int = 1) -> str:
        f = f"{{:+.{digits}f}}" if signed else f"{{:.{digits}f}}"
        return f"{f.format(self.value)}% [{f.format(self.lo)}, {f.format(self.hi)}]"

    @property
    def excludes_zero(self) -> bool:
        return self.lo > 0 or self.hi < 0


def speaker_of(utt_id: str) -> str:
    """The speaker of a LibriSpeech-style utterance id ``SPEAKER-CHAPTER-UTT``: the part before the first '-'."""
    speaker, sep, _ = utt_id.partition("-")
    if not sep or not speaker:
        raise ValueError(f"utterance id {utt_id!r} names no speaker: expected the form SPEAKER-CHAPTER-UTT")
    return speaker


def _arrays(groups: list[list[UttErrors]], unit: str) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per subset: errors and words of each resampling unit (an utterance, or all utterances of a speaker)."""
    out = []
    for g in groups:
        err, wrd = (np.array([getattr(u, k) for u in g], dtype=np.int64) for k in ("errors", "words"))
        if unit == "speaker":
            spk = np.unique([speaker_of(u.utt_id) for u in g], return_inverse=True)[1].ravel()
            err, wrd = (np.bincount(spk, weights=a).astype(np.int64) for a in (err, wrd))
        out.append((err, wrd))
    return out


def _check_groups(name: str, groups: list[list[UttErrors]], unit: str) -> None:
    if unit not in UNITS:
        raise ValueError(f"{name}: unit {unit!r}: expected one of {', '.join(map(repr, UNITS))}")
    if not groups or any(len(g) == 0 for g in groups):
        raise ValueError(f"{name}: every subset needs at least one utterance")


def wer_interval(groups: list[list[UttErrors]], resamples: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED,
                 level: float = 0.95, unit: str = "speaker") -> Interval:
    """Pooled WER (%) of the groups with its bootstrap interval; ``unit``: what is resampled within each subset,
    "speaker" (all utterances of a drawn speaker) or "utterance"."""
    _check_groups("wer_interval", groups, unit)
    arrays = _arrays(groups, unit)
    point = 100.0 * sum(e.sum() for e, _ in arrays) / sum(w.sum() for _, w in arrays)
    rng = np.random.default_rng(seed)
    samples = []
    for err, wrd in arrays:
        idx = rng.integers(0, len(err), size=(resamples, len(err)))
        samples.append((err[idx].sum(1), wrd[idx].sum(1)))
    wer = 100.0 * sum(e for e, _ in samples) / sum(w for _, w in samples)
    lo, hi = np.percentile(wer, [50 * (1 - level), 100 - 50 * (1 - level)])
    return Interval(float(point), float(lo), float(hi))


def paired_relative_change(base: list[list[UttErrors]], other: list[list[UttErrors]],
                           resamples: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED,
                           level: float = 0.95, unit: str = "speaker") -> Interval:
    """Relative WER change (%) of ``other`` against ``base`` on the same utterances, with the paired
    bootstrap interval: 100 * (WER_other - WER_base) / WER_base, both WERs from the same resample (the same
    draw of speakers, or of utterances with unit="utterance")."""
    _check_groups("paired_relative_change", base, unit)
    if len(base) != len(other):
        raise ValueError(f"{len(base)} subsets against {len(other)}")
    for b, o in zip(base, other):
        if [u.utt_id for u in b] != [u.utt_id for u in o]:
            raise ValueError("paired comparison needs the same utterances in the same order in both systems")
        if [u.words for u in b] != [u.words for u in o]:
            raise ValueError("paired comparison: reference word counts differ (different references?)")
    base_a, other_a = _arrays(base, unit), _arrays(other, unit)
    base_err = sum(e.sum() for e, _ in base_a)
    if base_err == 0:
        raise ValueError("relative change against a WER of 0 is undefined")
    point = 100.0 * (sum(e.sum() for e, _ in other_a) - base_err) / base_err
    rng = np.random.default_rng(seed)
    b_sum = np.zeros(resamples, dtype=np.int64)
    o_sum = np.zeros(resamples, dtype=np.int64)
    for (b_err, _), (o_err, _) in zip(base_a, other_a):
        idx = rng.integers(0, len(b_err), size=(resamples, len(b_err)))
        b_sum += b_err[idx].sum(1)
        o_sum += o_err[idx].sum(1)
    # the words of a resample are the same for both systems: the ratio of WERs is the ratio of errors
    rel = 100.0 * (o_sum - b_sum) / np.maximum(b_sum, 1)
    lo, hi = np.percentile(rel, [50 * (1 - level), 100 - 50 * (1 - level)])
    return Interval(float(point), float(lo), float(hi))




