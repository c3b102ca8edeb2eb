"""The bounded hand-off queue: order, bound, batch reads, across real threads."""

from __future__ import annotations

import threading
import time

from hypothesis import given
from hypothesis import strategies as st

from collectors.batching import Handoff


def test_bound_refuses_and_counts() -> None:
    q: Handoff[int] = Handoff(3)
    assert [q.put(i) for i in range(5)] == [True, True, True, False, False]
    assert q.put_many([7, 8]) == 2
    assert q.get_all(0) == [0, 1, 2]
    assert q.put_many([7, 8, 9, 10]) == 1
    assert q.get_all(0, max_items=2) == [7, 8]
    assert q.get_all(0) == [9]


@given(st.lists(st.lists(st.integers(), max_size=20), max_size=30))
def test_order_is_kept_across_threads(chunks: list[list[int]]) -> None:
    q: Handoff[int] = Handoff(10_000)
    flat = [x for c in chunks for x in c]
    got: list[int] = []
    done = threading.Event()

    def consume() -> None:
        while not (done.is_set() and not len(q)):
            got.extend(q.get_all(0.01))

    t = threading.Thread(target=consume)
    t.start()
    for c in chunks:
        q.put_many(c)
    done.set()
    q.close()
    t.join(5)
    assert got == flat


def test_close_wakes_a_waiting_consumer() -> None:
    q: Handoff[int] = Handoff(1)
    result: list[list[int]] = []
    t = threading.Thread(target=lambda: result.append(q.get_all(30)))
    t.start()
    q.close()
    t.join(5)
    assert result == [[]]


def test_cost_bound_refuses_what_would_exceed_it() -> None:
    q: Handoff[bytes] = Handoff(100, max_cost=10, cost_of=len)
    assert q.put(b"x" * 6) and q.put(b"y" * 4)
    assert not q.put(b"z")              # 11 > 10
    assert q.cost == 10
    assert q.get_all(0, max_items=1) == [b"x" * 6] and q.cost == 4
    assert q.put_many([b"a" * 3, b"b" * 3, b"c"]) == 1
    assert q.get_all(0) == [b"y" * 4, b"a" * 3, b"b" * 3] and q.cost == 0
    assert q.put(b"w" * 50)             # alone above the bound: still passes when empty
    assert not q.put(b"v")


def test_put_many_waiting_applies_backpressure_instead_of_dropping() -> None:
    q: Handoff[int] = Handoff(10)
    stop = threading.Event()
    got: list[int] = []

    def consume() -> None:
        while len(got) < 100:
            got.extend(q.get_all(0.05, max_items=3))

    t = threading.Thread(target=consume)
    t.start()
    assert q.put_many_waiting(list(range(100)), stop) == 0
    t.join(5)
    assert got == list(range(100))


def test_put_many_waiting_gives_up_only_when_stopping() -> None:
    q: Handoff[int] = Handoff(2)
    stop = threading.Event()
    stop.set()
    assert q.put_many_waiting([1, 2, 3, 4], stop) == 2
    assert q.get_all(0) == [1, 2]


def test_put_many_waiting_waits_for_room_by_cost_too() -> None:
    # Full by cost with room by count: the wait looked at the count only, so it spun (a core
    # busy) and never saw `stop`.
    q: Handoff[bytes] = Handoff(1000, max_cost=100, cost_of=len)
    stop = threading.Event()
    stop.set()
    result: list[int] = []
    t = threading.Thread(target=lambda: result.append(
        q.put_many_waiting([b"a" * 80, b"b" * 80, b"c" * 10], stop)), daemon=True)
    started = time.process_time()
    t.start()
    t.join(5)
    assert not t.is_alive() and result == [2]  # the one wait for room ran out: stopping
    assert time.process_time() - started < 0.5  # waited, not spun
    assert q.get_all(0) == [b"a" * 80]


def test_put_many_within_waits_for_room_by_cost_and_keeps_order() -> None:
    q: Handoff[bytes] = Handoff(1000, max_cost=100, cost_of=len)
    frames = [bytes([i]) * 30 for i in range(10)]  # 300 bytes: three times the bound
    got: list[bytes] = []

    def consume() -> None:
        while len(got) < len(frames):
            got.extend(q.get_all(timeout_s=5))

    consumer = threading.Thread(target=consume)
    consumer.start()
    assert q.put_many_within(frames, timeout_s=10) == 0  # waited for room, dropped nothing
    consumer.join(10)
    assert got == frames


def test_put_many_within_drops_the_newest_when_no_room_comes_in_time() -> None:
    q: Handoff[bytes] = Handoff(1000, max_cost=100, cost_of=len)
    assert q.put_many_within([b"a" * 60, b"b" * 30], timeout_s=0) == 0
    # Nobody consumes: after the (short) wait, what does not fit is refused, newest first.
    assert q.put_many_within([b"c" * 10, b"d" * 10, b"e" * 10], timeout_s=0.05) == 2
    assert q.get_all(0) == [b"a" * 60, b"b" * 30, b"c" * 10]


def test_put_many_within_waits_once_per_stall_not_once_per_call() -> None:
    q: Handoff[int] = Handoff(2)
    q.put_many([0, 1])
    assert q.put_many_within([2], 0.05) == 1  # the one wait of this stall
    assert q.stalled
    started = time.monotonic()
    for i in range(100):  # a stuck consumer: every later call refuses at once
        assert q.put_many_within([i], 60.0) == 1
    assert time.monotonic() - started < 5  # not 100 minutes
    assert q.get_all(0) == [0, 1]
    assert not q.stalled  # the consumer made room: the stall is over


def test_after_a_stall_a_full_queue_waits_for_the_consumer_again() -> None:
    q: Handoff[int] = Handoff(1)
    q.put(0)
    assert q.put_many_within([1], 0.01) == 1
    assert q.stalled
    assert q.get_all(0) == [0]
    q.put(2)
    taken: list[int] = []
    consumer = threading.Thread(target=lambda: taken.extend(q.get_all(0) or []))
    # The stall is over, so this call waits for room again; a consumer makes it.
    timer = threading.Timer(0.05, consumer.start)
    timer.start()
    assert q.put_many_within([3], 30.0) == 0
    timer.join()
    consumer.join()
    assert taken == [2] and q.get_all(0) == [3]


def test_the_totals_count_items_accepted_and_taken() -> None:
    q: Handoff[int] = Handoff(3)
    q.put(1)
    q.put_many([2, 3, 4])
    assert (q.put_total, q.taken_total) == (3, 0)
    q.get_all(0, max_items=2)
    assert (q.put_total, q.taken_total) == (3, 2)
