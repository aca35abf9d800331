"""The `advface` training scripts: the torch generator they train is exactly the numpy
generator they ship, they run as modules, and v2's game (the complete loop, an adaptive
decoder that learns between generator steps) does what it says on a tiny random problem."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import torch

from advplugin.nets.advface import torch_noisy
from advplugin.training.advface_common import generator_net, to_numpy_generator


def test_shipped_numpy_generator_matches_the_trained_torch_one() -> None:
    torch.manual_seed(0)
    model = generator_net(16, 32)
    max_angle = float(np.arccos(0.9))
    x = np.random.default_rng(0).normal(size=(8, 16))
    u = x / np.linalg.norm(x, axis=1, keepdims=True)
    with torch.no_grad():
        expected = torch_noisy(model, torch.from_numpy(u.astype(np.float32)), max_angle).numpy()
    np.testing.assert_allclose(to_numpy_generator(model, max_angle)(u), expected, atol=1e-5)


def test_runs_as_a_module() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "advplugin.training.advface", "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "--out" in out.stdout and "shadow decoder" in out.stdout


def _tiny_game(adaptive: bool) -> tuple[object, ...]:
    """Two game steps on random data with a small decoder and dlib's real ResNet as F."""
    from advplugin.evaluation.decoder import dlib_identity_loss
    from advplugin.nets.decoder import Decoder, DecoderConfig
    from advplugin.training.advface_v2 import train_game

    rng = np.random.default_rng(0)
    x = rng.normal(size=(24, 128))
    u = x / np.linalg.norm(x, axis=1, keepdims=True)
    identity = np.repeat(np.arange(12), 2).astype(str)
    crops = rng.integers(0, 256, size=(24, 64, 64, 3), dtype=np.uint8)
    config = DecoderConfig(size=64, widths=(16, 8, 8, 8, 8))
    torch.manual_seed(0)
    shadow = Decoder(128, config).eval()
    for p in shadow.parameters():
        p.requires_grad_(False)
    feature = dlib_identity_loss().eval()
    model, max_angle, attacker, log = train_game(
        u, identity, crops, shadow, feature, dlib_identity_loss(jitter=0.05), config,
        min_cosine=0.9, steps=2, hidden=32, batch=8, loop_batch=3, adapt_batch=3,
        lam_sim=100.0, w_feature=1.0, adaptive=adaptive, seed=0, log_every=0,
    )  # fmt: skip
    return u, shadow, model, max_angle, attacker, log


def test_v2_game_moves_the_adaptive_decoder_and_keeps_the_budget() -> None:
    """The adaptive decoder starts as the shadow decoder and learns during the game; the
    generator it plays against still ships as v1's numpy generator, budget exact."""
    u, shadow, model, max_angle, attacker, log = _tiny_game(adaptive=True)
    moved = [
        not torch.equal(a, b)
        for a, b in zip(shadow.state_dict().values(), attacker.state_dict().values(), strict=True)
    ]
    assert any(moved)
    assert {"naive_feature", "adaptive_recon", "attacker_l1"} <= set(log[-1])
    t = to_numpy_generator(model, max_angle)(u)
    assert np.sum(u * t, axis=1).min() >= 0.9 - 1e-6


def test_v2_without_the_game_leaves_the_shadow_decoder_alone() -> None:
    _, shadow, _, _, attacker, log = _tiny_game(adaptive=False)
    for a, b in zip(shadow.state_dict().values(), attacker.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert "adaptive_image" not in log[-1]


def test_loop_terms_are_zero_for_the_clean_input_and_differentiable_in_t() -> None:
    from advplugin.evaluation.decoder import dlib_identity_loss
    from advplugin.nets.decoder import Decoder, DecoderConfig
    from advplugin.training.advface_v2 import loop_terms

    torch.manual_seed(1)
    decoder = Decoder(128, DecoderConfig(size=64, widths=(16, 8, 8, 8, 8))).eval()
    feature = dlib_identity_loss().eval()
    u = torch.nn.functional.normalize(torch.randn(3, 128), dim=1)
    same = loop_terms(decoder, decoder, feature, u, u)
    for value in same.values():
        assert float(value.detach().abs().max()) < 1e-5
    t = torch.nn.functional.normalize(u + 0.5 * torch.randn(3, 128), dim=1).requires_grad_(True)
    terms = loop_terms(decoder, decoder, feature, u, t)
    sum(v.sum() for v in terms.values()).backward()
    assert t.grad is not None and float(t.grad.abs().sum()) > 0


def test_v2_runs_as_a_module_and_through_v1s_trainer() -> None:
    for module, extra in (("advface_v2", []), ("advface", ["--version", "2"])):
        out = subprocess.run(
            [sys.executable, "-m", f"advplugin.training.{module}", *extra, "--help"],
            capture_output=True,
            text=True,
            check=True,
        )
        assert "--out" in out.stdout and "--no-adaptive" in out.stdout
