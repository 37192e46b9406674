"""SpecAugment of the training subset (task speech_recognition_augment): fairseq's own masks, reproducible per
(seed, epoch, utterance), the clean features untouched, and one clear error for a bad configuration."""
import numpy as np
import pytest
import torch
from fairseq.data import FairseqDataset

from fairseq_quant.tasks.speech_recognition_augment import AugmentError, SpecAugmentDataset, parse_specaugment

CONFIG = {"freq_mask_N": 2, "freq_mask_F": 20, "time_mask_N": 2, "time_mask_T": 30, "time_mask_p": 0.2}


class Features(FairseqDataset):
    """AsrDataset's item layout: {"id", "data": [features [frames, 80], target]}."""

    def __init__(self, n=4, frames=200):
        g = torch.Generator().manual_seed(0)
        self.items = [torch.randn(frames, 80, generator=g) for _ in range(n)]

    def __getitem__(self, index):
        return {"id": index, "data": [self.items[index], torch.tensor([5, 6, 2])]}

    def __len__(self):
        return len(self.items)


def masked_cells(before: torch.Tensor, after: torch.Tensor) -> int:
    return int((before != after).sum())


def test_masks_are_fairseqs_and_reproducible_per_seed_epoch_and_utterance():
    clean = Features()
    data = SpecAugmentDataset(clean, CONFIG, seed=1)
    np.random.seed(123)
    outside = np.random.get_state()[1].copy()
    first = [data[i]["data"][0] for i in range(4)]
    assert np.array_equal(np.random.get_state()[1], outside)  # the global generator is left as it was
    for i, x in enumerate(first):
        assert x.shape == (200, 80) and x.dtype == torch.float32
        changed = x != clean.items[i]
        assert 0 < masked_cells(clean.items[i], x) < 200 * 80 * 0.75
        # masks are whole frequency bands and whole frame spans set to one value (the utterance mean)
        assert torch.unique(x[changed]).numel() == 1
        assert torch.equal(data[i]["data"][1], torch.tensor([5, 6, 2]))
    assert all(torch.equal(a, data[i]["data"][0]) for i, a in enumerate(first))  # same epoch: same masks
    masks = [x != clean.items[i] for i, x in enumerate(first)]
    assert not torch.equal(masks[0], masks[1])  # different utterances: different masks
    data.set_epoch(2)
    assert not torch.equal(data[0]["data"][0], first[0])
    assert not torch.equal(SpecAugmentDataset(clean, CONFIG, seed=2)[0]["data"][0], first[0])
    assert torch.equal(clean[0]["data"][0], Features()[0]["data"][0])  # the cached clean features are not modified


@pytest.mark.parametrize("text,message", [
    ("{", "is not a JSON object"),
    ("[1, 2]", "must be a JSON object, got list"),
    ('{"freq_mask": 2}', r"unknown keys \['freq_mask'\]"),
    ('{"freq_mask_N": -1}', "freq_mask_N must be a non-negative number"),
    ('{"time_mask_N": 2}', "time_mask_N > 0 needs time_mask_T > 0"),
    ('{"time_mask_N": 1, "time_mask_T": 5, "time_mask_p": 2}', r"time_mask_p must be in \[0, 1\]"),
])
def test_a_bad_configuration_is_one_clear_error(text, message):
    with pytest.raises(AugmentError, match=message):
        parse_specaugment(text)
    assert parse_specaugment(None) == {} and parse_specaugment('{"freq_mask_N": 1, "freq_mask_F": 3}')
