"""Audio input and features of the on-device runtime: the training front end without torch.

Training (``recipes.librispeech.prepare_data.load_features``, fairseq's ``AsrDataset``) reads 16 kHz mono
audio with soundfile as int16-range floats, computes torchaudio's ``kaldi.fbank`` (80 mel bins, 25 ms frames,
10 ms shift, torchaudio's defaults otherwise) and normalises each utterance's mean and variance per
dimension. This module reproduces that path in numpy, every frame of an utterance at once (one FFT call, one
matrix product with the mel banks; normalised features within 5e-4 of training's on the corpus's speech, see
``tests/test_runtime_audio.py``), and accepts what
training would refuse: several channels are averaged into one, other sample rates are resampled to 16 kHz
with soxr.
"""
from __future__ import annotations

import multiprocessing
import os
import struct
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

SAMPLE_RATE = 16000
NUM_MEL_BINS = 80
FRAME_LENGTH_MS = 25.0
FRAME_SHIFT_MS = 10.0
FRAME_SAMPLES = int(SAMPLE_RATE * FRAME_LENGTH_MS / 1000)  # 400
MV_NORM_EPS = 1e-8  # as fairseq's data_utils.apply_mv_norm
INT16_SCALE = 32768.0  # soundfile's float read of 16-bit PCM is int16 / 32768
_BYTES_PER_SAMPLE = {"PCM_U8": 1, "PCM_16": 2, "PCM_24": 3, "PCM_32": 4, "FLOAT": 4, "DOUBLE": 8,
                     "ULAW": 1, "ALAW": 1}


class AudioError(ValueError):
    """An audio input the runtime cannot use (missing, empty, unreadable, truncated, too short), named in
    the message."""


# torchaudio.compliance.kaldi.fbank(wave, num_mel_bins=80, frame_length=25, frame_shift=10) with its defaults for the
# rest: dither 0, DC offset removed per frame, pre-emphasis 0.97, Povey window, 512-point FFT (round to a power of
# two), snip_edges, power spectrum, Kaldi mel banks from 20 Hz to Nyquist, log(max(energy, float32 eps))
FRAME_SHIFT_SAMPLES = int(SAMPLE_RATE * FRAME_SHIFT_MS / 1000)  # 160
FFT_SIZE = 512
PREEMPHASIS = 0.97
LOW_FREQ = 20.0
LOG_FLOOR = float(np.finfo(np.float32).eps)


def _mel_scale(freq):
    return 1127.0 * np.log(1.0 + np.asarray(freq, dtype=np.float64) / 700.0)


def kaldi_mel_banks(num_bins: int = NUM_MEL_BINS, fft_size: int = FFT_SIZE, sample_rate: int = SAMPLE_RATE,
                    low_freq: float = LOW_FREQ) -> np.ndarray:
    """Kaldi's triangular mel filters up to Nyquist, [fft_size // 2 + 1, num_bins] (the Nyquist bin weighs 0), as
    torchaudio's ``get_mel_banks`` computes them."""
    mel_low, mel_high = _mel_scale(low_freq), _mel_scale(0.5 * sample_rate)
    delta = (mel_high - mel_low) / (num_bins + 1)
    b = np.arange(num_bins, dtype=np.float64)[:, None]
    left, center, right = mel_low + b * delta, mel_low + (b + 1) * delta, mel_low + (b + 2) * delta
    mel = _mel_scale(sample_rate / fft_size * np.arange(fft_size // 2, dtype=np.float64))[None, :]
    banks = np.maximum(0.0, np.minimum((mel - left) / (center - left), (right - mel) / (right - center)))
    return np.ascontiguousarray(np.pad(banks, ((0, 0), (0, 1))).T.astype(np.float32))


_MEL_BANKS = kaldi_mel_banks()
_POVEY_WINDOW = (np.hanning(FRAME_SAMPLES) ** 0.85).astype(np.float32)  # Hann (symmetric) to the power 0.85


def read_audio(path: str | os.PathLike) -> np.ndarray:
    """Samples of a wav/flac file as float32 [samples] at 16 kHz, mono, in int16 range.

    For a 16-bit file these are exactly the samples training reads (soundfile, dtype int16): files are read
    as floats in [-1, 1) and scaled by 32768, which is exact for 16-bit PCM and also scales 24-bit and
    float files correctly (libsndfile's int16 read of a float file returns unscaled values, i.e. silence).
    Several channels are downmixed to their mean; another sample rate is resampled to 16 kHz with soxr
    (quality "HQ": flat to 7.3 kHz, so the top two or three of the 80 mel bins lose some energy). Neither
    is rounded back to integers.

    Raises AudioError for a missing, empty, unreadable, corrupt or truncated file, non-finite samples, and
    audio shorter than one 25 ms frame (400 samples at 16 kHz).
    """
    path = Path(path)
    if not path.exists():
        raise AudioError(f"{path}: audio file not found")
    if not path.is_file():
        raise AudioError(f"{path}: not a file, expected a wav or flac file")
    if path.stat().st_size == 0:
        raise AudioError(f"{path}: audio file is empty (0 bytes)")
    try:  # opened once: its header (format, frames, rate), then its samples
        audio = sf.SoundFile(str(path))
    except (sf.LibsndfileError, RuntimeError, TypeError) as err:
        raise AudioError(f"{path}: not a readable audio file, expected wav or flac "
                         f"(libsndfile: {_reason(err)})") from None
    with audio:
        info, rate = audio, audio.samplerate
        try:
            data = audio.read(dtype="float64", always_2d=True)
        except (sf.LibsndfileError, RuntimeError, TypeError) as err:
            raise AudioError(f"{path}: corrupt or truncated {info.format} audio "
                             f"(libsndfile: {_reason(err)})") from None
    announced = _wav_data_frames(path, info) if info.format == "WAV" else info.frames
    if announced is not None and data.shape[0] < announced:  # libsndfile reads a cut-off WAV silently
        raise AudioError(f"{path}: truncated {info.format} audio: {data.shape[0]} of the {announced} samples its "
                         f"header announces")
    if data.shape[0] == 0:
        raise AudioError(f"{path}: no audio samples")
    if not np.isfinite(data).all():
        raise AudioError(f"{path}: audio contains NaN or infinite samples")
    samples = data[:, 0] if data.shape[1] == 1 else data.mean(axis=1)
    samples = samples * INT16_SCALE
    if rate != SAMPLE_RATE:
        samples = soxr.resample(samples, rate, SAMPLE_RATE, quality="HQ")
    if samples.shape[0] < FRAME_SAMPLES:
        raise AudioError(f"{path}: {samples.shape[0]} samples at {SAMPLE_RATE} Hz "
                         f"({1000 * samples.shape[0] / SAMPLE_RATE:.1f} ms), shorter than one "
                         f"{FRAME_LENGTH_MS:g} ms frame ({FRAME_SAMPLES} samples)")
    return samples.astype(np.float32)


def _reason(err: Exception) -> str:
    """libsndfile's own words, without the file name soundfile repeats."""
    text = str(getattr(err, "error_string", "") or err).strip()
    return text.removeprefix("Error : ").rstrip(".")


def _wav_data_frames(path: Path, info) -> int | None:
    """Frames that a RIFF/WAVE header's data chunk announces; None when it announces no length (streamed
    WAVs write 0 or 0xFFFFFFFF) or the header is not plain RIFF (RF64, W64)."""
    with open(path, "rb") as f:
        head = f.read(12)
        if head[:4] != b"RIFF" or head[8:12] != b"WAVE":
            return None
        while len(chunk := f.read(8)) == 8:
            size = struct.unpack("<I", chunk[4:])[0]
            if chunk[:4] == b"data":
                if size in (0, 0xFFFFFFFF):
                    return None
                block = info.channels * _BYTES_PER_SAMPLE.get(info.subtype, 0)
                return size // block if block else None
            f.seek(size + (size & 1), os.SEEK_CUR)  # chunks are padded to even sizes
    return None


def prepare_samples(samples, sample_rate: int, name: str = "samples") -> np.ndarray:
    """Samples an application holds (a microphone buffer, a decoded stream) as the model reads audio: float32
    [samples] at 16 kHz, mono, in int16 range. ``samples``: [samples] or [samples, channels] (averaged), floats in
    [-1, 1] (as soundfile and sounddevice give them) or int16 PCM; another ``sample_rate`` is resampled (soxr HQ).
    Raises AudioError for anything else (wrong shape or type, non-finite values, a bad rate, under 25 ms)."""
    array = np.asarray(samples)
    if not isinstance(sample_rate, (int, np.integer)) or isinstance(sample_rate, bool) or sample_rate <= 0:
        raise AudioError(f"{name}: sample_rate must be a positive integer (Hz), got {sample_rate!r}")
    if array.ndim not in (1, 2):
        raise AudioError(f"{name}: expected [samples] or [samples, channels], got shape {tuple(array.shape)}")
    if array.dtype == np.int16:
        data = array.astype(np.float64)
    elif np.issubdtype(array.dtype, np.floating):
        data = array.astype(np.float64) * INT16_SCALE
    else:
        raise AudioError(f"{name}: expected float samples in [-1, 1] or int16 PCM, got dtype {array.dtype}")
    if data.ndim == 2:
        data = data.mean(axis=1)
    if not np.isfinite(data).all():
        raise AudioError(f"{name}: contains NaN or infinite samples")
    if sample_rate != SAMPLE_RATE:
        data = soxr.resample(data, int(sample_rate), SAMPLE_RATE, quality="HQ")
    if data.shape[0] < FRAME_SAMPLES:
        raise AudioError(f"{name}: {data.shape[0]} samples at {SAMPLE_RATE} Hz, shorter than one "
                         f"{FRAME_LENGTH_MS:g} ms frame ({FRAME_SAMPLES} samples)")
    return data.astype(np.float32)


def fbank(samples: np.ndarray) -> np.ndarray:
    """80-dim log-mel Kaldi fbank, float32 [frames, 80], of 16 kHz int16-range samples: 25 ms frames every
    10 ms, 1 + (samples - 400) // 160 frames (torchaudio's ``kaldi.fbank`` with training's arguments)."""
    samples = np.asarray(samples, dtype=np.float32)
    if samples.ndim != 1:
        raise AudioError(f"fbank: expected 1-D samples, got shape {tuple(samples.shape)}")
    if samples.shape[0] < FRAME_SAMPLES:
        raise AudioError(f"fbank: {samples.shape[0]} samples, shorter than one {FRAME_LENGTH_MS:g} ms frame "
                         f"({FRAME_SAMPLES} samples at {SAMPLE_RATE} Hz)")
    # every frame at once: [frames, 400] views of the samples, then one FFT and one matrix product for all
    count = 1 + (samples.shape[0] - FRAME_SAMPLES) // FRAME_SHIFT_SAMPLES
    frames = np.lib.stride_tricks.sliding_window_view(samples, FRAME_SAMPLES)[::FRAME_SHIFT_SAMPLES][:count]
    frames = frames - frames.mean(axis=1, keepdims=True)
    emphasised = np.empty_like(frames)
    emphasised[:, 1:] = frames[:, 1:] - PREEMPHASIS * frames[:, :-1]
    emphasised[:, 0] = frames[:, 0] * (1.0 - PREEMPHASIS)  # the sample before the first is itself
    emphasised *= _POVEY_WINDOW
    spectrum = np.fft.rfft(emphasised, n=FFT_SIZE, axis=1)
    power = (spectrum.real ** 2 + spectrum.imag ** 2).astype(np.float32)
    return np.log(np.maximum(power @ _MEL_BANKS, LOG_FLOOR))


def apply_mv_norm(features: np.ndarray) -> np.ndarray:
    """Per-utterance mean/variance normalisation exactly as training's ``apply_mv_norm``: unbiased
    variance per dimension; if any dimension's variance is below 1e-8, every dimension divides by
    std + 1e-8; fewer than 2 frames are returned unchanged. Mean and variance are taken in float64 (torch
    takes them in float32, which only matters for a dimension that is constant over the utterance)."""
    if features.shape[0] < 2:
        return features
    mean = features.mean(axis=0, dtype=np.float64)
    var = features.var(axis=0, ddof=1, dtype=np.float64)
    std = np.sqrt(var)
    inv_std = 1.0 / (std + MV_NORM_EPS) if (var < MV_NORM_EPS).any() else 1.0 / std
    return ((features - mean) * inv_std).astype(np.float32)


def features(path: str | os.PathLike) -> np.ndarray:
    """The model's input for an audio file: normalised 80-dim fbank, float32 [frames, 80]."""
    return apply_mv_norm(fbank(read_audio(path)))


def batch_features(paths: list) -> list[np.ndarray]:
    return [features(p) for p in paths]


def features_ahead(batches: list[list], workers: int = 0, ahead: int = 4):
    """The features of each batch of paths, in order. With ``workers`` >= 1 they are computed in that many
    worker processes, up to ``ahead`` batches ahead of the consumer, so that feature extraction (one thread in
    numpy) runs on another core while the consumer decodes; errors surface at their batch."""
    if workers < 1:
        for batch in batches:
            yield batch_features(batch)
        return
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
        pending = deque()
        queue = iter(batches)
        for batch in queue:
            pending.append(pool.submit(batch_features, batch))
            if len(pending) >= ahead:
                break
        while pending:
            result = pending.popleft().result()
            nxt = next(queue, None)
            if nxt is not None:
                pending.append(pool.submit(batch_features, nxt))
            yield result
