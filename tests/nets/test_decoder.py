"""The decoder network alone: its config checks the geometry, and a saved state dict
rebuilds the same frozen network (how `advface` loads its shipped shadow decoder)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from advplugin.nets.decoder import Decoder, DecoderConfig, frozen_decoder


def test_decoder_config_checks_the_size() -> None:
    with pytest.raises(ValueError, match="widths"):
        DecoderConfig(size=64, widths=(8, 8))
    with pytest.raises(ValueError):
        DecoderConfig(size=48, widths=(8, 8, 8, 8))


def test_frozen_decoder_rebuilds_the_network_from_numpy_state() -> None:
    torch.manual_seed(0)
    original = Decoder(16, DecoderConfig(size=16, widths=(8, 8, 4)))
    original.eval()
    state = {k: v.numpy().copy() for k, v in original.state_dict().items()}
    rebuilt = frozen_decoder(16, 16, [8, 8, 4], state)
    x = torch.randn(3, 16)
    with torch.no_grad():
        out = rebuilt(x)
        np.testing.assert_array_equal(out.numpy(), original(x).numpy())
    assert out.shape == (3, 3, 16, 16)
    assert not rebuilt.training
    assert not any(p.requires_grad for p in rebuilt.parameters())
