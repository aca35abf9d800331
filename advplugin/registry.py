"""One registry type for protectors, extractors and index backends.

All follow timm's pattern: a decorator fills a name -> factory table at import time, and
`create(name, ...)` fails with a message that lists what *is* available, so a typo in a
config file is obvious instead of surfacing later as an AttributeError. Like timm's
pretrained configs, an entry may carry metadata (`info(name)`): what a caller needs to know
about an entry *without building it* (a scheme's version, whether it needs a key, its
weights and their digests), so nobody builds a throwaway instance just to read a field.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._factories: dict[str, Callable[..., T]] = {}
        self._info: dict[str, object] = {}

    def register(
        self, name: str, *, info: object = None
    ) -> Callable[[Callable[..., T]], Callable[..., T]]:
        def decorator(factory: Callable[..., T]) -> Callable[..., T]:
            self.add(name, factory, info=info)
            return factory

        return decorator

    def add(self, name: str, factory: Callable[..., T], *, info: object = None) -> None:
        """Register without a decorator (e.g. a class whose metadata is built from it)."""
        if name in self._factories:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._factories[name] = factory
        if info is not None:
            self._info[name] = info

    def names(self) -> list[str]:
        return sorted(self._factories)

    def _unknown(self, name: str) -> ValueError:
        available = ", ".join(self.names()) or "none"
        return ValueError(f"unknown {self.kind} {name!r}; available: {available}")

    def factory(self, name: str) -> Callable[..., T]:
        try:
            return self._factories[name]
        except KeyError:
            raise self._unknown(name) from None

    def info(self, name: str) -> object:
        """The entry's metadata (None when it registered none); unknown names fail like
        `create`."""
        if name not in self._factories:
            raise self._unknown(name)
        return self._info.get(name)

    def create(self, name: str, /, **config: object) -> T:
        return self.factory(name)(**config)

    def __contains__(self, name: object) -> bool:
        return name in self._factories
