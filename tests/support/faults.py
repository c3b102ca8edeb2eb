"""FaultScript: WSGI middleware that makes the real ingest app misbehave on cue, for tests.

Each POST takes the next scripted action (then everything passes through):

    faults = FaultScript(app)
    faults.respond(503, retry_after=2).hang(5.0).close_connection().respond(429, times=2)

- `respond(status, retry_after=None)`: answer problem+json with that status; the app never runs.
- `hang(seconds)`: wait, then pass through (the batch IS stored: a client that timed out and
  retries must be answered as a replay). `release()` ends every hang at once, so a test never
  waits out the full time and a server can stop promptly.
- `close_connection()`: drop the TCP connection without a byte of response. This relies on
  waitress: raising `waitress.channel.ClientDisconnected` from the app before anything is
  written makes the channel close the socket without answering (other WSGI servers would send
  a 500 instead).
- `pass_through()`: a no-op step, to place a fault after N good requests.

GET requests always pass through. Everything is thread-safe; observation helpers
(`requests_seen`, `idempotency_keys`, `bodies`, `wait_for_requests`, `wait_for_completed`)
replace sleeps as synchronisation.
"""

from __future__ import annotations

import collections
import io
import json
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from http import HTTPStatus
from typing import TYPE_CHECKING

from waitress.channel import ClientDisconnected

if TYPE_CHECKING:
    from wsgiref.types import StartResponse, WSGIApplication, WSGIEnvironment


@dataclass(frozen=True, slots=True)
class Action:
    kind: str  # "respond" | "hang" | "close" | "pass"
    status: int = 0
    retry_after: str | None = None
    seconds: float = 0.0
    problem: bytes | None = None  # a scripted problem+json body (None: a generic one)


class FaultScript:
    """Wraps a WSGI app; scripted actions apply to the next POSTs, in order."""

    def __init__(self, app: WSGIApplication) -> None:
        self.app = app
        self._cond = threading.Condition()
        self._actions: collections.deque[Action] = collections.deque()
        self._release = threading.Event()
        self._requests_seen = 0
        self._completed = 0
        self._keys: list[str] = []
        self._bodies: list[bytes] = []
        self._applied: list[str] = []

    # --- scripting ---------------------------------------------------------------------------

    def respond(self, status: int, *, retry_after: float | str | None = None,
                times: int = 1, problem: dict[str, object] | None = None) -> FaultScript:
        value = None if retry_after is None else str(retry_after)
        body = None if problem is None else json.dumps(problem).encode()
        return self._add(Action("respond", status=status, retry_after=value, problem=body),
                         times)

    def hang(self, seconds: float, *, times: int = 1) -> FaultScript:
        return self._add(Action("hang", seconds=seconds), times)

    def close_connection(self, *, times: int = 1) -> FaultScript:
        return self._add(Action("close"), times)

    def pass_through(self, *, times: int = 1) -> FaultScript:
        return self._add(Action("pass"), times)

    def clear(self) -> None:
        with self._cond:
            self._actions.clear()

    def release(self) -> None:
        """End every current and future hang at once."""
        self._release.set()

    def _add(self, action: Action, times: int) -> FaultScript:
        with self._cond:
            self._actions.extend([action] * times)
        return self

    # --- observation -------------------------------------------------------------------------

    @property
    def pending(self) -> int:
        with self._cond:
            return len(self._actions)

    @property
    def requests_seen(self) -> int:
        """POSTs received so far (whatever happened to them)."""
        with self._cond:
            return self._requests_seen

    @property
    def completed(self) -> int:
        """POSTs fully handled (answered or dropped)."""
        with self._cond:
            return self._completed

    @property
    def idempotency_keys(self) -> list[str]:
        with self._cond:
            return list(self._keys)

    @property
    def bodies(self) -> list[bytes]:
        with self._cond:
            return list(self._bodies)

    @property
    def applied(self) -> list[str]:
        """The action kind each POST got, in arrival order."""
        with self._cond:
            return list(self._applied)

    def wait_for_requests(self, count: int, timeout_s: float = 10.0) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self._requests_seen >= count, timeout_s)

    def wait_for_completed(self, count: int, timeout_s: float = 10.0) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self._completed >= count, timeout_s)

    # --- WSGI --------------------------------------------------------------------------------

    def __call__(self, environ: WSGIEnvironment,
                 start_response: StartResponse) -> Iterable[bytes]:
        if str(environ.get("REQUEST_METHOD", "")).upper() != "POST":
            return self.app(environ, start_response)
        body = _read_all(environ)
        environ["wsgi.input"] = io.BytesIO(body)
        with self._cond:
            action = self._actions.popleft() if self._actions else Action("pass")
            self._requests_seen += 1
            self._keys.append(str(environ.get("HTTP_IDEMPOTENCY_KEY", "")))
            self._bodies.append(body)
            self._applied.append(action.kind)
            self._cond.notify_all()
        try:
            if action.kind == "respond":
                return self._respond(action, start_response)
            if action.kind == "close":
                raise ClientDisconnected("FaultScript: drop the connection without a response")
            if action.kind == "hang":
                self._release.wait(action.seconds)
            # Materialise the app's answer so "completed" means the answer exists.
            return list(self.app(environ, start_response))
        finally:
            with self._cond:
                self._completed += 1
                self._cond.notify_all()

    @staticmethod
    def _respond(action: Action, start_response: StartResponse) -> list[bytes]:
        phrase = HTTPStatus(action.status).phrase
        body = action.problem or json.dumps({
            "type": "urn:chrono:problem:scripted-fault", "title": phrase,
            "status": action.status, "detail": "scripted by FaultScript"}).encode()
        headers = [("Content-Type", "application/problem+json"),
                   ("Content-Length", str(len(body)))]
        if action.retry_after is not None:
            headers.append(("Retry-After", action.retry_after))
        start_response(f"{action.status} {phrase}", headers)
        return [body]

    # Keep the wrapped app's limits visible to start_server().
    @property
    def max_body_bytes(self) -> int:
        return int(getattr(self.app, "max_body_bytes", 8 * 1024 * 1024))


def _read_all(environ: WSGIEnvironment) -> bytes:
    stream = environ["wsgi.input"]
    length = str(environ.get("CONTENT_LENGTH", "")).strip()
    if length.isdigit():
        return bytes(stream.read(int(length)))
    return bytes(stream.read())
