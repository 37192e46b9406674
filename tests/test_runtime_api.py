"""The Recognizer an application embeds: samples at any rate (floats or int16, mono or several channels),
batches of inputs, and long inputs cut at their quiet frames into segments of bounded length."""
import numpy as np
import pytest
import soundfile as sf

from fairseq_quant_runtime.audio import AudioError, prepare_samples, read_audio
from fairseq_quant_runtime.decoding import DecodingConfig
from fairseq_quant_runtime.recognizer import Recognizer
from fairseq_quant_runtime.segment import FRAME, SegmentConfig, segments

RATE = 16000


def bursts(seconds, silences, seed=0):
    """Noise for ``seconds`` with silent gaps [(start s, end s)]."""
    x = np.random.default_rng(seed).normal(0, 3000, int(seconds * RATE)).astype(np.float32)
    for a, b in silences:
        x[int(a * RATE):int(b * RATE)] = 0
    return x


def test_long_inputs_are_cut_in_their_silences():
    x = bursts(26, [(8, 9), (17, 18)])
    # the latest quietest frame of each search window [limit - 5 s, limit): the silences' last frames
    assert segments(x, SegmentConfig(max_seconds=10, search_seconds=5)) == [
        (0, 899 * FRAME), (899 * FRAME, 1799 * FRAME), (1799 * FRAME, 26 * RATE)]
    assert segments(x, SegmentConfig(max_seconds=30)) == [(0, 26 * RATE)]  # fits: one piece


def test_a_tail_under_one_second_joins_the_last_segment():
    x = bursts(10.6, [(9.9, 9.91)])
    assert segments(x, SegmentConfig(max_seconds=10, search_seconds=5)) == [(0, x.shape[0])]


def test_twenty_minutes_in_bounded_segments():
    x = bursts(20 * 60, [(t, t + 0.3) for t in np.arange(3.5, 20 * 60, 4.0)])  # a pause every 4 s
    cuts = segments(x, SegmentConfig())
    assert cuts[0][0] == 0 and cuts[-1][1] == x.shape[0]
    assert all(a[1] == b[0] for a, b in zip(cuts, cuts[1:]))  # contiguous, in order
    assert all(end - start <= 20 * RATE for start, end in cuts)
    assert all(x[end] == 0 for _, end in cuts[:-1])  # every cut inside a silence
    # each cut at the last pause before its 20 s limit (every 19.5 s or so): about 62 segments
    assert 60 <= len(cuts) <= 65


def test_segment_settings_are_checked():
    with pytest.raises(ValueError, match=r"max_seconds must be in \[1, 600\], got 0"):
        SegmentConfig(max_seconds=0)
    with pytest.raises(ValueError, match=r"search_seconds must be in \(0, max_seconds\), got 20"):
        SegmentConfig(max_seconds=10, search_seconds=20)


def test_samples_become_what_the_model_reads(tmp_path):
    pcm = (np.random.default_rng(1).normal(0, 0.1, RATE) * 32767).clip(-32768, 32767).astype(np.int16)
    path = tmp_path / "a.wav"
    sf.write(path, pcm, RATE, subtype="PCM_16")
    from_file = read_audio(path)
    np.testing.assert_array_equal(prepare_samples(pcm, RATE), from_file)  # int16 PCM
    np.testing.assert_array_equal(prepare_samples(pcm / 32768.0, RATE), from_file)  # floats in [-1, 1]
    np.testing.assert_array_equal(prepare_samples(np.stack([pcm, pcm], axis=1), RATE), from_file)  # stereo
    assert prepare_samples(np.zeros(48000, np.float32), 48000).shape == (RATE,)  # resampled from 48 kHz
    for bad, rate, message in ((pcm.astype(np.int32), RATE, "expected float samples in \\[-1, 1\\] or int16 PCM"),
                               (np.full(800, np.nan), RATE, "contains NaN or infinite samples"),
                               (pcm, 0, "sample_rate must be a positive integer"),
                               (pcm.reshape(2, -1, 1), RATE, "expected \\[samples\\] or \\[samples, channels\\]"),
                               (pcm[:399], RATE, "shorter than one 25 ms frame")):
        with pytest.raises(AudioError, match=message):
            prepare_samples(bad, rate)


def test_recognizer_takes_samples_batches_and_long_inputs(tiny_model_file, tmp_path):
    rec = Recognizer(tiny_model_file, "fp32", "fp32")
    config = DecodingConfig(beam=2, max_len_b=4)
    pcm = (np.random.default_rng(2).normal(0, 0.1, 2 * RATE) * 32767).astype(np.int16)
    path = tmp_path / "b.wav"
    sf.write(path, pcm, RATE, subtype="PCM_16")
    expected = rec.transcribe([path], beam=2, max_len_b=4)[0]
    assert expected  # the tiny model writes something
    assert rec.transcribe_samples(pcm, RATE, config) == expected
    assert rec.transcribe_batch([(pcm, RATE), path, (pcm.astype(np.float32) / 32768, RATE)], config) == [expected] * 3
    long = bursts(26, [(8, 9), (17, 18)]) / 32768
    cut = SegmentConfig(max_seconds=10, search_seconds=5)
    # the same three slices given as three inputs: the same batch, so the same numbers (an untrained model's flat
    # distributions would let padding-order rounding change its words)
    slices = [(long[a:b], RATE) for a, b in segments(long * 32768, cut)]
    assert len(slices) == 3
    pieces = rec.transcribe_batch(slices, config, SegmentConfig(max_seconds=30))
    assert rec.transcribe_samples(long, RATE, config, cut) == " ".join(p for p in pieces if p)


@pytest.mark.parametrize("faster", ["fp32", "nbits", "int8"])
def test_auto_keeps_the_kernel_that_times_faster(tiny_model_file, monkeypatch, faster):
    """``auto`` times the kernels that compute the model's own function (fp32, nbits) at load and keeps the faster
    (the timer stubbed: which kernel is fastest on this CPU is a benchmark's question, not a test's); int8, which
    rounds activations the QAT model never rounded, is never chosen for its speed alone."""
    from fairseq_quant_runtime.graphs import count_kernels

    timed = []

    def fake_time(self, graph, kernel, sess):
        timed.append((graph, kernel))
        return 1.0 if kernel == faster else 2.0

    monkeypatch.setattr(Recognizer, "_time", fake_time)
    rec = Recognizer(tiny_model_file, "auto", "auto")
    chosen = "fp32" if faster == "int8" else faster
    assert rec.kernels == {"encoder": chosen, "decoder": chosen}
    assert sorted(timed) == [(g, k) for g in ("decoder", "encoder") for k in ("fp32", "nbits")]
    for graph in ("encoder", "decoder"):
        kernels = count_kernels(getattr(rec, f"{graph}_graph"))
        assert ("MatMulNBits" in kernels) == (chosen == "nbits")
        assert "DynamicQuantizeMatMul" not in kernels


def test_auto_times_nothing_on_an_fp32_export(dict_dir, tmp_path, monkeypatch):
    """An fp32 export has no weight a low-bit kernel can take: ``auto`` builds each graph once and times nothing
    (timing two identical graphs cost 0.3 s of every load)."""
    from conftest import ROOT, build_tiny

    from fairseq_quant.export.exporter import build_model_file, decode_only_spm
    from fairseq_quant_runtime import fqm

    task, model, _ = build_tiny(dict_dir, extra=["--quant-weight-bits", "fp32", "--quant-act-bits", "fp32"])
    d = task.target_dictionary
    special = {"eos": d.eos(), "pad": d.pad(), "unk": d.unk(), "bos": d.bos()}
    file, summary = build_model_file(model.eval(), list(d.symbols), decode_only_spm(
        ROOT / "recipes/librispeech/reference/spm.model"), special, {}, {})
    assert summary["quantized"] == {}
    fqm.write(tmp_path / "fp32.fqm", file)
    timed = []
    monkeypatch.setattr(Recognizer, "_time", lambda self, graph, kernel, sess: timed.append(kernel) or 1.0)
    rec = Recognizer(tmp_path / "fp32.fqm", "auto", "auto")
    assert rec.kernels == {"encoder": "fp32", "decoder": "fp32"} and timed == []


def test_length_batches_sort_by_length_and_bound_the_padded_frames():
    from fairseq_quant_runtime.decoding import length_batches

    lengths = [300, 100, 700, 120, 2000, 310, 0]
    # sorted: 0 (#6), 100 (#1), 120 (#3), 300 (#0), 310 (#5), 700 (#2), 2000 (#4); at most 1000 padded frames
    assert length_batches(lengths, 1000) == [[6, 1, 3], [0, 5], [2], [4]]
    assert length_batches(lengths, 14_000) == [[6, 1, 3, 0, 5, 2, 4]]
    assert length_batches(lengths, 13_999)[-1] == [4] and length_batches([], 1000) == []
