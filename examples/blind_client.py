"""Example client of a service in blind mode (ADVPLUGIN_MODE=blind, docs/blind.md).

This machine holds both secrets: the protection key (xnn) and the HE secret key. It extracts
a face, protects it, encrypts it, and sends only ciphertexts; the service answers with
encrypted scores, which are decrypted, ranked and thresholded here.

    advplugin keygen --out xnn.key
    python examples/blind_client.py keygen --he-key he.key
    ADVPLUGIN_MODE=blind ADVPLUGIN_TEMPLATE_KEY_ID=<xnn key id> advplugin serve
    python examples/blind_client.py --api-key-file .advplugin/data/api-key --key xnn.key \
        --he-key he.key enroll Ada ada1.jpg
    python examples/blind_client.py ... identify photo.jpg
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from advplugin.adapters import create_extractor
from advplugin.he import BlindKey
from advplugin.he.client import BlindClient
from advplugin.images import load_image
from advplugin.keys import load_key
from advplugin.protectors import create_protector


def protected_face(image: Path, protector) -> np.ndarray:
    """Extract the largest face and protect it: the raw embedding stays in this function."""
    faces = create_extractor("dlib").extract(load_image(image), largest_only=True)
    if not len(faces.detections):
        raise SystemExit(f"no face in {image}")
    return protector.protect(faces.embeddings[:1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--api-key-file", default=".advplugin/data/api-key")
    ap.add_argument("--key", help="protection (xnn) key file")
    ap.add_argument("--he-key", required=True, help="HE secret key file")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("keygen")
    e = sub.add_parser("enroll")
    e.add_argument("subject")
    e.add_argument("image", type=Path)
    i = sub.add_parser("identify")
    i.add_argument("image", type=Path)
    i.add_argument("--threshold", type=float)
    args = ap.parse_args()

    if args.cmd == "keygen":
        key = BlindKey.generate()
        key.save(args.he_key)
        print(f"HE key {args.he_key}: key id {key.key_id}")
        return
    protector = create_protector("xnn", key=load_key(args.key), dim=128)
    m = protector.metadata
    client = BlindClient(
        args.url, Path(args.api_key_file).read_text().strip(), BlindKey.load(args.he_key),
        {"scheme": m.scheme, "scheme_version": m.scheme_version, "key_id": m.key_id, "extractor_name": "dlib"},
    )
    template = protected_face(args.image, protector)
    if args.cmd == "enroll":
        print(client.enroll([args.subject], template))
    else:
        for match in client.identify(template[0], k=3, threshold=args.threshold):
            print(f"{match.subject}\t{match.similarity:.4f}")


if __name__ == "__main__":
    main()
