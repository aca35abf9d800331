"""Train `advface` v2 weights: AdvFace's complete shadow loop, then an adaptive game.

    python -m advplugin.training.advface_v2 --data /work/shared/data \
        --out advplugin/protectors/weights/advface-dlib128-v2.npz

What v1 (`advplugin.training.advface`) left out, now that dlib's network runs in torch
(`advplugin.nets.dlib_resnet`, through `evaluation.decoder.IdentityLoss`):

1. **Shadow decoder D0** with pixel + identity loss: the harness's `train_decoder` with
   `identity_weight` (0.03, the best weight `benchmarks/identity_decoder.py` found), on the
   train people's (raw embedding, aligned crop) pairs.
2. **The complete loop**: for a clean unit embedding u and its protected t, the generator
   maximises what differs between the clean and the protected pipeline at every stage:
   shadow image D(u) vs D(t) (L1), shadow feature F(D(u)) vs F(D(t)) (1 - cosine, F = dlib's
   ResNet in torch), reconstructed image D0(F(D(u))) vs D0(F(D(t))) (L1); under v1's
   accuracy constraint (squared change of every pairwise cosine in the batch) and v1's
   drift budget construction (`advface.NoiseGenerator`: cosine(u, t) >= 0.9 exactly).
3. **Adaptive game** (beyond the paper): a second shadow decoder Da, started from D0, is
   retrained on (protected template, crop) pairs with the same pixel + identity loss, one
   step after every generator step (GAN-style alternation); the generator's loss holds the
   loop terms for both D = D0 (the naive attacker) and D = Da (the attacker who adapts).

Only the train people of the evaluation's identity split are used (v1's loader, cached
crops); the record holds held-out figures (10-fold accuracy on the lfw-dev pairs among
held-out people, disruption of D0 and of the final Da, loop-feature cosines) beside v1's
generator measured the same way. CPU, one thread by default (~30 min on a shared machine).
The shipped file has v1's layout (generator `g*`, shadow decoder `dec/*`, JSON `record`),
so `advplugin.protectors.advface.load_weights` reads both.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from advplugin.evaluation.decoder import IdentityLoss, dlib_identity_loss, train_decoder
from advplugin.nets.advface import decode, torch_noisy
from advplugin.nets.decoder import Decoder, DecoderConfig
from advplugin.protectors.advface import NoiseGenerator, load_weights
from advplugin.protectors.base import l2_normalize
from advplugin.training.advface_common import (
    HELDOUT_DISRUPTION,
    SHADOW,
    add_data_options,
    batch_sampler,
    data_record,
    disruption,
    load_training_data,
    new_generator,
    random_noise_at,
    save_weights,
    to_numpy_generator,
)
from advplugin.training.common import pair_accuracy

#: Identity weight of both shadow decoders: the best of benchmarks/identity_decoder.py.
IDENTITY_WEIGHT = 0.03
#: Framing jitter of the identity loss while decoders train (as identity_decoder.py).
JITTER = 0.05


def _decoder_optimizer(decoder: Decoder, config: DecoderConfig) -> torch.optim.Optimizer:
    """`train_decoder`'s optimiser settings, for the adaptive decoder's alternating steps."""
    return torch.optim.Adam(decoder.parameters(), lr=config.learning_rate, betas=(0.5, 0.999))


def loop_terms(
    shadow: Decoder, attacker: Decoder, feature: IdentityLoss, u: torch.Tensor, t: torch.Tensor
) -> dict[str, torch.Tensor]:
    """The complete loop, clean u through `shadow` vs protected t through `attacker`:
    shadow images, shadow features (dlib of the shadow image) and reconstructed images
    (`shadow` applied to the shadow feature: F's output is a raw-space embedding). Each
    term is a per-row distance [N]; gradients flow through t only."""
    with torch.no_grad():
        image_c = decode(shadow, u)
        feature_c = feature.embed(image_c)
        recon_c = decode(shadow, feature_c)
    image_p = decode(attacker, t)
    feature_p = feature.embed(image_p)
    recon_p = decode(shadow, feature_p)
    return {
        "image": (image_p - image_c).abs().mean(dim=(1, 2, 3)),
        "feature": 1.0 - F.cosine_similarity(feature_p, feature_c, dim=1),
        "recon": (recon_p - recon_c).abs().mean(dim=(1, 2, 3)),
    }


def pairwise_cosine_change(u: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """v1's accuracy constraint: mean squared change of every off-diagonal cosine."""
    off = ~torch.eye(len(u), dtype=torch.bool)
    return ((t @ t.T - u @ u.T)[off] ** 2).mean()


def train_game(
    train_u: np.ndarray,
    identity: np.ndarray,
    crops: np.ndarray,
    shadow: Decoder,
    feature: IdentityLoss,
    adapt_loss: IdentityLoss,
    decoder_config: DecoderConfig,
    *,
    min_cosine: float,
    steps: int,
    hidden: int,
    batch: int,
    loop_batch: int,
    adapt_batch: int,
    lam_sim: float,
    w_feature: float,
    adaptive: bool,
    seed: int,
    log_every: int = 10,
) -> tuple[torch.nn.Sequential, float, Decoder, list[dict[str, float]]]:
    """Generator steps on the complete loop (naive D0 and, if `adaptive`, Da), each followed
    by one step of Da on the current generator's templates. Returns the generator, its
    angle budget, the final Da and a log of the losses."""
    model, opt, sched, max_angle, rng = new_generator(train_u.shape[1], hidden, steps, seed, min_cosine)
    attacker = copy.deepcopy(shadow)
    for prm in attacker.parameters():
        prm.requires_grad_(True)
    attacker_opt = _decoder_optimizer(attacker, decoder_config)
    u_all = torch.from_numpy(train_u.astype(np.float32))
    y_all = torch.from_numpy(np.ascontiguousarray(crops.transpose(0, 3, 1, 2)))  # uint8
    sample = batch_sampler(identity, batch, rng)
    log: list[dict[str, float]] = []
    for step in range(steps):
        # Generator step: v1's batch (genuine pairs always present) for the cosine loss, the
        # loop on a random part of it (dlib's ResNet is the slow part).
        idx = sample()
        u = u_all[idx]
        t = torch_noisy(model, u, max_angle)
        sim = pairwise_cosine_change(u, t)
        part = torch.from_numpy(rng.choice(batch, loop_batch, replace=False))
        attacker.eval()
        naive = loop_terms(shadow, shadow, feature, u[part], t[part])
        terms = {f"naive_{k}": v.mean() for k, v in naive.items()}
        if adaptive:
            adapted = loop_terms(shadow, attacker, feature, u[part], t[part])
            terms.update({f"adaptive_{k}": v.mean() for k, v in adapted.items()})
        gain = sum(
            (w_feature if name.endswith("feature") else 1.0) * value
            for name, value in terms.items()
        )
        loss = -gain + lam_sim * sim
        opt.zero_grad()
        attacker_opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        # Attacker step: Da learns the current generator's templates (pixel + identity).
        figures = {k: float(v.detach()) for k, v in terms.items()}
        if adaptive:
            attacker.train()
            a_idx = torch.from_numpy(rng.choice(len(train_u), adapt_batch, replace=False))
            with torch.no_grad():
                t_a = torch_noisy(model, u_all[a_idx], max_angle)
            out = decode(attacker, t_a)
            pixel = (out - y_all[a_idx].float() / 255.0).abs().mean()
            ident = adapt_loss(out, u_all[a_idx]).mean()
            attacker_opt.zero_grad()
            (pixel + IDENTITY_WEIGHT * ident).backward()
            attacker_opt.step()
            figures.update(
                attacker_l1=float(pixel.detach()), attacker_identity=float(ident.detach())
            )
        figures.update(step=step, cosine_rmse=float(sim.detach().sqrt()))
        log.append(figures)
        if log_every and (step % log_every == 0 or step == steps - 1):
            print("game " + json.dumps({k: round(v, 4) for k, v in figures.items()}), flush=True)
    model.eval()
    attacker.eval()
    for prm in attacker.parameters():
        prm.requires_grad_(False)
    return model, max_angle, attacker, log


@torch.no_grad()
def loop_figures(
    shadow: Decoder,
    attacker: Decoder,
    feature: IdentityLoss,
    u: np.ndarray,
    t: np.ndarray,
    batch: int = 100,
) -> dict[str, float]:
    """Held-out means of the loop terms, and dlib's cosine between the shadow feature of the
    protected template and the person's own embedding (how much identity the attacker's
    reconstruction keeps; clean reconstructions give the reference)."""
    sums: dict[str, float] = {}
    for i in range(0, len(u), batch):
        ub = torch.from_numpy(u[i : i + batch].astype(np.float32))
        tb = torch.from_numpy(t[i : i + batch].astype(np.float32))
        terms = loop_terms(shadow, attacker, feature, ub, tb)
        feature_p = feature.embed(decode(attacker, tb))
        terms["identity_kept"] = F.cosine_similarity(feature_p, ub, dim=1)
        for k, v in terms.items():
            sums[k] = sums.get(k, 0.0) + float(v.sum())
    return {k: v / len(u) for k, v in sums.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_data_options(p)
    p.add_argument("--steps", type=int, default=120, help="generator steps (each + 1 Da step)")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--batch", type=int, default=128, help="generator batch (cosine loss)")
    p.add_argument("--loop-batch", type=int, default=16, help="rows of it through the loop")
    p.add_argument("--adapt-batch", type=int, default=32, help="adaptive decoder batch")
    p.add_argument("--lam-sim", type=float, default=100.0, help="weight of the cosine loss")
    p.add_argument("--w-feature", type=float, default=1.0, help="weight of the feature terms")
    p.add_argument("--no-adaptive", action="store_true", help="the loop against D0 only")
    p.add_argument("--decoder-epochs", type=int, default=2)
    p.add_argument("--heldout-loop", type=int, default=200, help="held-out rows for F figures")
    p.add_argument("--v1-weights", type=Path, default=None, help="measure v1 alongside")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    data = load_training_data(
        args.data, args.cache_dir, args.test_fraction, SHADOW.size, not args.no_progress
    )
    train_u = l2_normalize(data["train_raw"], np.float64)
    shadow_cfg = DecoderConfig(
        size=SHADOW.size, widths=SHADOW.widths, epochs=args.decoder_epochs,
        batch_size=SHADOW.batch_size, seed=args.seed,
    )  # fmt: skip
    shadow = train_decoder(
        data["train_raw"], data["train_crops"], shadow_cfg, desc="shadow decoder",
        progress=not args.no_progress, identity_weight=IDENTITY_WEIGHT,
        identity_loss=dlib_identity_loss(jitter=JITTER),
    )  # fmt: skip
    for prm in shadow.parameters():
        prm.requires_grad_(False)
    t_decoder = time.perf_counter() - started
    print(f"shadow decoder: {t_decoder:.0f} s", flush=True)
    feature = dlib_identity_loss()  # fixed framing: F of the loop and of the figures
    feature.eval()
    model, max_angle, attacker, log = train_game(
        train_u, data["train_identity"], data["train_crops"], shadow, feature,
        dlib_identity_loss(jitter=JITTER), shadow_cfg,
        min_cosine=args.min_cosine, steps=args.steps, hidden=args.hidden, batch=args.batch,
        loop_batch=args.loop_batch, adapt_batch=args.adapt_batch, lam_sim=args.lam_sim,
        w_feature=args.w_feature, adaptive=not args.no_adaptive, seed=args.seed,
    )  # fmt: skip
    t_game = time.perf_counter() - started - t_decoder
    generator = to_numpy_generator(model, max_angle)

    # Held-out people: what the generator does to embeddings it never saw.
    test_u = l2_normalize(data["test_raw"], np.float64)
    pairs_file = args.data / "lfw-dev-pairs.txt"
    rng = np.random.default_rng(args.seed)
    k, m = HELDOUT_DISRUPTION, args.heldout_loop

    def measured(gen: NoiseGenerator) -> dict[str, object]:
        noisy = gen(test_u)
        _, angle = gen.direction_and_angle(test_u)
        cos = np.sum(test_u * noisy, axis=1)
        random_t = random_noise_at(test_u[:m], angle[:m], rng)
        return {
            "heldout_accuracy_noisy": pair_accuracy(noisy, data["test_path"], pairs_file)[0],
            "heldout_cosine_mean": float(cos.mean()),
            "heldout_cosine_min": float(cos.min()),
            "heldout_disruption_generator": disruption(shadow, test_u[:k], noisy[:k]),
            "heldout_disruption_random_same_angle": disruption(
                shadow, test_u[:k], random_noise_at(test_u[:k], angle[:k], rng)
            ),
            "heldout_disruption_adaptive_decoder": disruption(attacker, test_u[:k], noisy[:k]),
            "loop_naive": loop_figures(shadow, shadow, feature, test_u[:m], noisy[:m]),
            "loop_adaptive_decoder": loop_figures(shadow, attacker, feature, test_u[:m], noisy[:m]),
            "loop_naive_random_same_angle": loop_figures(
                shadow, shadow, feature, test_u[:m], random_t
            ),
        }

    acc_raw, n_pairs = pair_accuracy(test_u, data["test_path"], pairs_file)
    clean = loop_figures(shadow, shadow, feature, test_u[:m], test_u[:m])
    record: dict[str, object] = {
        "scheme_version": 2,
        "dim": int(train_u.shape[1]),
        "min_cosine": args.min_cosine,
        "decoder_size": shadow_cfg.size,
        "decoder_widths": list(shadow_cfg.widths),
        "decoder_epochs": shadow_cfg.epochs,
        "decoder_identity_weight": IDENTITY_WEIGHT,
        "decoder_identity_jitter": JITTER,
        "generator_hidden": args.hidden,
        "generator_steps": args.steps,
        "batch": args.batch,
        "loop_batch": args.loop_batch,
        "adapt_batch": args.adapt_batch,
        "adaptive_game": not args.no_adaptive,
        "lam_sim": args.lam_sim,
        "w_feature": args.w_feature,
        "seed": args.seed,
        "threads": args.threads,
        "command": "python -m advplugin.training.advface_v2 " + " ".join(argv or sys.argv[1:]),
        **data_record(args.test_fraction, data, train_u, test_u, n_pairs, acc_raw),
        "heldout_disruption_images": min(k, len(test_u)),
        "heldout_loop_images": min(m, len(test_u)),
        "loop_clean_identity_kept": clean["identity_kept"],
        **measured(generator),
        "game_log_first": log[0],
        "game_log_last": log[-1],
        "torch": torch.__version__,
        "seconds_decoder": round(t_decoder, 1),
        "seconds_game": round(t_game, 1),
    }
    if args.v1_weights is not None:
        v1, _, _ = load_weights(args.v1_weights)
        record["v1_same_measures"] = measured(v1)
    record["seconds_total"] = round(time.perf_counter() - started, 1)
    save_weights(args.out, generator, max_angle, shadow, record)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
