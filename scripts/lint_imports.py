"""Run import-linter (`lint-imports`) on advplugin laid out as it installs.

Why a wrapper: setup.cfg maps the top-level folders `adapters/` and `migrations/` into the
package as `advplugin.adapters` and `advplugin.migrations` (`package_dir`). grimp, which
builds import-linter's graph, finds `advplugin` with `importlib.util.find_spec` and then
walks that one directory on disk, so under the editable install it never sees the mapped
folders: a contract naming `advplugin.adapters` either errors ("does not exist") or, for an
import *into* adapters, treats it as an external package and checks nothing.

So this script copies the Python files into a temporary tree laid out exactly as setuptools
installs them (every package of setup.cfg's `packages`, each from the folder that
`package_dir` maps it to), puts that tree first on `sys.path`, checks that `advplugin` now
resolves there, and runs import-linter's own command line on it, with the contracts in
`.importlinter`. It uses only grimp's and import-linter's public behaviour (find_spec, the
CLI), so upgrades of either cannot silently bypass it. Copies keep line numbers, so reports
point at the right lines (module names, not temp paths, are what import-linter prints).

It also fails when a folder with an `__init__.py` under a mapped folder is missing from
setup.cfg's explicit `packages` list, since such a package would be absent from a real
(non-editable) install and invisible here.

    .venv/bin/python scripts/lint_imports.py [lint-imports options, e.g. --verbose]
"""

from __future__ import annotations

import configparser
import importlib.util
import os
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / ".importlinter"


def read_layout(setup_cfg: Path) -> tuple[dict[str, Path], list[str]]:
    """setup.cfg's `package_dir` (package -> folder) and `packages` list."""
    cfg = configparser.ConfigParser()
    cfg.read(setup_cfg)
    options = cfg["options"]
    package_dir: dict[str, Path] = {}
    for line in options["package_dir"].strip().splitlines():
        name, _, folder = line.partition("=")
        package_dir[name.strip()] = REPO / folder.strip()
    packages = [p.strip() for p in options["packages"].strip().splitlines() if p.strip()]
    return package_dir, packages


def source_folder(package: str, package_dir: dict[str, Path]) -> Path:
    """The folder setuptools installs `package` from: its longest mapped prefix, then the
    remaining components as subfolders."""
    parts = package.split(".")
    for n in range(len(parts), 0, -1):
        prefix = ".".join(parts[:n])
        if prefix in package_dir:
            return package_dir[prefix].joinpath(*parts[n:])
    raise SystemExit(f"setup.cfg: no package_dir entry covers package {package!r}")


def unlisted_packages(package_dir: dict[str, Path], packages: list[str]) -> list[str]:
    """Folders with an `__init__.py` under a mapped folder that `packages` does not list."""
    listed = {source_folder(p, package_dir).resolve() for p in packages}
    missing = []
    for folder in package_dir.values():
        for init in sorted(folder.rglob("__init__.py")):
            if "__pycache__" not in init.parts and init.parent.resolve() not in listed:
                missing.append(str(init.parent.relative_to(REPO)))
    return missing


def build_tree(root: Path, package_dir: dict[str, Path], packages: list[str]) -> None:
    for package in packages:
        src = source_folder(package, package_dir)
        dst = root.joinpath(*package.split("."))
        dst.mkdir(parents=True, exist_ok=True)
        for py in src.glob("*.py"):
            shutil.copy2(py, dst / py.name)


def main(argv: list[str]) -> int:
    package_dir, packages = read_layout(REPO / "setup.cfg")
    missing = unlisted_packages(package_dir, packages)
    if missing:
        print(
            "setup.cfg [options] packages does not list these package folders (a real install "
            f"would lack them): {', '.join(missing)}",
            file=sys.stderr,
        )
        return 1
    from importlinter.cli import lint_imports_command

    with tempfile.TemporaryDirectory(prefix="advplugin-layout-") as tmp:
        root = Path(tmp)
        build_tree(root, package_dir, packages)
        sys.path.insert(0, str(root))
        importlib.invalidate_caches()
        spec = importlib.util.find_spec("advplugin")
        origin = Path(spec.origin).resolve() if spec and spec.origin else None
        if origin != (root / "advplugin" / "__init__.py").resolve():
            print(f"advplugin resolves to {origin}, not the installed layout", file=sys.stderr)
            return 1
        # import-linter puts the working directory first on sys.path: run from the tree, or
        # the repository's own advplugin/ (mapped folders missing) would shadow it.
        cwd = Path.cwd()
        os.chdir(root)
        # The copies are fresh files each run, so grimp's cache would never hit.
        args = [str(CONFIG), "--no-cache", *argv]
        try:
            lint_imports_command.main(args=args, prog_name="lint-imports")
        except SystemExit as e:
            return int(e.code or 0)
        finally:
            os.chdir(cwd)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
