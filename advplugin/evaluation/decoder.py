"""The attacker's training: an NbNet-style template -> face decoder, and template -> raw maps.

The decoder network itself (`Decoder`, `DecoderConfig`) is defined in `advplugin.nets.decoder`
(the `advface` scheme runs a frozen copy at inference, and the runtime must not import
evaluation code); it is re-exported here for the harness and tests. It is trained with an L1
pixel loss on ArcFace-aligned crops, so its output is itself an aligned face that an
independent recognition model can score directly. Widths are small so that it trains on two
CPU cores in minutes: the attack must be cheap to be a credible threat, and the harness must
finish.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from advplugin.nets.decoder import Decoder, DecoderConfig

__all__ = [
    "Decoder",
    "DecoderConfig",
    "apply_linear_map",
    "apply_mlp_map",
    "fit_linear_map",
    "linear_fit_residual",
    "reconstruct",
    "train_decoder",
    "train_mlp_map",
]


def _unit_scaled(templates: np.ndarray) -> torch.Tensor:
    """Unit-normalise then scale by sqrt(D): entries of order 1 whatever the scheme's scale."""
    t = np.asarray(templates, np.float32)
    t = t / np.linalg.norm(t, axis=1, keepdims=True) * np.float32(np.sqrt(t.shape[1]))
    return torch.from_numpy(np.ascontiguousarray(t, dtype=np.float32))


def train_decoder(
    templates: np.ndarray,
    crops: np.ndarray,
    config: DecoderConfig,
    *,
    desc: str = "decoder",
    progress: bool = True,
) -> Decoder:
    """Fit a decoder from templates [N, D] to aligned crops [N, S, S, 3] uint8."""
    torch.manual_seed(config.seed)
    x = _unit_scaled(templates)
    y = torch.from_numpy(
        np.ascontiguousarray(crops.transpose(0, 3, 1, 2))
    )  # uint8, scaled per batch
    model = Decoder(x.shape[1], config)
    opt = torch.optim.Adam(model.parameters(), lr=config.learning_rate, betas=(0.5, 0.999))
    steps = config.epochs * math.ceil(len(x) / config.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, config.learning_rate, total_steps=max(steps, 1)
    )
    generator = torch.Generator().manual_seed(config.seed)
    model.train()
    bar = tqdm(total=steps, desc=desc, disable=not progress)
    for _ in range(config.epochs):
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), config.batch_size):
            idx = order[start : start + config.batch_size]
            if len(idx) < 2:  # batch norm needs two samples
                continue
            target = y[idx].float() / 255.0
            loss = (model(x[idx]) - target).abs().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            bar.update()
            bar.set_postfix(l1=f"{loss.item():.3f}", refresh=False)
    bar.close()
    model.eval()
    return model


@torch.no_grad()
def reconstruct(model: Decoder, templates: np.ndarray, batch: int = 256) -> np.ndarray:
    """Decoder outputs as uint8 images [N, S, S, 3]."""
    x = _unit_scaled(templates)
    out = [model(x[i : i + batch]) for i in range(0, len(x), batch)]
    img = torch.cat(out).permute(0, 2, 3, 1).numpy() * 255.0
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def fit_linear_map(source: np.ndarray, target: np.ndarray, ridge: float = 1e-6) -> np.ndarray:
    """Least-squares W with source @ W ~ target (unit-normalised rows; minimum-norm when
    there are fewer pairs than dimensions)."""
    s = _unit_scaled(source).double().numpy()
    t = _unit_scaled(target).double().numpy()
    if len(s) <= s.shape[1]:
        return np.linalg.lstsq(s, t, rcond=None)[0]
    return np.linalg.solve(s.T @ s + ridge * len(s) * np.eye(s.shape[1]), s.T @ t)


def apply_linear_map(w: np.ndarray, source: np.ndarray) -> np.ndarray:
    return (_unit_scaled(source).double().numpy() @ w).astype(np.float32)


def linear_fit_residual(source: np.ndarray, target: np.ndarray) -> float:
    """1 - mean cosine between targets and their best linear prediction from the sources:
    ~0 for schemes whose template direction is a linear function of the embedding's (cosine
    ignores the per-template normalisation every scheme applies)."""
    w = fit_linear_map(source, target)
    pred = _unit_scaled(source).double().numpy() @ w
    t = np.asarray(target, np.float64)
    cos = np.sum(pred * t, axis=1) / (np.linalg.norm(pred, axis=1) * np.linalg.norm(t, axis=1))
    return float(1.0 - cos.mean())


def train_mlp_map(
    source: np.ndarray,
    target: np.ndarray,
    *,
    epochs: int = 40,
    hidden: int = 512,
    batch_size: int = 128,
    seed: int = 0,
    progress: bool = True,
) -> nn.Module:
    """A two-layer MLP from protected templates to raw embeddings, trained on cosine loss."""
    torch.manual_seed(seed)
    x, y = _unit_scaled(source), _unit_scaled(target)
    model = nn.Sequential(nn.Linear(x.shape[1], hidden), nn.ReLU(), nn.Linear(hidden, y.shape[1]))
    opt = torch.optim.Adam(model.parameters(), lr=2e-3, weight_decay=1e-5)
    generator = torch.Generator().manual_seed(seed)
    for _ in tqdm(range(epochs), desc="MLP map", disable=not progress):
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), batch_size):
            idx = order[start : start + batch_size]
            loss = 1 - nn.functional.cosine_similarity(model(x[idx]), y[idx]).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    return model


@torch.no_grad()
def apply_mlp_map(model: nn.Module, source: np.ndarray) -> np.ndarray:
    return model(_unit_scaled(source)).numpy().astype(np.float32)
