"""Export of trained (quantized or fp32) checkpoints for the on-device runtime (:mod:`fairseq_quant_runtime`)."""
