"""`advplugin blind ...`: the key holder's commands of blind mode (docs/blind.md).

    advplugin blind keygen --out he.key
    advplugin blind enroll  --url URL --api-key-file F --he-key he.key --key xnn.key Ada photo.jpg
    advplugin blind identify --url URL --api-key-file F --he-key he.key --key xnn.key photo.jpg
    advplugin blind migrate --from lfw.npz --url URL --api-key-file F --he-key he.key --key xnn.key

Images are extracted and protected here, templates encrypted here, scores decrypted here: the
service only ever sees ciphertexts.
"""

from __future__ import annotations

import argparse
import functools
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any


def _service_errors(run: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """An unreachable service as advplugin's `RemoteError`, like the service's error answers
    (`BlindServiceError`): `main` prints one line and exits with the remote kind's code. httpx
    is not an advplugin error, hence this one translation at the edge of the command."""

    @functools.wraps(run)
    def wrapped(args: argparse.Namespace) -> int:
        import httpx

        from advplugin.errors import RemoteError

        try:
            return run(args)
        except httpx.TransportError as e:
            raise RemoteError(f"cannot reach {args.url}: {type(e).__name__}") from None

    return wrapped


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "blind", help="blind mode client: encrypted enrolment and identification",
        description="Client of a service in blind mode (ADVPLUGIN_MODE=blind): extracts, protects "
        "and encrypts here, decrypts scores here. See docs/blind.md.",
    )
    bsub = p.add_subparsers(dest="blind_command", required=True, metavar="COMMAND")

    k = bsub.add_parser("keygen", help="create the HE secret key file (mode 0600)")
    k.add_argument("--out", required=True, help="path of the key file to create")
    k.set_defaults(func=run_keygen)

    def client_args(q: argparse.ArgumentParser) -> None:
        q.add_argument("--url", default="http://127.0.0.1:8000")
        q.add_argument("--api-key-file", help="file holding the API key (else $ADVPLUGIN_API_KEY)")
        q.add_argument("--he-key", required=True, help="HE key file (advplugin blind keygen)")
        q.add_argument("--scheme", default="xnn", help="protection scheme before encryption")
        q.add_argument("--key", help="protection key file (advplugin keygen)")
        q.add_argument("--extractor", default="dlib")

    e = bsub.add_parser("enroll", help="enrol a face image under a subject")
    client_args(e)
    e.add_argument("subject")
    e.add_argument("images", nargs="+", type=Path)
    e.set_defaults(func=run_enroll)

    i = bsub.add_parser("identify", help="identify the largest face of an image")
    client_args(i)
    i.add_argument("image", type=Path)
    i.add_argument("-k", type=int, default=1, help="subjects to list")
    i.add_argument("--threshold", type=float, help="minimum similarity (applied here)")
    i.add_argument("--plain-probe", action="store_true", help="send the probe unencrypted (docs/blind.md)")
    i.set_defaults(func=run_identify)

    m = bsub.add_parser(
        "migrate", help="encrypt a raw feature database into a blind gallery (bulk, blocks of 4,096)"
    )
    client_args(m)
    m.add_argument("--from", dest="source", required=True, help="as `advplugin migrate --from`")
    m.add_argument("--table")
    m.add_argument("--id-column")
    m.add_argument("--subject-column")
    m.add_argument("--vector-column")
    m.add_argument("--mapping")
    m.set_defaults(func=run_migrate)


def run_keygen(args: argparse.Namespace) -> int:
    from advplugin.he import BlindKey

    key = BlindKey.generate()
    key.save(args.out)
    print(f"wrote HE key {args.out} (key id {key.key_id}, parameters {key.params.digest})")
    return 0


def _client(args: argparse.Namespace, dim: int) -> tuple[Any, Any]:
    from advplugin.cli.protect import build_protector
    from advplugin.he import BlindKey
    from advplugin.he.client import BlindClient

    api_key = Path(args.api_key_file).read_text().strip() if args.api_key_file else os.environ.get("ADVPLUGIN_API_KEY")
    if not api_key:
        raise ValueError("give --api-key-file or set ADVPLUGIN_API_KEY")
    protector = build_protector(args.scheme, args.key, dim, {})
    m = protector.metadata
    protection = {"scheme": m.scheme, "scheme_version": m.scheme_version, "key_id": m.key_id,
                  "extractor_name": args.extractor}
    return BlindClient(args.url, api_key, BlindKey.load(args.he_key), protection), protector


def _embed(args: argparse.Namespace, paths: list[Path]) -> Any:
    import numpy as np

    from advplugin.adapters import create_extractor
    from advplugin.images import load_image

    extractor = create_extractor(args.extractor)
    raws = []
    for path in paths:
        faces = extractor.extract(load_image(path), largest_only=True)
        if not len(faces.detections):
            raise ValueError(f"no face found in {path}")
        raws.append(faces.embeddings[0])
    return np.stack(raws), extractor.dim


@_service_errors
def run_enroll(args: argparse.Namespace) -> int:
    raws, dim = _embed(args, args.images)
    client, protector = _client(args, dim)
    items = client.enroll([args.subject] * len(raws), protector.protect(raws))
    print(f"enrolled {len(items)} template(s) of {args.subject} (encrypted)")
    return 0


@_service_errors
def run_identify(args: argparse.Namespace) -> int:
    raws, dim = _embed(args, [args.image])
    client, protector = _client(args, dim)
    matches = client.identify(protector.protect(raws)[0], k=args.k, threshold=args.threshold, plain=args.plain_probe)
    for m in matches:
        print(f"{m.subject}\t{m.similarity:.4f}")
    if not matches:
        print("no match")
    return 0


@_service_errors
def run_migrate(args: argparse.Namespace) -> int:
    from advplugin.bulk.sources import open_source

    source = open_source(
        args.source, table=args.table, id_column=args.id_column, subject_column=args.subject_column,
        vector_column=args.vector_column, mapping=args.mapping,
    )
    client = protector = None
    done = 0
    try:
        for chunk in source.chunks(4096):  # one block per request when the gallery is empty
            if client is None:
                client, protector = _client(args, chunk.vectors.shape[1])
            if len(chunk):
                client.enroll(chunk.subjects, protector.protect(chunk.vectors))
                done += len(chunk)
            for row_id, reason in chunk.bad:
                print(f"skipped {row_id}: {reason}")
    finally:
        source.close()
    print(f"migrated {done} templates into the blind gallery (encrypted)")
    return 0
