"""Generate a synthetic speech corpus in the exact LibriSpeech layout with several synthesizers.

Each "speaker" is a `Voice`: an espeak-ng formant voice configuration (accent + variant + pitch + speed + word
gap) or, in the multi-synthesizer corpora (`synth_mix`), a flite or festival voice built from recordings of a
real speaker (F0 target + duration stretch + speed perturbation). Sentences come from the grammar in
`sentences.py`. Audio is synthesised, resampled to 16 kHz, given a random gain and (for *-other, or mildly for
*-clean) noise, and written as 16-bit mono FLAC. Everything is derived from one seed. SPEAKERS.TXT names each
speaker's voice; VOICES.json records its back-end, family and configuration.

With `synth_mix` the corpus has a sixth subset, `test-unseen-synth`, spoken only by flite's clustergen voices
(HELD_OUT_FAMILY), which no training speaker uses.

    python -m recipes.librispeech.generate_corpus --out DIR --seed 0 --size quick
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torchaudio.functional as AF
from tqdm import tqdm

from recipes.librispeech.sentences import MAX_WORDS, sentences

# 2: every utterance has a noise floor (no digital silence); 3: lexicon, max_words, train_other, synth_train
FORMAT_VERSION = 3
MULTISYNTH_FORMAT_VERSION = 4  # 4: several synthesizers (synth_mix) and test-unseen-synth
SAMPLE_RATE = 16000
MARKER = ".complete"

# size -> generation parameters; dev/test counts are per subset. `lexicon`: words per grammar word list
# (None: the whole grammar, about 2,700 words; 4: a closed vocabulary of about 330 words); `max_words`:
# longest sentence; `train_other`: fraction of training speakers recorded in *-other conditions (wider
# pitch/speed, 10-20 dB SNR; never the rough voices, which stay unseen).
SIZES = {
    "tiny": dict(num_train=24, num_dev=6, num_test=6),
    "quick": dict(num_train=1500, num_dev=100, num_test=100),
    "default": dict(num_train=8000, num_dev=200, num_test=200),
    # the corpus of the shipped reference model (recipes/librispeech/reference)
    "reference": dict(num_train=12000, num_dev=300, num_test=500, lexicon=4, max_words=9, train_other=0.3),
    # the reference corpus spoken by several synthesizers: 40% of the training and dev/test-clean/other speakers
    # are flite and festival voices (TRAINED_FAMILIES), the rest espeak-ng; plus `test-unseen-synth`
    "multisynth": dict(num_train=12000, num_dev=300, num_test=500, lexicon=4, max_words=9, train_other=0.3,
                       synth_mix=0.4),
}
TRAIN_SUBSET = "train-clean-100"
EVAL_SUBSETS = ("dev-clean", "dev-other", "test-clean", "test-other")
SUBSETS = (TRAIN_SUBSET,) + EVAL_SUBSETS

TRAIN_UTTS_PER_SPEAKER = 30  # quick: 50 train speakers, default: 266
EVAL_UTTS_PER_SPEAKER = 20  # quick: 5 per eval subset, default: 10
MIN_TRAIN_SPEAKERS = 3
MIN_EVAL_SPEAKERS = 2
MAX_EVAL_SPEAKERS = 10
MAX_CHAPTERS_PER_SPEAKER = 3
# held-out speakers added to each evaluation subset by `extra_eval_speakers` (the benchmark's 40-speaker sets)
EXTRA_EVAL_UTTS_PER_SPEAKER = 25

BASE_VOICES = ("en-us", "en-gb", "en-gb-scotland", "en-gb-x-gbclan", "en-gb-x-rp",
               "en-gb-x-gbcwmd", "en-029", "en-us-nyc")
VARIANTS = (
    "m1 m2 m3 m4 m5 m6 m7 m8 f1 f2 f3 f4 f5 adam Alex Alicia Andrea Andy Annie antonio aunty "
    "belinda benjamin boris david ed edward edward2 Gene Gene2 gustave Henrique Hugo iven iven2 "
    "iven3 iven4 Jacky john kaukovalta Lee linda marcelo Marco Mario max Michael michel miguel "
    "Mike Nguyen pablo paul pedro quincy rob robert steph steph2 steph3 travis victor zac anika "
    "norbert sandro shelby klatt klatt2 klatt3 klatt4 klatt5 Denis Diogo").split()
OTHER_ONLY_VARIANTS = ("croak", "grandpa", "grandma")  # rough voices, only in *-other subsets
FEMALE_VARIANTS = {"f1", "f2", "f3", "f4", "f5", "Alicia", "Andrea", "Annie", "aunty",
                   "belinda", "linda", "steph", "steph2", "steph3", "anika", "grandma"}

# Per-condition voice ranges (pitch 0-99, speed in words per minute, word gap in 10 ms units).
CLEAN_VOICE = {"pitch": (30, 70), "speed": (140, 181), "gap": (0, 3)}
OTHER_VOICE = {"pitch": (10, 91), "speed": (120, 201), "gap": (0, 5)}
CLEAN_NOISE_PROB = 0.5  # fraction of clean utterances that get mild noise
CLEAN_SNR_DB = (25.0, 35.0)
# The rest of the clean utterances get a recording noise floor. Without it espeak-ng's pauses are digital
# zeros, whose log-mel energies sit at the floor (about -16) and, after per-utterance mean/variance
# normalisation, squash all the speech frames into a narrow band: a model then barely learns from them.
FLOOR_SNR_DB = (45.0, 55.0)
OTHER_SNR_DB = (10.0, 20.0)
GAIN_DB = (-10.0, 0.0)  # peak level relative to 0.9 full scale
PAD_SECONDS = (0.05, 0.3)  # extra silence before and after the speech


class Voice:
    """What a speaker is: one synthesizer back-end with one voice configuration.

    Subclasses are frozen dataclasses (hashable, picklable for worker processes) that say which back-end and
    voice family they belong to and synthesise text to a WAV file."""

    backend: str = ""
    family: str = ""

    def synthesise(self, text: str, wav_path: Path) -> tuple[np.ndarray, int]:
        """Synthesise `text` into wav_path; returns (float mono samples, sample rate)."""
        raise NotImplementedError

    def name(self) -> str:
        """A readable unique name, used in SPEAKERS.TXT."""
        raise NotImplementedError

    @property
    def female(self) -> bool:
        raise NotImplementedError

    def record(self) -> dict:
        """The voice as a JSON object (VOICES.json)."""
        return {"backend": self.backend, "family": self.family, **dataclasses.asdict(self)}


@dataclass(frozen=True)
class EspeakVoice(Voice):
    """An espeak-ng formant voice: base accent + variant + pitch (0-99) + speed (words per minute) + word gap."""

    base: str
    variant: str
    pitch: int
    speed: int
    gap: int
    backend = "espeak-ng"
    family = "espeak-ng"

    def espeak_args(self) -> list[str]:
        """Command-line options selecting this voice."""
        return ["-v", f"{self.base}+{self.variant}", "-p", str(self.pitch), "-s",
                str(self.speed), "-g", str(self.gap)]

    def name(self) -> str:
        return f"{self.base}+{self.variant} p{self.pitch} s{self.speed} g{self.gap}"

    @property
    def female(self) -> bool:
        return self.variant in FEMALE_VARIANTS

    def synthesise(self, text: str, wav_path: Path) -> tuple[np.ndarray, int]:
        return _run_synth(["espeak-ng", *self.espeak_args(), "-w", str(wav_path), text.lower()], None, wav_path,
                          self, text)


@dataclass(frozen=True)
class RecordedVoice(Voice):
    """A flite or festival voice built from recordings of one real speaker (diphone, clustergen or HTS), varied
    by a mean F0 target in Hz (0: the voice's own; not every voice takes one), a duration stretch, and a speed
    perturbation applied to the audio afterwards (resampling as if recorded at `speed` times its rate: tempo and
    pitch change together, like Kaldi's speed perturbation)."""

    voice: str
    f0: int
    stretch: float
    speed: float

    def name(self) -> str:
        return f"{self.backend}:{self.voice} f0={self.f0 or 'own'} stretch={self.stretch:.2f} speed={self.speed:.2f}"

    @property
    def female(self) -> bool:
        return self.voice in RECORDED_FEMALE

    def command(self, text: str, wav_path: Path) -> tuple[list[str], str | None]:
        """The synthesizer's command line and its standard input."""
        raise NotImplementedError

    def synthesise(self, text: str, wav_path: Path) -> tuple[np.ndarray, int]:
        audio, rate = _run_synth(*self.command(text.lower(), wav_path), wav_path, self, text)
        return audio, int(round(rate * self.speed))


@dataclass(frozen=True)
class FliteVoice(RecordedVoice):
    """flite: diphone voices kal (8 kHz) and kal16, clustergen statistical parametric voices awb, rms, slt (CMU
    ARCTIC speakers). F0 targets work on all of them except rms."""

    backend = "flite"

    @property
    def family(self) -> str:
        return "flite-diphone" if self.voice in ("kal", "kal16") else "flite-clustergen"

    def command(self, text: str, wav_path: Path) -> tuple[list[str], str | None]:
        pitch = ["--setf", f"int_f0_target_mean={self.f0}"] if self.f0 else []
        return ["flite", "-voice", self.voice, "--setf", f"duration_stretch={self.stretch:.2f}", *pitch,
                "-t", text, "-o", str(wav_path)], None


@dataclass(frozen=True)
class FestivalVoice(RecordedVoice):
    """festival: diphone voices kal_diphone and ked_diphone (F0 target through int_lr_params, Duration_Stretch),
    and the HTS voice cmu_us_slt_arctic_hts (which ignores both: its stretch is the HTS engine's speech rate,
    1 / stretch, and it takes no F0 target)."""

    backend = "festival"

    @property
    def family(self) -> str:
        return "festival-hts" if self.voice.endswith("_hts") else "festival-diphone"

    def command(self, text: str, wav_path: Path) -> tuple[list[str], str | None]:
        evals = ["-eval", f"(voice_{self.voice})", "-eval", f"(Parameter.set 'Duration_Stretch {self.stretch:.2f})"]
        if self.voice.endswith("_hts"):
            evals += ["-eval", f"(set! hts_engine_params (append hts_engine_params '((\"-r\" {1 / self.stretch:.3f}))))"]
        if self.f0:
            evals += ["-eval", f"(set! int_lr_params '((target_f0_mean {self.f0}) (target_f0_std {self.f0 // 8}) "
                               "(model_f0_mean 170) (model_f0_std 34)))"]
        return ["text2wave", *evals, "-o", str(wav_path)], text + "\n"


def _run_synth(cmd: list[str], stdin: str | None, wav_path: Path, voice: Voice, text: str) -> tuple[np.ndarray, int]:
    """Run a synthesizer command that writes wav_path; read it back as float mono samples."""
    try:
        result = subprocess.run(cmd, input=stdin, capture_output=True, text=True)
    except FileNotFoundError as e:
        raise RuntimeError(f"{voice.backend} is not installed ({cmd[0]} not found): run scripts/setup_env.sh") from e
    if result.returncode != 0 or not wav_path.exists():
        raise RuntimeError(f"{voice.backend} failed for voice {voice.name()!r} on {text!r}: {result.stderr.strip()}")
    audio, rate = sf.read(wav_path, dtype="float32")
    if audio.ndim != 1 or audio.size == 0:
        raise RuntimeError(f"{voice.backend} produced no mono audio for {text!r} ({wav_path})")
    return audio, rate


# The recorded voices, by family. Training hears espeak-ng and the TRAINED_FAMILIES; `test-unseen-synth` is spoken
# by HELD_OUT_FAMILY only: flite's clustergen voices, a synthesis method (statistical parametric) and two
# speakers (awb, rms) that training never hears. Its third voice, slt, is a speaker training hears through
# festival's HTS voice (a different method built from the same recordings).
RECORDED_VOICES = {
    "flite-diphone": (FliteVoice, ("kal", "kal16")),
    "festival-diphone": (FestivalVoice, ("kal_diphone", "ked_diphone")),
    "festival-hts": (FestivalVoice, ("cmu_us_slt_arctic_hts",)),
    "flite-clustergen": (FliteVoice, ("awb", "rms", "slt")),
}
TRAINED_FAMILIES = ("flite-diphone", "festival-diphone", "festival-hts")
HELD_OUT_FAMILY = "flite-clustergen"
UNSEEN_SYNTH_SUBSET = "test-unseen-synth"
RECORDED_FEMALE = {"slt", "cmu_us_slt_arctic_hts"}
NO_F0_TARGET = {"rms", "cmu_us_slt_arctic_hts"}
# F0 target (Hz) ranges for male and female voices; duration stretch; speed perturbation
RECORDED_CLEAN = {"f0_male": (85, 150), "f0_female": (150, 240), "stretch": (0.9, 1.2), "speed": (0.92, 1.08)}
RECORDED_OTHER = {"f0_male": (70, 180), "f0_female": (130, 280), "stretch": (0.8, 1.35), "speed": (0.88, 1.12)}


@dataclass
class Speaker:
    """A speaker of one subset with its chapters; `other`: recorded in *-other conditions."""

    speaker_id: int
    subset: str
    voice: Voice
    chapter_ids: list[int]
    other: bool = False


@dataclass(frozen=True)
class Utterance:
    """One utterance to synthesise (picklable task for a worker)."""

    utt_id: str
    text: str
    voice: Voice
    other: bool
    seed: tuple[int, ...]
    flac_path: str


# --------------------------------------------------------------------------------------------
# Planning: speakers, chapters, texts (all in the main process, from the seed)
# --------------------------------------------------------------------------------------------
def corpus_eval_subsets(params: dict) -> tuple[str, ...]:
    """The evaluation subsets of a corpus: with several synthesizers (`synth_mix`) also `test-unseen-synth`."""
    return EVAL_SUBSETS + ((UNSEEN_SYNTH_SUBSET,) if params.get("synth_mix") else ())


def speaker_counts(num_train: int, num_dev: int, num_test: int,
                   eval_subsets: tuple[str, ...] = EVAL_SUBSETS) -> dict[str, int]:
    """Number of speakers in each subset."""
    counts = {TRAIN_SUBSET: max(MIN_TRAIN_SPEAKERS, num_train // TRAIN_UTTS_PER_SPEAKER)}
    for subset in eval_subsets:
        n = num_dev if subset.startswith("dev") else num_test
        counts[subset] = min(MAX_EVAL_SPEAKERS, max(MIN_EVAL_SPEAKERS, n // EVAL_UTTS_PER_SPEAKER))
    return counts


def subset_sizes(num_train: int, num_dev: int, num_test: int,
                 eval_subsets: tuple[str, ...] = EVAL_SUBSETS) -> dict[str, int]:
    """Number of utterances in each subset."""
    return {s: num_train if s == TRAIN_SUBSET else num_dev if s.startswith("dev") else num_test
            for s in (TRAIN_SUBSET, *eval_subsets)}


def _draw_voice(rng: np.random.Generator, base: str, variant: str, other: bool) -> EspeakVoice:
    """An espeak-ng voice with pitch/speed/gap drawn from the clean or the other ranges."""
    ranges = OTHER_VOICE if other else CLEAN_VOICE
    return EspeakVoice(base, variant, *(int(rng.integers(*ranges[k])) for k in ("pitch", "speed", "gap")))


def draw_recorded_voice(rng: np.random.Generator, family: str, index: int, other: bool,
                        taken: set[Voice]) -> RecordedVoice:
    """The family's voice number `index` (cycling) with an F0 target, stretch and speed drawn from the clean or the
    other ranges, different from every voice configuration in `taken` (which it joins)."""
    cls, names = RECORDED_VOICES[family]
    voice = names[index % len(names)]
    for _ in range(1000):
        drawn = _draw_recorded(rng, cls, voice, other)
        if drawn not in taken:
            taken.add(drawn)
            return drawn
    raise ValueError(f"no new configuration of voice {voice} left after 1000 draws: too many speakers of it")


def _draw_recorded(rng: np.random.Generator, cls: type, voice: str, other: bool) -> RecordedVoice:
    ranges = RECORDED_OTHER if other else RECORDED_CLEAN
    f0_range = ranges["f0_female" if voice in RECORDED_FEMALE else "f0_male"]
    f0 = int(rng.integers(*f0_range))  # drawn for every voice, so the stream does not depend on the voice
    stretch = round(float(rng.uniform(*ranges["stretch"])), 2)
    speed = round(float(rng.uniform(*ranges["speed"])), 2)
    return cls(voice, 0 if voice in NO_F0_TARGET else f0, stretch, speed)


def train_other_count(num_speakers: int, train_other: float) -> int:
    """How many training speakers (the first ones) are recorded in *-other conditions."""
    return int(round(num_speakers * train_other))


def plan_voices(rng: np.random.Generator, counts: dict[str, int],
                train_other: float = 0.0) -> dict[str, list[Voice]]:
    """Voices per subset; a (base, variant) pair never appears in two subsets.

    Evaluation subsets take fresh pairs first; training uses the rest (cycling through them,
    with different pitch/speed, only if it needs more speakers than there are pairs left). The first
    `train_other_count` training voices take the *-other pitch/speed ranges.
    """
    pairs = [(b, v) for b in BASE_VOICES for v in VARIANTS]
    pairs = [pairs[i] for i in rng.permutation(len(pairs))]
    rough = [(b, v) for b in BASE_VOICES for v in OTHER_ONLY_VARIANTS]
    rough = [rough[i] for i in rng.permutation(len(rough))]
    voices: dict[str, list[Voice]] = {}
    for subset in EVAL_SUBSETS:  # test-unseen-synth has no espeak-ng voice (mix_recorded_voices)
        other = subset.endswith("other")
        voices[subset] = []
        for _ in range(counts[subset]):
            pool = rough if other and rough and rng.random() < 0.25 else pairs
            if not pool:
                raise ValueError(f"too many evaluation speakers requested: {counts}")
            voices[subset].append(_draw_voice(rng, *pool.pop(), other))
    if not pairs:
        raise ValueError(f"no voices left for training speakers: {counts}")
    train, seen = [], set()
    n_other = train_other_count(counts[TRAIN_SUBSET], train_other)
    while len(train) < counts[TRAIN_SUBSET]:
        voice = _draw_voice(rng, *pairs[len(train) % len(pairs)], len(train) < n_other)
        if voice not in seen:
            seen.add(voice)
            train.append(voice)
    voices[TRAIN_SUBSET] = train
    return voices


def mix_recorded_voices(rng: np.random.Generator, voices: dict[str, list[Voice]], mix: float,
                        train_other: float, unseen_count: int) -> dict[str, list[Voice]]:
    """Replace the fraction `mix` of every subset's espeak-ng voices (positions drawn at random) by flite and
    festival voices of the TRAINED_FAMILIES in turn, each with its own drawn configuration (the *-other ranges
    for *-other speakers), and add the HELD_OUT_FAMILY voices of `test-unseen-synth` (clean conditions). No
    configuration repeats anywhere in the corpus; the base recorded voices (kal, ked, slt) are shared by
    training and the dev/test subsets, as espeak-ng's accents are."""
    taken: set[Voice] = set()
    mixed: dict[str, list[Voice]] = {}
    for subset in SUBSETS:
        subset_voices = list(voices[subset])
        n = len(subset_voices)
        n_other = (train_other_count(n, train_other) if subset == TRAIN_SUBSET
                   else n if subset.endswith("other") else 0)
        positions = sorted(rng.choice(n, int(round(n * mix)), replace=False).tolist())
        for j, pos in enumerate(positions):
            family = TRAINED_FAMILIES[j % len(TRAINED_FAMILIES)]
            subset_voices[pos] = draw_recorded_voice(rng, family, j // len(TRAINED_FAMILIES), pos < n_other, taken)
        mixed[subset] = subset_voices
    mixed[UNSEEN_SYNTH_SUBSET] = [draw_recorded_voice(rng, HELD_OUT_FAMILY, k, False, taken)
                                  for k in range(unseen_count)]
    return mixed


def plan_speakers(rng: np.random.Generator, sizes: dict[str, int],
                  voices: dict[str, list[Voice]], train_other: float = 0.0,
                  subsets: tuple[str, ...] = SUBSETS) -> list[Speaker]:
    """Speakers with unique integer speaker and chapter IDs, 1-3 chapters each."""
    total = sum(len(v) for v in voices.values())
    speaker_ids = rng.choice(np.arange(10, 10000), size=total, replace=False)
    chapter_ids = iter(rng.choice(np.arange(100, 300000), size=total * MAX_CHAPTERS_PER_SPEAKER,
                                  replace=False).tolist())
    speakers, k = [], 0
    for subset in subsets:
        per_speaker = _split_evenly(sizes[subset], len(voices[subset]))
        n_other = (train_other_count(len(voices[subset]), train_other) if subset == TRAIN_SUBSET
                   else len(voices[subset]) if subset.endswith("other") else 0)
        for index, (voice, n_utts) in enumerate(zip(voices[subset], per_speaker)):
            n_chapters = min(int(rng.integers(1, MAX_CHAPTERS_PER_SPEAKER + 1)), max(n_utts, 1))
            chapters = sorted(next(chapter_ids) for _ in range(n_chapters))
            speakers.append(Speaker(int(speaker_ids[k]), subset, voice, chapters, index < n_other))
            k += 1
    return speakers


def _split_evenly(total: int, parts: int) -> list[int]:
    """Split `total` into `parts` integers differing by at most one (larger first)."""
    base, extra = divmod(total, parts)
    return [base + (i < extra) for i in range(parts)]


def plan_utterances(seed: int, sizes: dict[str, int], speakers: list[Speaker],
                    root: Path, lexicon: int | None = None, max_words: int = MAX_WORDS,
                    subsets: tuple[str, ...] = SUBSETS) -> list[Utterance]:
    """All utterances with IDs, texts, voices and per-utterance seeds.

    Texts are distinct across the whole corpus, so dev/test sentences never repeat training ones.
    """
    seen: set[str] = set()
    utterances = []
    for s_index, subset in enumerate(subsets):
        texts = sentences(np.random.default_rng([seed, 1, s_index]), sizes[subset], seen,
                          lexicon=lexicon, max_words=max_words)
        subset_speakers = [sp for sp in speakers if sp.subset == subset]
        counts = _split_evenly(sizes[subset], len(subset_speakers))
        k = 0
        for sp, n_utts in zip(subset_speakers, counts):
            for chapter, n_chap in zip(sp.chapter_ids, _split_evenly(n_utts, len(sp.chapter_ids))):
                for u in range(n_chap):
                    utt_id = f"{sp.speaker_id}-{chapter}-{u:04d}"
                    path = root / subset / str(sp.speaker_id) / str(chapter) / f"{utt_id}.flac"
                    utterances.append(Utterance(utt_id, texts[k], sp.voice,
                                                sp.other, (seed, 2, s_index, k),
                                                str(path)))
                    k += 1
    return utterances


# --------------------------------------------------------------------------------------------
# Audio synthesis (worker side)
# --------------------------------------------------------------------------------------------
def _init_worker() -> None:
    """One torch thread per worker process."""
    torch.set_num_threads(1)


def resample(audio: np.ndarray, rate: int) -> np.ndarray:
    """Resample mono float audio to SAMPLE_RATE."""
    if rate == SAMPLE_RATE:
        return audio
    return AF.resample(torch.from_numpy(audio), rate, SAMPLE_RATE).numpy()


def coloured_noise(rng: np.random.Generator, n: int) -> np.ndarray:
    """Gaussian noise with a random 1/f^beta spectrum (white to pink-ish), unit power."""
    beta = rng.uniform(0.0, 1.0)
    spectrum = np.fft.rfft(rng.standard_normal(n))
    freqs = np.arange(spectrum.size, dtype=np.float64)
    freqs[0] = 1.0
    noise = np.fft.irfft(spectrum / freqs ** (beta / 2), n)
    return noise / (np.sqrt(np.mean(noise ** 2)) + 1e-12)


def degrade(audio: np.ndarray, rng: np.random.Generator, other: bool) -> np.ndarray:
    """Pad with silence, apply a random gain and add noise at a condition-dependent SNR (at least a
    noise floor: no sample run is digital silence, as in any real recording)."""
    pads = [int(rng.uniform(*PAD_SECONDS) * SAMPLE_RATE) for _ in range(2)]
    speech_power = float(np.mean(audio.astype(np.float64) ** 2)) + 1e-12
    audio = np.concatenate([np.zeros(pads[0]), audio, np.zeros(pads[1])])
    if other:
        snr_db = rng.uniform(*OTHER_SNR_DB)
    elif rng.random() < CLEAN_NOISE_PROB:
        snr_db = rng.uniform(*CLEAN_SNR_DB)
    else:
        snr_db = rng.uniform(*FLOOR_SNR_DB)
    audio = audio + coloured_noise(rng, audio.size) * np.sqrt(speech_power / 10 ** (snr_db / 10))
    peak = 0.9 * 10 ** (rng.uniform(*GAIN_DB) / 20)
    return audio * (peak / (np.max(np.abs(audio)) + 1e-12))


def to_int16(audio: np.ndarray) -> np.ndarray:
    """Float audio in [-1, 1] to 16-bit PCM samples."""
    return np.clip(np.round(audio * 32767.0), -32768, 32767).astype(np.int16)


def synthesise(utt: Utterance, wav_dir: str) -> tuple[str, int]:
    """Synthesise one utterance to its FLAC path; returns (utt_id, number of samples)."""
    wav_path = Path(wav_dir) / f"{utt.utt_id}.wav"
    try:
        audio, rate = utt.voice.synthesise(utt.text, wav_path)
    finally:
        wav_path.unlink(missing_ok=True)
    rng = np.random.default_rng(list(utt.seed))
    samples = to_int16(degrade(resample(audio, rate), rng, utt.other))
    sf.write(utt.flac_path, samples, SAMPLE_RATE, format="FLAC", subtype="PCM_16")
    return utt.utt_id, samples.size


def _synthesise_task(args: tuple[Utterance, str]) -> tuple[str, int]:
    """Pool entry point: synthesise((utterance, wav_dir))."""
    return synthesise(*args)


# --------------------------------------------------------------------------------------------
# Writing the tree
# --------------------------------------------------------------------------------------------
def write_transcripts(utterances: list[Utterance]) -> None:
    """Write SPEAKER-CHAPTER.trans.txt next to each chapter's FLAC files, sorted by ID."""
    chapters: dict[Path, list[Utterance]] = {}
    for utt in utterances:
        chapters.setdefault(Path(utt.flac_path).parent, []).append(utt)
    for chapter_dir, utts in chapters.items():
        speaker, chapter = chapter_dir.parent.name, chapter_dir.name
        lines = [f"{u.utt_id} {u.text}\n" for u in sorted(utts, key=lambda u: u.utt_id)]
        (chapter_dir / f"{speaker}-{chapter}.trans.txt").write_text("".join(lines))


def write_speakers(root: Path, speakers: list[Speaker], minutes: dict[int, float]) -> None:
    """Write SPEAKERS.TXT in LibriSpeech's format; NAME is the espeak-ng voice configuration."""
    lines = ["; ID      |SEX| SUBSET           |MINUTES| NAME\n"]
    for sp in sorted(speakers, key=lambda s: s.speaker_id):
        sex = "F" if sp.voice.female else "M"
        lines.append(f"{sp.speaker_id:<8} | {sex} | {sp.subset:<16} | {minutes[sp.speaker_id]:5.2f} "
                     f"| {sp.voice.name()}\n")
    (root / "SPEAKERS.TXT").write_text("".join(lines))


def write_voices(root: Path, speakers: list[Speaker]) -> None:
    """Write VOICES.json: for every speaker its subset, conditions and voice (back-end, family, configuration)."""
    records = {str(sp.speaker_id): {"subset": sp.subset, "other": sp.other, **sp.voice.record()}
               for sp in sorted(speakers, key=lambda s: s.speaker_id)}
    (root / "VOICES.json").write_text(json.dumps(records, indent=1) + "\n")


def read_voices(root: Path) -> dict[str, dict]:
    """Speaker id -> VOICES.json record of a generated corpus."""
    return json.loads((Path(root) / "VOICES.json").read_text())


def synthesise_all(utterances: list[Utterance], jobs: int) -> dict[str, int]:
    """Synthesise all utterances with `jobs` worker processes; returns samples per utterance."""
    for utt in utterances:
        Path(utt.flac_path).parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="espeak-wav-") as wav_dir:
        tasks = [(u, wav_dir) for u in utterances]
        progress = tqdm(total=len(tasks), desc="synthesising", unit="utt", file=sys.stderr)
        results = {}
        for utt_id, n_samples in _run_tasks(tasks, jobs):
            results[utt_id] = n_samples
            progress.update(1)
        progress.close()
    return results


def _run_tasks(tasks: list, jobs: int):
    """Yield synthesis results, in this process (jobs <= 1) or in a pool of `jobs` workers."""
    if jobs <= 1:
        yield from map(_synthesise_task, tasks)
        return
    with multiprocessing.get_context("fork").Pool(jobs, initializer=_init_worker) as pool:
        yield from pool.imap_unordered(_synthesise_task, tasks, chunksize=4)


def generation_params(seed: int, num_train: int, num_dev: int, num_test: int, lexicon: int | None = None,
                      max_words: int = MAX_WORDS, train_other: float = 0.0,
                      synth_train: int | None = None, synth_eval: int | None = None,
                      extra_eval_speakers: int = 0, synth_mix: float | None = None) -> dict:
    """The parameters that determine the corpus content (recorded in the marker file).

    `synth_train` synthesises only N evenly spaced training utterances of the plan: the evaluation subsets
    (texts, speakers, audio) are exactly those of the full corpus, so a model trained on the full corpus
    is evaluated on the same held-out data, and a short fine-tuning run needs less synthesis.
    `synth_eval` likewise synthesises only N evenly spaced utterances of each evaluation subset (a quick
    check of a trained model on a few of its held-out utterances).
    `extra_eval_speakers` adds that many new-voice speakers to each evaluation subset (`plan_extra_eval`).
    `synth_mix` (format 4) speaks that fraction of the speakers with flite and festival voices and adds the
    `test-unseen-synth` subset (`mix_recorded_voices`)."""
    return {"format_version": MULTISYNTH_FORMAT_VERSION if synth_mix else FORMAT_VERSION, "seed": seed, "num_train": num_train,
            "num_dev": num_dev, "num_test": num_test, "lexicon": lexicon, "max_words": max_words,
            "train_other": train_other, "synth_train": synth_train, "synth_eval": synth_eval,
            # only when set, so that the parameters of corpora (and reference bundles) made without it are unchanged
            **({"extra_eval_speakers": extra_eval_speakers} if extra_eval_speakers else {}),
            **({"synth_mix": synth_mix} if synth_mix else {})}


def size_params(size: str, seed: int = 0, synth_train: int | None = None, synth_eval: int | None = None,
                extra_eval_speakers: int = 0) -> dict:
    """generation_params of a named size."""
    if size not in SIZES:
        raise ValueError(f"unknown corpus size {size!r}; sizes: {sorted(SIZES)}")
    return generation_params(seed, synth_train=synth_train, synth_eval=synth_eval,
                             extra_eval_speakers=extra_eval_speakers, **SIZES[size])


def check_existing(root: Path, params: dict) -> bool:
    """True if `root` holds a complete corpus made with `params`; raise if it holds another."""
    if not root.exists():
        return False
    marker = root / MARKER
    if not marker.exists():
        raise FileExistsError(f"{root} exists but has no {MARKER} marker (not a corpus made by this "
                              f"generator, or an incomplete one); remove it or choose another --out")
    found = json.loads(marker.read_text())
    if found != params:
        raise FileExistsError(f"{root} was generated with different parameters {found}; requested "
                              f"{params}; remove it or choose another --out")
    return True


def generate_corpus(out_dir: str | os.PathLike, seed: int = 0, num_train: int = SIZES["default"]["num_train"],
                    num_dev: int = SIZES["default"]["num_dev"], num_test: int = SIZES["default"]["num_test"],
                    jobs: int = 2, lexicon: int | None = None, max_words: int = MAX_WORDS,
                    train_other: float = 0.0, synth_train: int | None = None) -> Path:
    """Generate OUT_DIR/LibriSpeech (atomically, idempotently); returns its path."""
    params = generation_params(seed, num_train, num_dev, num_test, lexicon, max_words, train_other,
                               synth_train)
    return generate_from_params(out_dir, params, jobs)


def generate_from_params(out_dir: str | os.PathLike, params: dict, jobs: int = 2) -> Path:
    """generate_corpus with the parameters as a `generation_params` dict."""
    for name in ("num_train", "num_dev", "num_test"):
        if params[name] < 1:
            raise ValueError(f"{name} must be at least 1, got {params[name]}")
    if params["synth_train"] is not None and not 1 <= params["synth_train"] <= params["num_train"]:
        raise ValueError(f"synth_train must be in 1..num_train ({params['num_train']}), "
                         f"got {params['synth_train']}")
    smallest_eval = min(params["num_dev"], params["num_test"])
    if params["synth_eval"] is not None and not 1 <= params["synth_eval"] <= smallest_eval:
        raise ValueError(f"synth_eval must be in 1..{smallest_eval}, got {params['synth_eval']}")
    if not 0.0 <= params["train_other"] <= 1.0:
        raise ValueError(f"train_other must be a fraction in [0, 1], got {params['train_other']}")
    if not 0.0 <= params.get("synth_mix", 0.0) <= 1.0:
        raise ValueError(f"synth_mix must be a fraction in [0, 1], got {params['synth_mix']}")
    out_dir = Path(out_dir)
    root = out_dir / "LibriSpeech"
    if check_existing(root, params):
        print(f"{root} already complete with {params}; skipping generation", file=sys.stderr)
        return root
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp_root = out_dir / f"LibriSpeech.tmp-{os.getpid()}"
    shutil.rmtree(tmp_root, ignore_errors=True)
    try:
        _generate_into(tmp_root, params, jobs)
        os.rename(tmp_root, root)
    except BaseException:
        shutil.rmtree(tmp_root, ignore_errors=True)
        raise
    return root


def plan_corpus(params: dict, root: Path) -> tuple[list[Speaker], list[Utterance]]:
    """Speakers and utterances of the full corpus that `params` describe (synth_* limits not applied)."""
    rng = np.random.default_rng([params["seed"], 0])
    eval_subsets = corpus_eval_subsets(params)
    subsets = (TRAIN_SUBSET, *eval_subsets)
    sizes = subset_sizes(params["num_train"], params["num_dev"], params["num_test"], eval_subsets)
    counts = speaker_counts(params["num_train"], params["num_dev"], params["num_test"], eval_subsets)
    voices = plan_voices(rng, counts, params["train_other"])  # espeak-ng voices (the whole corpus of format 3)
    if params.get("synth_mix"):
        voices = mix_recorded_voices(np.random.default_rng([params["seed"], 6]), voices, params["synth_mix"],
                                     params["train_other"], counts[UNSEEN_SYNTH_SUBSET])
    speakers = plan_speakers(rng, sizes, voices, params["train_other"], subsets)
    utterances = plan_utterances(params["seed"], sizes, speakers, root, params["lexicon"], params["max_words"],
                                 subsets)
    extra = params.get("extra_eval_speakers", 0)
    if extra:
        more_speakers, more_utts = plan_extra_eval(params, speakers, utterances, extra, root)
        speakers, utterances = speakers + more_speakers, utterances + more_utts
    return speakers, utterances


def plan_extra_eval(params: dict, speakers: list[Speaker], utterances: list[Utterance], per_subset: int,
                    root: Path) -> tuple[list[Speaker], list[Utterance]]:
    """`per_subset` more speakers for each evaluation subset, planned after (and without changing) the rest of
    the corpus: voices whose (accent, variant) pair no subset uses, EXTRA_EVAL_UTTS_PER_SPEAKER new sentences
    each (distinct from every sentence of the corpus). A model trained on the corpus without them has heard
    neither their voices nor their sentences, so they enlarge the held-out sets by new voices. With several
    synthesizers (`synth_mix`) that fraction of each subset's new speakers are recorded voices of the trained
    families with new configurations, and `test-unseen-synth` gets `per_subset` more held-out-family voices."""
    rng = np.random.default_rng([params["seed"], 3])
    eval_subsets = corpus_eval_subsets(params)
    mix = params.get("synth_mix") or 0.0
    recorded_rng = np.random.default_rng([params["seed"], 7])
    recorded_at = {s: set(recorded_rng.choice(per_subset, per_subset if s == UNSEEN_SYNTH_SUBSET
                                              else int(round(per_subset * mix)), replace=False).tolist())
                   for s in eval_subsets}
    taken = {sp.voice for sp in speakers}
    used = {(sp.voice.base, sp.voice.variant) for sp in speakers if isinstance(sp.voice, EspeakVoice)}
    pairs = [(b, v) for b in BASE_VOICES for v in VARIANTS if (b, v) not in used]
    pairs = [pairs[i] for i in rng.permutation(len(pairs))]
    rough = [(b, v) for b in BASE_VOICES for v in OTHER_ONLY_VARIANTS if (b, v) not in used]
    rough = [rough[i] for i in rng.permutation(len(rough))]
    needed = sum(per_subset - len(recorded_at[s]) for s in eval_subsets)
    if needed > len(pairs) + len(rough):
        raise ValueError(f"extra_eval_speakers {per_subset}: only {len(pairs) + len(rough)} voices are unused by "
                         f"the corpus, {needed} needed")
    taken_ids = {sp.speaker_id for sp in speakers}
    taken_chapters = {c for sp in speakers for c in sp.chapter_ids}
    free_ids = [i for i in rng.permutation(np.arange(10, 10000)).tolist() if i not in taken_ids]
    free_chapters = iter(c for c in rng.permutation(np.arange(100, 300000)).tolist() if c not in taken_chapters)
    seen = {u.text for u in utterances}
    new_speakers, new_utts = [], []
    for s_index, subset in enumerate(eval_subsets):
        other = subset.endswith("other")
        texts = iter(sentences(np.random.default_rng([params["seed"], 4, s_index]),
                               per_subset * EXTRA_EVAL_UTTS_PER_SPEAKER, seen,
                               lexicon=params["lexicon"], max_words=params["max_words"]))
        recorded = sorted(recorded_at[subset])
        for k in range(per_subset):
            if k in recorded_at[subset]:
                j = recorded.index(k)
                family = (HELD_OUT_FAMILY if subset == UNSEEN_SYNTH_SUBSET
                          else TRAINED_FAMILIES[j % len(TRAINED_FAMILIES)])
                n_family = 1 if subset == UNSEEN_SYNTH_SUBSET else len(TRAINED_FAMILIES)
                voice = draw_recorded_voice(recorded_rng, family, j // n_family, other, taken)
            else:
                pool = rough if (other and rough and rng.random() < 0.25) or not pairs else pairs
                voice = _draw_voice(rng, *pool.pop(), other)
            n_chapters = int(rng.integers(1, MAX_CHAPTERS_PER_SPEAKER + 1))
            sp = Speaker(free_ids.pop(), subset, voice, sorted(next(free_chapters) for _ in range(n_chapters)),
                         other)
            new_speakers.append(sp)
            for chapter, n_chap in zip(sp.chapter_ids, _split_evenly(EXTRA_EVAL_UTTS_PER_SPEAKER, n_chapters)):
                for u in range(n_chap):
                    utt_id = f"{sp.speaker_id}-{chapter}-{u:04d}"
                    path = root / subset / str(sp.speaker_id) / str(chapter) / f"{utt_id}.flac"
                    new_utts.append(Utterance(utt_id, next(texts), voice, other, (params["seed"], 5, s_index,
                                                                                 len(new_utts)), str(path)))
    return new_speakers, new_utts


def _generate_into(tmp_root: Path, params: dict, jobs: int) -> None:
    """Plan and synthesise the corpus under tmp_root, then write the marker."""
    speakers, utterances = plan_corpus(params, tmp_root)
    limits = {TRAIN_SUBSET: params["synth_train"], **{s: params["synth_eval"] for s in corpus_eval_subsets(params)}}
    if any(n is not None for n in limits.values()):
        keep = set()
        for subset, limit in limits.items():
            ids = [u.utt_id for u in utterances if f"/{subset}/" in u.flac_path]
            # evenly spaced over the plan, so that every kind of speaker is represented
            step = len(ids) / (limit or len(ids))
            keep.update(ids[int(i * step)] for i in range(limit or len(ids)))
        utterances = [u for u in utterances if u.utt_id in keep]
        speakers = [sp for sp in speakers
                    if any(u.utt_id.startswith(f"{sp.speaker_id}-") for u in utterances)]
    # The FLAC paths point into tmp_root; the directory is renamed as a whole afterwards.
    samples = synthesise_all(utterances, jobs)
    write_transcripts(utterances)
    minutes: dict[int, float] = {sp.speaker_id: 0.0 for sp in speakers}
    for utt in utterances:
        minutes[int(utt.utt_id.split("-")[0])] += samples[utt.utt_id] / SAMPLE_RATE / 60
    write_speakers(tmp_root, speakers, minutes)
    write_voices(tmp_root, speakers)
    (tmp_root / MARKER).write_text(json.dumps(params, sort_keys=True) + "\n")


def parse_args(argv=None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output directory (LibriSpeech/ goes inside)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", choices=sorted(SIZES), default="default")
    parser.add_argument("--num-train", type=int, help="override the size's training utterances")
    parser.add_argument("--num-dev", type=int, help="override utterances per dev subset")
    parser.add_argument("--num-test", type=int, help="override utterances per test subset")
    parser.add_argument("--synth-train", type=int, default=None,
                        help="synthesise only N evenly spaced training utterances (evaluation subsets unchanged)")
    parser.add_argument("--extra-eval-speakers", type=int, default=0,
                        help=f"add N new-voice speakers ({EXTRA_EVAL_UTTS_PER_SPEAKER} utterances each) to every "
                             "evaluation subset (the rest of the corpus is unchanged)")
    parser.add_argument("--synth-mix", type=float, default=None,
                        help="speak this fraction of the speakers with flite and festival voices and add "
                             f"{UNSEEN_SYNTH_SUBSET} (format {MULTISYNTH_FORMAT_VERSION}; default: the size's)")
    parser.add_argument("--jobs", type=int, default=2, help="worker processes")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    """Generate the corpus and print its path."""
    args = parse_args(argv)
    params = size_params(args.size, args.seed, args.synth_train, extra_eval_speakers=args.extra_eval_speakers)
    for name in ("num_train", "num_dev", "num_test"):
        if getattr(args, name) is not None:
            params[name] = getattr(args, name)
    if args.synth_mix is not None:
        params = generation_params(**{**{k: v for k, v in params.items() if k != "format_version"},
                                      "synth_mix": args.synth_mix or None})
    print(generate_from_params(args.out, params, jobs=args.jobs))


if __name__ == "__main__":
    main()
