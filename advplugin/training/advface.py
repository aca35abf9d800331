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
import sys
import time

import numpy as np
import torch
from torch import nn

from advplugin.evaluation.decoder import train_decoder
from advplugin.nets.advface import decode, torch_noisy
from advplugin.nets.decoder import Decoder, DecoderConfig
from advplugin.protectors.base import l2_normalize
from advplugin.training import advface_common as shared
from advplugin.training.common import pair_accuracy


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
    model, opt, sched, max_angle, rng = shared.new_generator(train_u.shape[1], hidden, steps, seed, min_cosine)
    u_all = torch.from_numpy(train_u.astype(np.float32))
    sample = shared.batch_sampler(identity, batch, rng)
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
    shared.add_data_options(p)
    p.add_argument("--steps", type=int, default=200, help="generator steps")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lam-sim", type=float, default=100.0, help="weight of the cosine loss")
    p.add_argument("--decoder-epochs", type=int, default=shared.SHADOW.epochs)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    started = time.perf_counter()
    data = shared.load_training_data(
        args.data, args.cache_dir, args.test_fraction, shared.SHADOW.size, not args.no_progress
    )
    train_u = l2_normalize(data["train_raw"], np.float64)
    shadow_cfg = DecoderConfig(
        size=shared.SHADOW.size,
        widths=shared.SHADOW.widths,
        epochs=args.decoder_epochs,
        batch_size=shared.SHADOW.batch_size,
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
    generator = shared.to_numpy_generator(model, max_angle)
    # Held-out people: what the generator does to embeddings it never saw.
    test_u = l2_normalize(data["test_raw"], np.float64)
    noisy = generator(test_u)
    _, angle = generator.direction_and_angle(test_u)
    rng = np.random.default_rng(args.seed)
    acc_raw, n_pairs = pair_accuracy(test_u, data["test_path"], args.data / "lfw-dev-pairs.txt")
    acc_noisy, _ = pair_accuracy(noisy, data["test_path"], args.data / "lfw-dev-pairs.txt")
    cos = np.sum(test_u * noisy, axis=1)
    k = shared.HELDOUT_DISRUPTION
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
        **shared.data_record(args.test_fraction, data, train_u, test_u, n_pairs, acc_raw),
        "heldout_accuracy_noisy": acc_noisy,
        "heldout_cosine_mean": float(cos.mean()),
        "heldout_cosine_min": float(cos.min()),
        "heldout_disruption_images": min(shared.HELDOUT_DISRUPTION, len(test_u)),
        "heldout_disruption_generator": shared.disruption(decoder, test_u[:k], noisy[:k]),
        "heldout_disruption_random_same_angle": shared.disruption(
            decoder, test_u[:k], shared.random_noise_at(test_u[:k], angle[:k], rng)
        ),
        "torch": torch.__version__,
        "seconds_decoder": round(t_decoder, 1),
        "seconds_total": round(time.perf_counter() - started, 1),
    }
    shared.save_weights(args.out, generator, max_angle, decoder, record)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
