"""The reconstruction attacker of issue 15 and its judges, shared by the harness and
`benchmarks/identity_decoder.py` (which measured the recipe: 20.0 % of reconstructions from
raw templates accepted by mobileface at FAR 1e-3 against 5.3 % for the L1-only decoder).

The attacker (`AttackRecipe`, `train_attack_decoder`) is an NbNet-style decoder trained only
on the train people, with

- an identity loss through dlib's own ResNet in torch (`decoder.IdentityLoss`): the attacked
  network is public, so the attacker can aim at what it sees, not only at pixels;
- flip augmentation *re-embedded*: the mirrored photo is another photo of the person, and
  its template is the template of the mirrored photo (dlib's embedding of the mirrored crop,
  protected by the scheme for the adaptive attacker, who enrols it through the API), not the
  original's;
- early stopping on a validation split of the train people (by a hash of the name).

Reconstructions are judged (`ReconstructionJudge`) in ISO/IEC 30136's two ways: *type I*, by
the system under attack itself (dlib, via its ResNet in torch on the reconstruction warped to
dlib's chip; threshold at dlib's FAR on real test pairs), and *type II*, by an independent
recognition model (the scorer, e.g. mobileface). Success attack rate = the fraction of
reconstructions accepted as the right person against **another** photo of that person.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from advplugin.evaluation import attacks
from advplugin.evaluation.data import identity_in_test
from advplugin.evaluation.decoder import (
    Decoder,
    DecoderConfig,
    EpochCallback,
    IdentityLoss,
    dlib_identity_loss,
    train_decoder,
)
from advplugin.evaluation.metrics import psnr, ssim
from advplugin.evaluation.recipe import FARS, VALIDATION_SALT, AttackRecipe, far_key
from advplugin.protectors.base import l2_normalize

__all__ = [
    "FARS",
    "AttackRecipe",
    "ChipScorer",
    "JudgeScorer",
    "ReconstructionJudge",
    "far_key",
    "mirrored_embeddings",
    "other_photo",
    "train_attack_decoder",
    "validation_split",
]


class ChipScorer:
    """dlib's ResNet (torch) as a scorer of ArcFace-aligned crops of any size (uint8
    [N, S, S, 3]): each crop is warped to dlib's 150-px chip framing (`IdentityLoss.chips`)
    and embedded. Type I's judge, and the source of the mirrored photos' templates."""

    def __init__(self, loss: IdentityLoss | None = None, batch: int = 64) -> None:
        self.loss = loss or dlib_identity_loss()
        self.batch, self.dim = batch, 128

    @torch.no_grad()
    def embed_aligned(self, crops: np.ndarray) -> np.ndarray:
        self.loss.eval()
        out = [np.zeros((0, self.dim), np.float32)]
        for start in range(0, len(crops), self.batch):
            chunk = np.ascontiguousarray(crops[start : start + self.batch].transpose(0, 3, 1, 2))
            out.append(self.loss.embed(torch.from_numpy(chunk).float() / 255.0).numpy())
        return np.concatenate(out).astype(np.float32)


def mirrored_embeddings(scorer: ChipScorer, crops: np.ndarray) -> np.ndarray:
    """Raw embeddings of the mirrored photos: dlib's (torch) embeddings of the mirrored crops."""
    return scorer.embed_aligned(np.ascontiguousarray(crops[:, :, ::-1]))


def validation_split(identity: np.ndarray, fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(fit rows, validation rows): whole people held out, by a hash of the name. No
    validation rows when `fraction` is 0 or would leave either side empty."""
    held = np.array([identity_in_test(str(n), fraction, VALIDATION_SALT) for n in identity])
    if fraction <= 0 or held.all() or not held.any():
        return np.arange(len(identity)), np.zeros(0, np.int64)
    return np.flatnonzero(~held), np.flatnonzero(held)


def train_attack_decoder(
    templates: np.ndarray,
    raw: np.ndarray,
    crops: np.ndarray,
    identity: np.ndarray,
    config: DecoderConfig,
    recipe: AttackRecipe,
    *,
    mirrored_templates: np.ndarray | None = None,
    mirrored_raw: np.ndarray | None = None,
    desc: str = "decoder",
    progress: bool = True,
    on_epoch: EpochCallback | None = None,
) -> Decoder:
    """The attacker's decoder from templates (raw or protected, [N, D]) of the train photos
    to their crops. The identity loss aims at the photos' *raw* embeddings (`raw`: dlib is
    public, so the attacker computes them for its own photos), whatever the templates are.
    With `recipe.flip`, `mirrored_templates`/`mirrored_raw` are those of the mirrored photos
    (`mirrored_embeddings`, then the scheme's `protect`)."""
    fit, val = validation_split(identity, recipe.val_fraction)
    options: dict[str, object] = {}
    if recipe.identity_weight > 0:
        options.update(
            identity_weight=recipe.identity_weight,
            identity_targets=raw[fit],
            identity_loss=dlib_identity_loss(jitter=recipe.jitter, blur=recipe.blur),
        )
    if recipe.flip:
        if mirrored_templates is None or mirrored_raw is None:
            raise ValueError("flip augmentation needs the mirrored photos' templates and raw")
        options.update(flipped_templates=mirrored_templates[fit], flipped_targets=mirrored_raw[fit])
    if len(val):
        options["validation"] = (templates[val], crops[val], raw[val])
    return train_decoder(
        templates[fit], crops[fit], config, desc=desc, progress=progress, on_epoch=on_epoch,
        **options,
    )  # fmt: skip


def other_photo(identity: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """For each row, another photo of the same person (the next one, cyclically)."""
    out = np.empty(len(rows), np.int64)
    for i, r in enumerate(rows):
        same = np.flatnonzero(identity == identity[r])
        out[i] = same[(np.searchsorted(same, r) + 1) % len(same)]
    return out


@dataclass
class JudgeScorer:
    """One recognition system that judges reconstructions: how it embeds an aligned crop
    (uint8 [N, S, S, 3]) and its embeddings of the real test photos (the references)."""

    name: str
    embed: Callable[[np.ndarray], np.ndarray]
    references: np.ndarray


class ReconstructionJudge:
    """Success attack rates of reconstructions of the `attacked` test photos, for each scorer
    and each FAR in `fars`: accepted as the right person against another real photo of that
    person (`other`; the same photo too), and the false accept against a photo of someone
    else; thresholds at each FAR on real test pairs (cosine). SSIM and PSNR against the
    attacked photo's crop."""

    def __init__(
        self,
        crops: np.ndarray,
        identity: np.ndarray,
        attacked: np.ndarray,
        other: np.ndarray,
        scorers: Sequence[JudgeScorer],
        rng: np.random.Generator,
        max_impostors: int,
        fars: Sequence[float] = FARS,
    ) -> None:
        self.crops, self.attacked, self.other = crops, attacked, other
        self.scorers, self.fars = list(scorers), tuple(fars)
        self.impostor = np.array(
            [rng.choice(np.flatnonzero(identity != identity[a])) for a in attacked], np.int64
        )
        self.thresholds: dict[str, dict[str, float]] = {}
        #: per scorer and FAR: the threshold and real photos' TAR there (the ceiling).
        self.real_photos: dict[str, dict[str, dict[str, float]]] = {}
        for s in self.scorers:
            self.thresholds[s.name], self.real_photos[s.name] = {}, {}
            for far in self.fars:
                threshold, tar = attacks.scorer_threshold(
                    s.references, identity, far, rng, max_impostors
                )
                self.thresholds[s.name][far_key(far)] = threshold
                self.real_photos[s.name][far_key(far)] = {"threshold": threshold, "tar_at_far": tar}

    def __call__(self, images: np.ndarray) -> dict[str, object]:
        originals = self.crops[self.attacked]
        out: dict[str, object] = {
            "images": len(images),
            "ssim": float(ssim(originals, images).mean()),
            "psnr": float(psnr(originals, images).mean()),
        }
        for s in self.scorers:
            emb = l2_normalize(s.embed(images))
            ref = l2_normalize(s.references)
            scores = {
                "accepted_other_photo": np.sum(emb * ref[self.other], axis=1),
                "accepted_same_photo": np.sum(emb * ref[self.attacked], axis=1),
                "false_accept": np.sum(emb * ref[self.impostor], axis=1),
            }
            out[s.name] = {
                key: {k: float((v > threshold).mean()) for k, v in scores.items()}
                for key, threshold in self.thresholds[s.name].items()
            }
        return out
