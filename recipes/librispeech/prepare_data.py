"""Prepare a LibriSpeech tree for fairseq's speech_recognition task.

Writes into DATA: train.json (all training subsets merged), one {subset}.json per evaluation
subset, a SentencePiece unigram model spm_unigram{V}.model/.vocab trained on the training
transcripts, and dict.txt (fairseq Dictionary: pieces seen in training, by count). Features are
not precomputed; `load_features` computes what the task computes on the fly.

    python -m recipes.librispeech.prepare_data --librispeech-root DIR/LibriSpeech --out DATA \
        --train-subsets train-clean-100 --eval-subsets dev-clean,dev-other,test-clean,test-other
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import re
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import sentencepiece as spm
import soundfile as sf
import torch
import torchaudio.compliance.kaldi as kaldi
from tqdm import tqdm

from fairseq_quant_runtime.files import atomic_write

SAMPLE_RATE = 16000
NUM_MEL_BINS = 80
FRAME_LENGTH_MS = 25.0
FRAME_SHIFT_MS = 10.0
AUDIO_SUFFIX = ".flac"
TRANS_SUFFIX = ".trans.txt"
SPM_SPECIAL = {"<unk>", "<s>", "</s>", "<pad>"}
REASONS = ("bad_audio", "no_transcript", "no_audio")
REASON_TEXT = {
    "bad_audio": "corrupt or unreadable audio",
    "no_transcript": "audio without transcript text",
    "no_audio": "transcript line without audio",
}
MAX_NAMED_IDS = 5


# --------------------------------------------------------------------------------------------
# Features (what fairseq's AsrDataset computes on the fly)
# --------------------------------------------------------------------------------------------
def apply_mv_norm(features: torch.Tensor) -> torch.Tensor:
    """Per-utterance mean/variance normalisation, as fairseq's data_utils.apply_mv_norm."""
    if features.size(0) < 2:
        return features
    mean, var = features.mean(0), features.var(0)
    eps = 1e-8
    inv_std = 1.0 / (torch.sqrt(var) + eps) if (var < eps).any() else 1.0 / torch.sqrt(var)
    return (features - mean) * inv_std


def load_waveform(path: str | os.PathLike) -> torch.Tensor:
    """Read 16 kHz mono audio as an int16-range float tensor [1, samples]."""
    samples, rate = sf.read(str(path), dtype="int16", always_2d=True)
    if rate != SAMPLE_RATE:
        raise ValueError(f"{path}: sample rate {rate}, expected {SAMPLE_RATE}")
    if samples.shape[1] != 1:
        raise ValueError(f"{path}: {samples.shape[1]} channels, expected mono")
    if samples.shape[0] == 0:
        raise ValueError(f"{path}: no audio frames")
    return torch.from_numpy(samples.T.astype(np.float32))


def load_features(path: str | os.PathLike) -> torch.Tensor:
    """80-dim kaldi fbank (25 ms / 10 ms) with per-utterance mean/variance normalisation."""
    wave = load_waveform(path)
    if wave.shape[1] < SAMPLE_RATE * FRAME_LENGTH_MS / 1000:
        raise ValueError(f"{path}: {wave.shape[1]} samples, too short for one "
                         f"{FRAME_LENGTH_MS:g} ms frame")
    fbank = kaldi.fbank(wave, num_mel_bins=NUM_MEL_BINS, frame_length=FRAME_LENGTH_MS,
                        frame_shift=FRAME_SHIFT_MS)
    return apply_mv_norm(fbank)


def probe_audio(path: str) -> tuple[str, int, str | None]:
    """Check that a file decodes to features; returns (path, frames, error or None)."""
    try:
        info = sf.info(path)
        if info.frames <= 0:
            raise ValueError("zero frames")
        decoded = load_waveform(path).shape[1]
        if decoded != info.frames:
            raise ValueError(f"decoded {decoded} of {info.frames} frames")
        load_features(path)
        return path, info.frames, None
    except Exception as exc:  # any failure means the file is unusable
        return path, 0, f"{type(exc).__name__}: {exc}"


def _init_worker() -> None:
    """One torch thread per worker process."""
    torch.set_num_threads(1)


def probe_all(paths: list[str], jobs: int) -> dict[str, tuple[int, str | None]]:
    """Probe audio files in `jobs` processes; returns path -> (frames, error)."""
    progress = tqdm(total=len(paths), desc=f"checking audio ({jobs} processes)", unit="file", file=sys.stderr)
    results = {}
    for path, frames, err in _run_probes(paths, jobs):
        results[path] = (frames, err)
        progress.update(1)
    progress.close()
    return results


def _run_probes(paths: list[str], jobs: int):
    """Yield probe results, in this process (jobs <= 1) or in a pool of `jobs` workers."""
    if jobs <= 1:
        yield from map(probe_audio, paths)
        return
    with multiprocessing.get_context("fork").Pool(jobs, initializer=_init_worker) as pool:
        yield from pool.imap_unordered(probe_audio, paths, chunksize=16)


# --------------------------------------------------------------------------------------------
# Reading the tree
# --------------------------------------------------------------------------------------------
@dataclass
class Utt:
    """A kept utterance."""

    utt_id: str
    text: str
    path: str
    length_ms: int


@dataclass
class SubsetSummary:
    """What happened to one subset."""

    subset: str
    split: str
    kept: int = 0
    seconds: float = 0.0
    skipped: dict[str, int] = field(default_factory=lambda: {r: 0 for r in REASONS})
    skipped_ids: dict[str, list[str]] = field(default_factory=lambda: {r: [] for r in REASONS})
    errors: dict[str, str] = field(default_factory=dict)
    unk_pieces: int = 0

    @property
    def hours(self) -> float:
        return self.seconds / 3600

    def skip(self, utt_id: str, reason: str, error: str | None = None) -> None:
        """Record a skipped utterance (the first few IDs are kept by name)."""
        self.skipped[reason] += 1
        if len(self.skipped_ids[reason]) < MAX_NAMED_IDS:
            self.skipped_ids[reason].append(utt_id)
            if error:
                self.errors[utt_id] = error


@dataclass
class PrepSummary:
    """Result of `prepare`: output paths and per-subset statistics."""

    out_dir: Path
    vocab_size_requested: int
    vocab_size: int
    spm_model: Path
    dict_path: Path
    manifests: dict[str, Path]
    subsets: list[SubsetSummary]

    def subset(self, name: str) -> SubsetSummary:
        """Statistics of the subset called `name`."""
        for s in self.subsets:
            if s.subset == name:
                return s
        raise KeyError(f"no subset {name!r} in summary; have {[s.subset for s in self.subsets]}")

    def table(self) -> str:
        """The summary as a text table plus the named skipped IDs."""
        head = f"{'subset':<18}{'split':<12}{'kept':>7}" + "".join(f"{r:>15}" for r in REASONS)
        lines = [head + f"{'unk pieces':>12}{'hours':>9}", "-" * (len(head) + 21)]
        for s in self.subsets:
            lines.append(f"{s.subset:<18}{s.split:<12}{s.kept:>7}"
                         + "".join(f"{s.skipped[r]:>15}" for r in REASONS)
                         + f"{s.unk_pieces:>12}{s.hours:>9.3f}")
        for s in self.subsets:
            for r in REASONS:
                if s.skipped[r]:
                    named = ", ".join(s.skipped_ids[r])
                    lines.append(f"{s.subset}: {s.skipped[r]} skipped ({REASON_TEXT[r]}): {named}")
            for utt_id, err in s.errors.items():
                lines.append(f"{s.subset}: {utt_id}: {err}")
        lines.append(f"sentencepiece vocabulary: {self.vocab_size} (requested "
                     f"{self.vocab_size_requested}) -> {self.spm_model.name}")
        return "\n".join(lines)


def subset_dir(root: Path, subset: str) -> Path:
    """The directory of a subset; a clear error if it is missing."""
    path = root / subset
    if not path.is_dir():
        found = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
        raise FileNotFoundError(f"subset directory {path} does not exist; subsets found in {root}: "
                                f"{', '.join(found) if found else 'none'}")
    return path


def read_transcripts(directory: Path) -> dict[str, str]:
    """All `ID TEXT` lines of the *.trans.txt files under a subset (text whitespace-normalised)."""
    texts: dict[str, str] = {}
    for trans in sorted(directory.rglob("*" + TRANS_SUFFIX)):
        for line_no, line in enumerate(trans.read_text(encoding="utf-8").splitlines(), 1):
            parts = line.split(maxsplit=1)
            if not parts:
                continue
            utt_id = parts[0]
            if utt_id in texts:
                raise ValueError(f"{trans}:{line_no}: duplicate utterance id {utt_id}")
            texts[utt_id] = " ".join(parts[1].split()) if len(parts) > 1 else ""
    return texts


def find_audio(directory: Path) -> dict[str, str]:
    """Utterance ID -> absolute audio path for all FLAC files under a subset."""
    audio: dict[str, str] = {}
    for path in sorted(directory.rglob("*" + AUDIO_SUFFIX)):
        utt_id = path.name[: -len(AUDIO_SUFFIX)]
        if utt_id in audio:
            raise ValueError(f"utterance id {utt_id} has two audio files: {audio[utt_id]}, {path}")
        audio[utt_id] = os.path.abspath(path)
    return audio


def scan_subset(root: Path, subset: str) -> tuple[dict[str, str], dict[str, str]]:
    """(transcripts, audio paths) of one subset."""
    directory = subset_dir(root, subset)
    return read_transcripts(directory), find_audio(directory)


def select_utterances(summary: SubsetSummary, texts: dict[str, str], audio: dict[str, str],
                      probes: dict[str, tuple[int, str | None]]) -> list[Utt]:
    """Keep utterances with audio that decodes and a non-empty transcript; record the rest."""
    kept = []
    for utt_id in sorted(set(texts) | set(audio)):
        if utt_id not in audio:
            summary.skip(utt_id, "no_audio")
        elif not texts.get(utt_id):
            summary.skip(utt_id, "no_transcript")
        elif probes[audio[utt_id]][1] is not None:
            summary.skip(utt_id, "bad_audio", probes[audio[utt_id]][1])
        else:
            frames = probes[audio[utt_id]][0]
            kept.append(Utt(utt_id, texts[utt_id], audio[utt_id], frames * 1000 // SAMPLE_RATE))
            summary.kept += 1
            summary.seconds += frames / SAMPLE_RATE
    return kept


# --------------------------------------------------------------------------------------------
# Writing outputs (atomically, only when the content changes)
# --------------------------------------------------------------------------------------------
def write_if_changed(path: Path, data: bytes) -> None:
    """Write `data` to `path` via a temporary file and os.replace, unless identical already."""
    if path.exists() and path.read_bytes() == data:
        return
    atomic_write(path, data)


def train_sentencepiece(texts: list[str], out_dir: Path, vocab_size: int) -> tuple[Path, int]:
    """Train a unigram model on `texts`; returns (model path, vocabulary size used).

    If `vocab_size` is too large for the corpus, retrains with the largest size sentencepiece
    allows (and says so).
    """
    prefix = out_dir / f"spm_unigram{vocab_size}.tmp"
    size = vocab_size
    try:
        _spm_train(texts, prefix, size)
    except RuntimeError as exc:
        match = re.search(r"Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)",
                          str(exc))
        if not match:
            raise
        size = int(match.group(2))
        print(f"sentencepiece: vocabulary size {vocab_size} is too large for these transcripts; "
              f"using {size}", file=sys.stderr)
        _spm_train(texts, prefix, size)
    model = out_dir / f"spm_unigram{size}.model"
    for suffix in (".model", ".vocab"):
        tmp = Path(str(prefix) + suffix)
        write_if_changed(model.with_suffix(suffix), tmp.read_bytes())
        tmp.unlink()
    return model, size


def _spm_train(texts: list[str], prefix: Path, vocab_size: int) -> None:
    """Deterministic SentencePiece unigram training (upstream fairseq's options, one thread)."""
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_prefix=str(prefix), vocab_size=vocab_size,
        model_type="unigram", character_coverage=1.0, input_sentence_size=0,
        shuffle_input_sentence=False, num_threads=1, unk_id=3, eos_id=2, pad_id=1, bos_id=-1,
        minloglevel=2)


def dictionary_lines(piece_lists: list[list[str]]) -> str:
    """fairseq dict.txt text: `piece count` per training piece, by descending count then piece."""
    counts = Counter(p for pieces in piece_lists for p in pieces if p not in SPM_SPECIAL)
    return "".join(f"{p} {c}\n" for p, c in sorted(counts.items(), key=lambda pc: (-pc[1], pc[0])))


def manifest_json(utts: list[Utt], pieces: dict[str, list[str]], dictionary) -> tuple[str, int]:
    """The {split}.json text and the number of pieces that map to <unk>."""
    entries, unk = {}, 0
    for utt in sorted(utts, key=lambda u: u.utt_id):
        ids = [dictionary.index(p) for p in pieces[utt.utt_id]]
        unk += sum(i == dictionary.unk() for i in ids)
        entries[utt.utt_id] = {
            "input": {"length_ms": utt.length_ms, "path": utt.path},
            "output": {"text": utt.text, "token": " ".join(pieces[utt.utt_id]),
                       "tokenid": ", ".join(map(str, ids))},
        }
    return json.dumps({"utts": entries}, indent=4, ensure_ascii=False) + "\n", unk


# --------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------
def _check_subset_names(train_subsets: list[str], eval_subsets: list[str]) -> None:
    """Reject an empty training list and subsets used for both training and evaluation."""
    if not train_subsets:
        raise ValueError("no training subsets given")
    overlap = set(train_subsets) & set(eval_subsets)
    if overlap:
        raise ValueError(f"subsets given both for training and evaluation: {sorted(overlap)}")
    if "train" in eval_subsets:
        raise ValueError("an evaluation subset may not be called 'train' (train.json is reserved)")


def prepare(librispeech_root: str | os.PathLike, out_dir: str | os.PathLike,
            train_subsets: list[str], eval_subsets: list[str], vocab_size: int = 5000,
            jobs: int = 2, spm_model: str | os.PathLike | None = None,
            dictionary: str | os.PathLike | None = None) -> PrepSummary:
    """Prepare manifests, SentencePiece model and dict.txt in out_dir; returns a summary.

    With ``spm_model`` and ``dictionary`` (a trained model's, e.g. the reference bundle's), those are
    used as they are instead of training new ones, so the manifests fit that model's vocabulary."""
    if (spm_model is None) != (dictionary is None):
        raise ValueError("give both spm_model and dictionary (a trained model's), or neither")
    from fairseq.data import Dictionary  # heavy import, only needed here

    train_subsets, eval_subsets = list(train_subsets), list(eval_subsets)
    _check_subset_names(train_subsets, eval_subsets)
    root, out = Path(librispeech_root), Path(out_dir)
    scans = {s: scan_subset(root, s) for s in train_subsets + eval_subsets}
    wanted = sorted({scans[s][1][u] for s in scans for u in scans[s][0]
                     if scans[s][0][u] and u in scans[s][1]})
    probes = probe_all(wanted, jobs)

    summaries, kept = [], {}
    for s in train_subsets + eval_subsets:
        summary = SubsetSummary(s, "train" if s in train_subsets else s)
        kept[s] = select_utterances(summary, *scans[s], probes)
        summaries.append(summary)
    train_utts = [u for s in train_subsets for u in kept[s]]
    if not train_utts:
        raise ValueError(f"no usable training utterances in {train_subsets} under {root}")

    out.mkdir(parents=True, exist_ok=True)
    dict_path = out / "dict.txt"
    if spm_model is not None:
        given = Path(spm_model)
        sp = spm.SentencePieceProcessor(model_file=str(given))
        used = vocab_size = sp.get_piece_size()
        for old in out.glob("spm*.model"):
            if old.name != given.name:
                old.unlink()  # evaluation looks for exactly one SentencePiece model
        spm_model = out / given.name
        write_if_changed(spm_model, given.read_bytes())
        write_if_changed(dict_path, Path(dictionary).read_bytes())
    else:
        spm_model, used = train_sentencepiece([u.text for u in train_utts], out, vocab_size)
        sp = spm.SentencePieceProcessor(model_file=str(spm_model))
    pieces = {u.utt_id: sp.encode(u.text, out_type=str) for s in kept for u in kept[s]}
    if dictionary is None:
        write_if_changed(dict_path, dictionary_lines([pieces[u.utt_id] for u in train_utts]).encode())
    dictionary = Dictionary.load(str(dict_path))

    manifests = {}
    for split, subsets in [("train", train_subsets)] + [(s, [s]) for s in eval_subsets]:
        utts = [u for s in subsets for u in kept[s]]
        text, unk = manifest_json(utts, pieces, dictionary)
        if split == "train" and unk:
            raise RuntimeError(f"{unk} training pieces map to <unk> in {dict_path}")
        if split != "train":
            next(x for x in summaries if x.subset == split).unk_pieces = unk
        manifests[split] = out / f"{split}.json"
        write_if_changed(manifests[split], text.encode("utf-8"))

    summary = PrepSummary(out, vocab_size, used, spm_model, dict_path, manifests, summaries)
    print(summary.table())
    return summary


def parse_args(argv=None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--librispeech-root", required=True, help="the LibriSpeech directory")
    parser.add_argument("--out", required=True, help="output data directory")
    parser.add_argument("--train-subsets", default="train-clean-100",
                        help="comma-separated training subsets (merged into train.json)")
    parser.add_argument("--eval-subsets", default="dev-clean,dev-other,test-clean,test-other",
                        help="comma-separated evaluation subsets (one {subset}.json each)")
    parser.add_argument("--vocab-size", type=int, default=5000)
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                        help="processes for checking audio (default: one per CPU core)")
    return parser.parse_args(argv)


def _split_list(value: str) -> list[str]:
    """'a, b,c' -> ['a', 'b', 'c']."""
    return [v.strip() for v in value.split(",") if v.strip()]


def main(argv=None) -> None:
    """Run `prepare` from the command line."""
    args = parse_args(argv)
    if not Path(args.librispeech_root).is_dir():
        sys.exit(f"prepare_data: error: --librispeech-root {args.librispeech_root}: not a directory")
    try:
        prepare(args.librispeech_root, args.out, _split_list(args.train_subsets),
                _split_list(args.eval_subsets), args.vocab_size, args.jobs)
    except (FileNotFoundError, ValueError) as err:
        sys.exit(f"prepare_data: error: {err}")


if __name__ == "__main__":
    main()
