"""Blind mode (docs/blind.md) end to end over real HTTP: the client protects (xnn), encrypts
(CKKS), enrols and identifies; the service holds only ciphertexts and returns encrypted
scores; the client decrypts. Answers must be those of plaintext xnn; the server's database,
files, log and Python-visible state must hold no plaintext template or score; bad
ciphertexts must be refused with 4xx."""

from __future__ import annotations

import gc
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import httpx
import numpy as np
import pytest
import uvicorn

from advplugin.gallery import Gallery
from advplugin.he import BlindKey, HEParams, pack
from advplugin.he.client import BlindClient
from advplugin.he.wire import MEDIA_TYPE
from advplugin.protectors import create_protector
from advplugin.service.app import create_app
from advplugin.service.blind_service import max_request_bytes
from advplugin.settings import Settings
from tests.service.conftest import free_port, migrated_database
from tests.service.helpers import (
    assert_no_raw_bytes,
    files_blob,
    first_vs_rest,
    protection_of,
    vectors_in_blob,
)

#: Encrypted probes per test: the client's encryption (128 ciphertexts) costs ~0.5 s each, so
#: the full 5,358-probe comparison runs in benchmarks/blind.py, not in CI.
N_ENCRYPTED_PROBES = 10


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=-1, keepdims=True)
    b = b / np.linalg.norm(b, axis=-1, keepdims=True)
    return a @ b.T


@pytest.fixture(scope="module")
def he_key() -> BlindKey:
    return BlindKey.generate()


@pytest.fixture
def xnn_split(lfw_cache, key):
    """lfw-dev: first image of every identity with >= 2 images enrolled, the others probes,
    protected with xnn on the client."""
    emb, identity, path = lfw_cache["embedding"], lfw_cache["identity"], lfw_cache["path"]
    g_idx, p_idx = first_vs_rest(identity, path)
    protector = create_protector("xnn", key=key, dim=128)
    return {
        "protector": protector, "gallery": protector.protect(emb[g_idx]), "probes": protector.protect(emb[p_idx]),
        "g_names": [str(identity[i]) for i in g_idx], "p_names": [str(identity[i]) for i in p_idx],
    }


def _env(url: str, tmp_path: Path, key, **extra: str) -> dict[str, str]:
    return {
        "ADVPLUGIN_DATABASE_URL": url, "ADVPLUGIN_DATA_DIR": str(tmp_path / "data"),
        "ADVPLUGIN_MODE": "blind", "ADVPLUGIN_SCHEME": "xnn",
        "ADVPLUGIN_TEMPLATE_KEY_ID": key.key_id, "ADVPLUGIN_TEMPLATE_DIM": "128", **extra,
    }


@pytest.mark.slow
def test_blind_over_http_gives_the_answers_of_plaintext_xnn(
    xnn_split, key, he_key, tmp_path, make_server, request
) -> None:
    s = xnn_split
    url = migrated_database("postgresql", tmp_path, request)
    server = make_server(_env(url, tmp_path, key, ADVPLUGIN_BLIND_PLAIN_PROBES="1"))
    client = BlindClient(server.url, server.api_key, he_key, protection_of(s["protector"]))
    assert client.params()["he_key_id"] is None  # nothing enrolled: no key bound yet

    # Two requests into one block: the second is added homomorphically at offset 1000.
    names, gallery = s["g_names"], s["gallery"]
    items = client.enroll(names[:1000], gallery[:1000]) + client.enroll(names[1000:], gallery[1000:])
    assert [it["subject"] for it in items] == names
    assert [it["slot"] for it in items] == list(range(len(names)))
    info = client.params()
    assert info["he_key_id"] == he_key.key_id and info["template_count"] == len(names)
    assert not any((d / "key").exists() for d in (tmp_path, tmp_path / "data"))  # the server holds no key
    row_of = {it["template_id"]: i for i, it in enumerate(items)}

    # Probes spread over the whole probe list; offline = plaintext xnn on the same templates.
    pick = np.linspace(0, len(s["p_names"]) - 1, N_ENCRYPTED_PROBES).astype(int)
    offline = _cos(s["probes"][pick], gallery)
    offline_top1 = [names[int(j)] for j in offline.argmax(1)]
    protector_top1 = [names[int(j)] for j in s["protector"].score(s["probes"][pick], gallery).argmax(1)]
    assert offline_top1 == protector_top1  # xnn's own scorer is this cosine
    http_top1, worst = [], 0.0
    for row, j in enumerate(pick):
        sims, ids, subjects = client.scores(s["probes"][j])
        assert sorted(ids.tolist()) == sorted(row_of)  # every live template, once
        order = np.array([row_of[int(i)] for i in ids])
        worst = max(worst, float(np.abs(sims - offline[row, order]).max()))
        http_top1.append(BlindClient.rank(sims, ids, subjects, k=1)[0].subject)
    print(f"blind: {len(names)} enrolled, {len(pick)} encrypted probes: max |score - plaintext| {worst:.2e}")
    assert worst < 1e-4
    assert http_top1 == offline_top1
    assert np.mean(np.array(offline_top1) == np.array(s["p_names"])[pick]) > 0.5  # a real recogniser

    # The plaintext-probe option (enabled here) gives the same scores.
    sims, ids, _ = client.scores(s["probes"][pick[0]], plain=True)
    order = np.array([row_of[int(i)] for i in ids])
    assert np.abs(sims - offline[0, order]).max() < 1e-4

    # Threshold and k on the client side.
    top = client.identify(s["probes"][pick[0]], k=3)
    assert len(top) == 3 and top[0].similarity >= top[1].similarity >= top[2].similarity
    assert client.identify(s["probes"][pick[0]], k=3, threshold=top[0].similarity + 1e-3) == []

    # Deleting a subject (the ordinary route) removes its slots from the answers.
    victim = offline_top1[0]
    with server.client() as http:
        assert http.delete(f"/subjects/{victim}").status_code == 200
    sims, ids, subjects = client.scores(s["probes"][pick[0]])
    assert victim not in subjects and len(ids) == len(names) - names.count(victim)
    assert client.params()["template_count"] == len(ids)
    assert client.identify(s["probes"][pick[0]], k=1)[0].subject != victim

    # Plaintext template routes are refused in blind mode.
    with server.client() as http:
        r = http.post("/identify/templates", json={
            "templates": [s["probes"][0].tolist()], "protection": protection_of(s["protector"]),
        })
        assert r.status_code == 422 and r.json()["error"]["code"] == "blind_mode"

    # Restart: the encrypted index is rebuilt from SQL and answers the same.
    server.restart()
    client.http.close()
    client = BlindClient(server.url, server.api_key, he_key, protection_of(s["protector"]))
    assert client.identify(s["probes"][pick[1]], k=1)[0].subject == offline_top1[1]


# -- bad input -------------------------------------------------------------------------------------
def _post(http: httpx.Client, path: str, body: bytes) -> httpx.Response:
    return http.post(path, content=body, headers={"content-type": MEDIA_TYPE})


@pytest.mark.slow
def test_blind_bad_input_is_refused_with_4xx(xnn_split, key, he_key, tmp_path, make_server, request) -> None:
    s = xnn_split
    url = migrated_database("sqlite", tmp_path, request)
    server = make_server(_env(url, tmp_path, key))
    prot = protection_of(s["protector"])
    client = BlindClient(server.url, server.api_key, he_key, prot)
    client.enroll(s["g_names"][:20], s["gallery"][:20])
    good = he_key.encrypt_probe(s["probes"][0])
    base = {"he_key_id": he_key.key_id, "params": he_key.params.digest, "probe": "encrypted"}

    other_params = BlindKey.generate(HEParams(poly_modulus_degree=4096, coeff_mod_bit_sizes=(60, 49), scale_bits=28))
    other_key = BlindKey.generate()
    cases: dict[str, tuple[str, bytes, int, str]] = {
        "garbage": ("/blind/identify", b"not a message at all", 422, "invalid_message"),
        "truncated": ("/blind/identify", pack(base, good)[:-1000], 422, "invalid_message"),
        "bad header": ("/blind/identify", b"APHE\x01" + (5).to_bytes(4, "little") + b"[1,2]" + bytes(4), 422, "invalid_message"),
        "random ciphertext": ("/blind/identify", pack(base, [np.random.default_rng(0).bytes(len(good[0]))] * 128), 422, "invalid_ciphertext"),
        "flipped header bytes": ("/blind/identify", pack(base, [b"\xff" * 64 + g[64:] for g in good]), 422, "invalid_ciphertext"),
        "too few ciphertexts": ("/blind/identify", pack(base, good[:5]), 422, "invalid_ciphertext"),
        "oversized ciphertext": ("/blind/identify", pack(base, [good[0] + b"\0" * 8192, *good[1:]]), 422, "invalid_ciphertext"),
        "other parameters, honest digest": (
            "/blind/identify",
            pack({**base, "params": other_params.params.digest}, other_params.encrypt_probe(s["probes"][0])),
            422, "wrong_parameters",
        ),
        "other parameters, claiming ours": (
            "/blind/identify", pack(base, other_params.encrypt_probe(s["probes"][0])), 422, "invalid_ciphertext",
        ),
        "other key": ("/blind/identify", pack({**base, "he_key_id": other_key.key_id}, other_key.encrypt_probe(s["probes"][0])), 409, "wrong_he_key"),
        "plain probe refused": ("/blind/identify", pack({**base, "probe": "plain", "values": [0.1] * 128}), 422, "plain_probes_disabled"),
        "enrol without subjects": ("/blind/enroll", pack({**base, "block": None, "offset": 0, "protection": prot}, good), 422, "invalid_message"),
        "enrol at a taken slot": (
            "/blind/enroll",
            pack({**base, "block": 1, "offset": 3, "subjects": ["x"], "protection": prot}, he_key.encrypt_block(s["gallery"][:1], 3)),
            409, "slot_conflict",
        ),
        "enrol with another scheme key": (
            "/blind/enroll",
            pack({**base, "block": 1, "offset": 20, "subjects": ["x"], "protection": {**prot, "key_id": "0" * 16}}, good),
            422, "wrong_key",
        ),
    }
    with server.client() as http:
        for name, (path, body, status, code) in cases.items():
            r = _post(http, path, body)
            assert (r.status_code, r.json()["error"]["code"]) == (status, code), name
        # Size limit: refused before the body is read.
        r = _post(http, "/blind/identify", b"\0" * (max_request_bytes(he_key.params) + 1))
        assert r.status_code == 413
    assert server.proc.poll() is None  # never crashed
    assert client.identify(s["probes"][0], k=1)  # and still answers

    # The server process's whole writable memory holds none of the enrolled templates (it
    # only ever received their ciphertexts); the scanner finds one in a process that has it.
    patterns = _template_patterns(s["gallery"][[0, 7, 13, 19]])
    assert _memory_hits(server.proc.pid, patterns) == 0
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time, numpy as np; "
         "t = np.frombuffer(sys.stdin.buffer.read(512), '<f4').copy(); print(1, flush=True); time.sleep(60)"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE,
    )
    try:
        holder.stdin.write(s["gallery"][7].astype("<f4").tobytes())
        holder.stdin.close()
        holder.stdout.readline()
        assert _memory_hits(holder.pid, patterns) > 0
    finally:
        holder.kill()
        holder.wait()
    assert "Traceback" not in server.log()
    # A client that encrypted for slots another enrolment took meanwhile gets 409 and retries.
    real_params, calls = client.params, []

    def stale_then_real() -> dict:
        info = real_params()
        if not calls:  # the first read is stale: the slot before the real next free one
            info["open_block"]["offset"] -= 1
        calls.append(info)
        return info

    client.params = stale_then_real  # type: ignore[method-assign]
    items = client.enroll(["late"], s["gallery"][20:21])
    assert len(calls) == 2 and items[0]["slot"] == calls[1]["open_block"]["offset"] == 20
    client.params = real_params  # type: ignore[method-assign]

    # SQLite too cascades a subject's deletion to its blind templates.
    with server.client() as http:
        assert http.delete(f"/subjects/{s['g_names'][0]}").status_code == 200
    assert s["g_names"][0] not in client.scores(s["probes"][0])[2]


# -- nothing in plaintext on the server ------------------------------------------------------------
def _template_patterns(templates: np.ndarray) -> list[bytes]:
    """4 consecutive float32 and 2 consecutive float64 values from the middle of each template:
    what any in-memory copy of a template (the protected vector, or a cast of it) contains.
    Few patterns on purpose: each is one pass over the server's few hundred MB."""
    return [p for t in templates for p in (t.astype("<f4")[40:44].tobytes(), t.astype("<f8")[40:42].tobytes())]


def _memory_hits(pid: int, patterns: list[bytes]) -> int:
    """How many patterns occur in the readable-writable memory of process `pid` (heap, anonymous
    maps, stacks: where data lives), read through /proc/<pid>/mem (a child of this process)."""
    hits = 0
    with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/mem", "rb", 0) as mem:
        for line in maps:
            span, perms = line.split()[:2]
            if not perms.startswith("rw"):
                continue
            start, end = (int(x, 16) for x in span.split("-"))
            try:
                mem.seek(start)
                region = mem.read(end - start)
            except (OSError, ValueError, OverflowError):
                continue  # e.g. [vvar]
            hits += sum(p in region for p in patterns)
    return hits


class _ThreadServer:
    """The app under uvicorn in this process (real HTTP on 127.0.0.1), so the test can look at
    everything the running service object holds."""

    def __init__(self, settings: Settings) -> None:
        self.app = create_app(settings)
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> _ThreadServer:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "server did not start"
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(30)


#: Not followed: code and modules lead, through function globals, to every object of the
#: process (this test's own fixtures included), which is not what the service holds.
_NOT_STATE = (type, types.ModuleType, types.FunctionType, types.BuiltinFunctionType, types.CodeType,
              types.FrameType, types.MethodWrapperType, types.WrapperDescriptorType)


def _reachable(root: object, limit: int = 500_000) -> list[object]:
    """Every object of the service's state reachable from `root` (gc referents, not through
    code or modules), up to `limit`."""
    seen: set[int] = set()
    out, stack = [], [root]
    while stack and len(out) < limit:
        obj = stack.pop()
        if id(obj) in seen or isinstance(obj, _NOT_STATE):
            continue
        seen.add(id(obj))
        out.append(obj)
        stack.extend(gc.get_referents(obj))
    return out


def _held_data(root: object) -> tuple[bytes, np.ndarray]:
    """(every bytes-like object, every float reachable, as one float64 array)."""
    blobs, floats = [], []
    for obj in _reachable(root):
        if isinstance(obj, bytes | bytearray | memoryview):
            blobs.append(bytes(obj))
        elif isinstance(obj, np.ndarray):
            if obj.dtype.kind == "f":
                floats.append(obj.astype(np.float64).ravel())
            blobs.append(obj.tobytes())
        elif isinstance(obj, float):
            floats.append(np.array([obj]))
    return b"".join(blobs), np.concatenate(floats) if floats else np.zeros(0)


def _scores_found(held: np.ndarray, scores: np.ndarray) -> int:
    """How many of the 5 best scores appear (to 1e-6) among the held floats."""
    top = np.sort(scores)[-5:]
    return int(sum(np.isclose(held, t, atol=1e-6, rtol=0).any() for t in top))


@pytest.mark.slow
def test_blind_server_holds_no_plaintext_template_or_score(xnn_split, key, he_key, tmp_path, request) -> None:
    s = xnn_split
    url = migrated_database("sqlite", tmp_path, request)
    settings = Settings(
        database_url=url, data_dir=tmp_path / "data", mode="blind", scheme="xnn",
        template_key_id=key.key_id, template_dim=128, api_key="blind-test-api-key-0123456789",
    )
    n = 64
    templates = s["gallery"][:n]
    with _ThreadServer(settings) as srv:
        client = BlindClient(f"http://127.0.0.1:{srv.port}", "blind-test-api-key-0123456789", he_key,
                             protection_of(s["protector"]))
        client.enroll(s["g_names"][:n], templates)
        scores = [client.scores(p)[0] for p in s["probes"][:3]]
        held_bytes, held_floats = _held_data(srv.app.state.service)
        blind = srv.app.state.service.blind
        # What the C++ side holds, serialised: the ciphertexts of every block.
        cipher_bytes = b"".join(
            c.serialize() for _, cols in blind.index("default")._blocks.values() for c in cols
        )
    assert len(cipher_bytes) > 128 * 100_000  # control: the blocks are there
    with Gallery.open(url) as g:
        assert g.count_templates() == 0  # nothing in the plaintext templates table
    db = files_blob(tmp_path / "gallery.db", Path(f"{tmp_path / 'gallery.db'}-wal"))
    files = files_blob(*sorted(p for p in (tmp_path / "data").rglob("*") if p.is_file()))
    assert len(db) > 128 * 100_000  # control: the ciphertexts are in SQL (the truth)

    for where, blob in {"database": db, "data folder": files, "service objects": held_bytes,
                        "ciphertexts": cipher_bytes}.items():
        # Exact float32/float64/text patterns of a few templates (each pattern is a full scan
        # of tens of MB); the unit-vector scan below covers every template.
        assert_no_raw_bytes(blob, templates[:4], where)
        # Any unit float32 vector at any offset (the ciphertexts are the database's own
        # content: scanned there once).
        found = vectors_in_blob(blob, 128) if where != "ciphertexts" else []
        if len(found):
            assert np.abs(_cos(found, templates)).max() < 0.99, where
        for sc in scores:
            assert sc.astype("<f8")[:2].tobytes() not in blob and sc.astype("<f4")[:4].tobytes() not in blob
    for sc in scores:
        assert _scores_found(held_floats, sc) <= 1, "a plaintext score is held by the service"

    # Controls: the scans find what they look for when it is there.
    with pytest.raises(AssertionError):
        assert_no_raw_bytes(b"x" + templates[3].astype("<f4").tobytes(), templates, "control")
    assert len(vectors_in_blob(b"xyz" + templates[5].astype("<f4").tobytes() + b"tail", 128)) == 1
    _, planted = _held_data({"leak": np.asarray(scores[0])})
    assert _scores_found(planted, scores[0]) == 5


def test_wire_unpack_refuses_malformed_messages() -> None:
    from advplugin.he.wire import WireError, unpack

    msg = pack({"a": 1}, [b"xy", b"z"])
    assert unpack(msg) == ({"a": 1}, [b"xy", b"z"])
    for bad in (msg[:-1], msg + b"\0", b"APHE\x02" + msg[5:], msg.replace(b"APHE", b"APHX")):
        with pytest.raises(WireError):
            unpack(bad)
    with pytest.raises(WireError):
        unpack(msg, max_blobs=1)


def test_blind_key_file_is_private_and_round_trips(tmp_path: Path, he_key: BlindKey) -> None:
    path = tmp_path / "he.key"
    he_key.save(path)
    assert path.stat().st_mode & 0o777 == 0o600
    loaded = BlindKey.load(path)
    assert loaded.key_id == he_key.key_id and he_key.key_id not in repr(loaded._ctx)
    probe = np.ones(128)
    blob = pack({}, he_key.encrypt_probe(probe))  # encrypted with one, decrypted with the other
    from advplugin.he import ServerContext, unpack

    ctx = ServerContext()
    cols = ctx.load_all(unpack(blob)[1], "probe")
    scores = loaded.decrypt_scores(ctx.score([c for c in cols], np.full(128, 1 / np.sqrt(128))))
    np.testing.assert_allclose(scores, 1.0, atol=1e-4)  # <ones/|ones|, ones/|ones|> = 1
    path.chmod(0o644)
    with pytest.raises(PermissionError):
        BlindKey.load(path)
    with pytest.raises(FileExistsError):
        he_key.save(path)


@pytest.mark.slow
def test_blind_cli_migrates_a_raw_file_and_identifies_an_image(
    lfw_cache, face_data, key_file, tmp_path, make_server, request, capsys
) -> None:
    from advplugin.adapters import create_extractor
    from advplugin.cli.main import main
    from advplugin.images import load_image

    kpath, key = key_file
    emb, identity, path = lfw_cache["embedding"], lfw_cache["identity"], lfw_cache["path"]
    g_idx, p_idx = first_vs_rest(identity, path, max_identities=150)
    raw_file = tmp_path / "raw.npz"  # a raw feature database: one image per identity
    np.savez(raw_file, embedding=emb[g_idx], path=path[g_idx], identity=identity[g_idx])
    url = migrated_database("sqlite", tmp_path, request)
    server = make_server(_env(url, tmp_path, key))
    (tmp_path / "api-key").write_text(server.api_key)
    he_path = tmp_path / "he.key"
    assert main(["blind", "keygen", "--out", str(he_path)]) == 0
    common = ["--url", server.url, "--api-key-file", str(tmp_path / "api-key"), "--he-key", str(he_path),
              "--key", str(kpath)]
    assert main(["blind", "migrate", "--from", str(raw_file), *common]) == 0
    assert f"migrated {len(g_idx)} templates" in capsys.readouterr().out

    image = face_data / "lfw-dev" / str(path[p_idx[0]])
    assert main(["blind", "identify", str(image), "-k", "1", *common]) == 0
    printed = capsys.readouterr().out.split("\t")[0]
    # Offline: plaintext xnn of the same extraction against the same gallery.
    probe_raw = create_extractor("dlib").extract(load_image(image), largest_only=True).embeddings[0]
    protector = create_protector("xnn", key=key, dim=128)
    expected = identity[g_idx][int(_cos(protector.protect(probe_raw[None]), protector.protect(emb[g_idx])).argmax())]
    assert printed == str(expected)


def test_parameters_beyond_128_bit_security_are_refused() -> None:
    """The HE standard allows at most 218 modulus bits at N = 8192 for 128-bit security; the
    library refuses more (so a parameter change cannot silently weaken the service), and the
    defaults (120 bits) are inside it."""
    assert sum(HEParams().coeff_mod_bit_sizes) <= 218 and HEParams().poly_modulus_degree == 8192
    with pytest.raises(ValueError):
        BlindKey.generate(HEParams(coeff_mod_bit_sizes=(60, 60, 60, 60)))  # 240 bits
