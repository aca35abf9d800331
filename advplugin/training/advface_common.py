"""What both `advface` trainers share (v1: `advplugin.training.advface`, v2:
`advplugin.training.advface_v2`): the shadow decoder's shape, the generator network and its
conversion to the runtime's `NoiseGenerator`, the training data, batch sampling, the held-out
checks, the common options and the weights file. A module of its own so that v1 (which hands
`--version 2` over to v2) and v2 do not import each other.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from advplugin.embedding_files import load_embedding_set
from advplugin.evaluation.data import identity_in_test, list_images
from advplugin.evaluation.faces import aligned_faces, hash_files
from advplugin.evaluation.paths import default_cache_dir
from advplugin.nets.advface import decode
from advplugin.nets.decoder import Decoder, DecoderConfig
from advplugin.protectors.advface import NoiseGenerator
from advplugin.training.common import split_masks

SHADOW = DecoderConfig(size=64, widths=(128, 64, 32, 16, 8), epochs=4, batch_size=64)
#: Held-out images on which the disruption is measured (forward passes are the slow part).
HELDOUT_DISRUPTION = 1000


def generator_net(dim: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
        nn.Linear(hidden, dim + 1),
    )  # fmt: skip


def to_numpy_generator(model: nn.Sequential, max_angle: float) -> NoiseGenerator:
    linears = [m for m in model if isinstance(m, nn.Linear)]
    layers = tuple(
        (m.weight.detach().double().numpy().T.copy(), m.bias.detach().double().numpy().copy())
        for m in linears
    )
    return NoiseGenerator(layers, max_angle)


def load_training_data(
    data: Path, cache_dir: Path | None, test_fraction: float, crop_size: int, progress: bool
) -> dict[str, np.ndarray]:
    """Train people's raw embeddings (cache), identities and aligned crops; test people's
    embeddings and paths for the held-out checks (no crops needed there)."""
    emb = load_embedding_set(data / "lfw-dev-dlib128.npz")
    train_mask, test_mask = split_masks(emb.identity, test_fraction)
    folder = list_images(data / "lfw-dev")
    index = emb.index_by_path()
    keep = np.array([not identity_in_test(str(i), test_fraction) for i in folder.identity])
    folder = folder.subset(np.flatnonzero(keep))
    rows = np.array([index[str(p)] for p in folder.path])
    digests = hash_files(folder, progress=progress)
    crops, _ = aligned_faces(
        folder, digests, crop_size=crop_size, scorer=None, cache_dir=cache_dir, progress=progress
    )
    return {
        "train_raw": emb.embedding[rows].astype(np.float32),
        "train_identity": folder.identity,
        "train_crops": crops,
        "test_raw": emb.embedding[test_mask].astype(np.float32),
        "test_path": emb.path[test_mask],
        "test_identity": emb.identity[test_mask],
        "n_train_cache_rows": np.int64(train_mask.sum()),
    }


def new_generator(
    dim: int, hidden: int, steps: int, seed: int, min_cosine: float
) -> tuple[nn.Sequential, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler, float, np.random.Generator]:
    """A fresh generator with its optimiser and schedule (both versions train it the same
    way), the angle budget, and the seeded generator of batch draws."""
    torch.manual_seed(seed)
    model = generator_net(dim, hidden)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    return model, opt, sched, float(np.arccos(min_cosine)), np.random.default_rng(seed)


def batch_sampler(identity: np.ndarray, batch: int, rng: np.random.Generator) -> Callable[[], np.ndarray]:
    """Indices of one training batch: `batch // 4` people with two photos each (so genuine
    pairs are always in the batch for the pairwise-cosine term), the rest random photos."""
    _, inverse, counts = np.unique(identity, return_inverse=True, return_counts=True)
    multi = [np.flatnonzero(inverse == k) for k in np.flatnonzero(counts >= 2)]
    n = len(identity)

    def sample() -> np.ndarray:
        people = rng.choice(len(multi), batch // 4, replace=False)
        pairs = np.concatenate([rng.choice(multi[p], 2, replace=False) for p in people])
        return np.concatenate([pairs, rng.choice(n, batch - len(pairs), replace=False)])

    return sample


@torch.no_grad()
def disruption(decoder: Decoder, u: np.ndarray, t: np.ndarray, batch: int = 512) -> float:
    """Mean L1 (pixels in [0, 1]) between the shadow decoder's faces from u and from t."""
    total = 0.0
    for i in range(0, len(u), batch):
        a = decode(decoder, torch.from_numpy(u[i : i + batch].astype(np.float32)))
        b = decode(decoder, torch.from_numpy(t[i : i + batch].astype(np.float32)))
        total += float((a - b).abs().mean(dim=(1, 2, 3)).sum())
    return total / len(u)


def random_noise_at(u: np.ndarray, angle: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The baseline: a random direction orthogonal to u at the same angle (same drift)."""
    n = rng.normal(size=u.shape)
    n -= np.sum(n * u, axis=1, keepdims=True) * u
    n /= np.linalg.norm(n, axis=1, keepdims=True)
    return np.cos(angle)[:, None] * u + np.sin(angle)[:, None] * n


def add_data_options(p: argparse.ArgumentParser) -> None:
    """The options both versions' trainers share: data, output, cache, split, budget."""
    p.add_argument("--data", type=Path, default=Path("/work/shared/data"), help="LFW folder")
    p.add_argument("--out", type=Path, required=True, help="weights .npz to write")
    p.add_argument("--cache-dir", type=Path, default=default_cache_dir(), help="landmark cache")
    p.add_argument("--test-fraction", type=float, default=0.5, help="the evaluation's split")
    p.add_argument("--min-cosine", type=float, default=0.9, help="drift budget cos(x, x+g(x))")


def data_record(
    test_fraction: float, data: dict[str, np.ndarray], train_u: np.ndarray, test_u: np.ndarray,
    n_pairs: int, acc_raw: float,
) -> dict[str, object]:
    """What both versions' training records say about their data and held-out baseline."""
    return {
        "split": f"train side of evaluate-split (identity hash, test fraction {test_fraction})",
        "train_images": len(train_u),
        "train_identities": len(np.unique(data["train_identity"])),
        "heldout_images": len(test_u),
        "heldout_pairs": n_pairs,
        "heldout_accuracy_raw": acc_raw,
    }


def save_weights(
    out: Path, generator: NoiseGenerator, max_angle: float, decoder: Decoder, record: dict[str, object]
) -> None:
    """The weights file both versions ship (`protectors.advface.load_weights` reads it):
    the generator's layers, the shadow decoder under `dec/`, the training record as JSON."""
    arrays: dict[str, np.ndarray] = {
        "n_layers": np.int64(len(generator.layers)),
        "max_angle": np.float64(max_angle),
        "record": np.array(json.dumps(record)),
    }
    for i, (w, b) in enumerate(generator.layers):
        arrays[f"g{i}_w"], arrays[f"g{i}_b"] = w.astype(np.float32), b.astype(np.float32)
    for k, v in decoder.state_dict().items():
        arrays[f"dec/{k}"] = v.numpy()
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, **arrays)
    print(json.dumps(record, indent=2))
