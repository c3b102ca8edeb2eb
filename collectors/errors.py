"""The exception tree of chrono-collectors.

::

    ChronoError                     base of everything this package raises on purpose
    +-- ConfigError                 a bad environment variable or argument (exit code 2)
    +-- ParseError                  an exchange frame that is not a valid message/record
    +-- DeliveryError               a batch could not be delivered
    |   +-- RetryableDeliveryError  408/429/5xx/network: try again later (may carry Retry-After)
    |   +-- RejectedBatchError      other 4xx: never retried blindly, dead-lettered
    +-- SpoolError                  the on-disk spool cannot be used
    +-- StorageError                the ingest API's database failed

Third-party exceptions are translated at the module boundary (`raise X from exc`) so callers
catch only these. No message of any of them ever contains the API key.
"""

from __future__ import annotations


class ChronoError(Exception):
    """Base class of every error this package raises on purpose."""


class ConfigError(ChronoError):
    """Invalid configuration: names the variable, what is wrong and what is allowed."""

    def __init__(self, variable: str, problem: str, allowed: str = "") -> None:
        self.variable = variable
        self.problem = problem
        self.allowed = allowed
        text = f"{variable}: {problem}"
        if allowed:
            text += f" ({allowed})"
        super().__init__(text)


class ParseError(ChronoError):
    """A frame that cannot become a valid message or record. The text says why."""


class DeliveryError(ChronoError):
    """A batch could not be delivered to the ingest API."""


class RetryableDeliveryError(DeliveryError):
    """Transient failure (408, 429, 5xx, network): retry with backoff."""

    def __init__(self, message: str, *, status: int | None = None,
                 retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after_s = retry_after_s


class RejectedBatchError(DeliveryError):
    """The API refused the batch for good (4xx other than 408/429): dead-letter it."""

    def __init__(self, message: str, *, status: int, detail: str) -> None:
        super().__init__(message)
        self.status = status
        self.detail = detail


class SpoolError(ChronoError):
    """The durable spool could not be opened or written."""


class StorageError(ChronoError):
    """The ingest API's storage backend failed. `transient`: it may work again by itself (the
    database server down or starting, a full disk), so a start waits for it rather than exit."""

    def __init__(self, message: str, *, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient
