"""Example client of the advplugin REST service.

Two ways to use the service:
- images: send photos; the server extracts, protects with its key and matches;
- protected templates: this client extracts and protects locally with the same key file as
  the gallery's (the "client-side middleware"), so the server holds no key and never sees
  an image or a raw embedding (run it with ADVPLUGIN_MODE=templates).

    python examples/client.py --url http://127.0.0.1:8000 --api-key-file .advplugin/data/api-key \
        enroll Ada photo1.jpg
    python examples/client.py ... identify photo2.jpg
    python examples/client.py ... --key-file .advplugin/key enroll-templates Ada photo1.jpg
    python examples/client.py ... status

The HTTP part is the typed client package `advplugin.client` (sync `Client`, async
`AsyncClient`); this example adds the client-side protection and a command line.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from advplugin.client import Client


class AdvpluginClient(Client):
    """The typed client of the package (`advplugin.client.Client`: sync; `AsyncClient`:
    async), under the name this example always had."""


class LocalProtector:
    """Client-side middleware: extractor + protector with the gallery's key file. Raw
    embeddings exist only inside `templates`; only protected templates are sent."""

    def __init__(self, key_file: str, scheme: str = "xnn", extractor: str = "dlib") -> None:
        from advplugin.adapters import create_extractor
        from advplugin.keys import load_key
        from advplugin.protectors import create_protector

        self.extractor = create_extractor(extractor)
        self.protector = create_protector(scheme, key=load_key(key_file), dim=self.extractor.dim)

    @property
    def protection(self) -> dict:
        m = self.protector.metadata
        return {"scheme": m.scheme, "scheme_version": m.scheme_version, "key_id": m.key_id,
                "extractor_name": self.extractor.name, "extractor_version": self.extractor.version}

    def templates(self, image_path: str, *, largest_only: bool = True) -> np.ndarray:
        from advplugin.images import load_image

        faces = self.extractor.extract(load_image(image_path), largest_only=largest_only)
        if len(faces.detections) == 0:
            raise RuntimeError(f"no face found in {image_path}")
        return self.protector.protect(faces.embeddings)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--api-key-file", default=".advplugin/data/api-key")
    p.add_argument("--key-file", default=".advplugin/key", help="for the *-templates commands")
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("enroll", "enroll-templates"):
        s = sub.add_parser(name)
        s.add_argument("subject")
        s.add_argument("images", nargs="+")
    for name in ("identify", "identify-templates"):
        s = sub.add_parser(name)
        s.add_argument("images", nargs="+")
        s.add_argument("--top", type=int, default=3)
    s = sub.add_parser("verify")
    s.add_argument("subject")
    s.add_argument("image")
    s = sub.add_parser("delete")
    s.add_argument("subject")
    sub.add_parser("subjects")
    sub.add_parser("status")
    args = p.parse_args(argv)

    client = AdvpluginClient(args.url, Path(args.api_key_file).read_text().strip())
    out: list[dict] = []
    if args.cmd == "enroll":
        out = [client.enroll(args.subject, Path(i).read_bytes()) for i in args.images]
    elif args.cmd == "identify":
        out = [client.identify(Path(i).read_bytes(), prediction_count=args.top) for i in args.images]
    elif args.cmd == "verify":
        out = [client.verify(args.subject, Path(args.image).read_bytes())]
    elif args.cmd in ("enroll-templates", "identify-templates"):
        local = LocalProtector(args.key_file)
        t = np.concatenate([local.templates(i) for i in args.images])
        if args.cmd == "enroll-templates":
            out = [client.enroll_templates([args.subject] * len(t), t, local.protection)]
        else:
            out = [client.identify_templates(t, local.protection, prediction_count=args.top)]
    elif args.cmd == "delete":
        out = [client.delete_subject(args.subject)]
    elif args.cmd == "subjects":
        out = [client.subjects()]
    else:
        out = [client.status()]
    for o in out:
        print(json.dumps(o, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
