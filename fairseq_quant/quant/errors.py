"""Errors fairseq_quant reports to users as one line (see fairseq_quant.compat.install_excepthook)."""


class FairseqQuantError(Exception):
    """A problem with the user's input (strategy, checkpoint, teacher, export file), named in the message."""
