"""The `advface` training script: the torch generator it trains is exactly the numpy
generator it ships, and it still runs as `python -m advplugin.training.advface`."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import torch

from advplugin.nets.advface import torch_noisy
from advplugin.training.advface import generator_net, to_numpy_generator


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
