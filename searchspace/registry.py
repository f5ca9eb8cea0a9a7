"""A small name -> object registry shared by mixers, blocks, norms, presets and spaces."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from .errors import MixerNASError, UnknownNameError

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to objects; unknown names raise :class:`UnknownNameError` listing the close matches."""

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}

    def add(self, name: str, item: T, *, overwrite: bool = False) -> T:
        if not isinstance(name, str) or not name:
            raise MixerNASError(f"{self.kind} name must be a non-empty string, got {name!r}")
        if name in self._items and not overwrite:
            raise MixerNASError(
                f"{self.kind} {name!r} is already registered; pass overwrite=True to replace it"
            )
        self._items[name] = item
        return item

    def decorator(self, name: str, **kwargs) -> Callable[[T], T]:
        def wrap(item: T) -> T:
            self.add(name, item, **kwargs)
            return item

        return wrap

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except (KeyError, TypeError):
            raise UnknownNameError(self.kind, name, self._items) from None

    def remove(self, name: str) -> None:
        self.get(name)
        del self._items[name]

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._items)
