"""``speech_recognition_augment``: upstream's speech_recognition task with SpecAugment on the training subset.

    fairseq-train DATA --user-dir fairseq_quant --task speech_recognition_augment \
        --specaugment '{"freq_mask_N": 2, "freq_mask_F": 20, "time_mask_N": 2, "time_mask_T": 30, "time_mask_p": 0.2}' ...

The masks are fairseq's own ``SpecAugmentTransform`` (the keys of its ``from_config_dict``), applied to each
training utterance's fbank features after they are loaded (and after compat's feature cache, which keeps
the clean features). The masks of an utterance depend only on (--seed, epoch, utterance index): a resumed
run draws the same masks. Validation and test subsets are never augmented, and a checkpoint trained with
this task decodes like any other (the task only changes what training sees).
"""
import json
import logging

import numpy as np
import torch
from examples.speech_recognition.tasks.speech_recognition import SpeechRecognitionTask
from fairseq.data import BaseWrapperDataset
from fairseq.data.audio.feature_transforms.specaugment import SpecAugmentTransform
from fairseq.tasks import register_task

from ..quant.errors import FairseqQuantError

logger = logging.getLogger(__name__)
SPECAUGMENT_KEYS = ("time_warp_W", "freq_mask_N", "freq_mask_F", "time_mask_N", "time_mask_T", "time_mask_p",
                    "mask_value")


class AugmentError(FairseqQuantError, ValueError):
    """An invalid --specaugment configuration."""


def parse_specaugment(text: str | None) -> dict:
    """The --specaugment JSON object, checked: known keys, non-negative numbers, masks with a width."""
    if not text:
        return {}
    try:
        config = json.loads(text)
    except json.JSONDecodeError as err:
        raise AugmentError(f"--specaugment is not a JSON object: {err}") from None
    if not isinstance(config, dict):
        raise AugmentError(f"--specaugment must be a JSON object, got {type(config).__name__}")
    unknown = sorted(set(config) - set(SPECAUGMENT_KEYS))
    if unknown:
        raise AugmentError(f"--specaugment: unknown keys {unknown}; known: {list(SPECAUGMENT_KEYS)}")
    for key, value in config.items():
        if key == "mask_value" and value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise AugmentError(f"--specaugment: {key} must be a non-negative number, got {value!r}")
    for count, width in (("freq_mask_N", "freq_mask_F"), ("time_mask_N", "time_mask_T")):
        if config.get(count, 0) > 0 and config.get(width, 0) <= 0:
            raise AugmentError(f"--specaugment: {count} > 0 needs {width} > 0")
    if not 0.0 <= config.get("time_mask_p", 0.0) <= 1.0:
        raise AugmentError(f"--specaugment: time_mask_p must be in [0, 1], got {config['time_mask_p']}")
    return config


class SpecAugmentDataset(BaseWrapperDataset):
    """An AsrDataset whose items carry SpecAugment-masked features, seeded by (seed, epoch, index)."""

    def __init__(self, dataset, config: dict, seed: int):
        super().__init__(dataset)
        self.transform = SpecAugmentTransform.from_config_dict(config)
        self.seed, self.epoch = seed, 1

    def set_epoch(self, epoch):
        super().set_epoch(epoch)
        self.epoch = epoch

    def __getitem__(self, index):
        item = self.dataset[index]
        features = item["data"][0]
        state = np.random.get_state()  # the transform draws from numpy's global generator
        try:
            np.random.seed([self.seed, self.epoch, index])
            masked = self.transform(features.numpy())
        finally:
            np.random.set_state(state)
        return {**item, "data": [torch.from_numpy(np.ascontiguousarray(masked)), *item["data"][1:]]}


@register_task("speech_recognition_augment")
class SpeechRecognitionAugmentTask(SpeechRecognitionTask):
    """speech_recognition with SpecAugment on --train-subset (see the module docstring)."""

    @staticmethod
    def add_args(parser):
        SpeechRecognitionTask.add_args(parser)
        parser.add_argument("--specaugment", type=str, default=None, metavar="JSON",
                            help="SpecAugment of the training subset: a JSON object with fairseq's "
                                 f"SpecAugmentTransform keys {list(SPECAUGMENT_KEYS)}")

    def __init__(self, args, tgt_dict):
        super().__init__(args, tgt_dict)
        self.specaugment = parse_specaugment(getattr(args, "specaugment", None))

    def load_dataset(self, split, combine=False, **kwargs):
        super().load_dataset(split, combine=combine, **kwargs)
        if self.specaugment and split == getattr(self.args, "train_subset", "train"):
            self.datasets[split] = SpecAugmentDataset(self.datasets[split], self.specaugment,
                                                      getattr(self.args, "seed", 1))
            logger.info("SpecAugment on %s: %s", split, self.datasets[split].transform)
