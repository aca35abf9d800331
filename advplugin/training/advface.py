"""Train the `advface` weights: a shadow decoder, then the amortised noise generator.

    python -m advplugin.training.advface --data /work/shared/data \
        --out advplugin/protectors/weights/advface-dlib128-v1.npz

Only people on the *train* side of the evaluation harness's identity split are used (the same
hash as `advplugin evaluate-split`, test fraction 0.5), so the evaluation's test people are
unseen by the shadow decoder and the generator. Embeddings come from the shipped dlib cache
(`lfw-dev-dlib128.npz`); decoder targets are the harness's own ArcFace-aligned crops of the
photos, so the shadow decoder draws what the harness's attacker draws. CPU, two threads, a
few minutes.

Losses of the generator (the shadow decoder is frozen):
- disruption: mean L1 distance between the shadow decoder's faces from the clean and from the
  noisy embedding, to be maximised (DESIGN's second, shadow-feature loop through an image ->
  feature encoder is not implemented: it did not fit the CPU budget);
- recognition: squared change of every pairwise cosine in the batch (batches hold two images
  of each of half their people, so genuine pairs are always present), to be minimised;
- the drift budget needs no loss: the construction in `advface.NoiseGenerator` bounds it.

The differentiable formulas shared with inference (`torch_noisy`, the shadow decoder's input
convention) live in `advplugin.nets.advface`; this module holds only the training loops and
checks, and nothing in the runtime imports it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from advplugin.embedding_files import load_embedding_set
from advplugin.evaluation.data import identity_in_test, list_images, restrict_pairs
from advplugin.evaluation.decoder import train_decoder
from advplugin.evaluation.faces import aligned_faces, hash_files
from advplugin.evaluation.metrics import read_pairs, ten_fold_accuracy
from advplugin.evaluation.paths import default_cache_dir
from advplugin.nets.advface import decode, torch_noisy
from advplugin.nets.decoder import Decoder, DecoderConfig
from advplugin.protectors.advface import NoiseGenerator

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


def train_split(data: Path, test_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Masks over the embedding cache rows: (train people, test people) by the harness's hash."""
    emb = load_embedding_set(data / "lfw-dev-dlib128.npz")
    test = np.array([identity_in_test(str(i), test_fraction) for i in emb.identity])
    return ~test, test


def load_training_data(
    data: Path, cache_dir: Path | None, test_fraction: float, crop_size: int, progress: bool
) -> dict[str, np.ndarray]:
    """Train people's raw embeddings (cache), identities and aligned crops; test people's
    embeddings and paths for the held-out checks (no crops needed there)."""
    emb = load_embedding_set(data / "lfw-dev-dlib128.npz")
    train_mask, test_mask = train_split(data, test_fraction)
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


def _unit(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


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


def train_generator(
    train_u: np.ndarray,
    identity: np.ndarray,
    decoder: Decoder,
    *,
    min_cosine: float,
    steps: int,
    hidden: int,
    batch: int,
    lam_sim: float,
    seed: int,
    log_every: int = 100,
) -> tuple[nn.Sequential, float]:
    model, opt, sched, max_angle, rng = new_generator(train_u.shape[1], hidden, steps, seed, min_cosine)
    u_all = torch.from_numpy(train_u.astype(np.float32))
    sample = batch_sampler(identity, batch, rng)
    for step in range(steps):
        u = u_all[sample()]
        with torch.no_grad():
            clean = decode(decoder, u)
        t = torch_noisy(model, u, max_angle)
        disruption = (decode(decoder, t) - clean).abs().mean()
        off = ~torch.eye(len(u), dtype=torch.bool)
        sim = ((t @ t.T - u @ u.T)[off] ** 2).mean()
        loss = -disruption + lam_sim * sim
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if log_every and (step % log_every == 0 or step == steps - 1):
            print(
                f"generator step {step:5d}: disruption {disruption.item():.4f} "
                f"pairwise-cosine rmse {sim.sqrt().item():.4f}",
                flush=True,
            )
    model.eval()
    return model, max_angle


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


def heldout_accuracy(
    templates: np.ndarray, paths: np.ndarray, pairs_file: Path
) -> tuple[float, int]:
    """10-fold accuracy over the pairs of the pairs file whose two images are held-out people."""
    protocol = restrict_pairs(read_pairs(str(pairs_file)), set(map(str, paths)))
    index = {str(p): i for i, p in enumerate(paths)}
    left = _unit(templates[[index[p] for p in protocol.left]])
    right = _unit(templates[[index[p] for p in protocol.right]])
    accuracy, _ = ten_fold_accuracy(np.sum(left * right, axis=1), protocol.same, protocol.fold)
    return float(accuracy), len(protocol.left)


def add_data_options(p: argparse.ArgumentParser) -> None:
    """The options both versions' trainers share: data, output, cache, split, budget."""
    p.add_argument("--data", type=Path, default=Path("/work/shared/data"), help="LFW folder")
    p.add_argument("--out", type=Path, required=True, help="weights .npz to write")
    p.add_argument("--cache-dir", type=Path, default=default_cache_dir(), help="landmark cache")
    p.add_argument("--test-fraction", type=float, default=0.5, help="the evaluation's split")
    p.add_argument("--min-cosine", type=float, default=0.9, help="drift budget cos(x, x+g(x))")


def main(argv: list[str] | None = None) -> int:
    # `--version 2` (also through `advplugin train advface`) hands over to v2's trainer.
    version = argparse.ArgumentParser(add_help=False)
    version.add_argument("--version", type=int, choices=(1, 2), default=1)
    chosen, rest = version.parse_known_args(argv)
    if chosen.version == 2:
        from advplugin.training.advface_v2 import main as main_v2

        return main_v2(rest)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--version", type=int, choices=(1, 2), default=1,
        help="1: this trainer; 2: the complete loop and the adaptive game (advface_v2, "
        "which takes its own options)",
    )  # fmt: skip
    add_data_options(p)
    p.add_argument("--steps", type=int, default=200, help="generator steps")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lam-sim", type=float, default=100.0, help="weight of the cosine loss")
    p.add_argument("--decoder-epochs", type=int, default=SHADOW.epochs)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    started = time.perf_counter()
    data = load_training_data(
        args.data, args.cache_dir, args.test_fraction, SHADOW.size, not args.no_progress
    )
    train_u = _unit(data["train_raw"])
    shadow_cfg = DecoderConfig(
        size=SHADOW.size,
        widths=SHADOW.widths,
        epochs=args.decoder_epochs,
        batch_size=SHADOW.batch_size,
        seed=args.seed,
    )
    decoder = train_decoder(
        data["train_raw"], data["train_crops"], shadow_cfg, desc="shadow decoder",
        progress=not args.no_progress,
    )  # fmt: skip
    for prm in decoder.parameters():
        prm.requires_grad_(False)
    t_decoder = time.perf_counter() - started
    model, max_angle = train_generator(
        train_u,
        data["train_identity"],
        decoder,
        min_cosine=args.min_cosine,
        steps=args.steps,
        hidden=args.hidden,
        batch=args.batch,
        lam_sim=args.lam_sim,
        seed=args.seed,
    )
    generator = to_numpy_generator(model, max_angle)
    # Held-out people: what the generator does to embeddings it never saw.
    test_u = _unit(data["test_raw"])
    noisy = generator(test_u)
    _, angle = generator.direction_and_angle(test_u)
    rng = np.random.default_rng(args.seed)
    acc_raw, n_pairs = heldout_accuracy(test_u, data["test_path"], args.data / "lfw-dev-pairs.txt")
    acc_noisy, _ = heldout_accuracy(noisy, data["test_path"], args.data / "lfw-dev-pairs.txt")
    cos = np.sum(test_u * noisy, axis=1)
    k = HELDOUT_DISRUPTION
    record: dict[str, object] = {
        "dim": int(train_u.shape[1]),
        "min_cosine": args.min_cosine,
        "decoder_size": shadow_cfg.size,
        "decoder_widths": list(shadow_cfg.widths),
        "decoder_epochs": shadow_cfg.epochs,
        "generator_hidden": args.hidden,
        "generator_steps": args.steps,
        "batch": args.batch,
        "lam_sim": args.lam_sim,
        "seed": args.seed,
        "command": "python -m advplugin.training.advface " + " ".join(argv or sys.argv[1:]),
        **data_record(args.test_fraction, data, train_u, test_u, n_pairs, acc_raw),
        "heldout_accuracy_noisy": acc_noisy,
        "heldout_cosine_mean": float(cos.mean()),
        "heldout_cosine_min": float(cos.min()),
        "heldout_disruption_images": min(HELDOUT_DISRUPTION, len(test_u)),
        "heldout_disruption_generator": disruption(decoder, test_u[:k], noisy[:k]),
        "heldout_disruption_random_same_angle": disruption(
            decoder, test_u[:k], random_noise_at(test_u[:k], angle[:k], rng)
        ),
        "torch": torch.__version__,
        "seconds_decoder": round(t_decoder, 1),
        "seconds_total": round(time.perf_counter() - started, 1),
    }
    save_weights(args.out, generator, max_angle, decoder, record)
    return 0


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


if __name__ == "__main__":
    raise SystemExit(main())
