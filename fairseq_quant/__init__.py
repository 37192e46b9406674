"""fairseq_quant: a fairseq ``--user-dir`` plugin for honest low-bit quantization of speech transformers.

Importing this package registers with fairseq: the upstream speech_recognition task, VGGTransformer
models and ``cross_entropy_acc`` criterion (made to work on current torch), the ``quant_*``
VGGTransformer architectures and the ``quant_cross_entropy_acc`` criterion. The quantization library
itself lives in :mod:`fairseq_quant.quant` and imports no fairseq. It needs the ``train`` extra (torch,
fairseq); the on-device runtime is a package of its own, :mod:`fairseq_quant_runtime`, which imports
neither, so a device installs only the ``runtime`` extra and never imports this package.
"""
from . import compat

compat.apply()

from . import criterions, models, tasks  # noqa: E402,F401  (registration side effects)
