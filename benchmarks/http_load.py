"""HTTP cost under load: `/identify/templates` and `/identify` on a live uvicorn service on
loopback, driven by an asyncio httpx load generator with 1, 2, 4 and 8 concurrent clients.

    .venv/bin/python benchmarks/http_load.py            # ~3 minutes on 2 cores
    .venv/bin/python benchmarks/http_load.py --quick    # shorter runs, ~1.5 minutes

The service is the real one (`python -m advplugin.service`, SQLite, dlib + `xnn`, flat index,
sealed gallery, default settings: extraction in the serving process), its gallery the
lfw-dev templates (first image of each person with 2+ images) enrolled through
`/enroll/templates`. For every endpoint and client count: requests/s and p50/p95/p99.

* Image endpoint: the goal is the extractor's own cost. Single client, the same images
  alternately sent to the service and extracted + protected in this process (what the
  service does: decode, detect, embed, protect), so both see the same machine load; ratio =
  p50 service latency / p50 bare latency (goal <= 1.05). The client there is a lean one
  (`LeanClient`: http.client, prepared bodies), so that the ratio is the service's cost and
  not the client library's; httpx's own extra per request is reported beside it. Both sides
  of a pair run on the same CPU, alternating between the CPUs pair by pair (`pin`): the two
  vCPUs of this machine differ by more than the goal's margin.
* Template endpoint: requests/s per core = requests / CPU seconds the service process used
  (from /proc), and where that time goes: a sampling profiler inside the service process
  (a `sitecustomize` put on its PYTHONPATH by this script, every thread's Python stack every
  few ms; samples of idle threads dropped), in a separate run so it costs no timed figure.
The load generator shares the 2 cores with the service: its own CPU share is reported.
Writes benchmarks/results/http_load.json.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import FACE_DATA, table, write_results
from common import ms as pct
from service_bench import first_vs_rest

from advplugin.adapters import create_extractor
from advplugin.embedding_files import load_embedding_set
from advplugin.images import load_image
from advplugin.keys import load_key, write_key
from advplugin.protectors import create_protector
from advplugin.settings import Settings
from tests.service.conftest import Server

CLIENTS = (1, 2, 4, 8)
GOAL_IMAGE_RATIO = 1.05

# Runs inside the service process (imported at start through PYTHONPATH): samples every
# thread's Python stack and rewrites the counts every second (uvicorn ends on SIGTERM by
# re-raising it after its shutdown, so no atexit hook would run). Idle samples are dropped.
SAMPLER = '''
import collections, json, os, sys, threading, time
_OUT = os.environ.get("ADVPLUGIN_BENCH_SAMPLE")
if _OUT:
    _data = {}  # phase -> [samples, busy, self counter, cumulative counter]
    _IDLE = {"wait", "select", "get", "poll", "acquire", "_wait_for_tstate_lock", "sleep",
             "_worker", "worker", "accept", "readinto", "recv_into"}
    def _name(f):
        c = f.f_code
        path = c.co_filename.replace(os.sep, "/")
        for marker in ("/site-packages/", "/advplugin/"):
            if marker in path:
                path = ("advplugin/" if marker == "/advplugin/" else "") + path.split(marker, 1)[1]
                break
        else:
            path = os.path.basename(path)
        return f"{path}:{c.co_name}"
    def _phase():
        try:
            with open(_OUT + ".phase") as f:
                return f.read().strip() or "none"
        except OSError:
            return "none"
    def _dump():
        doc = {k: {"samples": v[0], "busy": v[1], "self": v[2].most_common(40),
                   "cumulative": v[3].most_common(80)} for k, v in _data.items()}
        with open(_OUT + ".tmp", "w") as f:
            json.dump(doc, f)
        os.replace(_OUT + ".tmp", _OUT)
    def _loop():
        me = threading.get_ident()
        last, phase = time.monotonic(), _phase()
        while True:
            time.sleep(0.002)
            if time.monotonic() - last > 0.5:
                _dump()
                last, phase = time.monotonic(), _phase()
            d = _data.setdefault(phase, [0, 0, collections.Counter(), collections.Counter()])
            for tid, frame in sys._current_frames().items():
                if tid == me:
                    continue
                d[0] += 1
                if frame.f_code.co_name in _IDLE or frame.f_code.co_filename.endswith("selectors.py"):
                    continue
                d[1] += 1
                d[2][_name(frame)] += 1
                seen = set()
                while frame is not None:
                    seen.add(_name(frame))
                    frame = frame.f_back
                for k in seen:
                    d[3][k] += 1
    threading.Thread(target=_loop, daemon=True, name="bench-sampler").start()
'''


def pin(pid: int, cpu: int | None) -> None:
    """Every thread of process `pid` (0: this one) onto one CPU, or back onto all (None).
    Why: on this machine's two vCPUs the same extraction measured 2.3 % apart (113.2 vs
    115.8 ms, alternated in one process), as large as the gap the image ratio looks for; both
    sides of a pair on the same CPU, the CPU alternating between pairs, cancels that out."""
    cpus = {cpu} if cpu is not None else set(range(os.cpu_count() or 1))
    proc = Path(f"/proc/{pid or os.getpid()}/task")
    for tid in (int(t) for t in os.listdir(proc)) if proc.exists() else [pid]:
        try:
            os.sched_setaffinity(tid, cpus)
        except (OSError, ValueError):  # a thread that just ended
            pass


class LeanClient:
    """One keep-alive connection of the standard library's http.client, request bodies built
    before the clock starts (as wrk sends a prepared request): the image comparison times
    the service, not a client library. httpx spends ~0.5-1 ms of its own per request here
    (`client_overhead_ms` in the results: its /health round trip minus this one's)."""

    BOUNDARY = "advplugin-bench-boundary"

    def __init__(self, url: str, api_key: str) -> None:
        u = httpx.URL(url)
        self.conn = http.client.HTTPConnection(u.host, u.port, timeout=120)
        self.headers = {"x-api-key": api_key}

    def multipart(self, data: bytes) -> bytes:
        head = (f'--{self.BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="i.jpg"\r\n'
                "Content-Type: image/jpeg\r\n\r\n").encode()
        return head + data + f"\r\n--{self.BOUNDARY}--\r\n".encode()

    def post(self, path: str, body: bytes) -> int:
        return self._send("POST", path, body, {"Content-Type": f"multipart/form-data; boundary={self.BOUNDARY}"})

    def get(self, path: str) -> int:
        return self._send("GET", path, None, {})

    def _send(self, method: str, path: str, body: bytes | None, headers: dict[str, str]) -> int:
        self.conn.request(method, path, body, self.headers | headers)
        resp = self.conn.getresponse()
        resp.read()
        return resp.status

    def close(self) -> None:
        self.conn.close()


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def load(url: str, headers: dict[str, str], make_request, clients: int, seconds: float) -> dict:
    """`clients` concurrent clients, each sending its next request as soon as the previous
    one is answered, for `seconds`. make_request(client, i) -> awaitable response."""
    latencies: list[float] = []
    errors: dict[int, int] = {}
    stop = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=120, limits=limits) as client:

        async def one(k: int) -> None:
            i = k
            while time.perf_counter() < stop:
                t = time.perf_counter()
                r = await make_request(client, i)
                # 422 (no face in that image) is a full answer; 429 (busy) and others are
                # counted apart, not as served.
                if r.status_code >= 400 and r.status_code != 422:
                    errors[r.status_code] = errors.get(r.status_code, 0) + 1
                    await asyncio.sleep(float(r.headers.get("retry-after", 0)) if r.status_code == 429 else 0)
                else:
                    latencies.append(time.perf_counter() - t)
                i += clients

        t0 = time.perf_counter()
        c0 = time.process_time()
        await asyncio.gather(*(one(k) for k in range(clients)))
        wall = time.perf_counter() - t0
        client_cpu = time.process_time() - c0
    return {
        "clients": clients, "requests": len(latencies), "errors_by_status": errors,
        "requests_per_s": len(latencies) / wall, "p50_ms": pct(latencies, 50),
        "p95_ms": pct(latencies, 95), "p99_ms": pct(latencies, 99), "wall_s": wall,
        "load_generator_cpu_share": client_cpu / wall,
    }


def start(tmp: Path, key_path: Path, sample_to: Path | None = None) -> Server:
    env = {
        "ADVPLUGIN_DATA_DIR": str(tmp / "data"), "ADVPLUGIN_KEY_FILE": str(key_path),
        "ADVPLUGIN_SCHEME": "xnn", "ADVPLUGIN_MASTER_KEY_FILE": str(tmp / "master.key"),
    }
    if sample_to is not None:
        site = tmp / "sampler"
        site.mkdir(exist_ok=True)
        (site / "sitecustomize.py").write_text(SAMPLER)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))
        env["ADVPLUGIN_BENCH_SAMPLE"] = str(sample_to)
    return Server(tmp, env).start()


def profile_summary(path: Path, phase: str, top: int = 12) -> dict:
    """The sampler's counts of one phase as shares of busy samples: own time of any function
    (library ones included: where the time really goes), and inclusive time of advplugin's
    functions (which part of the request it is spent under)."""
    doc = json.loads(path.read_text())[phase]
    busy = max(doc["busy"], 1)
    ours = [(k, n / busy) for k, n in doc["cumulative"] if k.startswith("advplugin/") and "/cli/" not in k]
    return {
        "samples": doc["samples"], "busy_samples": doc["busy"],
        "self_top": [(k, round(n / busy, 3)) for k, n in doc["self"][:top]],
        "advplugin_inclusive_top": [(k, round(v, 3)) for k, v in ours[:top]],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--images", type=int, default=20, help="distinct probe images")
    args = ap.parse_args()
    t_seconds, i_seconds, pairs = (3.0, 6.0, 20) if args.quick else (8.0, 15.0, 60)
    cache = load_embedding_set(FACE_DATA / "lfw-dev-dlib128.npz")
    g_idx, p_idx = first_vs_rest(cache.identity, cache.path)
    figures: dict[str, object] = {"goal_image_ratio": GOAL_IMAGE_RATIO, "cpu_count": os.cpu_count()}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        key_path = tmp / "scheme.key"
        write_key(key_path)
        protector = create_protector("xnn", key=load_key(key_path), dim=128)
        m = protector.metadata
        prot = {"scheme": m.scheme, "scheme_version": m.scheme_version, "key_id": m.key_id,
                "extractor_name": "dlib", "extractor_version": "cache"}
        gallery = protector.protect(cache.embedding[g_idx])
        probes = [t.tolist() for t in protector.protect(cache.embedding[p_idx[:500]])]
        image_files = [FACE_DATA / "lfw-dev" / str(cache.path[i]) for i in p_idx[: args.images]]
        images = [f.read_bytes() for f in image_files]

        def enrol(server: Server) -> None:
            with server.client() as c:
                for s in range(0, len(g_idx), 1000):
                    c.post("/enroll/templates", json={"protection": prot, "items": [
                        {"subject": str(cache.identity[i]), "template": t.tolist()}
                        for i, t in zip(g_idx[s:s + 1000], gallery[s:s + 1000], strict=True)]}).raise_for_status()

        async def ident_template(c: httpx.AsyncClient, i: int) -> httpx.Response:
            return await c.post("/identify/templates", json={"protection": prot, "templates": [probes[i % len(probes)]]})

        async def ident_image(c: httpx.AsyncClient, i: int) -> httpx.Response:
            return await c.post("/identify", files={"file": ("i.jpg", images[i % len(images)])}, params={"limit": 1})

        server = start(tmp, key_path)
        try:
            enrol(server)
            headers = {"x-api-key": server.api_key}
            assert server.proc is not None
            pid = server.proc.pid
            asyncio.run(load(server.url, headers, ident_template, 1, 1.0))  # warm
            rows: list[list[object]] = []

            def sweep(label: str, request, seconds: float) -> list[dict]:  # type: ignore[no-untyped-def]
                """`request` under 1..8 clients: throughput, latency, the service's CPU."""
                runs = []
                for n in CLIENTS:
                    c0 = cpu_seconds(pid)
                    r = asyncio.run(load(server.url, headers, request, n, seconds))
                    r["server_cpu_s"] = cpu_seconds(pid) - c0
                    r["requests_per_server_cpu_s"] = r["requests"] / max(r["server_cpu_s"], 1e-9)
                    runs.append(r)
                    rows.append([label, n, r["requests_per_s"], r["p50_ms"], r["p95_ms"], r["p99_ms"],
                                 sum(r["errors_by_status"].values()),
                                 r["requests_per_server_cpu_s"], r["load_generator_cpu_share"]])
                    print(f"{label} x{n}: {r['requests_per_s']:.1f} req/s", flush=True)
                return runs

            t_runs = sweep("/identify/templates", ident_template, t_seconds)

            # Image endpoint: same images, service and bare extraction alternately.
            extractor = create_extractor("dlib")
            max_pixels = Settings().max_pixels  # the service's default, as it runs here
            bare, served = [], []
            lean = LeanClient(server.url, server.api_key)
            bodies = [lean.multipart(data) for data in images]
            try:
                lean.post("/identify?limit=1", bodies[0])  # warm
                for k in range(pairs):
                    data, body = images[k % len(images)], bodies[k % len(images)]
                    cpu = k % (os.cpu_count() or 1)
                    pin(0, cpu)
                    pin(pid, cpu)
                    t = time.perf_counter()
                    # What /identify?limit=1 runs (extraction.py `_extract_and_protect`).
                    faces = extractor.extract(load_image(data, max_pixels=max_pixels), max_faces=1, largest_only=False)
                    if len(faces.embeddings):
                        protector.protect(faces.embeddings)
                    bare.append(time.perf_counter() - t)
                    t = time.perf_counter()
                    status = lean.post("/identify?limit=1", body)
                    assert status in (200, 422), status
                    served.append(time.perf_counter() - t)
                pin(0, None)
                pin(pid, None)
                # The client's own cost per request, the same bare route through each client.
                lean_health, httpx_health = [], []
                with server.client() as c:
                    for _ in range(200):
                        t = time.perf_counter()
                        lean.get("/health")
                        lean_health.append(time.perf_counter() - t)
                        t = time.perf_counter()
                        c.get("/health")
                        httpx_health.append(time.perf_counter() - t)
            finally:
                lean.close()
            ratio = pct(served, 50) / pct(bare, 50)
            figures["image_vs_bare"] = {
                "pairs": pairs, "bare_p50_ms": pct(bare, 50), "service_p50_ms": pct(served, 50),
                "bare_p95_ms": pct(bare, 95), "service_p95_ms": pct(served, 95),
                "ratio_p50": ratio, "met": ratio <= GOAL_IMAGE_RATIO,
                "client": "http.client, one keep-alive connection, bodies built beforehand",
                "cpus": "both sides of each pair on one CPU, alternating between pairs",
                "health_round_trip_p50_ms": pct(lean_health, 50),
                "client_overhead_ms": pct(httpx_health, 50) - pct(lean_health, 50),
            }
            print(f"image: service/bare p50 = {ratio:.3f}", flush=True)
            i_runs = sweep("/identify (image)", ident_image, i_seconds)
        finally:
            server.stop()
        figures["identify_templates"] = t_runs
        figures["identify_image"] = i_runs
        figures["bare_extraction_per_s_one_core"] = 1000 / pct(bare, 50)

        # Where the template endpoint's time goes: a second service with the sampler.
        prof_tmp = tmp / "prof"
        prof_tmp.mkdir()
        sample = prof_tmp / "samples.json"
        phase = Path(str(sample) + ".phase")
        server = start(prof_tmp, key_path, sample_to=sample)
        try:
            enrol(server)
            for name, request, n in (("templates", ident_template, 2), ("image", ident_image, 1)):
                asyncio.run(load(server.url, {"x-api-key": server.api_key}, request, 1, 1.0))  # steady state
                phase.write_text(name)
                time.sleep(0.6)
                asyncio.run(load(server.url, {"x-api-key": server.api_key}, request, n, t_seconds))
                phase.write_text("idle")
                time.sleep(1.2)  # the sampler writes its counts every 0.5 s
        finally:
            server.stop()
        figures["identify_templates_profile"] = profile_summary(sample, "templates")
        figures["identify_image_profile"] = profile_summary(sample, "image")

    figures["gallery_templates"] = len(g_idx)
    table(
        f"HTTP load on loopback ({os.cpu_count()} cores shared by service and load generator, "
        f"gallery {len(g_idx)} lfw-dev templates, load average {os.getloadavg()[0]:.1f})",
        ["endpoint", "clients", "answered requests/s", "p50 ms", "p95 ms", "p99 ms", "not served (429...)",
         "requests per service CPU-s",
         "load generator CPU share"],
        rows,
    )
    iv = figures["image_vs_bare"]
    table("Image endpoint vs bare extraction + protection, same images, alternated, 1 client",
          ["", "p50 ms", "p95 ms", "ratio p50", f"goal <= {GOAL_IMAGE_RATIO}"],
          [["bare extract + protect (baseline)", iv["bare_p50_ms"], iv["bare_p95_ms"], 1.0, ""],
           ["POST /identify", iv["service_p50_ms"], iv["service_p95_ms"], iv["ratio_p50"],
            "met" if iv["met"] else "NOT met"]])
    for endpoint, key in (("/identify/templates", "identify_templates_profile"), ("/identify", "identify_image_profile")):
        prof = figures[key]
        print(f"\nwhere {endpoint} spends its time (sampled, share of busy samples)")
        print("  own time: " + "; ".join(f"{k} {v:.0%}" for k, v in prof["self_top"][:8]))
        print("  inside advplugin functions: " + "; ".join(f"{k} {v:.0%}" for k, v in prof["advplugin_inclusive_top"][:8]))
    write_results("http_load", figures, command="python benchmarks/http_load.py" + (" --quick" if args.quick else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
