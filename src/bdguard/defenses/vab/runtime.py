"""How tensors meet the two networks on the training device: float input, memory format, mixed precision."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from bdguard.data.augment import to_float
from bdguard.training.metrics import autocast
from bdguard.training.trainer import batch_indices


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    amp: bool  # bfloat16 autocast (CUDA only, as in the trainer)
    channels_last: bool  # CUDA only, as in the trainer
    quiet: bool

    @classmethod
    def create(cls, device: torch.device, amp: bool, channels_last: bool, quiet: bool) -> Runtime:
        return cls(device, amp, channels_last and device.type == "cuda", quiet)

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        return model.to(memory_format=torch.channels_last) if self.channels_last else model

    def layout(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def inputs(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images -> float in [0, 1] in the networks' memory format."""
        return self.layout(to_float(images))

    def autocast(self):
        return autocast(self.device, self.amp)


def cycle_batches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Shuffled index batches over range(n), reshuffled whenever exhausted (a data loader that restarts)."""
    while True:
        yield from batch_indices(n, batch_size, generator)
