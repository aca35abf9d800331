"""The real service: `python -m advplugin.service` (= `advplugin serve`) run by uvicorn as a
subprocess on 127.0.0.1 with a free port, spoken to over real HTTP with httpx."""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import text

from advplugin.gallery import make_engine
from advplugin.keys import Key, write_key


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """One service process; `restart` keeps its data folder, database and key.

    Its bootstrap key (`api_key`) is granted exact scores unless `env` says otherwise
    (ADVPLUGIN_API_KEY_EXACT_SCORES=false): most suites compare exact similarities (key
    rotation, crashes, the index); the answer policy's tests (test_answers.py) and the
    CompreFace SDK's interop test speak with ordinary keys under the default policy."""

    def __init__(self, workdir: Path, env: dict[str, str]) -> None:
        self.workdir = workdir
        self.api_key = secrets.token_urlsafe(24)
        self.env = {**os.environ, "ADVPLUGIN_API_KEY_EXACT_SCORES": "true", **env, "ADVPLUGIN_API_KEY": self.api_key}
        self.log_path = workdir / "server.log"
        self.proc: subprocess.Popen | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Server:
        self.port = free_port()
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "advplugin.service", "--port", str(self.port), "--log-level", "info"],
            cwd=self.workdir, env=self.env, stdout=log, stderr=subprocess.STDOUT,
        )
        log.close()
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: {self.log()[-2000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise RuntimeError("server did not come up")

    def client(self, api_key: str | None = None) -> httpx.Client:
        return httpx.Client(
            base_url=self.url, headers={"x-api-key": api_key or self.api_key}, timeout=120
        )

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(30)

    def kill(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)

    def restart(self) -> Server:
        self.stop()
        return self.start()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def reset_postgres(url: str) -> None:
    engine = make_engine(url)
    with engine.begin() as conn:
        conn.execute(text("DROP SCHEMA public CASCADE"))
        conn.execute(text("CREATE SCHEMA public"))
    engine.dispose()


def migrated_database(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    """A fresh, migrated gallery database (the service refuses un-migrated ones)."""
    from advplugin.gallery import Gallery

    if backend == "sqlite":
        url = f"sqlite:///{tmp_path / 'gallery.db'}"
    else:
        url = request.getfixturevalue("postgres_url")
        reset_postgres(url)
    Gallery.open(url, upgrade=True).close()
    return url


@pytest.fixture
def make_server(tmp_path: Path) -> Iterator:
    servers: list[Server] = []

    def make(env: dict[str, str], workdir: Path | None = None) -> Server:
        wd = workdir or tmp_path
        wd.mkdir(parents=True, exist_ok=True)
        server = Server(wd, env)
        servers.append(server)
        return server.start()

    yield make
    for s in servers:
        s.stop()


@pytest.fixture
def key_file(tmp_path: Path) -> tuple[Path, Key]:
    path = tmp_path / "secret.key"
    return path, write_key(path)
