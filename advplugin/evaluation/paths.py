"""Where evaluation and training keep their content-hash caches.

A module of its own, with no imports beyond the standard library, because the CLI's
`--help` imports it to show the default (and must stay instant), and the training scripts
share the harness's cache (landmarks, crops) instead of recomputing it.
"""

from __future__ import annotations

import os
from pathlib import Path


def default_cache_dir() -> Path:
    """`$XDG_CACHE_HOME/advplugin/evaluation` (`~/.cache/...` when the variable is unset)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "advplugin" / "evaluation"
