"""Images for adapter tests: LFW when present, else the photos shipped inside insightface."""

from __future__ import annotations

from importlib.util import find_spec
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def packaged_images() -> Path:
    """insightface's sample photos (t1.jpg holds six faces): available with the dev extra
    even on a fresh clone without LFW."""
    spec = find_spec("insightface")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("insightface (dev extra) is not installed: no packaged sample photos")
    return Path(next(iter(spec.submodule_search_locations))) / "data" / "images"
