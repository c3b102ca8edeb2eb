"""Pure retry policies: capped exponential backoff with full jitter, Retry-After, status classes."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from enum import StrEnum


@dataclass(slots=True)
class Backoff:
    """Full-jitter exponential backoff: delay ~ U(0, min(cap, base * 2**attempt)).

    Full jitter spreads reconnect storms (many collectors losing a venue at once) the most evenly
    for the least total wait (see AWS Architecture Blog, "Exponential Backoff And Jitter").
    """

    base_s: float = 1.0
    cap_s: float = 60.0
    rng: random.Random = field(default_factory=random.Random)
    attempt: int = 0

    def next_delay(self) -> float:
        ceiling = min(self.cap_s, self.base_s * (2 ** min(self.attempt, 30)))
        self.attempt += 1
        return self.rng.uniform(0, ceiling)

    def reset(self) -> None:
        self.attempt = 0


class Outcome(StrEnum):
    STORED = "stored"
    RETRY = "retry"          # 408, 409, 429, 5xx, network: keep the batch, try again later
    AUTH = "auth"            # 401/403: our key is wrong; hold everything, retry slowly, shout
    REJECT = "reject"        # any other 4xx: the batch itself is bad -> dead letter


def classify_status(status: int) -> Outcome:
    if 200 <= status < 300:
        return Outcome.STORED
    # 409: the same Idempotency-Key is still in flight (our earlier attempt timed out on our
    # side but is being stored): retry and get the stored result.
    if status in (408, 409, 425, 429) or status >= 500:
        return Outcome.RETRY
    if status in (401, 403):
        return Outcome.AUTH
    if 400 <= status < 500:
        return Outcome.REJECT
    # 3xx is not an answer the contract allows: treat as transient server trouble. So is a 1xx,
    # which is never a final answer (the Poster skips interim ones: delivery._FinalResponse).
    return Outcome.RETRY


def parse_retry_after(value: str | None, now: datetime | None = None,
                      max_s: float = 600.0) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or HTTP-date), clamped to [0, max_s];
    None when it is absent or unreadable. Raises nothing for any header value."""
    if value is None:
        return None
    value = value.strip()
    if not value:
        return None
    if value.isascii() and value.isdigit():  # str.isdigit() is True for "²" too
        return min(float(value), max_s)
    try:
        when = parsedate_to_datetime(value)
    # OverflowError: a year, day or second too large for a datetime ("06 Nov 99999999999").
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    now = now or datetime.now(UTC)
    return max(0.0, min((when - now).total_seconds(), max_s))
