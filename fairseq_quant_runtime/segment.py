"""Long inputs in segments: the encoder attends over its whole input at once (time and memory grow with the square
of its length, and the model never saw an utterance longer than its training data), so audio longer than
``max_seconds`` is cut at its quietest 10 ms frame within the last ``search_seconds`` before each limit, and the
segments are decoded separately (in batches) and their transcripts joined. Time is linear in the input's length
and memory bounded by the segment length. numpy only."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

FRAME = 160  # samples per 10 ms at 16 kHz
MIN_TAIL = 100  # frames: a last piece shorter than 1 s is not decoded alone (the segment before it takes it)


@dataclass(frozen=True)
class SegmentConfig:
    """``max_seconds``: the longest segment decoded in one piece (the reference model was trained on utterances
    of up to about 10 s); ``search_seconds``: how far before that limit a cut may move to find silence."""

    max_seconds: float = 20.0
    search_seconds: float = 5.0

    def __post_init__(self):
        if not (isinstance(self.max_seconds, (int, float)) and 1.0 <= self.max_seconds <= 600.0):
            raise ValueError(f"max_seconds must be in [1, 600], got {self.max_seconds!r}")
        if not (isinstance(self.search_seconds, (int, float)) and 0.0 < self.search_seconds < self.max_seconds):
            raise ValueError(f"search_seconds must be in (0, max_seconds), got {self.search_seconds!r}")


def frame_energy(samples: np.ndarray) -> np.ndarray:
    """Mean square of each whole 10 ms frame of 16 kHz ``samples`` (vectorised)."""
    n = samples.shape[0] // FRAME
    frames = samples[: n * FRAME].astype(np.float64).reshape(n, FRAME)
    return np.einsum("ij,ij->i", frames, frames) / FRAME


def segments(samples: np.ndarray, config: SegmentConfig = SegmentConfig()) -> list[tuple[int, int]]:
    """[(start, end)] sample ranges that cover ``samples`` (16 kHz) in order, each at most ``max_seconds`` long
    (the last one up to 1 s longer, rather than leave a piece under 1 s); an input that fits is one segment. Each cut lies on the lowest-energy frame boundary of the search window
    (the latest such frame on ties)."""
    total = samples.shape[0]
    limit = int(config.max_seconds * 100)  # frames
    search = max(1, int(config.search_seconds * 100))
    if total <= limit * FRAME:
        return [(0, total)]
    energy = frame_energy(samples)
    out, start = [], 0  # in frames
    while total - start * FRAME > limit * FRAME:
        lo, hi = start + limit - search, start + limit  # candidate cut frames, the cut falls before frame k
        window = energy[lo:hi]
        k = lo + (len(window) - 1 - int(np.argmin(window[::-1])))  # the latest minimum
        out.append((start * FRAME, k * FRAME))
        start = k
    if total - start * FRAME < MIN_TAIL * FRAME:  # a tail too short to decode alone joins the last segment
        out[-1] = (out[-1][0], total)
    else:
        out.append((start * FRAME, total))
    return out


__all__ = ["SegmentConfig", "frame_energy", "segments"]
