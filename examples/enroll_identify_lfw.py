"""Enroll and identify LFW faces through the protected pipeline, in memory.

image -> dlib extractor -> raw embedding -> xnn protector (secret key) -> protected template;
identification compares protected templates only. Prints the rank-1 rate and a few results.

    python examples/enroll_identify_lfw.py [--people 40] [--data ../shared/data]
"""

from __future__ import annotations

import argparse
import os
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from advplugin.adapters import create_extractor
from advplugin.images import load_image
from advplugin.keys import load_key, write_key
from advplugin.protectors import create_protector


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--people", type=int, default=40, help="identities to enroll (default 40)")
    parser.add_argument(
        "--data",
        default=os.environ.get(
            "ADVPLUGIN_FACE_DATA", str(Path(__file__).resolve().parents[2] / "shared/data")
        ),
        help="folder holding lfw-dev/ (default $ADVPLUGIN_FACE_DATA or ../shared/data)",
    )
    parser.add_argument(
        "--key", default=".advplugin/example.key", help="key file (created if missing)"
    )
    args = parser.parse_args()

    root = Path(args.data) / "lfw-dev"
    if not root.is_dir():
        raise SystemExit(f"no LFW images at {root}; set ADVPLUGIN_FACE_DATA or --data")
    key_path = Path(args.key)
    if key_path.exists():
        key = load_key(key_path)
    else:
        key_path.parent.mkdir(parents=True, exist_ok=True)
        key = write_key(key_path)
    people = sorted(
        d.name for d in root.iterdir() if d.is_dir() and len(list(d.glob("*.jpg"))) >= 2
    )
    people = people[: args.people]

    extractor = create_extractor("dlib")
    protector = create_protector("xnn", key=key, dim=extractor.dim)
    print(
        f"extractor {extractor.name} {extractor.version}; scheme {protector.metadata.scheme} key id {key.key_id}"
    )

    gallery: list[np.ndarray] = []
    names: list[str] = []
    probes: dict[str, list[np.ndarray]] = defaultdict(list)
    start = time.perf_counter()
    for name in people:
        images = sorted((root / name).glob("*.jpg"))
        for i, path in enumerate(images):
            faces = extractor.extract(load_image(path), largest_only=True)
            if len(faces.detections) == 0:
                continue
            template = protector.protect(faces.embeddings)[0]  # the raw vector goes no further
            if i == 0:
                gallery.append(template)
                names.append(name)
            else:
                probes[name].append(template)
    g = np.stack(gallery)
    hits = total = 0
    for name, temps in probes.items():
        scores = protector.score(np.stack(temps), g)
        best = np.asarray(names)[scores.argmax(1)]
        hits += int((best == name).sum())
        total += len(temps)
        if total <= 5:
            print(f"  probe of {name}: identified as {best[0]} (similarity {scores.max(1)[0]:.3f})")
    took = time.perf_counter() - start
    print(
        f"enrolled {len(g)} people, identified {total} probe images: rank-1 {hits / max(total, 1):.1%}"
    )
    print(f"({took:.1f} s; only protected templates were kept in memory after each image)")


if __name__ == "__main__":
    main()
