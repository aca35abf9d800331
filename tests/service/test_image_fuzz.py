"""Mutated files of every format Pillow can write, sent to the six image routes of a live
service (issue 22): only documented statuses come back (never a 5xx), and memory stays
bounded over crafted requests, decompression bombs among them.

A real lfw-dev face is saved in each format Pillow can write, then mutated with a seeded
generator (byte flips, truncations, duplicated and zeroed chunks). Formats outside the
allowlist (JPEG, PNG, WebP) must be refused from their first bytes; mutated JPEG, PNG and
WebP files are decoded or refused with `invalid_image`. Set ADVPLUGIN_IMAGE_FUZZ_SEED to
explore other mutations (a failure prints its seed, format, mutation and route).
"""

from __future__ import annotations

import base64
import os
import random
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image

from tests.service.conftest import Server, migrated_database
from tests.test_images import encoded, ico_bomb, png_bomb, png_with_inflating_chunk

SEED = int(os.environ.get("ADVPLUGIN_IMAGE_FUZZ_SEED", "22"))
FUZZ_REQUESTS = 324  # 36 per route
CF = "/api/v1"
ACCEPTED = ("JPEG", "PNG", "WEBP")

#: What each API may answer for an image request: success, an unusable image, no face, busy.
NATIVE_OK = {200, 201}
NATIVE_ERRORS = {422: {"invalid_image", "no_face"}, 429: {"busy"}}
CF_ERRORS = {400: {21, 28}, 429: {0}}  # CompreFace's 21: unusable image, 28: no face


@pytest.fixture(scope="module")
def face(face_data: Path) -> Image.Image:
    return Image.open(sorted((face_data / "lfw-dev" / "Aaron_Peirsol").glob("*.jpg"))[0]).convert("RGB")


@pytest.fixture(scope="module")
def variants(face: Image.Image) -> dict[str, bytes]:
    """The face in every format this Pillow can write."""
    Image.init()
    out = {}
    for fmt in sorted(Image.SAVE):
        try:
            out[fmt] = encoded(fmt, image=face)
        except (OSError, KeyError, ValueError, TypeError):
            continue  # no writer in this build (BUFR, GRIB, HDF5, WMF need a handler)
    assert {"JPEG", "PNG", "WEBP", "ICO", "ICNS", "DDS", "QOI", "SGI", "XBM", "TIFF", "BMP", "GIF"} <= set(out)
    return out


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("image-fuzz")
    url = migrated_database("sqlite", tmp, None)  # type: ignore[arg-type]
    srv = Server(tmp, {
        "ADVPLUGIN_DATABASE_URL": url, "ADVPLUGIN_DATA_DIR": str(tmp / "data"), "ADVPLUGIN_SCHEME": "xnn",
    }).start()
    yield srv
    srv.stop()


def mutate(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    """One seeded mutation: flips, a truncation, a duplicated chunk, a zeroed run, or several."""
    b = bytearray(data)
    kind = rng.choice(["flip", "flip-header", "truncate", "duplicate", "zero", "mixed"])
    kinds = [rng.choice(["flip", "flip-header", "truncate", "duplicate", "zero"]) for _ in range(3)] if kind == "mixed" else [kind]
    for k in kinds:
        if len(b) < 2:
            break
        if k == "flip":
            for _ in range(rng.randint(1, 8)):
                b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
        elif k == "flip-header":  # where the sizes, offsets and chunk lengths are
            for _ in range(rng.randint(1, 3)):
                b[rng.randrange(min(len(b), 64))] = rng.randrange(256)
        elif k == "truncate":
            del b[rng.randrange(1, len(b)):]
        elif k == "duplicate":
            i = rng.randrange(len(b))
            j = min(len(b), i + rng.randint(1, 4096))
            at = rng.randrange(len(b))
            b[at:at] = b[i:j]
        else:
            i, n = rng.randrange(len(b)), rng.randint(1, 512)
            b[i : i + n] = bytes(len(b[i : i + n]))
    return bytes(b), "+".join(kinds)


class Routes:
    """The six image routes (nine paths); each sends one image and checks the answer."""

    def __init__(self, client: httpx.Client, valid: bytes) -> None:
        self.c, self.valid = client, valid
        r = client.post("/enroll", files={"file": ("a.jpg", valid)}, data={"subject": "Aaron"})
        assert r.status_code == 201, r.text
        r = client.post(f"{CF}/recognition/faces", params={"subject": "Aaron"}, files={"file": ("a.jpg", valid)})
        assert r.status_code == 201, r.text
        self.image_id = r.json()["image_id"]

    def all(self) -> list[tuple[str, Callable[[bytes, bool], httpx.Response]]]:
        c = self.c

        def cf(path: str, **params: str) -> Callable[[bytes, bool], httpx.Response]:
            def send(data: bytes, as_json: bool) -> httpx.Response:
                if as_json:
                    return c.post(CF + path, params=params, json={"file": base64.b64encode(data).decode()})
                return c.post(CF + path, params=params, files={"file": ("x", data)})
            return send

        def cf_pair(data: bytes, as_json: bool) -> httpx.Response:
            if as_json:
                return c.post(CF + "/verification/verify", json={
                    "source_image": base64.b64encode(self.valid).decode(),
                    "target_image": base64.b64encode(data).decode()})
            return c.post(CF + "/verification/verify",
                          files={"source_image": ("s", data), "target_image": ("t", self.valid)})

        return [
            ("/enroll", lambda d, _: c.post("/enroll", files={"file": ("x", d)}, data={"subject": "Fuzzed"})),
            ("/identify", lambda d, _: c.post("/identify", files={"file": ("x", d)})),
            ("/verify", lambda d, _: c.post("/verify", files={"file": ("x", d)}, data={"subject": "Aaron"})),
            (CF + "/recognition/faces", cf("/recognition/faces", subject="Fuzzed")),
            (CF + "/recognition/recognize", cf("/recognition/recognize")),
            (CF + "/detection/detect", cf("/detection/detect")),
            (CF + "/verification/verify", cf_pair),
            (CF + "/recognition/faces/{id}/verify", cf(f"/recognition/faces/{self.image_id}/verify")),
            (CF + "/recognition/recognize?limit=1", cf("/recognition/recognize", limit="1")),
        ]


def check(r: httpx.Response, route: str, what: str) -> str:
    """The answer is a documented one; returns "status code" for the tally."""
    where = f"{route} <- {what}: {r.status_code} {r.text[:300]}"
    if route.startswith(CF):
        body = r.json()
        if r.status_code in NATIVE_OK:
            return str(r.status_code)
        assert r.status_code in CF_ERRORS and body["code"] in CF_ERRORS[r.status_code], where
        return f"{r.status_code} {body['error']['code']}"
    if r.status_code in NATIVE_OK:
        return str(r.status_code)
    assert r.status_code in NATIVE_ERRORS, where
    code = r.json()["error"]["code"]
    assert code in NATIVE_ERRORS[r.status_code], where
    return f"{r.status_code} {code}"


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_mutated_files_of_every_format_answer_documented_statuses(server: Server, variants: dict[str, bytes]) -> None:
    rng = random.Random(SEED)
    formats = sorted(variants)
    tally: dict[str, int] = {}
    with server.client() as c:
        routes = Routes(c, variants["JPEG"]).all()
        for n in range(FUZZ_REQUESTS):
            route, send = routes[n % len(routes)]
            # half the requests: the accepted formats, whose decoders do run; half: every format
            fmt = ACCEPTED[n // 2 % 3] if n % 2 == 0 else formats[(n // 2) % len(formats)]
            data, how = mutate(variants[fmt], rng)
            status = check(send(data, n % 4 >= 2), route, f"seed {SEED} #{n} {fmt} {how}")
            tally[status] = tally.get(status, 0) + 1
        # every unmutated format: accepted ones decode (a face, 2xx), the others are refused
        for fmt in formats:
            r = c.post("/identify", files={"file": ("x", variants[fmt])})
            accepted = fmt in (*ACCEPTED, "MPO")  # MPO is written as a JPEG
            assert (r.status_code == 200) if accepted else (
                r.status_code == 422 and "JPEG, PNG, WebP" in r.json()["error"]["message"]), (fmt, r.text)
    print(f"image fuzz, seed {SEED}: {FUZZ_REQUESTS} requests over {len(formats)} formats: {dict(sorted(tally.items()))}")
    assert not any(s.startswith("5") for s in tally)
    log = server.log()
    assert "Traceback" not in log and "internal error" not in log


def test_nested_json_is_an_invalid_request(server: Server) -> None:
    """Base64 JSON nested 100,000 levels deep was a 500 (RecursionError)."""
    deep = "[" * 100_000 + "]" * 100_000
    bodies = [deep, '{"file": ' + deep + "}"]
    with server.client() as c:
        for path in ("/recognition/faces?subject=X", "/recognition/recognize", "/detection/detect",
                     "/verification/verify", "/recognition/faces/1/verify"):
            for body in bodies:
                r = c.post(CF + path, content=body, headers={"content-type": "application/json"})
                assert r.status_code == 400, (path, r.status_code, r.text[:300])
                assert r.json()["code"] == 26 and r.json()["error"]["code"] == "invalid_request"
    assert "Traceback" not in server.log()


def test_memory_stays_bounded_over_crafted_requests(server: Server, variants: dict[str, bytes]) -> None:
    """100 crafted requests, 13000x13000 ICO and PNG bombs among them (an ICO took the
    process from 642 MB to 3 GB): RSS stays within 300 MB of where it started."""
    assert server.proc is not None
    rng = random.Random(SEED + 1)
    crafted = [("ico-bomb", ico_bomb()), ("png-bomb", png_bomb()),
               ("zTXt", png_with_inflating_chunk(b"zTXt")), ("iCCP", png_with_inflating_chunk(b"iCCP"))]
    accepted = [variants[f] for f in ACCEPTED]
    with server.client() as c:
        routes = Routes(c, variants["JPEG"]).all()
        for _, send in routes:  # warm: every route has run once on a real face
            send(variants["JPEG"], False)
        before = rss_mb(server.proc.pid)
        peak, tally = before, {}
        for n in range(100):
            route, send = routes[n % len(routes)]
            if n % 2 == 0:
                what, data = crafted[(n // 2) % len(crafted)]
            else:
                data, what = mutate(rng.choice(accepted), rng)
            status = check(send(data, n % 4 == 1), route, what)
            tally[status] = tally.get(status, 0) + 1
            if n % 10 == 9:
                peak = max(peak, rss_mb(server.proc.pid))
        after = rss_mb(server.proc.pid)
    print(f"RSS over 100 crafted requests: {before:.0f} MB before, {peak:.0f} MB peak, {after:.0f} MB after; "
          f"{dict(sorted(tally.items()))}")
    assert after - before < 300 and peak - before < 300
    assert tally.get("422 invalid_image", 0) + tally.get("400 invalid_image", 0) >= 50
