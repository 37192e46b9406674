"""The runtime's audio input and features (fairseq_quant_runtime.audio) against the training front end.

Audio is real speech made exactly as the recipe's corpus makes it (espeak-ng, resampled to 16 kHz, padded,
noise added, 16-bit FLAC), compared with ``recipes.librispeech.prepare_data`` (soundfile + torchaudio's
kaldi.fbank + apply_mv_norm), which is what training feeds the model.
"""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import torchaudio.compliance.kaldi as kaldi
import torchaudio.functional as AF

from fairseq_quant_runtime.audio import AudioError, apply_mv_norm, fbank, features, read_audio
from recipes.librispeech import generate_corpus as gc
from recipes.librispeech import prepare_data

ROOT = Path(__file__).resolve().parents[1]

SPEECH = [  # (text, voice): corpus voices of both sexes, accents, a rough one, and a one-word utterance
    ("the quick brown fox jumps over the lazy dog near the river bank", gc.EspeakVoice("en-us", "m3", 50, 160, 0)),
    ("where should that wild frog sit", gc.EspeakVoice("en-gb", "f2", 70, 140, 2)),
    ("a small boat drifted slowly past the old stone bridge at dawn", gc.EspeakVoice("en", "klatt", 30, 180, 1)),
    ("seven", gc.EspeakVoice("en-us", "Annie", 40, 150, 0)),
    ("please call stella and ask her to bring these things with her", gc.EspeakVoice("en-sc", "croak", 20, 200, 4)),
]
MEL_BINS_BELOW_3200_HZ = 53  # mel bins whose upper edge lies below 3.2 kHz (torchaudio's 8 kHz keeps them)
MEL_BINS_BELOW_7000_HZ = 76  # below 7 kHz: untouched by the resamplers' anti-aliasing filters


@pytest.fixture(scope="module")
def speech(tmp_path_factory) -> list[Path]:
    """10 corpus utterances (each text clean and 'other': noisier, other SNR and gain) as 16 kHz FLAC."""
    out = tmp_path_factory.mktemp("speech")
    paths = []
    for i, (text, voice) in enumerate(SPEECH):
        for other in (False, True):
            path = out / f"1-{int(other)}-{i}.flac"
            gc.synthesise(gc.Utterance(path.stem, text, voice, other, (i, int(other)), str(path)), str(out))
            paths.append(path)
    return paths


def int16_samples(path: Path) -> np.ndarray:
    return sf.read(path, dtype="int16")[0]


# --------------------------------------------------------------------------------------------
# Same features as training
# --------------------------------------------------------------------------------------------
def test_samples_of_16bit_files_are_the_training_samples(speech):
    for path in speech:
        assert np.array_equal(read_audio(path), prepare_data.load_waveform(path)[0].numpy())


def test_features_equal_training_features(speech):
    """Measured on these 10 files: normalised features differ from training's by at most 4.3e-4 (mean
    3e-6), raw log-mel fbank from torchaudio's by at most 1.6e-3 (relative 6e-5): float32 FFT and
    summation order, nothing systematic."""
    worst_norm = worst_raw = 0.0
    for path in speech:
        ours, theirs = features(path), prepare_data.load_features(path).numpy()
        samples = sf.info(path).frames
        assert ours.dtype == np.float32
        assert ours.shape == theirs.shape == (1 + (samples - 400) // 160, 80)
        worst_norm = max(worst_norm, float(np.abs(ours - theirs).max()))

        wave = read_audio(path)
        raw = kaldi.fbank(torch.from_numpy(wave)[None], num_mel_bins=80, frame_length=25,
                          frame_shift=10).numpy()
        worst_raw = max(worst_raw, float(np.abs(fbank(wave) - raw).max()))
    assert worst_norm < 5e-4
    assert worst_raw < 2e-3


def test_one_frame_of_audio_is_left_unnormalised_as_in_training(speech, tmp_path):
    path = tmp_path / "frame.wav"
    sf.write(path, int16_samples(speech[0])[8000:8400], 16000, subtype="PCM_16")
    ours, theirs = features(path), prepare_data.load_features(path).numpy()
    assert ours.shape == theirs.shape == (1, 80)
    assert np.abs(ours - theirs).max() < 2e-3
    assert np.abs(ours).max() > 1  # raw log energies: normalisation needs two frames


def test_mv_norm_matches_training_including_constant_dimensions():
    rng = np.random.default_rng(0)
    feats = (rng.standard_normal((50, 80)) * 3 + 7).astype(np.float32)
    expected = prepare_data.apply_mv_norm(torch.from_numpy(feats)).numpy()
    assert np.abs(apply_mv_norm(feats) - expected).max() < 1e-5
    # unbiased variance: one column of [0, 2] has mean 1 and std sqrt(2), so it normalises to -+1/sqrt(2)
    two = np.array([[0.0] * 80, [2.0] * 80], dtype=np.float32)
    assert np.allclose(apply_mv_norm(two), [[-2 ** -0.5] * 80, [2 ** -0.5] * 80], atol=1e-6)
    # a constant column (variance 0 < 1e-8): every column divides by std + 1e-8 and the constant one becomes
    # 0. Training's float32 torch mean of 50 x -15.9 is -15.8999977, so there it becomes -2.3e-6 / 1e-8 =
    # -190.7: a rounding artefact we do not copy (the runtime takes mean and variance in float64).
    feats[:, 5] = -15.9
    ours = apply_mv_norm(feats)
    theirs = prepare_data.apply_mv_norm(torch.from_numpy(feats)).numpy()
    assert np.all(ours[:, 5] == 0)
    assert np.allclose(theirs[:, 5], -190.73486)
    others = np.arange(80) != 5
    assert np.abs(ours[:, others] - theirs[:, others]).max() < 1e-5


# --------------------------------------------------------------------------------------------
# Inputs training would refuse: several channels, other rates, float files
# --------------------------------------------------------------------------------------------
def test_stereo_is_downmixed_to_the_mean_of_its_channels(speech, tmp_path):
    x = int16_samples(speech[0]).astype(np.int32)
    d = np.resize(int16_samples(speech[2]).astype(np.int32) // 4, x.shape)  # another voice, other words
    left, right = x + d, x - d  # their mean is x exactly
    assert max(abs(left).max(), abs(right).max()) < 32768
    stereo = tmp_path / "stereo.wav"
    sf.write(stereo, np.stack([left, right], axis=1).astype(np.int16), 16000, subtype="PCM_16")
    assert np.array_equal(read_audio(stereo), x.astype(np.float32))
    assert np.array_equal(features(stereo), features(speech[0]))
    left_only = tmp_path / "left.wav"
    sf.write(left_only, left.astype(np.int16), 16000, subtype="PCM_16")
    assert np.abs(features(left_only) - features(speech[0])).max() > 1  # not one channel: the mean


def resample_int16(x: np.ndarray, rate: int) -> np.ndarray:
    """16 kHz int16 samples at `rate` with torchaudio (independent of the runtime's soxr), as int16."""
    y = AF.resample(torch.from_numpy(x.astype(np.float64)), 16000, rate).numpy()
    return np.clip(np.round(y), -32768, 32767).astype(np.int16)


@pytest.mark.parametrize("rate,fmt", [(8000, "WAV"), (44100, "FLAC"), (48000, "WAV")])
def test_other_rates_are_resampled_to_16khz(speech, tmp_path, rate, fmt):
    """The 16 kHz corpus file, resampled to `rate` by torchaudio and stored as 16-bit PCM, read back through
    soxr: the same length (+-1 sample) and, in the band both files hold, nearly the same normalised features.
    Measured on these 10 files (worst file): 8 kHz, the 53 mel bins below 3.2 kHz (torchaudio's short
    anti-aliasing filter already cuts into the bins above): mean abs diff 0.0045, correlation 0.99996;
    44.1 and 48 kHz, the 76 bins below 7 kHz: mean abs diff 0.0018, correlation 0.999988; all 80 bins: mean
    abs diff 0.0136, correlation 0.9947 (the top bins, 7.2-8 kHz, lose energy in both resamplers' filters)."""
    for path in speech:
        x = int16_samples(path)
        y = resample_int16(x, rate)
        other = tmp_path / f"{path.stem}.{fmt.lower()}"
        sf.write(other, y, rate, format=fmt, subtype="PCM_16")
        samples = read_audio(other)
        assert samples.dtype == np.float32
        assert abs(samples.shape[0] - y.shape[0] * 16000 / rate) <= 1
        assert abs(samples.shape[0] - x.shape[0]) <= 1
        ours, ref = features(other), features(path)
        n = min(len(ours), len(ref))
        ours, ref = ours[:n], ref[:n]
        if rate == 8000:
            band = slice(0, MEL_BINS_BELOW_3200_HZ)
            assert np.abs(ours[:, band] - ref[:, band]).mean() < 0.0055
            assert np.corrcoef(ours[:, band].ravel(), ref[:, band].ravel())[0, 1] > 0.99993
        else:
            band = slice(0, MEL_BINS_BELOW_7000_HZ)
            assert np.abs(ours[:, band] - ref[:, band]).mean() < 0.0025
            assert np.corrcoef(ours[:, band].ravel(), ref[:, band].ravel())[0, 1] > 0.99998
            assert np.abs(ours - ref).mean() < 0.016
            assert np.corrcoef(ours.ravel(), ref.ravel())[0, 1] > 0.994


def test_float_and_24bit_files_are_scaled_to_int16_range(speech, tmp_path):
    """libsndfile's int16 read of a float file returns the unscaled values (silence); the runtime scales."""
    x = int16_samples(speech[1])
    for subtype in ("FLOAT", "PCM_24"):
        path = tmp_path / f"{subtype}.wav"
        sf.write(path, x.astype(np.float32) / 32768, 16000, subtype=subtype)
        assert np.array_equal(read_audio(path), x.astype(np.float32))
    assert np.abs(sf.read(tmp_path / "FLOAT.wav", dtype="int16")[0]).max() <= 1  # the trap avoided


# --------------------------------------------------------------------------------------------
# Bad input: one clear error each, naming the file
# --------------------------------------------------------------------------------------------
def write_bytes(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(AudioError, match=r"nothere\.flac: audio file not found"):
        features(tmp_path / "nothere.flac")
    with pytest.raises(AudioError, match=r"empty\.wav: audio file is empty \(0 bytes\)"):
        features(write_bytes(tmp_path / "empty.wav", b""))
    with pytest.raises(AudioError, match=r"\w+: not a file, expected a wav or flac file"):
        features(tmp_path)
    no_samples = tmp_path / "nosamples.wav"
    sf.write(no_samples, np.zeros(0, np.int16), 16000, subtype="PCM_16")
    with pytest.raises(AudioError, match=r"nosamples\.wav: no audio samples"):
        features(no_samples)


def test_corrupt_and_truncated_files(speech, tmp_path):
    flac = speech[1].read_bytes()
    noise = np.random.default_rng(0).bytes(5000)
    with pytest.raises(AudioError, match=r"noise\.wav: not a readable audio file, expected wav or flac "
                                         r"\(libsndfile: Format not recognised\)"):
        features(write_bytes(tmp_path / "noise.wav", noise))
    with pytest.raises(AudioError, match=r"text\.flac: not a readable audio file"):
        features(write_bytes(tmp_path / "text.flac", b"this is not audio\n" * 50))
    with pytest.raises(AudioError, match=r"half\.flac: corrupt or truncated FLAC audio \(libsndfile: flac "
                                         r"decoder lost sync\)"):
        features(write_bytes(tmp_path / "half.flac", flac[: len(flac) // 2]))
    with pytest.raises(AudioError, match=r"cut\.flac: corrupt or truncated FLAC audio"):
        features(write_bytes(tmp_path / "cut.flac", flac[:-10]))
    flipped = bytearray(flac)
    flipped[len(flac) // 2] ^= 0xFF
    with pytest.raises(AudioError, match=r"flipped\.flac: corrupt or truncated FLAC audio"):
        features(write_bytes(tmp_path / "flipped.flac", bytes(flipped)))

    wav = tmp_path / "whole.wav"
    sf.write(wav, int16_samples(speech[1]), 16000, subtype="PCM_16")
    frames = sf.info(wav).frames
    data = wav.read_bytes()
    half = write_bytes(tmp_path / "half.wav", data[: 44 + 2 * 1000])  # header + 1000 samples
    assert sf.read(half)[0].shape == (1000,)  # libsndfile reads the rest silently
    with pytest.raises(AudioError, match=rf"half\.wav: truncated WAV audio: 1000 of the {frames} samples its "
                                         r"header announces"):
        features(half)


def test_audio_shorter_than_one_frame(speech, tmp_path):
    x = int16_samples(speech[0])[8000:]
    short = tmp_path / "short.wav"
    sf.write(short, x[:399], 16000, subtype="PCM_16")
    with pytest.raises(AudioError, match=r"short\.wav: 399 samples at 16000 Hz \(24\.9 ms\), shorter than "
                                         r"one 25 ms frame \(400 samples\)"):
        features(short)
    short8k = tmp_path / "short8k.wav"
    sf.write(short8k, x[:150], 8000, subtype="PCM_16")  # 300 samples once resampled
    with pytest.raises(AudioError, match=r"short8k\.wav: 300 samples at 16000 Hz \(18\.8 ms\), shorter"):
        features(short8k)
    with pytest.raises(AudioError, match=r"fbank: 10 samples, shorter than one 25 ms frame"):
        fbank(np.zeros(10, np.float32))


def test_non_finite_samples(tmp_path):
    path = tmp_path / "nan.wav"
    samples = np.full(16000, 0.1, np.float32)
    samples[100] = np.nan
    sf.write(path, samples, 16000, subtype="FLOAT")
    with pytest.raises(AudioError, match=r"nan\.wav: audio contains NaN or infinite samples"):
        features(path)


# --------------------------------------------------------------------------------------------
# Installs on a device without torch and fairseq
# --------------------------------------------------------------------------------------------
def test_runtime_audio_imports_neither_torch_nor_fairseq(speech):
    code = (
        "import sys\n"
        "sys.modules['torch'] = None; sys.modules['fairseq'] = None  # any import of them now fails\n"
        "import fairseq_quant_runtime.audio as audio\n"
        f"feats = audio.features({str(speech[0])!r})\n"
        "loaded = [m for m, mod in sys.modules.items() if mod is not None\n"
        "          and m.split('.')[0] in ('torch', 'torchaudio', 'fairseq', 'examples')]\n"
        "print(feats.shape, loaded)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    frames = 1 + (sf.info(speech[0]).frames - 400) // 160
    assert proc.stdout.strip() == f"({frames}, 80) []"


def test_registration_errors_other_than_missing_frameworks_still_propagate():
    code = (
        "import sys\n"
        "sys.modules['fairseq_quant.criterions'] = None  # a broken module of ours, not a missing framework\n"
        "import fairseq_quant\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode != 0
    assert "ModuleNotFoundError: import of fairseq_quant.criterions halted" in proc.stderr


@pytest.mark.parametrize("workers", [0, 1, 2])
def test_features_ahead_keeps_batch_order_and_values(speech, tmp_path, workers):
    from fairseq_quant_runtime.audio import features, features_ahead

    batches = [speech[:2], speech[2:3], speech[3:], speech[:1]]
    got = list(features_ahead(batches, workers, ahead=2))
    assert [len(b) for b in got] == [len(b) for b in batches]
    for batch, feats in zip(batches, got):
        for path, f in zip(batch, feats):
            np.testing.assert_array_equal(f, features(path))
    bad = write_bytes(tmp_path / "bad.flac", b"fLaC not really")
    stream = features_ahead([speech[:1], [bad]], workers)
    assert len(next(stream)) == 1  # the batch before the bad file arrives
    with pytest.raises(AudioError, match="bad.flac"):
        next(stream)
