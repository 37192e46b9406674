"""The on-device runtime: decodes exported fairseq_quant models with onnxruntime, numpy, soundfile,
sentencepiece and kaldi-native-fbank; it imports neither torch nor fairseq (``pip install .[runtime]``).

- :mod:`.audio` wav/flac input (downmix, resampling to 16 kHz) and the training features
"""
from .audio import AudioError, apply_mv_norm, fbank, features, read_audio

__all__ = ["AudioError", "apply_mv_norm", "fbank", "features", "read_audio"]
