"""Bounded, thread-safe hand-off queues between the pipeline's threads.

`Handoff` moves items from one producer thread to one consumer thread in chunks: the consumer
takes everything waiting in one call, so per-item locking stays off the hot path. The bound is
on the item count; when full, the policy is explicit: `put` refuses the item and the caller
counts it (the socket thread must never block, or the venue disconnects a slow reader).
"""

from __future__ import annotations

import threading
from collections import deque
from typing import Generic, TypeVar

T = TypeVar("T")


class Handoff(Generic[T]):
    """A bounded single-producer/single-consumer queue with batch reads."""

    def __init__(self, max_items: int) -> None:
        if max_items < 1:
            raise ValueError("max_items must be >= 1")
        self.max_items = max_items
        self._items: deque[T] = deque()
        self._cond = threading.Condition(threading.Lock())
        self._closed = False

    def __len__(self) -> int:
        return len(self._items)

    def put(self, item: T) -> bool:
        """Add one item; False (nothing added) when the queue is full."""
        with self._cond:
            if len(self._items) >= self.max_items:
                return False
            self._items.append(item)
            if len(self._items) == 1:
                self._cond.notify()
            return True

    def put_many(self, items: list[T]) -> int:
        """Add items in order while there is room; return how many did not fit."""
        with self._cond:
            room = self.max_items - len(self._items)
            accepted = items[:room] if room < len(items) else items
            was_empty = not self._items
            self._items.extend(accepted)
            if was_empty and accepted:
                self._cond.notify()
            return len(items) - len(accepted)

    def get_all(self, timeout_s: float, max_items: int | None = None) -> list[T]:
        """Everything waiting (up to max_items), waiting up to timeout_s for the first item."""
        with self._cond:
            if not self._items and not self._closed:
                self._cond.wait(timeout_s)
            if max_items is None or max_items >= len(self._items):
                out = list(self._items)
                self._items.clear()
                return out
            return [self._items.popleft() for _ in range(max_items)]

    def close(self) -> None:
        """Wake the consumer; later gets return at once."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
