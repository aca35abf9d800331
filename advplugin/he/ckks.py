"""CKKS (TenSEAL) for blind matching: parameters, the client's secret key, packing, and the
server's validated loading and scoring of ciphertexts.

Packing (chosen by measurement, docs/blind.md): a *block* holds up to `slots` = N/2 = 4,096
templates as `dim` ciphertexts, ciphertext d holding dimension d of every template of the
block (slot s = template s). A probe is `dim` ciphertexts, ciphertext d holding the probe's
d-th value in every slot. The encrypted scores of a whole block are then

    score = sum_d block_d * probe_d      (slot s: the cosine of the probe and template s)

128 ciphertext multiplications and additions per 4,096 templates, with no rotation (so no
Galois keys), no relinearisation (the client decrypts the 3-part product with its secret
key; so no relinearisation keys) and no rescale (one 60-bit data prime holds scale 2^56).
The server therefore holds no key of any kind: only the parameters.

Encryption is symmetric (with the secret key): the key holder is the only party that
encrypts, and a symmetric ciphertext is fresher (smaller noise) than a public-key one,
which is what lets a single 60-bit prime keep scores within 1e-5 of the plaintext ones.
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import tenseal as ts

from advplugin.errors import InvalidInputError
from advplugin.he.wire import WireError, pack, unpack

_KEY_KIND = "advplugin-he-key"


class CiphertextError(InvalidInputError):
    """A ciphertext that is malformed, or made with other parameters than the server's.
    The message names what was wrong, never the bytes."""


@dataclass(frozen=True)
class HEParams:
    """CKKS parameters of a blind collection. Defaults: N = 8192, one 60-bit data prime plus
    a 60-bit special prime (120 bits in all: the HE standard allows up to 218 at N = 8192 for
    128-bit security, so these are well above it), scale 2^28 per factor."""

    poly_modulus_degree: int = 8192
    coeff_mod_bit_sizes: tuple[int, ...] = (60, 60)
    scale_bits: int = 28
    dim: int = 128

    def __post_init__(self) -> None:
        object.__setattr__(self, "coeff_mod_bit_sizes", tuple(int(b) for b in self.coeff_mod_bit_sizes))
        if self.dim <= 0 or self.dim > self.slots:
            raise ValueError(f"dim must be in 1..{self.slots}, got {self.dim}")
        # The product of two factors (scale 2^(2*scale_bits)) must stay well below the data
        # prime, or scores wrap around.
        if 2 * self.scale_bits + 3 > self.coeff_mod_bit_sizes[0]:
            raise ValueError("scale_bits too large for the first coefficient modulus prime")

    @property
    def slots(self) -> int:
        """Templates per block (CKKS packs N/2 complex slots)."""
        return self.poly_modulus_degree // 2

    @property
    def scale(self) -> float:
        return float(2**self.scale_bits)

    @property
    def max_ciphertext_bytes(self) -> int:
        """The largest serialised fresh ciphertext: 2 parts of N coefficients (8 bytes) per
        data prime, plus framing. Anything longer is refused before the library parses it
        (a compressed blob could otherwise claim far more memory than it occupies)."""
        return 2 * self.poly_modulus_degree * 8 * (len(self.coeff_mod_bit_sizes) - 1) + 4096

    @property
    def digest(self) -> str:
        """16 hex digits naming the parameters: requests carry it, and a mismatch is refused
        before any ciphertext is parsed."""
        text = "ckks/symmetric/{poly_modulus_degree}/{bits}/{scale_bits}/{dim}".format(
            bits=".".join(map(str, self.coeff_mod_bit_sizes)), **asdict(self)
        )
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "coeff_mod_bit_sizes": list(self.coeff_mod_bit_sizes), "digest": self.digest}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> HEParams:
        try:
            return cls(
                poly_modulus_degree=int(d["poly_modulus_degree"]),
                coeff_mod_bit_sizes=tuple(int(b) for b in d["coeff_mod_bit_sizes"]),
                scale_bits=int(d["scale_bits"]), dim=int(d["dim"]),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"invalid HE parameters: {type(e).__name__}") from None


DEFAULT_PARAMS = HEParams()


def _keyed_context(params: HEParams) -> ts.Context:
    """A fresh context with a new secret key (TenSEAL always generates one)."""
    ctx = ts.context(
        ts.SCHEME_TYPE.CKKS, params.poly_modulus_degree,
        coeff_mod_bit_sizes=list(params.coeff_mod_bit_sizes),
        encryption_type=ts.ENCRYPTION_TYPE.SYMMETRIC,
    )
    _configure(ctx, params)
    return ctx


def _configure(ctx: ts.Context, params: HEParams) -> None:
    # Lazy everything: one product per dimension, summed, never relinearised or rescaled.
    ctx.global_scale = params.scale
    ctx.auto_relin = False
    ctx.auto_rescale = False
    ctx.auto_mod_switch = False


# -- the client's secret key ----------------------------------------------------------------------
@dataclass
class BlindKey:
    """The secret key of a blind collection, held by the client only (the deployment's own
    machine or a small key service). `repr` shows the key id only."""

    params: HEParams
    _ctx: ts.Context = field(repr=False)
    key_id: str = ""

    def __post_init__(self) -> None:
        if not self.key_id:
            self.key_id = self._fingerprint()

    def _fingerprint(self) -> str:
        # A one-way commitment to the secret key (never the key): requests carry it so the
        # server can refuse ciphertexts under another key, which it cannot detect otherwise.
        return hashlib.sha256(b"advplugin/he-key-id/" + self._secret_blob()).hexdigest()[:16]

    def _secret_blob(self) -> bytes:
        """The context with its secret key: the one place it is ever serialised."""
        return self._ctx.serialize(save_secret_key=True, save_galois_keys=False, save_relin_keys=False)

    @classmethod
    def generate(cls, params: HEParams = DEFAULT_PARAMS) -> BlindKey:
        return cls(params, _keyed_context(params))

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the key file with mode 0600, created exclusively (never overwrites)."""
        blob = self._secret_blob()
        data = pack({"kind": _KEY_KIND, "key_id": self.key_id, "params": self.params.as_dict()}, [blob])
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> BlindKey:
        path = Path(path)
        if path.stat().st_mode & 0o077:
            raise PermissionError(f"blind key file {path} is readable by others; chmod 600 it")
        try:
            header, blobs = unpack(path.read_bytes(), max_blobs=1)
            if header.get("kind") != _KEY_KIND or len(blobs) != 1:
                raise WireError("not a blind key file")
            params = HEParams.from_dict(header["params"])
            ctx = ts.context_from(blobs[0])
        except (WireError, KeyError, ValueError, RuntimeError, TypeError) as e:
            raise ValueError(f"{path} is not a readable blind key file ({type(e).__name__})") from None
        _configure(ctx, params)
        key = cls(params, ctx)
        if key.key_id != header.get("key_id"):
            raise ValueError(f"{path}: the key does not match the key id it records")
        return key

    # -- encryption ------------------------------------------------------------------------------
    def _check(self, templates: np.ndarray) -> np.ndarray:
        t = np.asarray(templates, np.float64)
        if t.ndim != 2 or t.shape[1] != self.params.dim:
            raise ValueError(f"templates must have shape (n, {self.params.dim}), got {t.shape}")
        if not np.isfinite(t).all():
            raise ValueError("templates must be finite")
        norms = np.linalg.norm(t, axis=1, keepdims=True)
        if (norms == 0).any():
            raise ValueError("a template is all zeros")
        return t / norms  # scores are cosines, as in every other mode

    def encrypt_block(self, templates: np.ndarray, offset: int = 0) -> list[bytes]:
        """`dim` ciphertexts holding `templates` (L2-normalised here) in slots
        offset..offset+n-1 of a block, zeros elsewhere; the server adds them to the block."""
        t = self._check(templates)
        if offset < 0 or offset + len(t) > self.params.slots:
            raise ValueError(f"slots {offset}..{offset + len(t) - 1} do not fit a block of {self.params.slots}")
        columns = np.zeros((self.params.dim, self.params.slots))
        columns[:, offset : offset + len(t)] = t.T
        return [ts.ckks_vector(self._ctx, columns[d]).serialize() for d in range(self.params.dim)]

    def encrypt_probe(self, probe: np.ndarray) -> list[bytes]:
        """`dim` ciphertexts, ciphertext d holding the probe's d-th value in every slot."""
        p = self._check(np.asarray(probe).reshape(1, -1))[0]
        return [ts.ckks_vector(self._ctx, np.full(self.params.slots, p[d])).serialize() for d in range(self.params.dim)]

    @staticmethod
    def plain_probe(probe: np.ndarray) -> list[float]:
        """The probe as the plaintext-probe option sends it (L2-normalised values)."""
        p = np.asarray(probe, np.float64).reshape(-1)
        return (p / np.linalg.norm(p)).tolist()

    def decrypt_scores(self, blob: bytes) -> np.ndarray:
        """The `slots` scores of one block (float64), from the server's ciphertext."""
        try:
            vec = ts.ckks_vector_from(self._ctx, blob)
        except (ValueError, RuntimeError, TypeError) as e:
            raise CiphertextError(f"the server's score ciphertext is unreadable ({type(e).__name__})") from None
        return np.asarray(vec.decrypt(), np.float64)


# -- the server side ---------------------------------------------------------------------------------
class ServerContext:
    """The parameters and nothing else: loading, validating, adding and scoring ciphertexts.
    Built from a context serialised without any key, so no secret key lives in the server
    process (the throwaway key TenSEAL makes while building it is dropped at once)."""

    def __init__(self, params: HEParams = DEFAULT_PARAMS) -> None:
        self.params = params
        keyed = _keyed_context(params)
        self._ctx = ts.context_from(
            keyed.serialize(save_secret_key=False, save_galois_keys=False, save_relin_keys=False)
        )
        del keyed
        _configure(self._ctx, params)
        if self._ctx.has_secret_key():  # pragma: no cover - a TenSEAL change would show here
            raise RuntimeError("the server context must not hold a secret key")

    def load(self, blob: bytes, what: str = "ciphertext", *, stored: bool = True) -> ts.CKKSVector:
        """A fresh ciphertext of these parameters (2 parts, data level, scale 2^scale_bits,
        `slots` values), or CiphertextError.

        `stored=False` (probes): only what loading itself checks (ring, modulus chain,
        coefficients in range) and the slot count. Reading the parts for the full check
        copies every ciphertext (a third of a probe's server time), and a probe that passes
        loading but is not fresh fails in `score` with a CiphertextError, or yields scores
        only its own sender could decrypt. What is stored must pass the full check: one
        3-part or mis-scaled ciphertext added to a block would break it for everyone."""
        p = self.params
        if not isinstance(blob, bytes | bytearray) or not blob:
            raise CiphertextError(f"{what} is empty")
        if len(blob) > p.max_ciphertext_bytes:
            raise CiphertextError(f"{what} is larger than a ciphertext of these parameters ({p.max_ciphertext_bytes} bytes)")
        try:
            vec = ts.ckks_vector_from(self._ctx, bytes(blob))
            if not stored:
                if vec.size() != p.slots:
                    raise CiphertextError(f"{what} does not hold {p.slots} slots")
                return vec
            cts = vec.ciphertext()
            ok = (
                vec.size() == p.slots and len(cts) == 1 and cts[0].size() == 2
                and cts[0].coeff_modulus_size() == len(p.coeff_mod_bit_sizes) - 1
                and cts[0].poly_modulus_degree() == p.poly_modulus_degree
                and cts[0].is_ntt_form() and cts[0].scale == p.scale
            )
        except (ValueError, RuntimeError, TypeError, IndexError) as e:
            raise CiphertextError(
                f"{what} is not a CKKS ciphertext of this service's parameters "
                f"(digest {p.digest}) ({type(e).__name__})"
            ) from None
        if not ok:
            raise CiphertextError(
                f"{what} has other parameters than this service's (digest {p.digest}): a fresh "
                f"ciphertext of {p.slots} slots at scale 2^{p.scale_bits} is expected"
            )
        return vec

    def load_all(self, blobs: list[bytes], what: str, *, stored: bool = True) -> list[ts.CKKSVector]:
        if len(blobs) != self.params.dim:
            raise CiphertextError(f"{what} must be {self.params.dim} ciphertexts, got {len(blobs)}")
        return [self.load(b, f"{what} ciphertext {i}", stored=stored) for i, b in enumerate(blobs)]

    @staticmethod
    def add(a: list[ts.CKKSVector], b: list[ts.CKKSVector]) -> list[ts.CKKSVector]:
        """Slot-wise sum of two blocks (enrolment into free slots of an existing block)."""
        return [x + y for x, y in zip(a, b, strict=True)]

    def score(self, block: list[ts.CKKSVector], probe: list[ts.CKKSVector] | np.ndarray) -> bytes:
        """The serialised encrypted scores of one block: sum_d block_d * probe_d, with the
        probe encrypted (ciphertext-ciphertext products, left unrelinearised) or plaintext."""
        acc: ts.CKKSVector | None = None
        if isinstance(probe, np.ndarray):
            # A factor that encodes to 0 would make a transparent ciphertext (SEAL refuses);
            # it contributes nothing, so it is skipped.
            terms = ((c, float(v)) for c, v in zip(block, probe, strict=True) if round(abs(v) * self.params.scale))
        else:
            terms = zip(block, probe, strict=True)
        try:
            for column, factor in terms:
                product = column.mul(factor)
                acc = product if acc is None else acc.add_(product)
        except (ValueError, RuntimeError, TypeError) as e:  # a probe that loaded but is not fresh
            raise CiphertextError(f"the probe cannot be multiplied with the gallery ({type(e).__name__}): "
                                  "send fresh ciphertexts of this service's parameters") from None
        if acc is None:
            raise CiphertextError("the probe is zero")
        return acc.serialize()

    def score_blocks(
        self, blocks: list[list[ts.CKKSVector]], probe: list[ts.CKKSVector] | np.ndarray, threads: int = 1
    ) -> list[bytes]:
        """`score` of every block, over `threads` threads (TenSEAL's products run in C++)."""
        if threads <= 1 or len(blocks) <= 1:
            return [self.score(b, probe) for b in blocks]
        with ThreadPoolExecutor(max_workers=threads) as pool:
            return list(pool.map(lambda b: self.score(b, probe), blocks))

    # -- storage of a block --------------------------------------------------------------------------
    def pack_block(self, block: list[ts.CKKSVector]) -> bytes:
        """One SQL value for a block's `dim` ciphertexts."""
        return pack({"params": self.params.digest}, [c.serialize() for c in block])

    def unpack_block(self, blob: bytes) -> list[ts.CKKSVector]:
        try:
            header, blobs = unpack(blob, max_blobs=self.params.dim)
        except WireError as e:
            raise CiphertextError(f"stored block is unreadable: {e}") from None
        if header.get("params") != self.params.digest:
            raise CiphertextError("stored block has other HE parameters than this service")
        return self.load_all(blobs, "stored block")
