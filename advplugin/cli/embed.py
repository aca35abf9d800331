"""`advplugin embed`: raw embeddings of a folder of face images, in the shared npz layout.

This is the one command whose output is raw embeddings by design (caches for evaluation,
sources for migration); treat its output file as biometric data. Work is spread over
processes; each worker builds its own extractor and writes its rows straight into shared
memory, so no embedding is ever pickled between processes.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
from multiprocessing import shared_memory
from pathlib import Path

import numpy as np

from advplugin.cli.common import add_option_argument, parse_options
from advplugin.embedding_files import EmbeddingSet, save_embedding_set

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "embed",
        help="embed a folder of face images (<identity>/<image>) into an npz of raw embeddings",
        description="One embedding per image: the face nearest the image centre, or a centre box "
        "when no face is detected (flagged detected=0). Identity = folder name; paths are relative "
        "to IMAGES_DIR. The output holds RAW embeddings: biometric data.",
    )
    p.add_argument("images_dir", metavar="IMAGES_DIR")
    p.add_argument("--out", required=True, help="output .npz (embedding, path, identity, detected)")
    p.add_argument("--extractor", default="dlib", help="registered extractor name (default dlib)")
    add_option_argument(p, "--extractor-option", "extractor")
    p.add_argument(
        "--workers", type=int, default=os.cpu_count() or 1, help="processes (default: all cores)"
    )
    p.set_defaults(func=run)


def list_images(root: Path) -> list[Path]:
    """Images in `<identity>/<image>` layout, sorted for a reproducible order."""
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} not found")
    images = sorted(
        p.relative_to(root)
        for p in root.glob("*/*")
        if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
    )
    if not images:
        raise ValueError(f"no images found in {root} (expected <identity>/<image> files)")
    return images


# Per-process state, set by _init_worker: the extractor and a view of the shared output.
_worker: dict[str, object] = {}


def _init_worker(
    name: str, options: dict[str, object], shm_name: str, shape: tuple[int, int], root: str
) -> None:
    from advplugin.adapters import create_extractor

    shm = shared_memory.SharedMemory(name=shm_name)
    _worker.update(
        extractor=create_extractor(name, **options),
        shm=shm,
        out=np.ndarray(shape, dtype=np.float32, buffer=shm.buf),
        root=Path(root),
    )


def _embed_one(task: tuple[int, str]) -> tuple[int, bool, str | None]:
    from advplugin.images import FOLDER_FORMATS, ImageError, load_image

    index, rel = task
    try:
        image = load_image(_worker["root"] / rel, formats=FOLDER_FORMATS)  # type: ignore[operator]
    except ImageError as e:
        return index, False, str(e)
    vector, detected = _worker["extractor"].extract_central(image)  # type: ignore[attr-defined]
    _worker["out"][index] = vector  # type: ignore[index]
    return index, detected, None


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from advplugin.adapters import create_extractor

    root = Path(args.images_dir)
    images = list_images(root)
    options = parse_options(args.extractor_option)
    dim = create_extractor(args.extractor, **options).dim  # also validates the options up front
    workers = max(1, min(args.workers, len(images)))
    shm = shared_memory.SharedMemory(create=True, size=len(images) * dim * 4)
    try:
        out = np.ndarray((len(images), dim), dtype=np.float32, buffer=shm.buf)
        out[:] = 0
        detected = np.zeros(len(images), np.int8)
        failed: dict[int, str] = {}
        init = (args.extractor, options, shm.name, out.shape, str(root))
        tasks = [(i, str(p)) for i, p in enumerate(images)]
        ctx = mp.get_context("fork")
        with ctx.Pool(workers, initializer=_init_worker, initargs=init) as pool:
            for index, found, error in tqdm(
                pool.imap_unordered(_embed_one, tasks, chunksize=8),
                total=len(tasks),
                unit="img",
                desc="embed",
            ):
                detected[index] = found
                if error:
                    failed[index] = error
        keep = np.ones(len(images), bool)
        keep[list(failed)] = False
        data = EmbeddingSet(
            embedding=out[keep].copy(),
            path=np.array([str(p) for p in images])[keep],
            identity=np.array([p.parts[0] for p in images])[keep],
            detected=detected[keep],
        )
        del out
    finally:
        shm.close()
        shm.unlink()
    save_embedding_set(args.out, data)
    print(
        f"wrote {len(data)} embeddings (dim {dim}, {int(data.detected.sum())} detected) to {args.out}"
    )
    for index, error in sorted(failed.items()):
        print(f"skipped unreadable image {images[index]}: {error}")
    return 0
