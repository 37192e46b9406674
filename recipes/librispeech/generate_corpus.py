"""Generate a synthetic speech corpus in the exact LibriSpeech layout with espeak-ng.

Each "speaker" is an espeak-ng voice configuration (base accent + variant + pitch + speed +
word gap); sentences come from the grammar in `sentences.py`. Audio is synthesised by
espeak-ng, resampled to 16 kHz, given a random gain and (for *-other, or mildly for *-clean)
noise, and written as 16-bit mono FLAC. Everything is derived from one seed.

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


@dataclass(frozen=True)
class Voice:
    """An espeak-ng voice configuration: this is what a speaker is."""

    base: str
    variant: str
    pitch: int
    speed: int
    gap: int

    def espeak_args(self) -> list[str]:
        """Command-line options selecting this voice."""
        return ["-v", f"{self.base}+{self.variant}", "-p", str(self.pitch), "-s",
                str(self.speed), "-g", str(self.gap)]

    def name(self) -> str:
        """A readable unique name, used in SPEAKERS.TXT."""
        return f"{self.base}+{self.variant} p{self.pitch} s{self.speed} g{self.gap}"


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
def speaker_counts(num_train: int, num_dev: int, num_test: int) -> dict[str, int]:
    """Number of speakers in each subset."""
    counts = {TRAIN_SUBSET: max(MIN_TRAIN_SPEAKERS, num_train // TRAIN_UTTS_PER_SPEAKER)}
    for subset in EVAL_SUBSETS:
        n = num_dev if subset.startswith("dev") else num_test
        counts[subset] = min(MAX_EVAL_SPEAKERS, max(MIN_EVAL_SPEAKERS, n // EVAL_UTTS_PER_SPEAKER))
    return counts


def subset_sizes(num_train: int, num_dev: int, num_test: int) -> dict[str, int]:
    """Number of utterances in each subset."""
    return {s: num_train if s == TRAIN_SUBSET else num_dev if s.startswith("dev") else num_test
            for s in SUBSETS}


def _draw_voice(rng: np.random.Generator, base: str, variant: str, other: bool) -> Voice:
    """A voice with pitch/speed/gap drawn from the clean or the other ranges."""
    ranges = OTHER_VOICE if other else CLEAN_VOICE
    return Voice(base, variant, *(int(rng.integers(*ranges[k])) for k in ("pitch", "speed", "gap")))


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
    for subset in EVAL_SUBSETS:
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


def plan_speakers(rng: np.random.Generator, sizes: dict[str, int],
                  voices: dict[str, list[Voice]], train_other: float = 0.0) -> list[Speaker]:
    """Speakers with unique integer speaker and chapter IDs, 1-3 chapters each."""
    total = sum(len(v) for v in voices.values())
    speaker_ids = rng.choice(np.arange(10, 10000), size=total, replace=False)
    chapter_ids = iter(rng.choice(np.arange(100, 300000), size=total * MAX_CHAPTERS_PER_SPEAKER,
                                  replace=False).tolist())
    speakers, k = [], 0
    for subset in SUBSETS:
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
                    root: Path, lexicon: int | None = None, max_words: int = MAX_WORDS) -> list[Utterance]:
    """All utterances with IDs, texts, voices and per-utterance seeds.

    Texts are distinct across the whole corpus, so dev/test sentences never repeat training ones.
    """
    seen: set[str] = set()
    utterances = []
    for s_index, subset in enumerate(SUBSETS):
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


def espeak(text: str, voice: Voice, wav_path: Path) -> tuple[np.ndarray, int]:
    """Synthesise `text` with espeak-ng into wav_path; returns (float samples, sample rate)."""
    cmd = ["espeak-ng", *voice.espeak_args(), "-w", str(wav_path), text.lower()]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0 or not wav_path.exists():
        raise RuntimeError(f"espeak-ng failed for voice {voice.name()!r} on {text!r}: "
                           f"{result.stderr.strip()}")
    audio, rate = sf.read(wav_path, dtype="float32")
    if audio.ndim != 1 or audio.size == 0:
        raise RuntimeError(f"espeak-ng produced no mono audio for {text!r} ({wav_path})")
    return audio, rate


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
        audio, rate = espeak(utt.text, utt.voice, wav_path)
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
        sex = "F" if sp.voice.variant in FEMALE_VARIANTS else "M"
        lines.append(f"{sp.speaker_id:<8} | {sex} | {sp.subset:<16} | {minutes[sp.speaker_id]:5.2f} "
                     f"| {sp.voice.name()}\n")
    (root / "SPEAKERS.TXT").write_text("".join(lines))


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
                      extra_eval_speakers: int = 0) -> dict:
    """The parameters that determine the corpus content (recorded in the marker file).

    `synth_train` synthesises only N evenly spaced training utterances of the plan: the evaluation subsets
    (texts, speakers, audio) are exactly those of the full corpus, so a model trained on the full corpus
    is evaluated on the same held-out data, and a short fine-tuning run needs less synthesis.
    `synth_eval` likewise synthesises only N evenly spaced utterances of each evaluation subset (a quick
    check of a trained model on a few of its held-out utterances).
    `extra_eval_speakers` adds that many new-voice speakers to each evaluation subset (`plan_extra_eval`)."""
    return {"format_version": FORMAT_VERSION, "seed": seed, "num_train": num_train,
            "num_dev": num_dev, "num_test": num_test, "lexicon": lexicon, "max_words": max_words,
            "train_other": train_other, "synth_train": synth_train, "synth_eval": synth_eval,
            # only when set, so that the parameters of corpora (and reference bundles) made without it are unchanged
            **({"extra_eval_speakers": extra_eval_speakers} if extra_eval_speakers else {})}


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
    sizes = subset_sizes(params["num_train"], params["num_dev"], params["num_test"])
    voices = plan_voices(rng, speaker_counts(params["num_train"], params["num_dev"],
                                             params["num_test"]), params["train_other"])
    speakers = plan_speakers(rng, sizes, voices, params["train_other"])
    utterances = plan_utterances(params["seed"], sizes, speakers, root, params["lexicon"], params["max_words"])
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
    neither their voices nor their sentences, so they enlarge the held-out sets by new voices."""
    rng = np.random.default_rng([params["seed"], 3])
    used = {(sp.voice.base, sp.voice.variant) for sp in speakers}
    pairs = [(b, v) for b in BASE_VOICES for v in VARIANTS if (b, v) not in used]
    pairs = [pairs[i] for i in rng.permutation(len(pairs))]
    rough = [(b, v) for b in BASE_VOICES for v in OTHER_ONLY_VARIANTS if (b, v) not in used]
    rough = [rough[i] for i in rng.permutation(len(rough))]
    needed = per_subset * len(EVAL_SUBSETS)
    if needed > len(pairs) + len(rough):
        raise ValueError(f"extra_eval_speakers {per_subset}: only {len(pairs) + len(rough)} voices are unused by "
                         f"the corpus, {needed} needed")
    taken_ids = {sp.speaker_id for sp in speakers}
    taken_chapters = {c for sp in speakers for c in sp.chapter_ids}
    free_ids = [i for i in rng.permutation(np.arange(10, 10000)).tolist() if i not in taken_ids]
    free_chapters = iter(c for c in rng.permutation(np.arange(100, 300000)).tolist() if c not in taken_chapters)
    seen = {u.text for u in utterances}
    new_speakers, new_utts = [], []
    for s_index, subset in enumerate(EVAL_SUBSETS):
        other = subset.endswith("other")
        texts = iter(sentences(np.random.default_rng([params["seed"], 4, s_index]),
                               per_subset * EXTRA_EVAL_UTTS_PER_SPEAKER, seen,
                               lexicon=params["lexicon"], max_words=params["max_words"]))
        for k in range(per_subset):
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
    limits = {TRAIN_SUBSET: params["synth_train"], **{s: params["synth_eval"] for s in EVAL_SUBSETS}}
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
    parser.add_argument("--jobs", type=int, default=2, help="worker processes")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    """Generate the corpus and print its path."""
    args = parse_args(argv)
    params = size_params(args.size, args.seed, args.synth_train, extra_eval_speakers=args.extra_eval_speakers)
    for name in ("num_train", "num_dev", "num_test"):
        if getattr(args, name) is not None:
            params[name] = getattr(args, name)
    print(generate_from_params(args.out, params, jobs=args.jobs))


if __name__ == "__main__":
    main()
