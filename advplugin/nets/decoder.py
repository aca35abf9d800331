"""The NbNet-style template -> face decoder network (definition only).

The decoder follows NbNet (Mai et al., TPAMI 2019): a fully connected layer to a 4x4 map,
then stride-2 transposed convolutions (each with batch norm and leaky ReLU) doubling the
size up to the output, and a 3x3 convolution to RGB. Its output is an aligned face that an
independent recognition model can score directly.

It lives here rather than in `advplugin.evaluation.decoder` (which trains it as the
attacker) because the `advface` scheme also runs a frozen copy at inference time (its
shadow decoder, for `refine_steps`), and the runtime must not import evaluation code.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn


@dataclass(frozen=True)
class DecoderConfig:
    """Architecture (size, widths) and the training schedule `train_decoder` uses; the
    schedule fields are carried here so one value describes a decoder end to end."""

    size: int = 64
    widths: tuple[int, ...] = (256, 128, 64, 32, 16)
    epochs: int = 6
    batch_size: int = 64
    learning_rate: float = 2e-3
    seed: int = 0

    def __post_init__(self) -> None:
        steps = math.log2(self.size / 4)
        if steps != int(steps) or len(self.widths) != int(steps) + 1:
            raise ValueError(
                f"decoder size {self.size} needs {int(steps) + 1} widths (4x4 doubled to the size)"
            )


class Decoder(nn.Module):
    def __init__(self, dim: int, config: DecoderConfig) -> None:
        super().__init__()
        w = config.widths
        self.head = nn.Linear(dim, w[0] * 16)
        self.first = w[0]
        blocks: list[nn.Module] = []
        for a, b in itertools.pairwise(w):
            blocks += [
                nn.ConvTranspose2d(a, b, 4, 2, 1, bias=False),
                nn.BatchNorm2d(b),
                nn.LeakyReLU(0.2),
            ]
        self.body = nn.Sequential(nn.BatchNorm2d(w[0]), nn.LeakyReLU(0.2), *blocks)
        self.out = nn.Conv2d(w[-1], 3, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.head(x).view(len(x), self.first, 4, 4)
        return torch.sigmoid(self.out(self.body(h)))


def frozen_decoder(
    dim: int, size: int, widths: Sequence[int], state: Mapping[str, np.ndarray]
) -> Decoder:
    """A decoder rebuilt from a saved numpy state dict, in eval mode with no gradients on
    its parameters (callers differentiate through it with respect to the input only)."""
    model = Decoder(dim, DecoderConfig(size=size, widths=tuple(widths)))
    model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state.items()})
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model
