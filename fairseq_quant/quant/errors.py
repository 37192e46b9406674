"""Errors fairseq_quant reports to users as one line (see fairseq_quant.compat.install_excepthook)."""


class FairseqQuantError(Exception):
    """A problem with the user's input (strategy, checkpoint, teacher, export file), named in the message."""

    def __str__(self) -> str:
        return " ".join(super().__str__().split())  # always one line, whatever the input quoted in it held


class CheckpointError(FairseqQuantError, ValueError):
    """A checkpoint file that cannot be loaded (missing, truncated, corrupted), named in the message."""
