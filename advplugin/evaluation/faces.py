"""Per-image inputs of the harness: raw embeddings, aligned face crops, scorer embeddings.

Everything expensive is cached by image content hash (`FeatureCache`): the attacked
extractor's embeddings (seedable from an `.npz` embedding set such as the shipped
`lfw-dev-dlib128.npz`), and the 5 ArcFace landmarks plus the independent scorer's embedding.
Crops are re-warped from the cached landmarks on every run (milliseconds per image).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import re
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from advplugin.adapters import Extractor
from advplugin.adapters.align import align_face, arcface_points_from_dlib68
from advplugin.adapters.dlib_adapter import model_dir
from advplugin.embedding_files import load_embedding_set
from advplugin.evaluation.data import FeatureCache, ImageFolder, file_sha256
from advplugin.images import FOLDER_FORMATS, load_image

#: Aligned crops are warped at the ArcFace size, then scaled to the decoder's size, so a
#: decoder output scaled back to 112 is exactly what an ArcFace-style scorer expects.
ALIGN_SIZE = 112


@dataclass
class FaceSet:
    """One folder's images with what the harness needs, in memory only."""

    folder: ImageFolder
    raw: np.ndarray  # [N, D] raw embeddings of the attacked extractor
    detected: np.ndarray  # bool [N]
    crops: np.ndarray  # uint8 [N, S, S, 3], ArcFace-aligned
    scorer: np.ndarray | None  # [N, D_s] embeddings of the independent scorer, or None

    def __repr__(self) -> str:
        return f"FaceSet(n={len(self.raw)}, dim={self.raw.shape[1]}, vectors=<hidden>)"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text)[:120]


class FaceAligner:
    """5 ArcFace landmarks from dlib's HOG detector (no upsampling: LFW-sized faces are found
    at a third of the cost) and 68-point predictor; the centre box where nothing is found."""

    def __init__(self) -> None:
        import dlib

        self._dlib = dlib
        self._detector = dlib.get_frontal_face_detector()
        self._shapes = dlib.shape_predictor(
            str(model_dir() / "shape_predictor_68_face_landmarks.dat")
        )

    def landmarks(self, image: np.ndarray) -> tuple[np.ndarray, bool]:
        h, w = image.shape[:2]
        rects = self._detector(image, 0)
        if rects:
            centre = np.array([w / 2, h / 2])
            dist = [np.sum((np.array([r.center().x, r.center().y]) - centre) ** 2) for r in rects]
            rect, found = rects[int(np.argmin(dist))], True
        else:
            rect = self._dlib.rectangle(int(0.2 * w), int(0.2 * h), int(0.8 * w), int(0.8 * h))
            found = False
        shape = self._shapes(image, rect)
        return arcface_points_from_dlib68(np.array([(p.x, p.y) for p in shape.parts()])), found


def hash_files(folder: ImageFolder, *, progress: bool = True) -> list[str]:
    return [file_sha256(f) for f in tqdm(folder.files(), desc="hash images", disable=not progress)]


def raw_embeddings(
    folder: ImageFolder,
    digests: list[str],
    extractor: Extractor,
    *,
    cache_dir: Path | None,
    seed_file: Path | None = None,
    progress: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """The attacked extractor's embedding of every image (one per image, the central face).

    A seed file (EmbeddingSet layout, paths relative to the image folder) fills cache misses
    by relative path; it must come from the same extractor, as the shipped LFW cache does.
    """
    cache = FeatureCache(
        cache_dir / f"embed-{_slug(extractor.name + '-' + extractor.version)}.npz"
        if cache_dir
        else None,
        {"embedding": (extractor.dim,), "detected": ()},
    )
    seed = None
    if seed_file is not None:
        seed_set = load_embedding_set(seed_file)
        if seed_set.embedding.shape[1] != extractor.dim:
            raise ValueError(
                f"{seed_file} has dimension {seed_set.embedding.shape[1]}, not {extractor.dim}"
            )
        seed = (seed_set, seed_set.index_by_path())
    for rel, file, digest in tqdm(
        list(zip(folder.path, folder.files(), digests, strict=True)),
        desc=f"embed ({extractor.name})",
        disable=not progress,
    ):
        if digest in cache:
            continue
        if seed is not None and str(rel) in seed[1]:
            row = seed[1][str(rel)]
            cache.put(
                digest, {"embedding": seed[0].embedding[row], "detected": seed[0].detected[row]}
            )
            continue
        vector, found = extractor.extract_central(load_image(file, formats=FOLDER_FORMATS))
        cache.put(digest, {"embedding": vector, "detected": np.float32(found)})
    cache.save()
    rows = [cache.get(d) for d in digests]
    return np.stack([r["embedding"] for r in rows]), np.array([r["detected"] > 0 for r in rows])


def aligned_faces(
    folder: ImageFolder,
    digests: list[str],
    *,
    crop_size: int,
    scorer: Extractor | None,
    cache_dir: Path | None,
    progress: bool = True,
) -> tuple[np.ndarray, np.ndarray | None]:
    """ArcFace-aligned crops [N, S, S, 3] and, with a scorer, its embeddings of the photos."""
    fields: dict[str, tuple[int, ...]] = {"landmarks": (5, 2), "found": ()}
    name = "align-dlib68-up0"
    if scorer is not None:
        fields["scorer"] = (scorer.dim,)
        name += f"-{scorer.name}-{scorer.version}"
    cache = FeatureCache(cache_dir / f"{_slug(name)}.npz" if cache_dir else None, fields)
    files = folder.files()
    missing = [i for i, d in enumerate(digests) if d not in cache]
    found_points = _landmarks_in_parallel([files[i] for i in missing], progress=progress)
    crops = np.zeros((len(digests), crop_size, crop_size, 3), np.uint8)
    scores = np.zeros((len(digests), scorer.dim), np.float32) if scorer is not None else None
    for i, (file, digest) in enumerate(
        tqdm(list(zip(files, digests, strict=True)), desc="align faces", disable=not progress)
    ):
        image = load_image(file, formats=FOLDER_FORMATS)
        if digest in cache:
            crop = align_face(image, cache.get(digest)["landmarks"], ALIGN_SIZE)
        else:
            points, found = found_points[file]
            crop = align_face(image, points, ALIGN_SIZE)
            values = {"landmarks": points, "found": np.float32(found)}
            if scorer is not None:
                values["scorer"] = scorer.embed_aligned(crop[None])[0]
            cache.put(digest, values)
        if scores is not None:
            scores[i] = cache.get(digest)["scorer"]
        crops[i] = to_size(crop, crop_size)
    cache.save()
    return crops, scores


_aligner: FaceAligner | None = None  # one per worker process


def _landmarks_of(file: Path) -> tuple[Path, np.ndarray, bool]:
    global _aligner
    _aligner = _aligner or FaceAligner()
    points, found = _aligner.landmarks(load_image(file, formats=FOLDER_FORMATS))
    return file, points, found


def _landmarks_in_parallel(
    files: list[Path], *, progress: bool
) -> dict[Path, tuple[np.ndarray, bool]]:
    """Landmarks of uncached photos on every core: detection is the slow step of a cold run
    (about 0.1 s a photo). Only landmark coordinates cross process boundaries."""
    if not files:
        return {}
    workers = max(1, min(os.cpu_count() or 1, len(files) // 50 or 1))
    bar = tqdm(total=len(files), desc="detect landmarks", disable=not progress)
    out: dict[Path, tuple[np.ndarray, bool]] = {}
    if workers == 1:
        results = map(_landmarks_of, files)
        for file, points, found in results:
            out[file] = (points, found)
            bar.update()
    else:
        with mp.get_context("fork").Pool(workers) as pool:
            for file, points, found in pool.imap_unordered(_landmarks_of, files, chunksize=16):
                out[file] = (points, found)
                bar.update()
    bar.close()
    return out


def to_size(image: np.ndarray, size: int) -> np.ndarray:
    """Resize an aligned square crop (area averaging down, bilinear up)."""
    if image.shape[0] == size:
        return image
    interpolation = cv2.INTER_AREA if image.shape[0] > size else cv2.INTER_LINEAR
    return cv2.resize(image, (size, size), interpolation=interpolation)


def scorer_embeddings(scorer: Extractor, crops: np.ndarray, batch: int = 256) -> np.ndarray:
    """The scorer's embeddings of aligned crops of any size (decoder outputs), scaled to 112."""
    out = []
    for start in range(0, len(crops), batch):
        chunk = np.stack([to_size(c, ALIGN_SIZE) for c in crops[start : start + batch]])
        out.append(scorer.embed_aligned(chunk))  # type: ignore[attr-defined]
    return np.concatenate(out) if out else np.zeros((0, scorer.dim), np.float32)


def load_face_set(
    folder: ImageFolder,
    extractor: Extractor,
    *,
    crop_size: int,
    scorer: Extractor | None,
    cache_dir: Path | None,
    seed_file: Path | None,
    progress: bool = True,
) -> FaceSet:
    digests = hash_files(folder, progress=progress)
    raw, detected = raw_embeddings(
        folder, digests, extractor, cache_dir=cache_dir, seed_file=seed_file, progress=progress
    )
    crops, scores = aligned_faces(
        folder, digests, crop_size=crop_size, scorer=scorer, cache_dir=cache_dir, progress=progress
    )
    return FaceSet(folder, raw, detected, crops, scores)
