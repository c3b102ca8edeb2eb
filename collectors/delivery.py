"""Delivery: records -> spool (on the parser thread) -> batches POSTed to the ingest API (delivery
thread), with requests.

Every batch carries an `Idempotency-Key` that the spool persisted with it, so a retry (also after
a restart) sends the same key and the same body bytes and the API stores it once. 408/429/5xx and
network errors are retried with capped, jittered backoff that honours `Retry-After`; 401/403 mean
our key is wrong, so everything is held on disk and retried slowly while the log says so; any
other 4xx moves the batch to the dead-letter file with the API's reason.
"""

from __future__ import annotations

import contextlib
import http.client
import http.cookiejar
import json
import logging
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import msgspec
import requests
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import HTTPError as Urllib3Error
from urllib3.exceptions import NewConnectionError
from urllib3.exceptions import TimeoutError as Urllib3TimeoutError

from collectors import __version__
from collectors.backoff import Backoff, Outcome, classify_status, parse_retry_after
from collectors.errors import SpoolError
from collectors.keys import Redactor
from collectors.logsetup import LogSampler
from collectors.metrics import FlushFailureReason, Metrics
from collectors.model import Metadata, PriceFeed
from collectors.spool import Batch, Spool
from collectors.threadnames import name_native_thread

log = logging.getLogger(__name__)

AUTH_RETRY_S = 30.0
RETRY_AFTER_FLOOR_S = 0.25


#: How long a metrics scrape or a health check waits for the spool's stats (`stats_within`).
STATS_WAIT_S = 0.25
#: At most this much of an answer body is read (a hostile or broken API cannot exhaust memory).
MAX_RESPONSE_BYTES = 64 * 1024

#: At most this many interim (1xx) answers are skipped before the final one; more is an error
#: (the time they may take is bounded by the POST's total deadline already).
MAX_INTERIM_RESPONSES = 100


@dataclass(frozen=True, slots=True)
class PostResult:
    outcome: Outcome
    status: int | None
    retry_after_s: float | None
    detail: str          # the start of the answer body (or the network error), for logs
    body: bytes = b""    # the answer body, up to MAX_RESPONSE_BYTES
    #: the failure reason for metrics and logs, when the status does not say
    reason: FlushFailureReason | None = None

    def rejected_indexes(self, batch_size: int) -> list[int] | None:
        """Positions of the records a 400/422 problem+json names (`errors[].index`), or None
        when the answer does not name them all with valid positions."""
        try:
            doc = json.loads(self.body)
        except (ValueError, RecursionError):  # RecursionError: deep nesting ("[[[[...")
            return None
        errors = doc.get("errors") if isinstance(doc, dict) else None
        if not isinstance(errors, list) or not errors:
            return None
        out: set[int] = set()
        for err in errors:
            index = err.get("index") if isinstance(err, dict) else None
            if not isinstance(index, int) or isinstance(index, bool) or not (
                    0 <= index < batch_size):
                return None
            out.add(index)
        return sorted(out)


class _Deadline:
    """A total deadline for one request. requests/urllib3 timeouts bound each socket operation,
    so an API that drips its answer a byte at a time could hold a POST forever; this watchdog
    thread shuts the request's socket down when the whole exchange takes too long, and the
    blocked read fails at once (a network error: retried with the same key)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._expires: float | None = None
        self._stop_at: float | None = None  # see stop_by
        # When the watcher wakes next (None: not before a notify). `arm` wakes it only for an
        # earlier expiry than that: a request's deadline is seconds away while it takes
        # milliseconds, so the watcher wakes about once per deadline's length, not per POST
        # (a thread woken on every POST wanted the GIL just as the POST did).
        self._wakes_at: float | None = None
        self.sock: socket.socket | None = None  # set by the connection classes below
        self.fired = False
        self.stopping = False  # the deadline that fired was stop_by's
        threading.Thread(target=self._watch, name="post-deadline", daemon=True).start()

    def arm(self, seconds: float) -> bool:
        """Start the clock for one request; False (and nothing armed) when stop_by's time has
        come already: the request must not start."""
        with self._cond:
            now = time.monotonic()
            expires = now + seconds
            self.stopping = self._stop_at is not None and self._stop_at < expires
            if self.stopping and self._stop_at is not None and self._stop_at <= now:
                return False
            if self.stopping and self._stop_at is not None:
                expires = self._stop_at
            self._expires = expires
            self.fired = False
            if self._wakes_at is None or expires < self._wakes_at:
                self._cond.notify()
            return True

    def stop_by(self, at: float) -> None:
        """No request runs past `at` (monotonic): the one in flight and every later one."""
        with self._cond:
            self._stop_at = at
            if self._expires is not None and self._expires > at:
                self._expires, self.stopping = at, True
                self._cond.notify()

    def past_stop(self) -> bool:
        with self._cond:
            return self._stop_at is not None and self._stop_at <= time.monotonic()

    def disarm(self) -> None:
        with self._cond:
            self._expires = None

    def _watch(self) -> None:
        name_native_thread("post-deadline")
        with self._cond:
            while True:
                if self._expires is None:
                    self._wakes_at = None
                    self._cond.wait()
                    continue
                left = self._expires - time.monotonic()
                if left > 0:
                    self._wakes_at = self._expires
                    self._cond.wait(left)
                    continue
                self._expires = None
                sock, self.fired = self.sock, True
                if sock is not None:
                    with contextlib.suppress(OSError):
                        sock.shutdown(socket.SHUT_RDWR)


class _FinalResponse(http.client.HTTPResponse):
    """A response that skips every interim 1xx answer, headers and all, and is the final one.

    RFC 9110 15.2: a client must parse and ignore interim answers. http.client skips only
    `100 Continue`; any other 1xx (a `103 Early Hints` a proxy or CDN adds, a `102 Processing`)
    came back as *the* answer, with no body: a retry of a batch the API had stored, and the
    same again on every retry, for ever. `101 Switching Protocols` is no interim answer: the
    connection would go on in a protocol we never ask for, so it is an error (a network retry
    on a new connection: urllib3 drops one whose answer failed)."""

    # http.client's begin() reads the status line through _read_status (in a loop that skips
    # 100 Continue only): overriding it skips the other interim answers at the same place.
    # Private, so not in the type stubs; stable since Python 3.0 and still in 3.13.
    def _read_status(self) -> tuple[str, int, str]:
        read_status: Callable[[], tuple[str, int, str]] = super()._read_status  # type: ignore[misc]
        for _ in range(MAX_INTERIM_RESPONSES + 1):
            version, status, reason = read_status()
            if status == 101:
                raise http.client.HTTPException("unexpected 101 Switching Protocols")
            if not 100 <= status < 200:
                return version, status, reason
            # Its headers (bounded in number and length by http.client) are of no use to us.
            http.client.parse_headers(self.fp)
        raise http.client.HTTPException(
            f"more than {MAX_INTERIM_RESPONSES} interim (1xx) answers before the final one")


class _NoRedirectSession(requests.Session):
    """A Session that never looks at a redirect. requests runs its redirect machinery even
    with `allow_redirects=False` (to fill `Response.next`): it parses the Location header (a
    malformed one raises ValueError or UnicodeDecodeError, not a RequestException) and reads
    the whole body with no bound. A 3xx is an answer like any other here: its body is read
    with the bound and its status classified."""

    def get_redirect_target(self, resp: requests.Response) -> str | None:
        return None


def _tracking_adapter(deadline: _Deadline) -> HTTPAdapter:
    """An HTTPAdapter whose connections tell `deadline` which socket is in use."""

    def track(sock: socket.socket) -> None:
        deadline.sock = sock
        if deadline.fired:  # it fired while this socket was connecting: it missed this one
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    class Tracked(HTTPConnection):
        response_class = _FinalResponse  # urllib3 2.x reads the answer through http.client

        def connect(self) -> None:
            super().connect()
            track(self.sock)

    class TrackedTLS(HTTPSConnection):
        response_class = _FinalResponse

        def connect(self) -> None:
            super().connect()
            track(self.sock)

    class Pool(HTTPConnectionPool):
        ConnectionCls = Tracked

    class TLSPool(HTTPSConnectionPool):
        ConnectionCls = TrackedTLS

    # Retries are ours (with the idempotency key and backoff); urllib3 must not add its own.
    adapter = HTTPAdapter(max_retries=0, pool_maxsize=1)
    adapter.poolmanager.pool_classes_by_scheme = {"http": Pool, "https": TLSPool}
    return adapter


class Poster:
    """POSTs one batch. Holds one keep-alive session; never retries by itself. Each POST has a
    total deadline of twice the connect plus read timeouts. Never raises for anything the API
    answers (or fails to): every surprise is a RETRY result."""

    def __init__(self, url: str, api_key: str, *, connect_timeout_s: float,
                 read_timeout_s: float) -> None:
        self.url = url
        self._timeout = (connect_timeout_s, read_timeout_s)
        self._total_s = 2 * (connect_timeout_s + read_timeout_s)
        self._deadline = _Deadline()
        # An API that echoes our headers, or an error naming a URL that holds the key, must not
        # put the key into logs or the dead-letter file, in any form (percent-encoded in a URL,
        # escaped, cut short: collectors.keys).
        self._redact = Redactor([api_key] if api_key.strip() else [])
        self._logged_at: dict[str, float] = {}  # event -> monotonic time (rate-limited logs)
        #: monotonic time of the first stop_by call: when the collector was asked to stop.
        self.stop_requested_at: float | None = None
        self._session = _NoRedirectSession()
        adapter = _tracking_adapter(self._deadline)
        self._session.mount("http://", adapter)
        self._session.mount("https://", adapter)
        self._session.headers.update({"Authorization": f"Bearer {api_key}",
                                      "Content-Type": "application/json",
                                      # Answers are small JSON: no compression, so no zip bomb.
                                      "Accept-Encoding": "identity",
                                      "User-Agent": f"chrono-collectors/{__version__}"})
        self._session.trust_env = False  # no proxies/netrc from the environment
        # No cookie state: a Session keeps every cookie an API sets and sends them all back on
        # each POST, so an API (or a load balancer in front of it) that sets new ones on every
        # answer grows our memory and our request headers without bound, until a proxy's header
        # limit answers every batch 400 (dead-lettered). The contract uses none. A policy that
        # allows no domain refuses every cookie where requests stores them (CookieJar.
        # extract_cookies asks the policy), so the jar stays empty and no Cookie header is sent.
        self._session.cookies.set_policy(http.cookiejar.DefaultCookiePolicy(allowed_domains=[]))
        # Every POST is the same request but for its body and key: prepared once (URL checks,
        # the session's headers merged), copied for each batch. `Session.post` prepared it
        # anew each time, about 70 µs of GIL-holding Python a POST, on the path from a batch
        # due to its bytes on the wire (docs/benchmarks.md, latency).
        self._template = self._session.prepare_request(requests.Request("POST", url))

    def post(self, batch: Batch) -> PostResult:
        try:
            return self._post(batch)
        except Exception as exc:  # noqa: BLE001 - no answer may end the delivery thread
            # A bug or a library surprise on a hostile answer: retried like a network error
            # (same key, with backoff), said once a minute, never a thread crash (which
            # would restart the process into the same batch, for ever).
            detail = f"client_error: {self._describe(exc)}"
            self._log_sometimes(logging.ERROR, "post_client_error", detail)
            # The session's connection may be mid-answer: drop it, the next POST reconnects.
            with contextlib.suppress(Exception):
                self._session.close()
            return PostResult(Outcome.RETRY, None, None, detail, reason="client_error")

    def _post(self, batch: Batch) -> PostResult:
        if not self._deadline.arm(self._total_s):
            return self._cut_short()
        try:
            try:
                request = self._template.copy()
                request.headers["Idempotency-Key"] = batch.key
                request.prepare_body(batch.body(), None)  # (and its Content-Length)
                resp = self._session.send(request, timeout=self._timeout,
                                          allow_redirects=False, stream=True)
            except _NETWORK_ERRORS as exc:
                return self._no_answer(exc)
            try:
                if self._deadline.fired:
                    # Cut while the headers came: http.client takes the end of the stream for
                    # their end, so they may not be whole.
                    return self._cut_short()
                body = _bounded_body(resp)
            except _NETWORK_ERRORS as exc:
                if not 200 <= resp.status_code < 300:
                    return self._no_answer(exc)
                # The status line and headers arrived whole and say "stored": the body (which
                # we do not use) stalled or broke. Re-sending would never be acknowledged by an
                # API that always does this; urllib3 closed the connection (not reused).
                self._log_sometimes(logging.WARNING, "ingest_answer_body_failed",
                                    self._describe(exc))
                body = b""
            finally:
                resp.close()
        finally:
            self._deadline.disarm()
        outcome = classify_status(resp.status_code)
        out_of_step = outcome is Outcome.STORED and not _answers_key(body, batch.key)
        if outcome is not Outcome.STORED or out_of_step:
            # An API that failed may still write to this connection (a late answer to this
            # request, a proxy's stray one): reused, it would be read as the next request's
            # answer, and a late 2xx would acknowledge a batch never stored. The next POST
            # takes a new connection (failures are rare; successes keep theirs).
            self._session.close()
        if self._deadline.fired and outcome is not Outcome.STORED:
            return self._cut_short()  # not a whole answer
        if out_of_step:
            return PostResult(Outcome.RETRY, resp.status_code, None,
                              "a 2xx answer naming another batch's Idempotency-Key (an answer "
                              "out of step with its request): not counted as stored",
                              reason="other")
        detail = ""
        if outcome is not Outcome.STORED:
            # Redacted before it is cut: a key straddling the cut would escape the log filter.
            detail = self._redact(body.decode("utf-8", "replace"))
            if 300 <= resp.status_code < 400:
                location = self._redact(resp.headers.get("Location", ""))[:200]
                detail = f"redirect not followed (Location: {location!r}) {detail}"
            detail = detail[:1000]
        return PostResult(outcome, resp.status_code,
                          parse_retry_after(resp.headers.get("Retry-After")), detail, body)

    def stop_by(self, at: float) -> None:
        """Stopping: cut the POST in flight, and any later one, at `at` (monotonic time), so
        the process stops within its drain window even while an API drips an answer (the batch
        stays claimed and is re-sent under its key)."""
        if self.stop_requested_at is None:
            self.stop_requested_at = time.monotonic()
        self._deadline.stop_by(at)

    def past_stop_deadline(self) -> bool:
        """stop_by's time has come: a POST now would be refused without being sent."""
        return self._deadline.past_stop()

    def _no_answer(self, exc: BaseException) -> PostResult:
        """No (whole) answer came. `timeout` when the API was reached but did not answer in
        time (connect or read timeout, or our deadline cut it), `network` when the connection
        failed (refused, reset, closed): an operator looks at a slow API for the one and at the
        network or a down API for the other."""
        if self._deadline.fired:
            return self._cut_short()
        reason: FlushFailureReason = "timeout" if _timed_out(exc) else "network"
        return PostResult(Outcome.RETRY, None, None, self._describe(exc), reason=reason)

    def _cut_short(self) -> PostResult:
        """The deadline (ours, or stop_by's) cut the exchange: a retry, counted as a timeout."""
        if self._deadline.stopping:
            detail = "no complete answer before the collector's stop deadline"
        else:
            detail = f"no complete answer within {self._total_s:.0f} s"
        return PostResult(Outcome.RETRY, None, None, detail, reason="timeout")

    def _describe(self, exc: BaseException) -> str:
        # requests' messages name the URL (no secrets in it) and the cause; keep them short.
        return f"{type(exc).__name__}: {self._redact(str(exc))[:300]}"

    def _log_sometimes(self, level: int, event: str, error: str) -> None:
        """Log `event` at most once a minute: an API that always misbehaves must not flood."""
        now = time.monotonic()
        last = self._logged_at.get(event)
        if last is None or now - last >= 60.0:
            self._logged_at[event] = now
            log.log(level, event, extra={"error": error, "url": self.url})

    def close(self) -> None:
        self._session.close()


# Reading the body goes through urllib3 directly, whose errors requests does not wrap (a
# chunked answer cut or stalled mid-stream).
_NETWORK_ERRORS = (requests.RequestException, Urllib3Error, http.client.HTTPException, OSError)
# requests' ConnectTimeout/ReadTimeout; urllib3's own while the body is read; a bare socket
# timeout (the builtin TimeoutError) should one escape both.
_TIMEOUT_ERRORS = (requests.Timeout, Urllib3TimeoutError, TimeoutError)


def _timed_out(exc: BaseException) -> bool:
    """Whether a timeout is what failed, however it was wrapped: a send that stalls past the
    timeout reaches us as requests' ConnectionError holding urllib3's ProtocolError("Connection
    aborted.", TimeoutError(...)), the timeout in their args, not their type."""
    todo: list[BaseException] = [exc]
    seen: set[int] = set()
    while todo and len(seen) < 16:
        e = todo.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        # (urllib3's NewConnectionError derives from its ConnectTimeoutError for old code's
        # sake: a refused connection is one, and is no timeout.)
        if isinstance(e, _TIMEOUT_ERRORS) and not isinstance(e, NewConnectionError):
            return True
        todo += [x for x in (e.__cause__, e.__context__, *e.args) if isinstance(x, BaseException)]
    return False


def _answers_key(body: bytes, key: str) -> bool:
    """False when a 2xx body names an `idempotency_key` (the reference API echoes it) other
    than `key`: the answer belongs to another request. True when it names this one, or none
    (the contract does not require the echo)."""
    if b'"idempotency_key"' not in body:
        return True
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):
        return True
    named = doc.get("idempotency_key") if isinstance(doc, dict) else None
    # (compared as the same UUID however spelled: an API that keeps keys in a uuid column
    # echoes them with dashes)
    return not isinstance(named, str) or _key_form(named) == _key_form(key)


def _key_form(key: str) -> str:
    return key.replace("-", "").lower()


def _bounded_body(resp: requests.Response) -> bytes:
    """The answer body as sent, at most MAX_RESPONSE_BYTES, whatever the headers claim: read
    with a bound (a Content-Length sent beside chunked framing does not bound the chunks) and
    never decompressed (we ask for `identity`; a server that compresses anyway gets its bytes
    shown as they came, not inflated). A body read to its end leaves the keep-alive connection
    free for the next POST; a longer one is cut, and its connection closes with the response."""
    data = resp.raw.read(MAX_RESPONSE_BYTES + 1, decode_content=False)
    return bytes(data[:MAX_RESPONSE_BYTES])


_MARK_MIN, _MARK_MAX = -(2**63), 2**63 - 1  # SQLite's INTEGER


class SpoolWriter:
    """Writes each chunk of parsed records to the spool in one transaction, on the parser's
    thread (the parser calls `put_many_waiting` as it would on a queue): a record is durable
    (survives `kill -9`) before the parser takes the next chunk of frames.

    No thread of its own: a hand-off to a spool-writer thread cost a thread wake-up per chunk
    (about as much CPU as parsing the record, at a few thousand messages a second) and held up
    to 20,000 parsed records in memory. While a commit runs (the GIL is released in SQLite),
    frames queue up in front of the parser, so a busy feed is committed in bigger chunks.

    When the spool refuses a write (disk full, I/O error) the chunk is retried every
    `retry_wait_s` and the parser waits with it; frames then queue up in front of the parser
    (bounded, see the service) and the ws thread pauses reading before anything is dropped.
    """

    #: At most one `spool_full_dropped_oldest` line this often (the metric counts every record).
    FULL_LOG_INTERVAL_S = 10.0

    def __init__(self, spool: Spool | None, metrics: Metrics, wake: threading.Event, *,
                 mark_of: Callable[[PriceFeed], tuple[str, int] | None] = lambda _r: None,
                 due_size: Callable[[], int] = lambda: 1,
                 retry_wait_s: float = 0.5,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._mark_of = mark_of  # the adapter's dedup mark, persisted with the records
        self._spool = spool  # None until attach(): the service opens the spool when it runs
        self._append: Callable[[Sequence[bytes], Mapping[str, int]], int] | None = (
            None if spool is None else spool.append)
        self._metrics = metrics
        # Wakes the delivery thread, but only when that changes its plan: a full batch waits
        # (`due_size()` records: the Sender's batch size), or the first record after none (it
        # slept without a due time). Otherwise it sleeps until the oldest record is due: a
        # wake-up per commit cost more CPU than the POSTs at a few thousand tickers a second.
        self._wake = wake
        self._due_size = due_size
        self._retry_wait_s = retry_wait_s
        self._last_error_log = 0.0
        # While the spool is full every write drops (a line each was thousands a minute): one
        # line per FULL_LOG_INTERVAL_S with the count since the last one; the metric is exact.
        self._clock = clock
        self._drop_logged_at: float | None = None
        self._dropped_unlogged = 0
        self.beat = time.monotonic()  # last write attempt (watchdog progress while retrying)

    def attach(self, spool: Spool,
               append: Callable[[Sequence[bytes], Mapping[str, int]], int] | None = None) -> None:
        """Write to `spool`, through `append` when given (the Sender's, which may claim the
        batch a write fills for a worker waiting for one) instead of `spool.append`."""
        self._spool = spool
        self._append = append or spool.append

    def put_many_waiting(self, records: list[PriceFeed], stop: threading.Event) -> int:
        """Spool `records` (with their dedup marks) in one transaction; returns how many could
        not be stored: 0, or all of them when `stop` is set and the spool still refuses."""
        if not records:
            return 0
        spool, append = self._spool, self._append
        if spool is None or append is None:
            raise RuntimeError("SpoolWriter used before attach()")
        encoded = [encode(r) for r in records]
        # The adapter's dedup state after this chunk, per key (it may have started a count
        # over: lower than the stored mark; see Spool.append). A value SQLite cannot hold is no
        # mark.
        marks: dict[str, int] = {}
        mark_of = self._mark_of
        for record in records:
            mark = mark_of(record)
            if mark is not None and _MARK_MIN <= mark[1] <= _MARK_MAX:
                marks[mark[0]] = mark[1]
        while True:
            self.beat = time.monotonic()
            waited = spool.waiting_records
            try:
                dropped = append(encoded, marks)
            except SpoolError as exc:
                self._metrics.spool_errors.inc()
                now = time.monotonic()
                if now - self._last_error_log > 10:
                    self._last_error_log = now
                    log.error("spool_write_failed", extra={"error": str(exc),
                                                           "held": len(encoded)})
                if stop.is_set():  # the parser counts and logs them
                    return len(encoded)
                stop.wait(self._retry_wait_s)
                continue
            if dropped:
                self._metrics.spool_dropped.inc(dropped)
                self._log_dropped(dropped)
            elif self._dropped_unlogged:
                self._log_dropped(0)  # the drops since the last line, once its interval is up
            if waited <= 0 or spool.waiting_records >= self._due_size():
                self._wake.set()
            return 0

    def _log_dropped(self, dropped: int) -> None:
        """Log the full policy's drops: the first at once, then at most one line per
        FULL_LOG_INTERVAL_S, with every record dropped since the line before (`dropped`)."""
        self._dropped_unlogged += dropped
        now = self._clock()
        last = self._drop_logged_at
        if last is not None and now - last < self.FULL_LOG_INTERVAL_S:
            return
        self._say_dropped(now)

    def flush_log(self) -> None:
        """Say the drops not said yet (the stop path: the writer writes no more)."""
        if self._dropped_unlogged:
            self._say_dropped(self._clock())

    def _say_dropped(self, now: float) -> None:
        last = self._drop_logged_at
        since_s = None if last is None else round(now - last, 1)
        self._drop_logged_at = now
        count, self._dropped_unlogged = self._dropped_unlogged, 0
        spool = self._spool
        reason = spool.last_drop_reason if spool is not None else None
        log.error("spool_full_dropped_oldest", extra={
            "dropped": count, "over_s": since_s, "reason": reason,
            "hint": "the disk holding the spool is nearly full: free space on it"
            if reason == "disk_reserve" else "the spool reached SPOOL_MAX_BYTES"})


# msgspec's encoder is 6x faster than json.dumps here (1.1 vs 7.2 us a record) and writes the
# same compact JSON (floats in shortest round-trip form). Records are validated finite by the
# adapters; msgspec would write NaN as null, so `encode` never sees one.
_ENCODER = msgspec.json.Encoder()


# The record's JSON object as a msgspec Struct: its field names are encoded once, not hashed
# and written from a dict built per record (0.1-0.6 us less a record on the simulator's
# tickers, 5-20 %). Same keys in the same order as `PriceFeed.to_json_dict()`, so the same bytes (a
# property test holds them equal): `volume` is the one field with a default, left out when None.
class _Wire(msgspec.Struct, kw_only=True, omit_defaults=True):
    symbol: str
    price: float
    volume: float | None = None
    timestamp: str
    source: str
    worker_id: str
    metadata: Metadata


def encode(record: PriceFeed) -> bytes:
    """A record's compact JSON, exactly what the API receives and stores: the bytes of
    `msgspec.json.encode(record.to_json_dict())`."""
    return _ENCODER.encode(_Wire(symbol=record.symbol, price=record.price, volume=record.volume,
                                 timestamp=record.timestamp, source=record.source,
                                 worker_id=record.worker_id, metadata=record.metadata))


class Sender:
    """The delivery workers: each takes a due batch from the spool, oldest first, and POSTs it.

    One worker per Poster (`DELIVERY_CONCURRENCY`, 1 by default). With one, batches are stored
    in spool order. With more, that many POSTs may be in flight at once, so the latency of a
    remote or slow API costs no throughput; batches may then be stored out of order (every
    record keeps its own timestamps). The workers share one retry policy: after a failed POST
    none sends before the retry time, and while the API keeps failing a single request (a probe)
    is in flight at a time, so N workers do not hit a struggling API N times harder.

    A worker's spool writes run on one bookkeeping thread (`delivery-spool`) while its POST is
    on the wire: the attempt count of the batch being sent, the claim of the next batch (with
    one worker only: with more, a free worker claims it), and after a success the
    acknowledgement. POSTs still go one after the other, in spool order,
    but a batch no longer waits for its predecessor's acknowledgement and its own claim (a
    third of a burst's delivery time before). A batch claimed ahead goes back to waiting when
    the POST before it fails, so the failed batch, retried or split, keeps its place. The attempt
    count is persisted while the POST runs, not before it: a `kill -9` in that instant loses
    only the count (the batch is re-sent under its key, so the API still stores it once).

    A spool that refuses a write (a full disk, an I/O error) never ends a worker: the service
    would exit and lose the frames it holds in memory, while a full disk passes. A count of
    attempts it cannot write is skipped; an acknowledgement it cannot write is retried every
    `ack_retry_s`, its batch kept out of claims meanwhile (the API has it: no POST for nothing).
    """

    #: At most one line per kind of failed spool write this often (a full disk fails them all).
    SPOOL_ERROR_LOG_INTERVAL_S = 10.0

    def __init__(self, spool: Spool, posters: Poster | Sequence[Poster], metrics: Metrics, *,
                 batch_size: int, batch_interval_s: float, stop: threading.Event,
                 writer_finished: threading.Event, wake: threading.Event,
                 drain_timeout_s: float = 5.0, backoff: Backoff | None = None,
                 retry_max_s: float = 30.0,
                 thread_init: Callable[[], object] | None = None,
                 ack_retry_s: float = 1.0, refusal_memory_s: float = 600.0) -> None:
        self._spool = spool
        self._posters = [posters] if isinstance(posters, Poster) else list(posters)
        if not self._posters:
            raise ValueError("at least one Poster")
        self._metrics = metrics
        self._batch_size = batch_size
        self._interval_s = batch_interval_s
        self._stop = stop
        self._writer_finished = writer_finished
        self._wake = wake
        self._drain_timeout_s = drain_timeout_s
        # _lock guards the shared state below. Claiming a batch and reserving it (in
        # _in_flight) happen under _claim_lock as one step, so no two workers ever send the
        # same batch at once.
        self._lock = threading.Lock()
        self._claim_lock = threading.Lock()
        # Capped (DELIVERY_RETRY_MAX_S, 30 s): after an outage the backlog starts draining soon.
        self._backoff = backoff or Backoff(base_s=0.5, cap_s=retry_max_s)
        self._resume_at = 0.0  # monotonic time before which no worker POSTs (after a failure)
        # records_rejected and batch_rejected lines: the first at once, then one per
        # SPOOL_ERROR_LOG_INTERVAL_S with the count not logged since.
        self._reject_log = LogSampler(interval_s=self.SPOOL_ERROR_LOG_INTERVAL_S)
        self._retry_said = False  # a batch_retry line was logged since the last recovery
        self._probe = threading.Lock()  # held by the one POST allowed while the API is failing
        self._in_flight: set[str] = set()  # keys of the batches the workers hold
        # Batches the parser claimed in its own commit for a worker waiting for one (`append`);
        # their keys are in _in_flight. `_idle`: workers waiting for a batch.
        self._handed: deque[Batch] = deque()
        self._idle = 0
        self._acking: set[str] = set()  # keys of stored batches whose acknowledgement is queued
        # The spool writes of every worker run on one thread, in the order they are handed in
        # (a batch's attempt is counted before it can be acknowledged); `thread_init` names it.
        self._bookkeeper = ThreadPoolExecutor(max_workers=1, thread_name_prefix="delivery-spool",
                                              initializer=thread_init)
        self._ahead: list[Future[Batch | None] | None] = [None] * len(self._posters)
        self._acks: list[list[Future[None]]] = [[] for _ in self._posters]
        self._tried: set[str] = set()
        # Acknowledgements the spool refused: key -> (records, monotonic time of the next try).
        # Their keys stay in _acking, so no claim hands the stored batch out again meanwhile.
        self._ack_retry: dict[str, tuple[int, float]] = {}
        self._ack_retry_s = ack_retry_s
        self._unacked_logged = False
        self._spool_error_logged_at: dict[str, float] = {}  # event -> last line (monotonic)
        self._spool_errors_unlogged: dict[str, int] = {}  # event -> failures since that line
        self._retry_logged_at: float | None = None  # the last batch_retry line (monotonic)
        self._retries_unlogged = 0  # failed POSTs since it
        # After a 413 the batch size is halved until batches fit, then grows back on success,
        # but not past the smallest size refused (`_too_large`, at `_too_large_at`) while that
        # refusal is younger than `refusal_memory_s`: it bisects between that and the largest
        # size stored since (`_fits`), so a fixed body limit costs a few 413s, not every other
        # POST. A refusal that old is probed once (a batch of its size), so a raised limit is
        # found again.
        self._size_cap = batch_size
        self._too_large: int | None = None
        self._too_large_at = 0.0
        self._fits = 0
        self._refusal_memory_s = refusal_memory_s
        self._drain_deadline: float | None = None
        self._drained_logged = False
        self._left_logged = False
        self._gauges_at = float("-inf")  # monotonic time of the last stats() for the gauges
        self._gauge_values = (0.0, 0.0, 0.0)  # records, payload bytes, oldest record (unix s)
        self._corrupt_seen = 0
        self.last_success_unix: float | None = None
        self._beats = [time.monotonic()] * len(self._posters)  # per worker (watchdog progress)
        # The spool gauges are read when scraped (from a snapshot at most a second old), not
        # set from the workers' loop: a worker waits out a 600 s Retry-After, a 401's 30 s or
        # a hung POST while the spool fills and drops, and the spool alerts must see that.
        metrics.spool_records.set_function(lambda: self._spool_gauges()[0])
        metrics.spool_bytes.set_function(lambda: self._spool_gauges()[1])
        metrics.spool_oldest_ts.set_function(lambda: self._spool_gauges()[2])

    @property
    def workers(self) -> int:
        return len(self._posters)

    @property
    def due_size(self) -> int:
        """Waiting records that make a batch due now (the batch size; less after a 413)."""
        return self._size_cap

    @property
    def beat(self) -> float:
        """The last loop turn of the slowest worker."""
        return min(self._beats)

    @property
    def failing(self) -> bool:
        """The last POST failed (retry or auth) and none has succeeded since."""
        with self._lock:
            return self._backoff.attempt > 0

    def run(self, worker: int = 0) -> None:
        """Worker `worker`'s loop (one thread each) until stopped and drained."""
        try:
            self._loop(worker)
        finally:
            # The acknowledgements of stored batches commit before the thread ends (the service
            # closes the spool once every worker has).
            self._settle(worker, raise_errors=False)

    def close(self) -> None:
        """End the bookkeeping thread (after the workers have returned)."""
        self._bookkeeper.shutdown(wait=True)

    def _loop(self, worker: int) -> None:
        poster = self._posters[worker]
        while True:
            self._check_acks(worker)  # and queues the acknowledgements due for another try
            now = self._beats[worker] = time.monotonic()
            drain_deadline = self._drain_deadline_if_stopping()
            final = drain_deadline is not None and self._writer_finished.is_set()
            if drain_deadline is not None and now > drain_deadline:
                self._log_left_behind()
                return
            self._wake.clear()  # before looking: an append from now on ends the wait below
            try:
                ahead, self._ahead[worker] = self._ahead[worker], None
                # The batch claimed during the last POST, or (none was due then) one now: a
                # stop during that POST makes the records it left waiting due at once.
                batch = None if ahead is None else ahead.result()
                if batch is None:
                    batch = self._claim(final)
            except SpoolError as exc:
                # (A full disk fails every claim: one line per interval, each counted.)
                self._spool_failed("spool_read_failed", exc, retry_in_s=1.0)
                if not self._sleep(worker, 1.0):
                    return
                continue
            self._spool_gauges()  # also counts records lost to corruption without a scrape
            if batch is None:
                if final:
                    self._settle(worker, raise_errors=True)
                    with self._lock:
                        if not self._in_flight and not self._acking and not self._drained_logged:
                            self._drained_logged = True
                            log.info("delivery_drained")
                    return
                with self._lock:
                    self._idle += 1
                try:
                    self._wake.wait(self._idle_wait_s(drain_deadline))
                finally:
                    with self._lock:
                        self._idle -= 1
                continue
            try:
                sent = self._deliver(batch, poster, worker, final)
            finally:
                with self._lock:
                    self._in_flight.discard(batch.key)
            if not sent:  # the drain deadline came before the retry time
                self._log_left_behind()
                return

    # ---- spool bookkeeping (mostly on the bookkeeping thread) --------------------------------
    def append(self, records: Sequence[bytes], marks: Mapping[str, int]) -> int:
        """`Spool.append` for the parser's spool writer (returns what the full policy dropped).

        When a worker waits for a batch (the feed is not busy enough to keep one claimed ahead)
        and this write fills one, it is claimed in the same transaction (`append_claiming`) and
        handed to the worker, which POSTs it as soon as it wakes: the claim's own transaction,
        the worker's wait for the spool's write lock (the parser's next commit) and for the
        GIL to make it are off the path from a record's commit to its POST. Not while the API
        fails, nor when stopping: the batches then come from `due_batch` as before."""
        spool = self._spool
        if (not self._idle or self._handed
                or spool.waiting_records + len(records) < self._size_cap):
            return spool.append(records, marks)
        with self._claim_lock:
            with self._lock:
                size = self._size_cap if (self._idle and not self._handed
                                          and self._backoff.attempt == 0
                                          and not self._stop.is_set()) else 0
                exclude = self._in_flight | self._acking
            dropped, batch = spool.append_claiming(records, marks, size, exclude)
            if batch is not None:
                with self._lock:
                    self._in_flight.add(batch.key)
                    self._handed.append(batch)
        if batch is not None:
            self._wake.set()
        return dropped

    def _claim(self, final: bool) -> Batch | None:
        """The next batch to send (see Spool.due_batch), reserved for the caller: first one
        the parser claimed for a waiting worker (`append`). One claim at a time
        (`_claim_lock`), so the keys read under `_lock` are still the ones to skip when the
        claim commits (keys only leave the sets meanwhile), without holding `_lock`, which the
        workers need between POSTs, for the length of a claim. A claimed batch whose
        acknowledgement is still queued is skipped (`_acking`), so a claim need not wait for
        the bookkeeping thread."""
        with self._claim_lock:
            with self._lock:
                if self._handed:
                    return self._handed.popleft()
                exclude = self._in_flight | self._acking
                size = self._size_cap
            batch = self._spool.due_batch(size, self._interval_s, force=final, exclude=exclude)
            if batch is not None:
                with self._lock:
                    self._in_flight.add(batch.key)
            return batch

    def _acknowledge(self, key: str, n: int) -> None:
        """The API stored batch `key`: delete it from the spool, then count it delivered.

        When the spool refuses the deletion (disk full, I/O error) the batch stays claimed on
        disk and out of claims (its key stays in `_acking`), and the deletion is tried again
        after `ack_retry_s` (`_check_acks`): re-sending it would only cost POSTs (the API
        answers a replay without storing twice), in a loop while the disk stays full. Should
        the process stop first, the next start re-sends it under its key."""
        try:
            self._spool.ack(key)
        except SpoolError as exc:
            with self._lock:
                self._ack_retry[key] = (n, time.monotonic() + self._ack_retry_s)
            self._spool_failed("spool_ack_failed", exc, idempotency_key=key,
                               retry_in_s=self._ack_retry_s)
            return
        except BaseException:
            with self._lock:
                self._acking.discard(key)
            raise
        with self._lock:
            self._acking.discard(key)
        self._metrics.records_delivered.inc(n)
        self.last_success_unix = time.time()
        self._metrics.last_flush_success_ts.set(self.last_success_unix)

    def _check_acks(self, worker: int) -> None:
        """Collect this worker's finished acknowledgements, and queue again those the spool
        refused whose retry time has come."""
        pending = self._acks[worker]
        while pending and pending[0].done():
            # Raises what the acknowledgement raised: a bug (a refusing spool is retried).
            pending.pop(0).result()
        self._retry_acks(worker, all_now=False)

    def _retry_acks(self, worker: int, *, all_now: bool) -> None:
        """Queue again the acknowledgements the spool refused whose retry time has come
        (every one with `all_now`), on this worker's list."""
        pending = self._acks[worker]
        now = time.monotonic()
        with self._lock:
            due = [(key, n) for key, (n, at) in self._ack_retry.items() if all_now or at <= now]
            for key, _n in due:
                del self._ack_retry[key]
        for key, n in due:
            pending.append(self._bookkeeper.submit(self._acknowledge, key, n))

    def _put_back_ahead(self, worker: int) -> None:
        """The POST before the batch claimed ahead did not store its batch. A batch this claim
        made (never sent) goes back to waiting, in front, as if never claimed: the failed
        batch stays the oldest claimed one and goes first, and should it later be split (a
        413, a partial rejection: its records go back in front of the waiting ones) the
        records behind it keep their place, and a smaller batch size applies to them too. A
        batch claimed before (it may have been sent) stays claimed, free for any worker."""
        ahead, self._ahead[worker] = self._ahead[worker], None
        if ahead is None:
            return
        with contextlib.suppress(SpoolError):  # the next claim meets and reports it
            batch = ahead.result()
            if batch is not None:
                try:
                    if batch.fresh:
                        self._spool.release(batch.key)
                finally:
                    with self._lock:
                        self._in_flight.discard(batch.key)

    def _settle(self, worker: int, *, raise_errors: bool) -> None:
        """Wait for this worker's queued spool writes, with one more try of every
        acknowledgement the spool refused (it may take them again by now)."""
        ahead, self._ahead[worker] = self._ahead[worker], None
        if ahead is not None:
            with contextlib.suppress(Exception):
                ahead.result(timeout=60)
        self._retry_acks(worker, all_now=True)
        pending, self._acks[worker] = self._acks[worker], []
        for future in pending:
            try:
                future.result(timeout=60)
            except Exception as exc:
                if raise_errors:
                    raise
                log.error("spool_ack_failed", extra={"error": str(exc)})
        with self._lock:
            unacknowledged = len(self._ack_retry)
            if self._unacked_logged:
                return
            self._unacked_logged = unacknowledged > 0
        if unacknowledged:
            log.warning("delivery_stopped_unacknowledged", extra={
                "batches": unacknowledged,
                "hint": "stored by the API but still on disk (the spool refused to delete "
                        "them): re-sent under the same keys after the next start, stored once"})

    # ---- waiting ---------------------------------------------------------------------------
    def _idle_wait_s(self, drain_deadline: float | None) -> float:
        """How long to sleep with nothing to send: until the oldest waiting record is due
        (an append that fills a batch wakes us earlier), at most 1 s."""
        if drain_deadline is not None:
            return 0.02
        try:
            until = self._spool.seconds_until_due(self._interval_s)
        except SpoolError:
            return 0.1  # the next due_batch reports it
        return 1.0 if until is None else min(1.0, max(0.005, until))

    def _drain_deadline_if_stopping(self) -> float | None:
        if self._stop.is_set():
            with self._lock:
                if self._drain_deadline is None:
                    now = time.monotonic()
                    # The window starts at the stop request (the service tells the Posters at
                    # once), not when a worker next looks: a POST in flight must not push it
                    # back (it would then outlast stop_by, and later POSTs be refused).
                    asked = [p.stop_requested_at for p in self._posters
                             if p.stop_requested_at is not None]
                    self._drain_deadline = min([now, *asked]) + self._drain_timeout_s
                    # Stopping cuts a retry wait short: one more try within the drain window.
                    self._resume_at = min(self._resume_at, now)
        return self._drain_deadline

    def _sleep(self, worker: int, seconds: float) -> bool:
        """Wait `seconds` in slices (the beat keeps moving). False when the drain deadline
        comes first."""
        until = time.monotonic() + seconds
        while (now := time.monotonic()) < until:
            self._beats[worker] = now  # waiting on purpose is progress
            deadline = self._drain_deadline_if_stopping()
            if deadline is not None:
                if until > deadline:
                    return False
                time.sleep(min(until - now, 0.25))  # stopping already: nothing else to wait for
            else:
                self._stop.wait(min(until - now, 1.0))
        return True

    def _take_turn(self, worker: int) -> bool | None:
        """Wait until this worker may POST. Returns True holding the probe lock (the API is
        failing: one request at a time), False without it (all is well), None when the drain
        deadline comes first."""
        while True:
            with self._lock:
                wait_s = self._resume_at - time.monotonic()
                failing = self._backoff.attempt > 0
            if wait_s > 0:
                if not self._sleep(worker, wait_s):
                    # The wait outlasts the drain window; but stopping (noticed during it) may
                    # have moved the retry time to now: that one more try is still due.
                    with self._lock:
                        if self._resume_at <= time.monotonic():
                            continue
                    return None
                continue
            if not failing:
                return False
            if self._probe.acquire(timeout=0.25):
                with self._lock:
                    due = time.monotonic() >= self._resume_at
                if due:
                    return True
                self._probe.release()  # another probe failed meanwhile: wait again
            self._beats[worker] = time.monotonic()
            deadline = self._drain_deadline_if_stopping()
            if deadline is not None and time.monotonic() > deadline:
                return None

    # ---- one POST --------------------------------------------------------------------------
    def _deliver(self, batch: Batch, poster: Poster, worker: int, final: bool) -> bool:
        """POST one batch when it is this worker's turn, and act on the answer. False when the
        drain deadline (or the Poster's stop_by time) came first (the batch stays claimed on
        disk)."""
        probing = self._take_turn(worker)
        if probing is None:
            return False
        try:
            if poster.past_stop_deadline():
                # It would be refused unsent: no attempt to count, no failure to report.
                return False
            self._post(batch, poster, worker, final and not probing)
        finally:
            if probing:
                self._probe.release()
        return True

    def _post(self, batch: Batch, poster: Poster, worker: int, final: bool) -> None:
        n = batch.size
        with self._lock:
            first_try_here = batch.key not in self._tried
            self._tried.add(batch.key)
            # While the API fails, one batch at a time: nothing is claimed ahead. Nor with more
            # than one worker: the others claim as soon as they are free, and a batch claimed
            # ahead by a worker whose POST hangs would wait for it while another sat idle.
            look_ahead = self._backoff.attempt == 0 and len(self._posters) == 1
        if first_try_here and batch.attempts > 0:
            self._metrics.spool_replayed.inc(n)
            log.info("batch_replayed", extra={"idempotency_key": batch.key, "records": n,
                                              "attempts": batch.attempts})
        # Both run on the bookkeeping thread while the POST is on the wire.
        attempt = self._bookkeeper.submit(self._spool.record_attempt, batch.key)
        if look_ahead:
            self._ahead[worker] = self._bookkeeper.submit(self._claim, final)
        self._metrics.flushes.inc()
        started = time.monotonic()
        result = poster.post(batch)
        self._metrics.flush_duration.observe(time.monotonic() - started)
        try:
            attempt.result()
        except SpoolError as exc:
            # Bookkeeping only (`batch_replayed` and its metric): it decides nothing about this
            # POST, and a full disk must not end the worker.
            self._spool_failed("spool_attempt_count_failed", exc, idempotency_key=batch.key)
        if result.outcome is Outcome.STORED:
            with self._lock:
                self._acking.add(batch.key)  # skipped by claims until the deletion commits
                self._tried.discard(batch.key)
                self._size_cap = self._grown_cap(n)
                recovered_after = self._backoff.attempt
                self._backoff.reset()
                # Said when a batch_retry line was (an API failing every other POST wrote
                # one of each per POST): each said failure is followed by its recovery.
                say_recovered = recovered_after > 0 and self._retry_said
                if say_recovered:
                    self._retry_said = False
            self._acks[worker].append(self._bookkeeper.submit(self._acknowledge, batch.key, n))
            if say_recovered:
                log.info("delivery_recovered", extra={"after_attempts": recovered_after})
            log.debug("batch_delivered", extra={"idempotency_key": batch.key, "records": n,
                                                "status": result.status})
            return
        self._put_back_ahead(worker)
        reason = _failure_reason(result)
        self._metrics.flush_failure(reason)
        if result.outcome is Outcome.REJECT:
            try:
                self._reject(batch, result)
            except SpoolError as exc:
                # The spool refused to split or dead-letter it (disk full): the batch stays
                # claimed and is sent again after a pause, and the API's answer decides again.
                self._spool_failed("spool_reject_failed", exc, idempotency_key=batch.key,
                                   status=result.status, retry_in_s=1.0)
                # No POST before then, from any worker: the next turn waits for it (and, when
                # stopping, gives up once the drain deadline comes first). A sleep here ended
                # at once near the deadline, and the batch was POSTed back to back.
                with self._lock:
                    self._resume_at = max(self._resume_at, time.monotonic() + 1.0)
            return
        with self._lock:
            delay = self._backoff.next_delay()
            retry_after = result.retry_after_s
            if retry_after is not None:
                # The server said when: then, as it asks. A "0", or a date already past (a
                # clock behind ours), says nothing: the backoff's own time, or such an API was
                # retried four times a second for as long as the outage lasted.
                delay = (retry_after if retry_after >= RETRY_AFTER_FLOOR_S
                         else max(delay, RETRY_AFTER_FLOOR_S))
            if result.outcome is Outcome.AUTH:
                delay = max(delay, AUTH_RETRY_S)
            self._resume_at = max(self._resume_at, time.monotonic() + delay)
        if result.outcome is Outcome.AUTH:
            with self._lock:
                self._retry_said = True  # (its recovery is said too)
            log.error("ingest_auth_failed", extra={
                "status": result.status, "retry_in_s": round(delay, 1),
                "hint": "the ingest API refused the key; check API_KEY/API_KEY_FILE. Records "
                        "stay in the spool until it is fixed."})
        else:
            # An API failing fast (a `Retry-After: 0` once retried four times a second) must
            # not write a warning per failure: one line per
            # SPOOL_ERROR_LOG_INTERVAL_S (10 s), with the retries since; every one is counted.
            now = time.monotonic()
            with self._lock:
                retries = self._retries_unlogged + 1
                logged_at = self._retry_logged_at
                if logged_at is not None and now - logged_at < self.SPOOL_ERROR_LOG_INTERVAL_S:
                    self._retries_unlogged = retries
                    return
                self._retry_logged_at, self._retries_unlogged = now, 0
                self._retry_said = True
            log.warning("batch_retry", extra={"idempotency_key": batch.key, "records": n,
                                              "status": result.status, "reason": reason,
                                              "detail": result.detail[:200] or None,
                                              "retry_in_s": round(delay, 3),
                                              "retries_since_last_log": retries})

    def _reject(self, batch: Batch, result: PostResult) -> None:
        """The API refused the batch for good and stored none of it. Keep what was good:
        a 413 splits the batch; a 400/422 naming the bad records dead-letters only those."""
        n = batch.size
        status = result.status or 0
        with self._lock:
            self._tried.discard(batch.key)
        if status == 413 and n > 1:
            self._spool.split(batch.key, (), status, result.detail)
            with self._lock:
                self._size_cap = self._shrunk_cap(n)
                next_size = self._size_cap
            log.warning("batch_too_large_split", extra={"idempotency_key": batch.key,
                                                        "records": n,
                                                        "next_batch_size": next_size})
            return
        bad = result.rejected_indexes(n) if status in (400, 422) else None
        if bad is not None and len(bad) < n:
            dead, released = self._spool.split(batch.key, bad, status, result.detail)
            self._metrics.dead_letter_records.inc(dead)
            # An API refusing part of every batch must not write a line per batch: each is
            # counted and in the dead-letter file with its reason.
            not_logged = self._reject_log.admit("records_rejected", time.monotonic())
            if not_logged is not None:
                log.error("records_rejected", extra={
                    "idempotency_key": batch.key, "rejected": dead, "resent": released,
                    "status": status, "detail": result.detail[:500],
                    "since_last_log": not_logged})
            return
        self._spool.dead_letter(batch.key, status, result.detail)
        self._metrics.dead_letter_records.inc(n)
        if status == 413:
            # One record the API takes in no batch: the 413s on the way down to it were its,
            # not a limit on the batch size, which must not stay bisected below them.
            with self._lock:
                self._too_large = None
        not_logged = self._reject_log.admit("batch_rejected", time.monotonic())
        if not_logged is not None:
            log.error("batch_rejected", extra={"idempotency_key": batch.key, "records": n,
                                               "status": status, "detail": result.detail[:500],
                                               "since_last_log": not_logged})

    def _spool_gauges(self) -> tuple[float, float, float]:
        """(records, payload bytes, the oldest record's Unix time or 0) for the spool gauges,
        from the spool's stats at most once a second: it reads two rows and the in-memory
        counters, under the spool's locks, so a scrape or a worker may call it. A spool that
        cannot answer leaves the last values (a scrape must not fail; it is counted), and so
        does one busy for longer than STATS_WAIT_S: an operation stuck on a stalled disk holds
        its locks, and every scrape of /metrics would have hung with it."""
        with self._lock:
            now = time.monotonic()
            if now - self._gauges_at < 1.0:
                return self._gauge_values
            self._gauges_at = now
        try:
            stats = self._spool.stats_within(STATS_WAIT_S)
        except SpoolError as exc:
            self._spool_failed("spool_stats_failed", exc)
            return self._gauge_values
        if stats is None:
            return self._gauge_values
        values = (float(stats.records), float(stats.payload_bytes),
                  (stats.oldest_record_ns or 0) / 1e9)
        with self._lock:
            self._gauge_values = values
            lost = stats.corrupt_lost_total - self._corrupt_seen
            self._corrupt_seen = max(self._corrupt_seen, stats.corrupt_lost_total)
        if lost > 0:
            self._metrics.spool_corrupt_lost.inc(lost)
        return values

    def _spool_failed(self, event: str, exc: SpoolError, **extra: object) -> None:
        """A spool operation delivery can do without for now failed: count every one, and
        log `event` (stable: one per kind of operation) at most once per
        SPOOL_ERROR_LOG_INTERVAL_S, with the failures since its last line."""
        self._metrics.spool_errors.inc()
        now = time.monotonic()
        with self._lock:
            failures = self._spool_errors_unlogged.get(event, 0) + 1
            last = self._spool_error_logged_at.get(event)
            if last is not None and now - last < self.SPOOL_ERROR_LOG_INTERVAL_S:
                self._spool_errors_unlogged[event] = failures
                return
            self._spool_error_logged_at[event] = now
            self._spool_errors_unlogged[event] = 0
        log.error(event, extra={"error": str(exc), "failures": failures, **extra})

    # ---- the batch size cap after a 413 (callers hold _lock) ----------------------------------
    def _grown_cap(self, n: int) -> int:
        """The cap after a batch of `n` records was stored: double it, up to the batch size,
        but below a size refused within `refusal_memory_s` only halfway from the largest size
        stored (a bisection: the few 413s it costs find the limit). A refusal that old allows
        one batch of its size: stored, the limit went up and the cap grows on."""
        if self._too_large is not None and n >= self._too_large:
            self._too_large = None  # a batch that large was stored: the limit went up
        self._fits = max(self._fits, n)
        cap = min(self._batch_size, self._size_cap * 2)
        if self._too_large is None:
            return cap
        if time.monotonic() - self._too_large_at >= self._refusal_memory_s:
            return min(cap, self._too_large)
        return min(cap, max(self._fits, (self._fits + self._too_large) // 2))

    def _shrunk_cap(self, n: int) -> int:
        """The cap after the API refused a batch of `n` records as too large: the largest
        size stored since, if smaller, else half of `n`."""
        now = time.monotonic()
        if (self._too_large is None or n <= self._too_large
                or now - self._too_large_at >= self._refusal_memory_s):
            self._too_large, self._too_large_at = n, now
        if self._fits >= n:
            self._fits = 0  # it fit before, not now: bigger records, or a lowered limit
        below = self._fits or n // 2
        return max(1, min(self._size_cap, below))

    def _log_left_behind(self) -> None:
        with self._lock:
            if self._left_logged:
                return
            self._left_logged = True
        try:
            stats = self._spool.stats()
        except SpoolError as exc:
            self._spool_failed("spool_stats_failed", exc)
            return
        if stats.records:
            log.warning("delivery_stopped_with_backlog",
                        extra={"spool_records": stats.records,
                               "hint": "kept on disk; delivered after the next start"})


def _failure_reason(result: PostResult) -> FlushFailureReason:
    """The `reason` label of a failed POST. With no status, the Poster says which (`timeout`:
    the API was reached but did not answer in time; `network`: the connection failed;
    `client_error`); `network` for a result that does not say."""
    if result.reason:
        return result.reason
    if result.status is None:
        return "network"
    if result.status == 429:
        return "throttled"
    if result.status >= 500:
        return "server_error"
    if result.outcome is Outcome.AUTH:
        return "auth"
    if result.outcome is Outcome.REJECT:
        return "rejected"
    if 300 <= result.status < 400:
        return "redirect"  # not followed: API_BASE_URL may be wrong (http for https?)
    return "timeout" if result.status == 408 else "other"
