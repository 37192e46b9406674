"""The on-device runtime: decodes exported fairseq_quant models with onnxruntime, numpy, soundfile,
sentencepiece and kaldi-native-fbank; it imports neither torch nor fairseq (``pip install .[runtime]``).

- :mod:`.fqm` the exported model file (bit-packed weights, scales, graphs; versioned and checksummed)
- :mod:`.graphs` the stored ONNX graphs made runnable, with a kernel chosen per weight (fp32 or MatMulNBits)
- :mod:`.recognizer` encoder, batched beam search and greedy search (fairseq's rules), transcripts
- :mod:`.audio` wav/flac input (downmix, resampling to 16 kHz) and the training features
- ``python -m fairseq_quant.runtime``: transcribe files, or a manifest with its WER and real-time factor
"""
from .audio import AudioError, apply_mv_norm, fbank, features, read_audio

__all__ = ["AudioError", "apply_mv_norm", "fbank", "features", "read_audio"]
