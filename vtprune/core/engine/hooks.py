"""Every hook and patched attribute one wrap adds, removed together (the kvpress way: nothing outlives unwrap)."""

from __future__ import annotations

from typing import Any

from torch.utils.hooks import RemovableHandle


class HookSet:
    """Module hooks and instance attributes that shadow a class's method, added one by one, removed at once."""

    def __init__(self) -> None:
        self._handles: list[RemovableHandle] = []
        self._patched: list[tuple[Any, str]] = []

    def add(self, handle: RemovableHandle) -> None:
        self._handles.append(handle)

    def patch(self, owner: Any, name: str, value: Any) -> None:
        """Shadow ``owner.name`` with an instance attribute until :meth:`remove`."""
        setattr(owner, name, value)
        self._patched.append((owner, name))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for owner, name in self._patched:
            delattr(owner, name)  # the class's own attribute shows through again
        self._patched.clear()

    def __len__(self) -> int:
        return len(self._handles) + len(self._patched)

    def __enter__(self) -> HookSet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()
