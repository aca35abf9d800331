"""The reconstruction attacker's recipe and the report's operating points: standard library
only, because `advplugin evaluate --help` shows the recipe's default and must stay instant
(the attacker itself, with torch, is `advplugin.evaluation.reconstruction`)."""

from __future__ import annotations

from dataclasses import dataclass

#: The operating points of the report's tables (ISO/IEC 30136: success attack rate at the
#: system's threshold for a given false match rate).
FARS = (1e-3, 1e-2)
#: The salt of the validation split of the train people (the benchmark's, so both agree).
VALIDATION_SALT = "identity-decoder-val"


@dataclass(frozen=True)
class AttackRecipe:
    """How the reconstruction attacker trains its decoder (issue 15's strong attacker by
    default; `l1_only()` is the committed reports' weak one)."""

    #: weight of 1 - cosine(dlib(reconstruction), raw embedding) beside the L1 loss;
    #: 0.03 measured best (`benchmarks/results/identity_decoder.json`).
    identity_weight: float = 0.03
    #: mirrored photos as extra training samples, their templates re-embedded.
    flip: bool = True
    #: share of train *people* held out for early stopping (0: no validation, last epoch).
    val_fraction: float = 0.1
    #: framing jitter of the identity loss (fraction of the chip's half-width and of scale).
    jitter: float = 0.05
    #: Gaussian blur (pixels) the identity loss sees the reconstruction through.
    blur: float = 0.0

    @classmethod
    def l1_only(cls) -> AttackRecipe:
        """The committed reports' decoder: L1 loss, every train photo, last epoch kept."""
        return cls(identity_weight=0.0, flip=False, val_fraction=0.0, jitter=0.0)

    @property
    def description(self) -> str:
        parts = ["L1 loss"]
        if self.identity_weight > 0:
            parts.append(f"+ {self.identity_weight:g} x identity loss (dlib's ResNet in torch)")
        if self.flip:
            parts.append("flip augmentation re-embedded")
        if self.val_fraction > 0:
            parts.append(f"early stopping on {self.val_fraction:.0%} of the train people")
        return ", ".join(parts)

    @property
    def needs_dlib_torch(self) -> bool:
        return self.identity_weight > 0 or self.flip


def far_key(far: float) -> str:
    """The JSON key of an operating point: 1e-3 -> "1e-3"."""
    mantissa, exponent = f"{far:e}".split("e")
    m = mantissa.rstrip("0").rstrip(".")
    return f"{m}e{int(exponent)}"
