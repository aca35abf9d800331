"""`BlindClient`: the key holder's side of blind mode (docs/blind.md), over HTTP.

The client protects (with any scheme: it receives protected templates), encrypts with its
`BlindKey`, and sends ciphertexts; the service answers identify with encrypted scores, which
the client decrypts here, ranks per subject and thresholds. Scores never exist outside this
object's process.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import httpx
import numpy as np

from advplugin.errors import RemoteError
from advplugin.he.ckks import BlindKey
from advplugin.he.wire import MEDIA_TYPE, pack, unpack

#: Enrolment retries when another client took the slots this one encrypted for.
MAX_SLOT_RETRIES = 8


class BlindServiceError(RemoteError):
    """An error answer of the service: `status` and the envelope's `code`."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status, self.code = status, code


@dataclass(frozen=True)
class BlindMatch:
    subject: str
    similarity: float
    template_id: int


class BlindClient:
    """`protection`: what the templates were protected with (scheme, scheme_version, key_id,
    extractor_name), as the service's `GET /blind/params` asks for."""

    def __init__(
        self, url: str, api_key: str, key: BlindKey, protection: dict[str, Any], *,
        timeout: float = 300, http: httpx.Client | None = None,
    ) -> None:
        self.key = key
        self.protection = protection
        self.http = http or httpx.Client(base_url=url, headers={"x-api-key": api_key}, timeout=timeout)

    def close(self) -> None:
        self.http.close()

    # -- plumbing ----------------------------------------------------------------------------------
    @staticmethod
    def _check(response: httpx.Response) -> httpx.Response:
        if response.status_code >= 400:
            try:
                err = response.json().get("error", {})
            except ValueError:
                err = {}
            raise BlindServiceError(response.status_code, str(err.get("code")), str(err.get("message")))
        return response

    def _post(self, path: str, header: dict[str, Any], blobs: list[bytes]) -> httpx.Response:
        body = pack({"he_key_id": self.key.key_id, "params": self.key.params.digest, **header}, blobs)
        return self._check(self.http.post(path, content=body, headers={"content-type": MEDIA_TYPE}))

    def params(self) -> dict[str, Any]:
        info = self._check(self.http.get("/blind/params")).json()
        if info["params"]["digest"] != self.key.params.digest:
            raise ValueError(
                f"the service uses HE parameters {info['params']['digest']}, this key "
                f"{self.key.params.digest}: make a key with the service's parameters"
            )
        return info

    # -- enrolment -----------------------------------------------------------------------------------
    def enroll(self, subjects: list[str], templates: np.ndarray) -> list[dict[str, Any]]:
        """Encrypt and enrol protected templates (any number: blocks are filled in order,
        a request per block part). Returns the service's items (subject, template_id, slot)."""
        templates = np.asarray(templates)
        if len(subjects) != len(templates):
            raise ValueError("one subject per template")
        out: list[dict[str, Any]] = []
        done, retries = 0, 0
        while done < len(subjects):
            spot = self.params()["open_block"]
            n = min(spot["capacity"] - spot["offset"], len(subjects) - done)
            blobs = self.key.encrypt_block(templates[done : done + n], spot["offset"])
            header = {
                "block": spot["block"], "offset": spot["offset"], "subjects": subjects[done : done + n],
                "protection": self.protection,
            }
            try:
                answer = self._post("/blind/enroll", header, blobs).json()
            except BlindServiceError as e:
                if e.code != "slot_conflict" or retries >= MAX_SLOT_RETRIES:
                    raise
                retries += 1
                continue
            out += answer["templates"]
            done += n
        return out

    # -- identification ------------------------------------------------------------------------------
    def scores(self, probe: np.ndarray, *, plain: bool = False) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """(similarities float64 [M], template ids [M], subjects [M]) of every live template,
        decrypted here. `plain`: send the probe unencrypted (only where the service allows
        it and the threat model does, docs/blind.md)."""
        if plain:
            header: dict[str, Any] = {"probe": "plain", "values": BlindKey.plain_probe(probe)}
            blobs: list[bytes] = []
        else:
            header, blobs = {"probe": "encrypted"}, self.key.encrypt_probe(probe)
        answer, cts = unpack(self._post("/blind/identify", header, blobs).content, max_header=1 << 30, max_blobs=1 << 20)
        sims, ids, names = [], [], []
        for block, ct in zip(answer["blocks"], cts, strict=True):
            decrypted = self.key.decrypt_scores(ct)
            sims.append(decrypted[np.asarray(block["slots"], np.int64)])
            ids += block["template_ids"]
            names += block["subjects"]
        if not sims:
            return np.zeros(0), np.zeros(0, np.int64), []
        return np.concatenate(sims), np.asarray(ids, np.int64), names

    def identify(
        self, probe: np.ndarray, *, k: int = 1, threshold: float | None = None, plain: bool = False
    ) -> list[BlindMatch]:
        """The k best subjects (each scored by its best template), above `threshold`."""
        return self.rank(*self.scores(probe, plain=plain), k=k, threshold=threshold)

    @staticmethod
    def rank(
        sims: np.ndarray, ids: np.ndarray, names: list[str], *, k: int = 1, threshold: float | None = None
    ) -> list[BlindMatch]:
        """`identify`'s ranking of decrypted scores (from `scores`): as the plaintext matcher
        ranks, a subject by its best template, best first, ties by name."""
        best: dict[str, tuple[float, int]] = {}
        for s, i, n in zip(sims.tolist(), ids.tolist(), names, strict=True):
            if n not in best or s > best[n][0]:
                best[n] = (s, i)
        ranked = sorted(best.items(), key=lambda kv: (-kv[1][0], kv[0]))
        return [
            BlindMatch(n, s, i) for n, (s, i) in ranked[:k] if threshold is None or s >= threshold
        ]
