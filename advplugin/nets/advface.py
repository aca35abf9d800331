"""Torch inference of the `advface` scheme: its shadow decoder and per-template refinement.

`advplugin.protectors.advface` runs numpy only; with `refine_steps > 0` it imports this
module (function-locally, so `import advplugin.protectors` never imports torch) to take a
few gradient steps per template against the shipped shadow decoder (either version's: both
weights files record the decoder's shape). The training scripts (`advplugin.training.advface`
and `advface_v2`) use the same functions, so the formulas used in training and at inference
are one copy.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from advplugin.nets.decoder import Decoder, frozen_decoder


class NoiseDirections(Protocol):
    """What `refine` needs of `advplugin.protectors.advface.NoiseGenerator` (a protocol,
    because nets sit below protectors and must not import them)."""

    def direction_and_angle(self, u: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...


def torch_noisy(model: nn.Module, u: torch.Tensor, max_angle: float) -> torch.Tensor:
    """`NoiseGenerator.__call__` in torch (same formula, differentiable)."""
    h = model(u * math.sqrt(u.shape[1]))
    d, logit = h[:, :-1], h[:, -1]
    n = d - (d * u).sum(1, keepdim=True) * u
    n = n / (n.norm(dim=1, keepdim=True) + 1e-12)
    angle = max_angle * torch.sigmoid(logit)
    return torch.cos(angle)[:, None] * u + torch.sin(angle)[:, None] * n


def shadow_decoder(state: Mapping[str, np.ndarray], record: Mapping[str, Any]) -> Decoder:
    """The frozen shadow decoder from the weights file's `dec/*` arrays and its JSON record."""
    return frozen_decoder(
        int(record["dim"]), int(record["decoder_size"]), record["decoder_widths"], state
    )


def decode(decoder: Decoder, t: torch.Tensor) -> torch.Tensor:
    """The decoder's input convention (unit vectors scaled by sqrt(D), as the harness's)."""
    return decoder(t / t.norm(dim=1, keepdim=True) * math.sqrt(t.shape[1]))


def refine(
    u: np.ndarray,
    generator: NoiseDirections,
    decoder_state: Mapping[str, np.ndarray],
    record: Mapping[str, Any],
    *,
    steps: int,
    lr: float,
) -> np.ndarray:
    """Per-template gradient steps on the noise direction against the shadow decoder, at the
    generator's angle (so the budget still holds exactly). Each template is refined on its
    own (batch norm in eval mode), so results do not depend on the batch."""
    decoder = shadow_decoder(decoder_state, record)
    direction, angle = generator.direction_and_angle(u)
    ut = torch.from_numpy(u)
    a = torch.from_numpy(angle)[:, None]
    v = torch.from_numpy(direction).clone().requires_grad_(True)
    opt = torch.optim.Adam([v], lr=lr)
    with torch.no_grad():
        clean = decode(decoder, ut.float())
    for _ in range(steps):
        n = v - (v * ut).sum(1, keepdim=True) * ut
        n = n / n.norm(dim=1, keepdim=True)
        t = torch.cos(a) * ut + torch.sin(a) * n
        loss = -(decode(decoder, t.float()) - clean).abs().mean(dim=(1, 2, 3)).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        n = v - (v * ut).sum(1, keepdim=True) * ut
        n = n / n.norm(dim=1, keepdim=True)
        return (torch.cos(a) * ut + torch.sin(a) * n).numpy()
