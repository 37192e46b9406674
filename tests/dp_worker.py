"""One worker of a data-parallel ``fairseq-train`` job, run by test_data_parallel.py: fairseq-train's own
command line, then the worker saves the quantizer state its model ended with to ``$FAIRSEQ_QUANT_DUMP``
(only rank 0 writes checkpoints, so the other workers' state is otherwise invisible)."""
import os

import torch
from fairseq import trainer as trainer_module
from fairseq_cli import train

TRAINERS = []
_init = trainer_module.Trainer.__init__


def _recording_init(self, *args, **kwargs):
    _init(self, *args, **kwargs)
    TRAINERS.append(self)


trainer_module.Trainer.__init__ = _recording_init

if __name__ == "__main__":
    train.cli_main()
    model = TRAINERS[0].get_model()  # unwrapped from the data-parallel wrapper
    state = {k: v.detach().clone() for k, v in model.state_dict().items()
             if "_quantizer." in k or k == "quant_calibrated"}
    torch.save(state, os.environ["FAIRSEQ_QUANT_DUMP"])
