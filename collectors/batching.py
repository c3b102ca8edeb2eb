"""Bounded, thread-safe hand-off queues between the pipeline's threads.

`Handoff` moves items from one producer thread to one consumer thread in chunks: the consumer
takes everything waiting in one call, so per-item locking stays off the hot path. The bound is
on the item count and, optionally, on a cost such as bytes; when full, the policy is explicit:
`put` refuses the item and the caller counts it; `put_many_within` waits a bounded time for room
first (the socket thread may pause briefly, letting TCP slow the sender down, but never for
long, or the venue disconnects a slow reader), and once per stall only: after a wait ran out
it refuses at once until the consumer takes items again, so a stuck consumer costs items, not
the producer's time; `put_many_waiting` waits until there is room.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class Handoff(Generic[T]):
    """A bounded single-producer/single-consumer queue with batch reads."""

    def __init__(self, max_items: int, *, max_cost: int | None = None,
                 cost_of: Callable[[T], int] | None = None) -> None:
        if max_items < 1:
            raise ValueError("max_items must be >= 1")
        if (max_cost is None) != (cost_of is None):
            raise ValueError("max_cost and cost_of go together")
        self.max_items = max_items
        self.max_cost = max_cost
        self._limit = max_cost or 0
        self._cost_of = cost_of
        self._cost = 0
        self._items: deque[T] = deque()
        lock = threading.Lock()
        self._cond = threading.Condition(lock)      # "not empty", for the consumer
        self._not_full = threading.Condition(lock)  # "room again", for a waiting producer
        self._closed = False
        # A put_many_within wait ran out and the consumer has taken nothing since: the next
        # ones refuse at once (cleared by get_all).
        self._stalled = False
        #: items accepted and items taken since creation (a producer can tell whether the
        #: consumer has got past a given item: `taken_total > put_total` read back then)
        self.put_total = 0
        self.taken_total = 0

    @property
    def cost(self) -> int:
        return self._cost

    def __len__(self) -> int:
        return len(self._items)

    def put(self, item: T) -> bool:
        """Add one item; False (nothing added) when the queue is full."""
        with self._cond:
            if len(self._items) >= self.max_items:
                return False
            if self._cost_of is not None:
                cost = self._cost_of(item)
                # An item alone above the bound still passes when the queue is empty.
                if self._items and self._cost + cost > self._limit:
                    return False
                self._cost += cost
            self._items.append(item)
            self.put_total += 1
            if len(self._items) == 1:
                self._cond.notify()
            return True

    def put_many(self, items: list[T]) -> int:
        """Add items in order while there is room; return how many did not fit."""
        with self._cond:
            room = self.max_items - len(self._items)
            accepted = items[:room] if room < len(items) else items
            if self._cost_of is not None:
                taken = 0
                for item in accepted:
                    cost = self._cost_of(item)
                    if (self._items or taken) and self._cost + cost > self._limit:
                        break
                    self._cost += cost
                    taken += 1
                accepted = accepted[:taken]
            was_empty = not self._items
            self._items.extend(accepted)
            self.put_total += len(accepted)
            if was_empty and accepted:
                self._cond.notify()
            return len(items) - len(accepted)

    def put_many_within(self, items: list[T], timeout_s: float) -> int:
        """Add items in order, waiting up to `timeout_s` in all for room (count and cost) as the
        consumer takes items; return how many did not fit by then (the newest ones).

        When a wait runs out, the queue counts as stalled until the consumer next takes items:
        meanwhile calls add what fits and refuse the rest without waiting (a stuck consumer
        would otherwise cost `timeout_s` per call, for good)."""
        deadline = time.monotonic() + timeout_s
        rest = items
        while True:
            left = self.put_many(rest)
            if not left:
                return 0
            rest = rest[len(rest) - left:]
            with self._cond:
                # Room may have come between put_many and here (its notify then went unheard).
                if not self._has_room_for(rest[0]):
                    remaining = deadline - time.monotonic()
                    if self._stalled or remaining <= 0:
                        self._stalled = True
                        return len(rest)
                    self._not_full.wait(remaining)

    @property
    def stalled(self) -> bool:
        """Whether a `put_many_within` wait ran out and the consumer has taken nothing since."""
        return self._stalled

    def _has_room_for(self, item: T) -> bool:
        """Whether `item` fits now; the caller holds the lock."""
        if len(self._items) >= self.max_items:
            return False
        if self._cost_of is None or not self._items:
            return True
        return self._cost + self._cost_of(item) <= self._limit

    def get_all(self, timeout_s: float, max_items: int | None = None) -> list[T]:
        """Everything waiting (up to max_items), waiting up to timeout_s for the first item."""
        with self._cond:
            if not self._items and not self._closed:
                self._cond.wait(timeout_s)
            if max_items is None or max_items >= len(self._items):
                out = list(self._items)
                self._items.clear()
            else:
                out = [self._items.popleft() for _ in range(max_items)]
            if self._cost_of is not None:
                self._cost = 0 if not self._items else self._cost - sum(map(self._cost_of, out))
            if out:
                self.taken_total += len(out)
                self._stalled = False
                self._not_full.notify()
            return out

    def put_many_waiting(self, items: list[T], stop: threading.Event) -> int:
        """Add every item, waiting for room as the consumer takes items (backpressure).
        Gives up only when `stop` is set and no room comes within a second; returns how many
        were not added."""
        rest = items
        while rest:
            with self._cond:
                room_waited = False
                while not self._has_room_for(rest[0]):  # (count and cost)
                    if room_waited and stop.is_set():
                        return len(rest)
                    self._not_full.wait(1.0)
                    room_waited = True
            left = self.put_many(rest)
            rest = rest[len(rest) - left:]
        return 0

    def close(self) -> None:
        """Wake the consumer; later gets return at once."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
