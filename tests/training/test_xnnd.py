"""The `xnn-d` trainer: the torch nets it trains are exactly the numpy nets it ships, its three
stages run end to end into a weights file the protector loads (with either student), a new
release keeps a given G and fits S for it, XNN's outsourced training reaches raw-level
held-out accuracy on obfuscated embeddings, and it runs as a module."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from advplugin.keys import Key
from advplugin.protectors import create_protector
from advplugin.protectors.base import l2_normalize
from advplugin.protectors.xnnd import load_weights
from advplugin.training.xnnd import (
    TrainConfig,
    fit_linear_student,
    generator_module,
    mlp,
    outsourced_training,
    save_weights,
    to_numpy_nets,
    train,
)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matmuls: more threads only contend on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_numpy_nets_match_the_torch_ones() -> None:
    torch.manual_seed(0)
    g, s = mlp([16, 32, 32, 16]), mlp([16, 32, 16])
    u = np.random.default_rng(0).normal(size=(8, 16)).astype(np.float32)
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    with torch.no_grad():
        t = torch.from_numpy(u)
        f = t + g(t)
        e = torch.nn.functional.normalize(s(f), dim=1)
    nets = to_numpy_nets(g, s)
    np.testing.assert_allclose(nets.noisy(u), f.numpy(), atol=1e-5)
    np.testing.assert_allclose(nets.match_features(nets.noisy(u)), e.numpy(), atol=1e-5)


def clustered(rng: np.random.Generator, people: int, per: int, dim: int) -> tuple[np.ndarray, np.ndarray]:
    centres = rng.normal(size=(people, dim))
    x = np.repeat(centres, per, axis=0) + 0.3 * rng.normal(size=(people * per, dim))
    return x.astype(np.float32), np.repeat(np.arange(people).astype(str), per)


@pytest.mark.parametrize("student", ["linear", "mlp"])
def test_three_stages_write_weights_the_protector_loads(tmp_path: Path, student: str) -> None:
    rng = np.random.default_rng(0)
    dim = 16
    x, ident = clustered(rng, 40, 4, dim)
    cfg = TrainConfig(
        hidden=32, batch=64, teacher_steps=20, game_steps=20, student_steps=40, student=student
    )
    trained = train(x, ident, cfg, log_every=0)
    nets = trained.nets
    assert nets.dim == dim and nets.output_dim == dim and trained.times["seconds_total"] >= 0
    path = tmp_path / "w.npz"
    save_weights(path, nets, {"note": "test"})
    loaded, record = load_weights(path)
    assert loaded.dim == dim
    assert record == {"note": "test"}
    p = create_protector("xnn-d", key=Key.generate(), dim=dim, weights=str(path))
    t = p.protect(x)
    assert t.shape == (len(x), dim)
    # The distilled matcher on the noisy feature still tells these people apart.
    s = p.score(t, t)
    np.fill_diagonal(s, -np.inf)
    assert (ident[np.argmax(s, axis=1)] == ident).mean() > 0.8


def test_new_release_keeps_the_given_generator_and_inverts_it() -> None:
    """`--generator`: the game is skipped, G is the given one bit for bit, and the linear
    student maps f = u + G(u) back to u on people it never saw (G here is random, so this
    holds for any near-invertible G, not only the shipped one)."""
    rng = np.random.default_rng(1)
    dim = 16
    x, ident = clustered(rng, 60, 4, dim)
    torch.manual_seed(0)
    given = to_numpy_nets(mlp([dim, 32, 32, dim]), mlp([dim, 32, dim])).generator
    cfg = TrainConfig(hidden=32, batch=64, teacher_steps=5, game_steps=10_000)
    trained = train(x[:160], ident[:160], cfg, log_every=0, generator_layers=given)
    for (w, b), (w0, b0) in zip(trained.nets.generator, given, strict=True):
        assert np.array_equal(w, w0) and np.array_equal(b, b0)
    assert trained.times["seconds_game"] < 5  # 10,000 game steps were not run
    u_new = l2_normalize(x[160:], np.float32)
    e = trained.nets.match_features(trained.nets.noisy(u_new))
    f_cos = np.sum(u_new * l2_normalize(trained.nets.noisy(u_new), np.float32), axis=1).mean()
    assert np.sum(u_new * e, axis=1).mean() > max(0.9, f_cos)
    # the torch twin of the numpy generator computes the same f
    with torch.no_grad():
        g = generator_module(given)(torch.from_numpy(u_new)).numpy()
    np.testing.assert_allclose(u_new + g, trained.nets.noisy(u_new), atol=1e-5)


def test_linear_student_is_the_least_squares_fit() -> None:
    rng = np.random.default_rng(2)
    f = rng.normal(size=(200, 8)).astype(np.float32)
    a, b = rng.normal(size=(8, 8)), rng.normal(size=8)
    target = f @ a + b
    ((w, bias),) = fit_linear_student(f, target)
    t = l2_normalize(target, np.float32)
    residual = np.linalg.norm(f @ w + bias - t)
    # no other affine map does better (a perturbed one is worse)
    assert residual < np.linalg.norm(f @ (w + 1e-3 * rng.normal(size=w.shape)) + bias - t)


def test_outsourced_training_on_obfuscated_embeddings_matches_raw(
    lfw_cache: dict[str, np.ndarray], face_data: Path
) -> None:
    """A host that only sees `xnn` templates (key never shipped) trains a head as good as
    one trained on raw embeddings, measured on held-out people."""
    result = outsourced_training(
        lfw_cache["embedding"].astype(np.float32),
        lfw_cache["identity"],
        lfw_cache["path"],
        face_data / "lfw-dev-pairs.txt",
        key=Key.generate(),
        steps=100,
    )
    assert result["heldout_pairs"] > 1000
    # the head learned something (far above chance) ...
    assert result["heldout_accuracy_head_on_raw"] > 0.8
    # ... and the same on obfuscated embeddings (within the noise of a 10-fold estimate)
    assert abs(result["heldout_accuracy_head_on_xnn"] - result["heldout_accuracy_head_on_raw"]) < 0.015


def test_runs_as_a_module() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "advplugin.training.xnnd", "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "--embeddings" in out.stdout and "--outsourced" in out.stdout
    assert "--generator" in out.stdout and "--student" in out.stdout
