"""The decoder's identity loss (issue 15): reconstructions are framed as dlib's chips, the loss
is differentiable through dlib's ResNet in torch, and training with it brings the
reconstructions' dlib embeddings closer to their targets than the L1 loss alone does."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from advplugin.evaluation.data import list_images
from advplugin.evaluation.decoder import (
    DLIB_CHIP_FROM_ARCFACE,
    DecoderConfig,
    dlib_identity_loss,
    reconstruct,
    train_decoder,
)
from advplugin.evaluation.faces import ALIGN_SIZE, aligned_faces, hash_files, to_size


@pytest.fixture(scope="module")
def faces(
    small_split: dict[str, Path],
    lfw_cache: dict[str, np.ndarray],
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Real lfw-dev photos of 10 train people: ArcFace crops at 112, their raw dlib
    embeddings (the shipped cache), and identities."""
    folder = list_images(small_split["train"])
    crops, _ = aligned_faces(
        folder,
        hash_files(folder, progress=False),
        crop_size=ALIGN_SIZE,
        scorer=None,
        cache_dir=tmp_path_factory.mktemp("align"),
        progress=False,
    )
    index = {str(p): i for i, p in enumerate(lfw_cache["path"])}
    raw = lfw_cache["embedding"][[index[str(p)] for p in folder.path]].astype(np.float32)
    return crops, raw, folder.identity


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_chips_are_the_cv2_warp_of_the_crop(faces: tuple[np.ndarray, ...]) -> None:
    crops = faces[0][:3]
    loss = dlib_identity_loss()
    with torch.no_grad():
        chips = loss.chips(torch.from_numpy(crops.transpose(0, 3, 1, 2).copy()).float() / 255)
    expected = np.stack(
        [
            cv2.warpAffine(c, DLIB_CHIP_FROM_ARCFACE, (150, 150), borderMode=cv2.BORDER_REPLICATE)
            for c in crops
        ]
    ).astype(np.float32)
    got = chips.permute(0, 2, 3, 1).numpy()
    # Rows below the crop (its border repeated) differ in interpolation only; inside, both
    # are the same bilinear warp up to uint8 rounding of cv2's output.
    assert np.abs(got - expected)[:, :130].max() < 1.0


def test_framed_crops_are_recognised_by_dlib_as_their_own_person(
    faces: tuple[np.ndarray, ...],
) -> None:
    """The framing is right: dlib's embedding of a 64x64 crop warped to the chip is its own
    photo's raw embedding's nearest neighbour, and far closer than other people's."""
    crops, raw, identity = faces
    small = np.stack([to_size(c, 64) for c in crops])
    loss = dlib_identity_loss()
    with torch.no_grad():
        emb = loss.embed(torch.from_numpy(small.transpose(0, 3, 1, 2).copy()).float() / 255)
    cos = _unit(emb.numpy()) @ _unit(raw).T
    assert (np.argmax(cos, axis=1) == np.arange(len(raw))).mean() > 0.9
    other_people = identity[:, None] != identity[None]
    assert np.diag(cos).mean() > cos[other_people].mean() + 0.1


def test_identity_loss_is_differentiable_and_brings_embeddings_closer(
    faces: tuple[np.ndarray, ...],
) -> None:
    crops, raw, _ = faces
    crops, raw = np.stack([to_size(c, 32) for c in crops[:8]]), raw[:8]
    loss = dlib_identity_loss()
    images = torch.full((2, 3, 32, 32), 0.5, requires_grad=True)
    loss(images, torch.from_numpy(raw[:2])).sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0

    config = DecoderConfig(size=32, widths=(32, 16, 16, 8), epochs=25, batch_size=8)

    def distance(weight: float) -> float:
        model = train_decoder(
            raw, crops, config, progress=False, identity_weight=weight, identity_loss=loss
        )
        out = torch.from_numpy(reconstruct(model, raw).transpose(0, 3, 1, 2).copy()) / 255.0
        with torch.no_grad():
            return float(loss(out.float(), torch.from_numpy(raw)).mean())

    with_identity, without = distance(5.0), distance(0.0)
    assert with_identity < without - 0.02


def test_epoch_callback_and_defaults_leave_training_unchanged(
    faces: tuple[np.ndarray, ...],
) -> None:
    """identity_weight 0 with a callback trains the very same weights as the plain call (the
    committed report stays reproducible); the callback sees every epoch."""
    crops, raw, _ = faces
    crops, raw = np.stack([to_size(c, 16) for c in crops[:8]]), raw[:8]
    config = DecoderConfig(size=16, widths=(16, 8, 8), epochs=2, batch_size=4)
    seen: list[int] = []
    a = train_decoder(raw, crops, config, progress=False)
    b = train_decoder(raw, crops, config, progress=False, on_epoch=lambda e, m, f: seen.append(e))
    assert seen == [1, 2]
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(p, q), name


def test_early_stopping_keeps_the_best_validation_epoch(faces: tuple[np.ndarray, ...]) -> None:
    """With a validation set the returned weights are those of the epoch with the lowest
    validation loss, not the last epoch's (held-out photos turned upside down: their loss
    first falls as the decoder learns skin tones, then rises as it learns upright faces);
    mirrored training samples are accepted."""
    crops, raw, _ = faces
    crops = np.stack([to_size(c, 16) for c in crops])
    fit, val = slice(0, 24), slice(24, None)
    upside_down = np.ascontiguousarray(crops[val][:, ::-1])
    config = DecoderConfig(size=16, widths=(16, 8, 8), epochs=15, batch_size=4)
    history: list[float] = []
    model = train_decoder(
        raw[fit],
        crops[fit],
        config,
        progress=False,
        flipped_templates=raw[fit][::-1].copy(),
        validation=(raw[val], upside_down, None),
        on_epoch=lambda e, m, f: history.append(f["val_loss"]),
    )
    assert len(history) == 15
    assert history[-1] > min(history) + 0.002  # the test's premise: the last epoch is worse
    final = (
        np.abs(
            reconstruct(model, raw[val]).astype(np.float32) - upside_down.astype(np.float32)
        ).mean()
        / 255.0
    )
    assert final == pytest.approx(min(history), abs=1e-3)
