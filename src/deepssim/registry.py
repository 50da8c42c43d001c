"""One registry type for every extension point: metrics, readers, search backends, engines,
architectures and augmentation sets.

A registry maps a name to an object (a class or a function). An entry may also be registered
lazily, as ``"module:attribute"``, so that naming a heavy optional component (Ray) does not
import it until it is used. Unknown names are a :class:`DeepSSIMError` that lists the choices.

    ENGINES = Registry("engine")

    @ENGINES.register("local")
    class LocalEngine: ...

    ENGINES.register_lazy("ray", "deepssim.execution.ray_engine:RayEngine")
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator, Mapping
from typing import Generic, TypeVar

from deepssim.errors import DeepSSIMError

T = TypeVar("T")


class Registry(Mapping[str, T], Generic[T]):
    """Name -> entry, in registration order. ``kind`` names the extension point in errors."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, T | str] = {}

    def register(self, *names: str) -> Callable[[T], T]:
        """Decorator: add the decorated object under each of ``names``; a class also gets ``.name``
        (its first name)."""

        def add(entry: T) -> T:
            for name in names:
                self._entries[name] = entry
            if isinstance(entry, type):
                entry.name = names[0]
            return entry

        return add

    def register_lazy(self, name: str, target: str) -> None:
        """Add ``"module:attribute"`` under ``name``; imported on first lookup."""
        self._entries[name] = target

    def __getitem__(self, name: str) -> T:
        if name not in self._entries:
            raise DeepSSIMError(f"unknown {self.kind} {name!r}; choose one of {', '.join(self._entries)}")
        entry = self._entries[name]
        if isinstance(entry, str):  # lazy: import the module, which registers the real entry
            module, _, attribute = entry.partition(":")
            entry = getattr(importlib.import_module(module), attribute)
            self._entries[name] = entry
            if isinstance(entry, type):
                entry.name = name
        return entry

    def get(self, name: str, default=None):
        return self[name] if name in self._entries else default

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def names(self) -> tuple[str, ...]:
        return tuple(self._entries)
