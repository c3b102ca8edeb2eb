"""IngestApp: the ingest API as a WSGI application (auth, limits, idempotency, problem+json).

Every answer is built whole before `start_response`, so nothing a handler raises can leave a
half-written response; anything unexpected becomes a logged 500 problem+json. Client mistakes are
always 4xx, and storage failures 503 with Retry-After so collectors keep the batch and retry.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import TYPE_CHECKING
from urllib.parse import parse_qsl

from collectors.errors import StorageError
from collectors.ingest.config import DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_FEEDS
from collectors.ingest.storage.base import Outcome, Storage
from collectors.ingest.validate import (
    MAX_PROBLEMS,
    BodyError,
    Problem,
    Validation,
    fast_validation,
    slow_validation,
    valid_name,
    valid_symbol,
)

if TYPE_CHECKING:
    from wsgiref.types import StartResponse, WSGIEnvironment

log = logging.getLogger(__name__)

#: How long a body for the stdlib path waits for the one before it (then 503, Retry-After).
SLOW_GATE_WAIT_S = 2.0
#: Body bytes validated and stored at once: a body takes about 10 times its size in memory from
#: its parse until its records are stored. Two 8 MiB bodies, or sixteen 1 MiB ones, never wait
#: for each other, nor do ordinary batches (100-1000 records, well under 1 MB each) on every
#: worker thread; with a larger INGEST_MAX_BODY_BYTES the budget is twice that. Bodies are let
#: in in the order they came (a large one is not passed by a stream of small ones).
DEFAULT_VALIDATION_BUDGET_BYTES = 16 * 1024 * 1024
#: How long a body waits for room in that budget (then 503, Retry-After).
VALIDATION_BUDGET_WAIT_S = 2.0

INGEST_PATH = "/internal/ingest"
HEALTH_PATH = "/healthz"
LATEST_PATH = "/api/v1/prices/latest"
SUMMARY_PATH = "/api/v1/summary"
MAX_IDEMPOTENCY_KEY_CHARS = 255
MAX_SUMMARY_MINUTES = 7 * 24 * 60
PROBLEM_TYPE = "urn:chrono:problem:"
JSON = "application/json"
PROBLEM_JSON = "application/problem+json"


@dataclass(slots=True)
class Response:
    """A complete answer: status, headers and body."""

    status: int
    body: bytes
    headers: list[tuple[str, str]] = field(default_factory=list)

    @property
    def status_line(self) -> str:
        return f"{self.status} {HTTPStatus(self.status).phrase}"


def json_response(status: int, payload: object, *,
                  headers: Sequence[tuple[str, str]] = ()) -> Response:
    body = json.dumps(payload, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode("utf-8")
    return Response(status, body, [("Content-Type", JSON), *headers])


def problem(status: int, slug: str, detail: str, *, errors: Sequence[Problem] = (),
            headers: Sequence[tuple[str, str]] = (), title: str | None = None) -> Response:
    """An RFC 9457 problem+json answer; `errors` name the failing record index and field."""
    payload: dict[str, object] = {
        "type": PROBLEM_TYPE + slug,
        "title": title or HTTPStatus(status).phrase,
        "status": status,
        "detail": detail,
    }
    if errors:
        payload["errors"] = [p.as_dict() for p in errors]
    body = json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    return Response(status, body, [("Content-Type", PROBLEM_JSON), *headers])


class IngestApp:
    """The WSGI application. Thread-safe: all state lives in `storage`."""

    def __init__(self, storage: Storage, api_keys: Sequence[str],
                 max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
                 max_feeds: int = DEFAULT_MAX_FEEDS, *,
                 retry_after_s: int = 5,
                 validation_budget_bytes: int | None = None,
                 clock_ns: Callable[[], int] = time.time_ns) -> None:
        if not api_keys:
            raise ValueError("IngestApp needs at least one API key")
        self.storage = storage
        self.max_body_bytes = max_body_bytes
        self.max_feeds = max_feeds
        self._keys = tuple(k.encode("utf-8") for k in api_keys)
        self._retry_after_s = retry_after_s
        self._clock_ns = clock_ns
        # Bodies the fast path does not take (malformed, invalid, unusual) are checked one at a
        # time: the stdlib parse of 8 MiB of tiny values takes ~250 MB and seconds, and eight
        # of them at once would take every worker thread and gigabytes.
        self._slow_gate = threading.Lock()
        # The fast path's memory, bounded too: eight 8 MiB bodies at once took 640 MB. Guarded
        # by the condition: bytes of the bodies being validated, or their records stored, now.
        self._budget_bytes = (max(DEFAULT_VALIDATION_BUDGET_BYTES, 2 * max_body_bytes)
                              if validation_budget_bytes is None else validation_budget_bytes)
        self._budget = threading.Condition(threading.Lock())
        self._validating_bytes = 0
        self._budget_queue: deque[object] = deque()  # the bodies waiting, in arrival order
        self._routes: dict[str, tuple[str, Callable[[WSGIEnvironment], Response], bool]] = {
            INGEST_PATH: ("POST", self._ingest, True),
            HEALTH_PATH: ("GET", self._health, False),
            LATEST_PATH: ("GET", self._latest, True),
            SUMMARY_PATH: ("GET", self._summary, True),
        }

    def __call__(self, environ: WSGIEnvironment,
                 start_response: StartResponse) -> Iterable[bytes]:
        try:
            response = self._dispatch(environ)
        except Exception:
            # The one catch-all: a bug must cost one request a 500, never the worker thread.
            log.exception("request_failed", extra={"path": _path(environ),
                                                   "method": _method(environ)})
            response = problem(500, "internal-error", "unexpected server error; it is logged")
        headers = [*response.headers, ("Content-Length", str(len(response.body))),
                   ("Cache-Control", "no-store"), ("X-Content-Type-Options", "nosniff")]
        start_response(response.status_line, headers)
        return [response.body]

    def _dispatch(self, environ: WSGIEnvironment) -> Response:
        path = _path(environ)
        route = self._routes.get(path)
        if route is None:
            return problem(404, "not-found", f"no resource at {path[:100]!r}")
        method, handler, needs_key = route
        if _method(environ) != method:
            return problem(405, "method-not-allowed", f"{path} accepts {method} only",
                           headers=[("Allow", method)])
        if needs_key:
            refused = self._authenticate(environ)
            if refused is not None:
                return refused
        return handler(environ)

    def _authenticate(self, environ: WSGIEnvironment) -> Response | None:
        header = str(environ.get("HTTP_AUTHORIZATION", "")).strip()
        scheme, _, token = header.partition(" ")
        token = token.strip()
        if not header:
            reason = "missing"
        elif scheme.lower() != "bearer" or not token:
            reason = "not_bearer"
        else:
            # WSGI gives header values as latin-1 text: encoding back recovers the wire bytes.
            presented = token.encode("latin-1", "replace")
            matched = False
            for key in self._keys:  # no early exit: the time taken does not depend on which key
                matched |= hmac.compare_digest(presented, key)
            if matched:
                return None
            reason = "unknown_key"
        # Never log or echo the presented token.
        log.warning("auth_failed", extra={"reason": reason, "path": _path(environ),
                                          "remote_addr": environ.get("REMOTE_ADDR", "")})
        challenge = 'Bearer realm="chrono-ingest"'
        if reason != "missing":
            challenge += ', error="invalid_token"'
        return problem(401, "unauthorized", "a valid 'Authorization: Bearer <key>' is required",
                       headers=[("WWW-Authenticate", challenge)])

    # --- POST /internal/ingest -------------------------------------------------------------

    def _ingest(self, environ: WSGIEnvironment) -> Response:
        media_type = str(environ.get("CONTENT_TYPE", "")).split(";", 1)[0].strip().lower()
        if media_type != JSON:
            return problem(415, "unsupported-media-type",
                           f"Content-Type must be {JSON}, got {media_type[:60]!r}",
                           headers=[("Accept-Post", JSON)])
        key = str(environ.get("HTTP_IDEMPOTENCY_KEY", ""))
        bad_key = _idempotency_key_problem(key)
        if bad_key is not None:
            return problem(400, "bad-idempotency-key", bad_key,
                           errors=[Problem(None, "Idempotency-Key", bad_key)])
        body = self._read_body(environ)
        if isinstance(body, Response):
            return body
        # The budget is held until the records are stored: the validated batch is most of the
        # memory a body takes, and it lives until then.
        if not self._take_budget(len(body)):
            return problem(503, "busy", "too many batches are being checked at once; retry",
                           headers=[("Retry-After", "1")])
        try:
            return self._check_and_store(key, body)
        finally:
            self._return_budget(len(body))

    def _check_and_store(self, key: str, body: bytes) -> Response:
        """Validate `body` and store its records under `key`: the answer to the POST."""
        try:
            verdict = fast_validation(body, max_feeds=self.max_feeds, now_ns=self._clock_ns())
            if verdict is None:
                verdict = self._slow_validation(body)
                if verdict is None:
                    return problem(503, "busy", "another unusual batch is being checked; retry",
                                   headers=[("Retry-After", "1")])
        except BodyError as exc:
            stored = self._stored_before(key, body)
            if stored is not None:
                return stored
            slug = "too-many-records" if exc.status == 413 else "malformed-json"
            return problem(exc.status, slug, exc.detail, title=exc.title,
                           errors=[Problem(None, "feeds" if exc.status == 413 else "(body)",
                                           exc.detail)])
        if not verdict.ok:
            stored = self._stored_before(key, body)
            if stored is not None:
                return stored
            shown = len(verdict.problems)
            detail = (f"{verdict.invalid_records} invalid record(s); nothing was stored"
                      if verdict.invalid_records else "the batch is invalid; nothing was stored")
            if shown >= MAX_PROBLEMS:
                detail += f" (first {MAX_PROBLEMS} problems listed)"
            log.warning("batch_rejected", extra={
                "idempotency_key": key, "invalid_records": verdict.invalid_records,
                "first_problem": verdict.problems[0].as_dict()})
            return problem(422, "invalid-records", detail, title="Invalid records",
                           errors=verdict.problems)
        digest = hashlib.sha256(body).hexdigest()
        started = time.monotonic()
        try:
            result = self.storage.store_batch(key, digest, verdict.feeds)
        except StorageError as exc:
            log.error("storage_failed", extra={"error": str(exc), "idempotency_key": key,
                                               "records": len(verdict.feeds)})
            return problem(503, "storage-unavailable", "the database is unavailable; retry",
                           headers=[("Retry-After", str(self._retry_after_s))])
        answer = {"stored": result.stored, "idempotency_key": key}
        if result.outcome is Outcome.STORED:
            if log.isEnabledFor(logging.DEBUG):  # the `extra` dict is built for nothing otherwise
                log.debug("batch_stored", extra={
                    "idempotency_key": key, "records": result.stored,
                    "duration_ms": round((time.monotonic() - started) * 1000, 3)})
            return json_response(201, answer)
        if result.outcome is Outcome.REPLAYED:
            log.info("batch_replayed", extra={"idempotency_key": key, "records": result.stored})
            return json_response(200, answer, headers=[("Idempotency-Replayed", "true")])
        if result.outcome is Outcome.IN_FLIGHT:
            return problem(409, "request-in-flight",
                           "a request with this Idempotency-Key is being processed; retry",
                           headers=[("Retry-After", "1")])
        log.warning("idempotency_conflict", extra={"idempotency_key": key})
        return problem(422, "idempotency-key-reused",
                       "this Idempotency-Key was already used with a different body",
                       errors=[Problem(None, "Idempotency-Key", "reused with a different body")])

    def _take_budget(self, size: int) -> bool:
        """Count `size` body bytes into the validation budget, waiting up to
        VALIDATION_BUDGET_WAIT_S for room: False if there was none (the sender retries)."""
        ticket = object()
        queue = self._budget_queue
        with self._budget:
            queue.append(ticket)
            # First in line, and alone (any body fits then) or within the budget.
            if self._budget.wait_for(lambda: queue[0] is ticket and (
                    not self._validating_bytes
                    or self._validating_bytes + size <= self._budget_bytes),
                    timeout=VALIDATION_BUDGET_WAIT_S):
                queue.popleft()
                self._validating_bytes += size
                self._budget.notify_all()  # the next in line may fit too
                return True
            queue.remove(ticket)
            self._budget.notify_all()  # it may have been first in line
            validating = self._validating_bytes
        log.warning("validation_busy", extra={"body_bytes": size,
                                              "validating_bytes": validating})
        return False

    def _return_budget(self, size: int) -> None:
        with self._budget:
            self._validating_bytes -= size
            self._budget.notify_all()

    def _slow_validation(self, body: bytes) -> Validation | None:
        """slow_validation, one request at a time: None when another held the gate for
        SLOW_GATE_WAIT_S (the sender retries). Raises BodyError."""
        if not self._slow_gate.acquire(timeout=SLOW_GATE_WAIT_S):
            log.warning("slow_validation_busy", extra={"body_bytes": len(body)})
            return None
        try:
            return slow_validation(body, max_feeds=self.max_feeds, now_ns=self._clock_ns())
        finally:
            self._slow_gate.release()

    def _stored_before(self, key: str, body: bytes) -> Response | None:
        """The replay of a batch refused now that was stored before under this key with these
        very bytes (the limits or the rules have changed since): a retry of a stored batch is
        answered as stored, or its sender would split it or dead-letter records we hold."""
        try:
            count = self.storage.stored_count(key, hashlib.sha256(body).hexdigest())
        except StorageError:
            return None  # the refusal stands; the sender retries only what it may
        if count is None:
            return None
        log.info("batch_replayed", extra={"idempotency_key": key, "records": count})
        return json_response(200, {"stored": count, "idempotency_key": key},
                             headers=[("Idempotency-Replayed", "true")])

    def _read_body(self, environ: WSGIEnvironment) -> bytes | Response:
        stream = environ["wsgi.input"]
        declared = str(environ.get("CONTENT_LENGTH", "")).strip()
        if not declared:
            # Chunked upload without a length: only safe when the server marks the end of input
            # (waitress de-chunks and sets CONTENT_LENGTH itself). Read at most max + 1 bytes.
            if not environ.get("wsgi.input_terminated"):
                return problem(411, "length-required", "Content-Length is required")
            data = _read_up_to(stream, self.max_body_bytes + 1)
            return self._too_large() if len(data) > self.max_body_bytes else data
        if not (declared.isascii() and declared.isdigit()) or len(declared) > 15:
            return problem(400, "bad-content-length", "Content-Length is not a valid number")
        length = int(declared)
        if length > self.max_body_bytes:
            return self._too_large()  # refused before reading a byte of it
        data = _read_up_to(stream, length)
        if len(data) != length:
            return problem(400, "incomplete-body", "the body is shorter than Content-Length")
        return data

    def _too_large(self) -> Response:
        return problem(413, "body-too-large",
                       f"the body is larger than {self.max_body_bytes} bytes; send smaller batches")

    # --- reads ------------------------------------------------------------------------------

    def _health(self, environ: WSGIEnvironment) -> Response:
        try:
            self.storage.ping()
        except StorageError as exc:
            log.warning("health_failed", extra={"error": str(exc)})
            return problem(503, "storage-unavailable", "the database does not answer",
                           headers=[("Retry-After", str(self._retry_after_s))])
        return json_response(200, {"status": "ok"})

    def _latest(self, environ: WSGIEnvironment) -> Response:
        params = _query(environ, {"source", "symbol"})
        if isinstance(params, Response):
            return params
        source = params.get("source") or None
        symbol = params.get("symbol") or None
        if source is not None and not valid_name(source):
            return _bad_param("source", "must be 1-64 characters of A-Z a-z 0-9 . _ -")
        if symbol is not None and not valid_symbol(symbol):
            return _bad_param("symbol", "must be a canonical symbol such as BTC/USD")
        try:
            rows = self.storage.latest(source, symbol)
        except StorageError as exc:
            return self._read_failed(exc)
        return json_response(200, {"prices": rows})

    def _summary(self, environ: WSGIEnvironment) -> Response:
        params = _query(environ, {"minutes"})
        if isinstance(params, Response):
            return params
        raw = params.get("minutes") or "10"
        if not (raw.isascii() and raw.isdigit()) or len(raw) > 6 or not (
                1 <= int(raw) <= MAX_SUMMARY_MINUTES):
            return _bad_param("minutes", f"must be a whole number from 1 to {MAX_SUMMARY_MINUTES}")
        minutes = int(raw)
        try:
            rows = self.storage.summary(minutes)
        except StorageError as exc:
            return self._read_failed(exc)
        return json_response(200, {"minutes": minutes, "sources": rows})

    def _read_failed(self, exc: StorageError) -> Response:
        log.error("storage_failed", extra={"error": str(exc)})
        return problem(503, "storage-unavailable", "the database is unavailable; retry",
                       headers=[("Retry-After", str(self._retry_after_s))])


def _idempotency_key_problem(key: str) -> str | None:
    if not key.strip():
        return "the Idempotency-Key header is required (one unique key per batch)"
    if len(key) > MAX_IDEMPOTENCY_KEY_CHARS:
        return f"Idempotency-Key is longer than {MAX_IDEMPOTENCY_KEY_CHARS} characters"
    if not (key.isascii() and key.isprintable()):  # " " to "~", in C
        return "Idempotency-Key must be printable ASCII"
    if "," in key:
        # A header sent twice reaches us joined ("k, k"): a new key, and the batch stored twice.
        return "Idempotency-Key must be one header holding one key, without ','"
    return None


def _read_up_to(stream: object, limit: int) -> bytes:
    read = getattr(stream, "read", None)
    if read is None:
        return b""
    chunks: list[bytes] = []
    remaining = limit
    while remaining > 0:
        chunk = read(min(remaining, 1 << 20))
        if not chunk:
            break
        chunks.append(bytes(chunk))
        remaining -= len(chunk)
    return b"".join(chunks)


def _query(environ: WSGIEnvironment, allowed: set[str]) -> dict[str, str] | Response:
    try:
        pairs = parse_qsl(str(environ.get("QUERY_STRING", "")), keep_blank_values=True,
                          strict_parsing=False, max_num_fields=10)
    except ValueError:
        return _bad_param("(query)", "too many query parameters")
    out: dict[str, str] = {}
    for name, value in pairs:
        if name not in allowed:
            known = ", ".join(sorted(allowed))
            return _bad_param(name[:64], f"unknown parameter; allowed: {known}")
        if name in out:
            return _bad_param(name, "given more than once")
        out[name] = value
    return out


def _bad_param(name: str, why: str) -> Response:
    return problem(400, "bad-query-parameter", f"{name}: {why}", errors=[Problem(None, name, why)])


def _path(environ: WSGIEnvironment) -> str:
    return str(environ.get("PATH_INFO", "")) or "/"


def _method(environ: WSGIEnvironment) -> str:
    return str(environ.get("REQUEST_METHOD", "GET")).upper()
