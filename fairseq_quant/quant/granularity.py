"""How a tensor is split into quantization groups that each get their own scale.

Weights are always handed to quantizers in "output-channel-first" layout ([out, ...]); a
granularity turns that into a 2-D view [groups, values_per_group] and back.
"""
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PerTensor:
    """One scale for the whole tensor."""

    def num_groups(self, shape) -> int:
        return 1

    def group_view(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(1, -1)

    def __str__(self) -> str:
        return "tensor"


@dataclass(frozen=True)
class PerChannel:
    """One scale per output channel (dimension 0 of the output-channel-first layout)."""

    def num_groups(self, shape) -> int:
        return int(shape[0])

    def group_view(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], -1)

    def __str__(self) -> str:
        return "channel"


@dataclass(frozen=True)
class PerGroup:
    """One scale per run of ``group_size`` consecutive input values of each output channel."""

    group_size: int

    def __post_init__(self):
        if self.group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {self.group_size}")

    def check(self, shape, name: str = "tensor") -> None:
        per_channel = 1
        for dim in shape[1:]:
            per_channel *= int(dim)
        if per_channel % self.group_size:
            raise ValueError(
                f"{name}: {per_channel} input values per output channel are not divisible by "
                f"group size {self.group_size}"
            )

    def num_groups(self, shape) -> int:
        total = 1
        for dim in shape:
            total *= int(dim)
        return total // self.group_size

    def group_view(self, x: torch.Tensor) -> torch.Tensor:
        self.check(x.shape)
        return x.reshape(-1, self.group_size)

    def __str__(self) -> str:
        return f"group{self.group_size}"


Granularity = PerTensor | PerChannel | PerGroup


def parse_granularity(text: str, group_size: int | None = None) -> Granularity:
    """'tensor' | 'channel' | 'group' (with group_size) -> granularity object."""
    if text == "tensor":
        return PerTensor()
    if text == "channel":
        return PerChannel()
    if text == "group":
        if group_size is None:
            raise ValueError("granularity 'group' needs group_size")
        return PerGroup(int(group_size))
    raise ValueError(f"unknown granularity {text!r}; expected one of tensor, channel, group")
