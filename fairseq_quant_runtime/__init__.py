"""The on-device runtime: decodes exported fairseq_quant models with onnxruntime, numpy, soundfile,
sentencepiece and soxr (``pip install .[runtime]``).

It is a package of its own, beside the fairseq plugin: importing it never imports torch or fairseq, whatever
is installed (``tests/test_runtime_imports.py``). The plugin imports what they share from here, never the
reverse:

- :mod:`.fqm` the exported model file (bit-packed weights, scales, graphs; versioned and checksummed)
- :mod:`.ctc` the CTC prefix scorer of joint CTC/attention decoding (used by fairseq_quant.evaluate too)
- :mod:`.graphs` the stored ONNX graphs made runnable, with a kernel chosen per weight (fp32 or MatMulNBits)
- :mod:`.recognizer` encoder, batched beam search and greedy search (fairseq's rules), transcripts
- :mod:`.audio` wav/flac input (downmix, resampling to 16 kHz) and the training features
- ``python -m fairseq_quant_runtime``: transcribe files, or a manifest with its WER and real-time factor

Submodules are imported where they are used: the file format and the CTC scorer need only numpy, so the
``train`` extra (which has no soxr or onnxruntime) can export and evaluate.
"""
