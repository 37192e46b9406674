"""CTC prefix scores for joint CTC/attention beam search, in numpy (no torch, no fairseq).

The prefix score of a hypothesis h under the CTC head is log P_ctc(h... ), the probability that the CTC
output starts with h (Watanabe et al., "Hybrid CTC/Attention Architecture for End-to-End Speech
Recognition", 2017, Algorithm 2; ESPnet's CTCPrefixScore). A hypothesis ending in EOS scores log P_ctc(h),
the whole sequence. Beam search adds ``weight * (prefix score of h + c - prefix score of h)`` to the
attention decoder's ``(1 - weight) * log p(c | h)``, so a finished hypothesis's score is the weighted sum
of both models' log-probabilities.

The scorer is vectorised over hypotheses (rows) and over the candidate tokens of each row: beam search
scores only each row's ``pre_beam`` most likely tokens under the attention decoder (ESPnet's partial
scoring); the others get -inf. Frames beyond an utterance's length emit blank with probability 1, so
utterances of different lengths share one padded array.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

NEG_INF = -1e30  # finite: logaddexp(-inf, -inf) would warn, and -inf - -inf is nan


@dataclass
class CTCState:
    """Forward variables of each row's prefix: r[t, 0, n] ends in its last token at frame t, r[t, 1, n] in
    blank; ``score[n]`` is the prefix score of row n."""
    r: np.ndarray  # [frames, 2, rows]
    score: np.ndarray  # [rows]


@dataclass
class CTCCandidates:
    """The prefix scores and forward variables of every scored (row, token) extension."""
    tokens: np.ndarray  # [rows, k]
    scores: np.ndarray  # [rows, k] prefix scores of h + token
    r: np.ndarray  # [frames, 2, rows, k]


class CTCPrefixScorer:
    """Prefix scores of a batch of hypotheses, from CTC log-probabilities ``log_probs`` [rows, frames, vocab]
    (rows already repeated per beam) with valid lengths ``lengths`` [rows]."""

    def __init__(self, log_probs: np.ndarray, lengths: np.ndarray, blank: int, eos: int):
        log_probs = np.asarray(log_probs, dtype=np.float32)
        if log_probs.ndim != 3:
            raise ValueError(f"CTC log-probabilities must be [rows, frames, vocab], got {list(log_probs.shape)}")
        rows, frames, vocab = log_probs.shape
        lengths = np.asarray(lengths, dtype=np.int64)
        if lengths.shape != (rows,) or (lengths < 1).any() or (lengths > frames).any():
            raise ValueError(f"lengths must be {rows} values in [1, {frames}], got {lengths.tolist()}")
        x = np.maximum(log_probs, NEG_INF).transpose(1, 0, 2).copy()  # [frames, rows, vocab]
        beyond = np.arange(frames)[:, None] >= lengths[None, :]  # padding frames: blank with probability 1
        x[beyond] = NEG_INF
        x[beyond, blank] = 0.0
        self.x, self.blank, self.eos = x, blank, eos
        self.frames, self.rows, self.vocab = frames, rows, vocab

    def initial_state(self) -> CTCState:
        """The empty prefix: all frames blank so far."""
        r = np.full((self.frames, 2, self.rows), NEG_INF, dtype=np.float32)
        r[:, 1] = np.cumsum(self.x[:, :, self.blank], axis=0)
        return CTCState(r, np.zeros(self.rows, dtype=np.float32))

    def take(self, rows: np.ndarray) -> "CTCPrefixScorer":
        """This scorer restricted to ``rows`` (sentences leaving the batch); the state is taken separately."""
        out = object.__new__(CTCPrefixScorer)
        out.__dict__.update(self.__dict__)
        out.x = self.x[:, rows]
        out.rows = len(rows)
        return out

    def extend(self, state: CTCState, prefix_len: int, last: np.ndarray, tokens: np.ndarray) -> CTCCandidates:
        """Prefix scores of every row's prefix extended by each of its candidate ``tokens`` [rows, k].

        ``prefix_len``: tokens in the rows' prefixes (all rows have the same, without BOS); ``last``: each
        row's last token (ignored when ``prefix_len`` is 0). EOS scores the whole sequence; blank -inf."""
        rows, k = tokens.shape
        frames, x = self.frames, self.x
        xs = x[:, np.arange(rows)[:, None], tokens]  # [T, rows, k]: each candidate's log-probability per frame
        r_prev = state.r
        r_sum = np.logaddexp(r_prev[:, 0], r_prev[:, 1])  # [T, rows]
        # d[t] = (phi[t], r1[t], r0[t]) side by side, so that one log-sum-exp and one addition per frame update
        # both forward variables: (r0[t], r1[t]) = logaddexp(r0[t-1], (phi[t-1], r1[t-1])) + (x[t, c], x[t, blank]),
        # written into the reversed view d[t, 2:0:-1]
        d = np.empty((frames, 3, rows, k), dtype=np.float32)
        # phi: probability of the prefix ending at t such that the new token may follow it directly at t + 1; a
        # repeated token needs a blank in between
        phi = d[:, 0]
        phi[...] = r_sum[:, :, None]
        if prefix_len > 0:
            same = tokens == np.asarray(last)[:, None]
            phi[:, same] = np.broadcast_to(r_prev[:, 1, :, None], (frames, rows, k))[:, same]
        # the prefix plus the new token needs prefix_len + 1 frames: before frame prefix_len both forward
        # variables stay impossible, and the recursion starts there
        start = max(1, prefix_len)
        d[:start, 1:] = NEG_INF
        if prefix_len == 0:
            d[0, 2] = xs[0]
        emit = np.empty((frames, 2, rows, k), dtype=np.float32)  # (x[t, c], x[t, blank]) in r's order
        emit[:, 0] = xs
        emit[:, 1] = x[:, :, self.blank][:, :, None]
        r = d[:, 2:0:-1]  # [T, 2, rows, k]: (r0, r1)
        for t in range(start, frames):
            np.logaddexp(d[t - 1, 2:3], d[t - 1, 0:2], out=r[t])
            np.add(r[t], emit[t], out=r[t])
        # psi: the new token emitted first at any frame, one log-sum-exp over the frames
        terms = np.concatenate([d[:1, 2], phi[:-1] + xs[1:]])  # [T, rows, k]
        top = terms.max(axis=0)
        psi = top + np.log(np.exp(terms - top).sum(axis=0))
        psi = np.where(tokens == self.eos, r_sum[-1][:, None], psi)
        psi = np.where(tokens == self.blank, NEG_INF, psi)
        return CTCCandidates(tokens, psi.astype(np.float32), r)

    @staticmethod
    def select(cands: CTCCandidates, rows: np.ndarray, tokens: np.ndarray) -> CTCState:
        """The state of the extensions chosen by beam search: row ``rows[i]`` extended by ``tokens[i]``
        (each must have been among that row's candidates)."""
        rows, tokens = np.asarray(rows), np.asarray(tokens)
        match = cands.tokens[rows] == tokens[:, None]
        if not match.any(axis=1).all():
            bad = int(np.flatnonzero(~match.any(axis=1))[0])
            raise ValueError(f"token {int(tokens[bad])} was not scored for row {int(rows[bad])}")
        col = match.argmax(axis=1)
        return CTCState(cands.r[:, :, rows, col], cands.scores[rows, col])


def pre_beam_size(beam: int) -> int:
    """Tokens scored by the CTC head per hypothesis and step: ESPnet's 1.5 x beam."""
    return max(int(1.5 * beam), 2)


def joint_scores(att_lprobs: np.ndarray, scorer: CTCPrefixScorer, state: CTCState, prefix_len: int,
                 last: np.ndarray, weight: float, pre_beam: int, keep: tuple[int, ...] = ()) -> tuple[np.ndarray, CTCCandidates]:
    """[rows, vocab] step scores of joint decoding: ``(1 - weight) * att + weight * (ctc(h + c) - ctc(h))`` for
    each row's ``pre_beam`` best tokens under the attention decoder (and the tokens ``keep``, e.g. EOS), -inf
    for the rest; and the scored candidates (for :meth:`CTCPrefixScorer.select`)."""
    att = np.asarray(att_lprobs, dtype=np.float32)
    k = min(pre_beam, att.shape[1])
    top = np.argpartition(-att, k - 1, axis=1)[:, :k]
    if keep:
        top = np.concatenate([top, np.broadcast_to(np.array(keep, dtype=top.dtype), (len(top), len(keep)))], axis=1)
    cands = scorer.extend(state, prefix_len, last, top)
    out = np.full_like(att, -np.inf)
    att_top = np.take_along_axis(att, top, axis=1)
    joint = (1.0 - weight) * att_top + weight * (cands.scores - state.score[:, None])
    joint = np.where((att_top <= NEG_INF) | ~np.isfinite(att_top) | (cands.scores <= NEG_INF / 2), -np.inf, joint)
    np.put_along_axis(out, top, joint, axis=1)
    return out, cands


__all__ = ["CTCCandidates", "CTCPrefixScorer", "CTCState", "joint_scores", "pre_beam_size"]
