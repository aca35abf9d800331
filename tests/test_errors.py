"""One exception hierarchy (issue 23): every exception class advplugin defines derives from
`advplugin.errors.AdvpluginError`, keeps the builtin base its callers catch, and names at
most two bases. Found by importing every module, so a new exception class cannot slip by."""

from __future__ import annotations

import importlib
import pkgutil

import pytest

import advplugin
import advplugin.adapters
from advplugin.errors import AdvpluginError, InvalidInputError, NotFoundError


def defined_exceptions() -> list[type[BaseException]]:
    """Exception classes defined at module level anywhere in advplugin (the folder `adapters/`
    included; not Alembic's revisions, which run on import, nor `__main__` entry points)."""
    names = {
        m.name
        for pkg in (advplugin, advplugin.adapters)
        for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + ".")
        if not m.name.startswith("advplugin.migrations") and not m.name.endswith("__main__")
    }
    found = []
    for name in sorted(names):
        module = importlib.import_module(name)
        found += [
            v for v in vars(module).values()
            if isinstance(v, type) and issubclass(v, BaseException) and v.__module__ == name
        ]
    return found


EXCEPTIONS = defined_exceptions()


def test_the_walk_finds_the_known_exceptions() -> None:
    names = {c.__qualname__ for c in EXCEPTIONS}
    assert {"SubjectNotFound", "MasterKeyError", "ImageError", "ConfigurationError", "ServiceError"} <= names
    assert len(EXCEPTIONS) >= 20


@pytest.mark.parametrize("cls", EXCEPTIONS, ids=lambda c: f"{c.__module__}.{c.__qualname__}")
def test_every_exception_derives_from_advplugin_error(cls: type[BaseException]) -> None:
    assert issubclass(cls, AdvpluginError)
    assert len(cls.__bases__) <= 2


def test_builtin_bases_that_callers_catch_are_kept() -> None:
    from advplugin.gallery import SubjectNotFound
    from advplugin.gallery.sealing import MasterKeyError
    from advplugin.images import ImageError
    from advplugin.service.protection import ConfigurationError

    assert issubclass(SubjectNotFound, KeyError) and issubclass(SubjectNotFound, NotFoundError)
    assert issubclass(ImageError, ValueError) and issubclass(ImageError, InvalidInputError)
    assert issubclass(MasterKeyError, RuntimeError) and issubclass(MasterKeyError, ConfigurationError)
    assert str(SubjectNotFound("no subject 'x'")) == "no subject 'x'"  # not KeyError's repr
