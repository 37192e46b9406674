"""fairseq_quant: a fairseq ``--user-dir`` plugin for honest low-bit quantization of speech transformers.

Importing this package registers with fairseq: the upstream speech_recognition task, VGGTransformer
models and ``cross_entropy_acc`` criterion (made to work on current torch), the ``quant_*``
VGGTransformer architectures and the ``quant_cross_entropy_acc`` criterion. The quantization library
itself lives in :mod:`fairseq_quant.quant` and imports no fairseq. Without torch or fairseq installed
(a device with only the ``runtime`` extra) registration is skipped and :mod:`fairseq_quant.runtime` works.
"""


def _missing_framework(err: ModuleNotFoundError) -> bool:
    """True when ``err`` is torch or fairseq itself (or one of their modules) not being installed."""
    name = err.name or ""
    return any(name == top or name.startswith(top + ".") for top in ("torch", "fairseq"))


try:
    from . import compat

    compat.apply()

    from . import criterions, models, tasks  # noqa: F401  (registration side effects)
except ModuleNotFoundError as _err:
    if not _missing_framework(_err):
        raise
