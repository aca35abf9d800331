"""The reconstruction decoder learns faces from templates (real LFW crops and embeddings)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from advplugin.evaluation.data import list_images
from advplugin.evaluation.decoder import DecoderConfig, reconstruct, train_decoder
from advplugin.evaluation.faces import aligned_faces, hash_files
from advplugin.evaluation.metrics import psnr


def test_decoder_fits_faces_better_than_the_mean_face(
    small_split: dict[str, Path], lfw_cache: dict[str, np.ndarray], tmp_path: Path
) -> None:
    folder = list_images(small_split["train"])
    crops, _ = aligned_faces(
        folder,
        hash_files(folder, progress=False),
        crop_size=32,
        scorer=None,
        cache_dir=tmp_path,
        progress=False,
    )
    index = {str(p): i for i, p in enumerate(lfw_cache["path"])}
    raw = lfw_cache["embedding"][[index[str(p)] for p in folder.path]]
    config = DecoderConfig(size=32, widths=(32, 16, 16, 8), epochs=30, batch_size=8)
    model = train_decoder(raw, crops, config, progress=False)
    out = reconstruct(model, raw)
    assert out.shape == crops.shape and out.dtype == np.uint8
    mean_face = np.repeat(crops.mean(0, keepdims=True), len(crops), 0)
    assert psnr(crops, out).mean() > psnr(crops, mean_face).mean() + 1.0
    # Each reconstruction is closer to its own photo than to the other people's photos.
    dist = ((out[:, None].astype(float) - crops[None].astype(float)) ** 2).mean(axis=(2, 3, 4))
    assert (np.argmin(dist, axis=1) == np.arange(len(out))).mean() > 0.5

