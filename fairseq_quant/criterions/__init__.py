"""fairseq criteria: ``quant_cross_entropy_acc`` (cross-entropy + accuracy + distillation)."""
from . import quant_cross_entropy_acc  # noqa: F401
