"""Fixtures of the CompreFace interop tests: the live service (the service tests' `Server`)
and the official SDK's own virtual environment.

`compreface-sdk==0.6.0` imports only with `urllib3<2` (its pinned `requests_toolbelt`), which
the main venv cannot hold, so it lives in `.venv-compreface` (made by `scripts/test.sh`, as
CI runs it, or here when missing) and runs `sdk_driver.py` in a subprocess that speaks to the
service over HTTP, as a CompreFace user's program would.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.bulk.conftest import new_pg_database  # noqa: F401 - fixture used here
from tests.conftest import REPO
from tests.service.conftest import key_file, make_server  # noqa: F401 - fixtures used here

SDK_VENV = REPO / ".venv-compreface"
SDK_REQUIREMENTS = ("compreface-sdk==0.6.0", "urllib3<2")
DRIVER = Path(__file__).with_name("sdk_driver.py")
HOW = (
    "create it with ./scripts/test.sh, or by hand: python3 -m venv .venv-compreface && "
    ".venv-compreface/bin/pip install 'compreface-sdk==0.6.0' 'urllib3<2'"
)


def _sdk_ok(python: Path) -> bool:
    return python.is_file() and subprocess.run(
        [str(python), "-c", "import compreface"], capture_output=True
    ).returncode == 0


@pytest.fixture(scope="session")
def sdk_python() -> Path:
    """The SDK venv's interpreter; made (once) when missing, a clear failure when that fails."""
    python = SDK_VENV / "bin" / "python"
    if not _sdk_ok(python):
        try:
            subprocess.run([sys.executable, "-m", "venv", str(SDK_VENV)], check=True, capture_output=True)
            subprocess.run([str(python), "-m", "pip", "install", "-q", *SDK_REQUIREMENTS],
                           check=True, capture_output=True, timeout=600)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as e:
            pytest.fail(f"the CompreFace SDK venv {SDK_VENV} is missing and could not be made ({e}); {HOW}")
        if not _sdk_ok(python):
            pytest.fail(f"the CompreFace SDK does not import in {SDK_VENV}; {HOW}")
    return python


def run_sdk(python: Path, phase: str, config: dict, tmp_path: Path) -> dict:
    """One phase of `sdk_driver.py` with the official SDK; its JSON answers."""
    cfg = tmp_path / f"sdk-{phase}.json"
    cfg.write_text(json.dumps(config))
    proc = subprocess.run([str(python), str(DRIVER), phase, str(cfg)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"SDK driver failed: {proc.stderr[-3000:]}"
    return json.loads(proc.stdout)
