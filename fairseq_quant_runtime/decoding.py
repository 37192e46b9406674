"""One decoding configuration for every decoder of the project: fairseq evaluation (``scripts/evaluate.py``), the
runtime (CLI and :class:`~fairseq_quant_runtime.recognizer.Recognizer`), the strategy search, the sensitivity
script, the recipe and the benchmarks. One set of defaults, validated once: an invalid value is one clear error
naming its flag, never a silent fallback (``--beam 0`` used to decode greedily without the CTC head).

Plain Python: the runtime and the fairseq plugin both import it.
"""
from __future__ import annotations

import argparse
import math
from dataclasses import asdict, dataclass

# joint CTC/attention decoding of models with a CTC head: chosen on dev-clean and dev-other (see README)
DEFAULT_CTC_WEIGHT = 0.5
# padded 10 ms frames per batch of utterances: the encoder's first convolutions hold 64 channels at full time and
# frequency resolution, so a batch's memory grows with it (500 test-clean utterances, runtime, 1 thread: 6000
# frames peaked at 263 MB, 3000 at 195 MB, 1500 at 169 MB, 1000 at 167 MB, and 1500 was also the fastest)
BATCH_FRAMES = 1500


def length_batches(lengths, batch_frames: int = BATCH_FRAMES) -> list[list[int]]:
    """Indices of ``lengths`` (frames) sorted by length and cut into batches of at most ``batch_frames`` padded
    frames (an item longer than that is a batch of its own): the batches of every decoder of the project."""
    batches, batch = [], []
    for i in sorted(range(len(lengths)), key=lambda i: lengths[i]):
        if batch and (len(batch) + 1) * max(lengths[i], 1) > batch_frames:
            batches.append(batch)
            batch = []
        batch.append(i)
    return batches + ([batch] if batch else [])


class DecodingError(ValueError):
    """An invalid decoding setting; the message names the flag."""


@dataclass(frozen=True)
class DecodingConfig:
    """How hypotheses are searched.

    ``beam`` 1 is greedy search (the attention decoder alone); ``ctc_weight`` None means DEFAULT_CTC_WEIGHT for a
    model with a CTC head and 0 otherwise; a hypothesis stops at ``max_len_a * frames + max_len_b`` tokens
    (frames of 10 ms: 0.2 allows 20 tokens a second of audio); ``len_penalty`` divides a finished hypothesis's score
    by its length to that power (fairseq's ``--lenpen``)."""

    beam: int = 5
    ctc_weight: float | None = None
    max_len_a: float = 0.2
    max_len_b: int = 10
    len_penalty: float = 1.0

    def __post_init__(self):
        if not _is_int(self.beam) or self.beam < 1:
            raise DecodingError(f"--beam must be an integer >= 1 (1: greedy search), got {self.beam!r}")
        if self.ctc_weight is not None:
            if not _is_real(self.ctc_weight) or not 0.0 <= self.ctc_weight <= 1.0:
                raise DecodingError(f"--ctc-weight must be in [0, 1] (0: the attention decoder alone), "
                                    f"got {self.ctc_weight!r}")
            if self.beam == 1 and self.ctc_weight > 0:
                raise DecodingError("--beam 1 is greedy search with the attention decoder alone: joint CTC "
                                    f"decoding (--ctc-weight {self.ctc_weight}) needs --beam >= 2")
        if not _is_real(self.max_len_a) or self.max_len_a < 0:
            raise DecodingError(f"--max-len-a must be a number >= 0 (tokens per 10 ms frame), got {self.max_len_a!r}")
        if not _is_int(self.max_len_b) or self.max_len_b < 1:
            raise DecodingError(f"--max-len-b must be an integer >= 1 (tokens), got {self.max_len_b!r}")
        if not _is_real(self.len_penalty):
            raise DecodingError(f"--len-penalty must be a finite number, got {self.len_penalty!r}")

    def joint_weight(self, has_ctc: bool) -> float:
        """The CTC weight used for a model with or without a CTC head."""
        if self.ctc_weight is None:
            return DEFAULT_CTC_WEIGHT if has_ctc and self.beam > 1 else 0.0
        if self.ctc_weight > 0 and not has_ctc:
            raise DecodingError(f"--ctc-weight {self.ctc_weight}: the model has no CTC head; pass 0")
        return float(self.ctc_weight)

    def max_len(self, frames: int) -> int:
        return int(self.max_len_a * frames + self.max_len_b)

    def to_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        """The decoding flags, with their defaults in ``--help``."""
        d = DecodingConfig()
        group = parser.add_argument_group("decoding")
        group.add_argument("--beam", type=int, default=d.beam, help=f"beam size; 1: greedy search (default {d.beam})")
        group.add_argument("--ctc-weight", type=float, default=None,
                           help=f"joint CTC/attention beam search with this CTC weight in [0, 1] (default "
                                f"{DEFAULT_CTC_WEIGHT} for a model with a CTC head; 0: the attention decoder alone)")
        group.add_argument("--max-len-a", type=float, default=d.max_len_a,
                           help=f"hypothesis length limit per 10 ms input frame (default {d.max_len_a}: 20 tokens a "
                                "second)")
        group.add_argument("--max-len-b", type=int, default=d.max_len_b,
                           help=f"hypotheses stop at a * frames + b tokens (default {d.max_len_b})")
        group.add_argument("--len-penalty", type=float, default=d.len_penalty,
                           help=f"a finished hypothesis's score is divided by its length to this power "
                                f"(default {d.len_penalty})")

    @classmethod
    def from_args(cls, args) -> DecodingConfig:
        return cls(beam=args.beam, ctc_weight=args.ctc_weight, max_len_a=args.max_len_a, max_len_b=args.max_len_b,
                   len_penalty=args.len_penalty)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


__all__ = ["BATCH_FRAMES", "DEFAULT_CTC_WEIGHT", "DecodingConfig", "DecodingError", "length_batches"]
