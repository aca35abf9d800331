"""`advface`'s torch inference (`refine_steps`): the refined noise keeps the generator's
angle exactly, so the drift budget holds however many steps run, and each row is refined on
its own. A tiny random generator and decoder stand in for the shipped weights."""

from __future__ import annotations

import numpy as np
import torch

from advplugin.nets.advface import refine, shadow_decoder
from advplugin.nets.decoder import Decoder, DecoderConfig
from advplugin.protectors.advface import NoiseGenerator

DIM = 16


def tiny_weights() -> tuple[NoiseGenerator, dict[str, np.ndarray], dict[str, object]]:
    rng = np.random.default_rng(0)
    layers = (
        (rng.normal(size=(DIM, 32)).astype(np.float32), np.zeros(32, np.float32)),
        (rng.normal(size=(32, DIM + 1)).astype(np.float32), np.zeros(DIM + 1, np.float32)),
    )
    torch.manual_seed(0)
    decoder = Decoder(DIM, DecoderConfig(size=8, widths=(8, 4)))
    state = {k: v.numpy().copy() for k, v in decoder.state_dict().items()}
    record: dict[str, object] = {"dim": DIM, "decoder_size": 8, "decoder_widths": [8, 4]}
    return NoiseGenerator(layers, float(np.arccos(0.9))), state, record


def unit_rows(n: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(n, DIM))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_refine_keeps_the_generators_angle() -> None:
    generator, state, record = tiny_weights()
    u = unit_rows(6, 1)
    t = refine(u, generator, state, record, steps=3, lr=0.1)
    _, angle = generator.direction_and_angle(u)
    np.testing.assert_allclose(np.sum(u * t, axis=1), np.cos(angle), atol=1e-9)
    assert not np.allclose(t, generator(u))  # the steps did move the direction


def test_refine_does_not_depend_on_the_batch() -> None:
    generator, state, record = tiny_weights()
    u = unit_rows(4, 2)
    batch = refine(u, generator, state, record, steps=2, lr=0.1)
    single = np.concatenate(
        [refine(u[i : i + 1], generator, state, record, steps=2, lr=0.1) for i in range(4)]
    )
    np.testing.assert_allclose(single, batch, atol=1e-6)  # float32 decoder: rounding only


def test_shadow_decoder_reads_the_weights_record() -> None:
    _, state, record = tiny_weights()
    out = shadow_decoder(state, record)(torch.randn(2, DIM))
    assert out.shape == (2, 3, 8, 8)


def test_refine_runs_on_every_shipped_version() -> None:
    """Both weights files carry a shadow decoder `refine` can rebuild from the record."""
    from advplugin.protectors.advface import VERSIONS, load_weights

    x = np.random.default_rng(3).normal(size=(4, 128))
    u = x / np.linalg.norm(x, axis=1, keepdims=True)
    for version, files in sorted(VERSIONS.items()):
        generator, state, record = load_weights(files[128].verified_path())
        t = refine(u, generator, state, record, steps=1, lr=0.01)
        _, angle = generator.direction_and_angle(u)
        np.testing.assert_allclose(np.sum(u * t, axis=1), np.cos(angle), atol=1e-9, err_msg=f"v{version}")
