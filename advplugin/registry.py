"""One registry type for protectors and extractors.

Both follow timm's pattern: a decorator fills a name -> factory table at import time, and
`create(name, ...)` fails with a message that lists what *is* available, so a typo in a
config file is obvious instead of surfacing later as an AttributeError.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._factories: dict[str, Callable[..., T]] = {}

    def register(self, name: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
        def decorator(factory: Callable[..., T]) -> Callable[..., T]:
            if name in self._factories:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._factories[name] = factory
            return factory

        return decorator

    def names(self) -> list[str]:
        return sorted(self._factories)

    def factory(self, name: str) -> Callable[..., T]:
        try:
            return self._factories[name]
        except KeyError:
            available = ", ".join(self.names()) or "none"
            raise ValueError(f"unknown {self.kind} {name!r}; available: {available}") from None

    def create(self, name: str, /, **config: object) -> T:
        return self.factory(name)(**config)

    def __contains__(self, name: object) -> bool:
        return name in self._factories
