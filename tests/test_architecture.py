"""Import-time architecture that the contracts in .importlinter cannot see: what a process
actually loads. The service and the numpy schemes must never load torch (hundreds of MB of
memory and a second of start-up in every worker), and `advface`'s optional torch refinement
must load the inference module in `advplugin.nets`, never training or evaluation code.

Each check runs in a fresh interpreter: this test process has long imported torch."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import textwrap
from pathlib import Path


def loaded_after(code: str) -> set[str]:
    """Top modules (and advplugin's subpackages) in sys.modules after running `code`."""
    script = textwrap.dedent(code) + textwrap.dedent(
        """
        import json, sys
        print(json.dumps(sorted(sys.modules)))
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def test_service_and_xnn_do_not_import_torch() -> None:
    modules = loaded_after(
        """
        import advplugin.service.app
        from advplugin.keys import Key
        from advplugin.protectors import create_protector
        create_protector("xnn", key=Key.generate(), dim=128)
        """
    )
    assert "advplugin.service.app" in modules
    assert "torch" not in modules


def test_advface_without_refinement_does_not_import_torch() -> None:
    modules = loaded_after(
        """
        import numpy as np
        from advplugin.keys import Key
        from advplugin.protectors import create_protector
        p = create_protector("advface", key=Key.generate(), dim=128)
        p.protect(np.random.default_rng(0).normal(size=(4, 128)).astype(np.float32))
        """
    )
    assert "torch" not in modules


def test_advface_refinement_uses_nets_not_training() -> None:
    modules = loaded_after(
        """
        import numpy as np
        from advplugin.keys import Key
        from advplugin.protectors import create_protector
        p = create_protector("advface", key=Key.generate(), dim=128, refine_steps=1)
        p.protect(np.random.default_rng(0).normal(size=(2, 128)).astype(np.float32))
        """
    )
    assert "advplugin.nets.advface" in modules
    assert not {m for m in modules if m.startswith(("advplugin.training", "advplugin.evaluation"))}


PACKAGE = Path(__file__).resolve().parents[1] / "advplugin"


def test_gallery_modules_stay_small() -> None:
    """Issue 23: the gallery is composed of parts a reader can take in one sitting; a module
    over 500 lines is a part that grew a second concern."""
    sizes = {p.name: len(p.read_text().splitlines()) for p in (PACKAGE / "gallery").glob("*.py")}
    assert {name: n for name, n in sizes.items() if n > 500} == {}


def test_no_class_has_more_than_two_bases() -> None:
    """Parts are composed and handed in, not inherited: a class with three bases (or an
    inheritance chain standing in for composition) is what the gallery was."""
    wide = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ClassDef) and len(node.bases) > 2:
                wide.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name}")
    assert wide == []


def test_the_gallery_is_composed_not_inherited() -> None:
    from advplugin.gallery import Gallery

    assert Gallery.__mro__ == (Gallery, object)
