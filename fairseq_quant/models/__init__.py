"""fairseq models: quantized VGGTransformer architectures (``quant_vggtransformer_*``)."""
from . import quant_vggtransformer  # noqa: F401
