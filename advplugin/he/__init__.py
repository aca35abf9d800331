"""Homomorphic encryption for blind matching (docs/blind.md).

The server of a blind collection holds only CKKS ciphertexts of protected templates and
computes encrypted scores; the client, which alone holds the secret key (`BlindKey`),
encrypts templates and probes and decrypts the scores. This package sits at the bottom of the
layers (numpy, TenSEAL and nothing of advplugin's upper layers) so that both the gallery
(the encrypted index) and the client can use it.

- `advplugin.he.ckks`: parameters, the client's key, encryption, decryption, and the
  server's validated loading and scoring of ciphertexts;
- `advplugin.he.wire`: the binary framing of requests and responses (JSON header +
  length-prefixed ciphertexts);
- `advplugin.he.client`: `BlindClient`, the HTTP client of the service's `/blind` routes.
"""

from advplugin.he.ckks import (
    DEFAULT_PARAMS,
    BlindKey,
    CiphertextError,
    HEParams,
    ServerContext,
)
from advplugin.he.wire import WireError, pack, unpack

__all__ = [
    "DEFAULT_PARAMS",
    "BlindKey",
    "CiphertextError",
    "HEParams",
    "ServerContext",
    "WireError",
    "pack",
    "unpack",
]
