"""The parser thread: frames -> adapter -> records -> spool, metrics, subscription control,
freshness.

It is the only caller of the adapter. It takes every frame waiting in the hand-off queue at once,
parses the chunk and hands its records to a sink in one call: in the service the spool writer,
which commits them on this thread before the next chunk is taken (so a busy feed is committed
in bigger chunks, and no parsed record waits in memory). Metric updates are aggregated per
chunk, so per-message cost stays low at high rates.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter as TallyCounter
from collections import deque
from collections.abc import Sequence
from typing import Protocol

from collectors.backoff import Backoff
from collectors.batching import Handoff
from collectors.connection import Connection, Frame, RetiredFrame
from collectors.errors import ParseError
from collectors.exchanges.base import Adapter, Kind
from collectors.logsetup import LOG_SAMPLE_INTERVAL_S, LOG_SAMPLE_KINDS, LogSampler
from collectors.metrics import Metrics
from collectors.model import PriceFeed

log = logging.getLogger(__name__)

#: A subscribed symbol that has never produced data after this long is reported by name (Binance
#: silently sends nothing for an unknown stream).
FIRST_DATA_TIMEOUT_S = 30.0
PARSE_ERROR_LOG_INTERVAL_S = LOG_SAMPLE_INTERVAL_S
#: Distinct parse-error reasons logged per interval (each at most once); past this they are
#: only counted, so hostile input cannot flood the log. Venue error messages are held to the
#: same limits.
PARSE_ERROR_LOG_REASONS = LOG_SAMPLE_KINDS
PARSE_CHUNK_MAX = 2000
#: A subscribe request the venue has not answered (an ack, a refusal, or data for the symbol)
#: this long after it was sent is sent again, after the subscribe backoff (Kraken advises a
#: deadline timer of about 5 s); SUBSCRIBE_UNANSWERED_RECONNECT unanswered in a row replace
#: the connection.
SUBSCRIBE_ANSWER_DEADLINE_S = 10.0
SUBSCRIBE_UNANSWERED_RECONNECT = 3
#: How long the parser sleeps with no frames: a frame wakes it at once, and so does the end of
#: the connection thread (the service closes the frame queue), so this only paces the per-second
#: freshness check of a silent feed.
IDLE_WAIT_S = 1.0


class RecordSink(Protocol):
    """Where the parser puts each chunk's records: the spool writer, or a `Handoff` queue."""

    def put_many_waiting(self, items: list[PriceFeed], stop: threading.Event) -> int:
        """Take `items`, waiting as long as needed; how many were not taken (only once `stop`
        is set)."""
        ...


class Freshness:
    """Per-symbol last-data times; reports symbols going stale and coming back (pure, no I/O).

    Times are read on a clock that runs only while a connection is up: a symbol is stale after
    `stale_after_s` connected seconds without data, and one that never had data is named after
    FIRST_DATA_TIMEOUT_S connected seconds, whether they came in one connection or in many. A
    window restarted by every new connection never ended when each lasted less than it (a venue
    that voids the subscribe and goes silent: the liveness timeout replaced the connection every
    10 s, and symbols that never had data were never named), and an outage must not make every
    symbol look stale at once when the connection comes back.
    """

    def __init__(self, symbols: Sequence[str], stale_after_s: float, now: float) -> None:
        self.stale_after_s = stale_after_s
        self._connected_s = 0.0  # connected seconds counted up to `_counted_at`
        # When the connected time was last counted (watching starts as if connected, until the
        # first check says otherwise); None while no connection is up.
        self._counted_at: float | None = now
        # Per symbol: the connected clock at its last data (None: none yet).
        self.last: dict[str, float | None] = dict.fromkeys(symbols)
        self.stale: set[str] = set()

    def clock(self, now: float) -> float:
        """Connected seconds since watching started, at monotonic time `now`."""
        counted_at = self._counted_at
        if counted_at is None:
            return self._connected_s
        return self._connected_s + max(0.0, now - counted_at)

    def seen(self, symbol: str, now: float) -> bool:
        """Record data for a symbol; True when it was stale until now."""
        if symbol not in self.last:
            return False
        self.last[symbol] = self.clock(now)
        if symbol in self.stale:
            self.stale.discard(symbol)
            return True
        return False

    def forget(self, symbol: str) -> None:
        self.last.pop(symbol, None)
        self.stale.discard(symbol)

    def check(self, now: float, connected_since: float | None = 0.0
              ) -> tuple[list[str], list[str]]:
        """(newly stale symbols that had data, newly stale symbols that never had any), given
        when the current connection came up (monotonic; None: none is up, and nothing is
        reported, the clock stops). Called about once a second."""
        counted_at = self._counted_at
        if connected_since is None:
            self._counted_at = None  # the time since the last check is not counted
            return [], []
        if counted_at is None or counted_at < connected_since:
            counted_at = connected_since  # a new connection: count from when it came up
        self._connected_s += max(0.0, now - counted_at)
        self._counted_at = now
        clock = self._connected_s
        first_data_s = min(FIRST_DATA_TIMEOUT_S, self.stale_after_s)
        quiet: list[str] = []
        never: list[str] = []
        for symbol, last in self.last.items():
            if symbol in self.stale:
                continue
            if last is None:
                if clock > first_data_s:
                    never.append(symbol)
            elif clock - last > self.stale_after_s:
                quiet.append(symbol)
        self.stale.update(quiet)
        self.stale.update(never)
        return quiet, never


class Parser:
    """Runs on the `parse-<exchange>` thread until the connection thread has stopped and the
    frame queue is empty."""

    def __init__(self, adapter: Adapter, frames: Handoff[Frame], records: RecordSink,
                 connection: Connection, metrics: Metrics, ws_finished: threading.Event,
                 stop: threading.Event | None = None) -> None:
        self._adapter = adapter
        self._frames = frames
        self._records = records
        self._conn = connection
        self._metrics = metrics
        self._ws_finished = ws_finished
        self._stop = stop or threading.Event()
        now = time.monotonic()
        self.freshness = Freshness(connection.symbols, adapter.symbol_stale_after_s, now)
        # The symbols subscribed: a record for any other (a venue's mistake, or a hostile one)
        # is dropped, not delivered, and never becomes a metric series of its own.
        self._wanted = frozenset(connection.symbols)
        self._last_unwanted_log = 0.0
        self._kind_counters = {k: metrics.messages_counter(k.value) for k in Kind}
        self._parse_log = LogSampler()   # parse_failed lines
        self._venue_log = LogSampler()   # venue_error lines (a venue's own texts)
        self._status_log = LogSampler()  # venue_status lines (each new status at once)
        self._rate_window: deque[tuple[float, int]] = deque(maxlen=16)
        # Paces subscribes sent again after a venue refused one for a passing reason.
        self._subscribe_backoff = Backoff(base_s=1.0, cap_s=60.0)
        # When the resubscribe last asked for goes out (monotonic): refusals until then are
        # the same event (Kraken acks each symbol of one subscribe on its own).
        self._resubscribe_due = 0.0
        # Whether the venue answers each subscribe (`_check_subscribe_answered`). Per symbol,
        # the frame (its place in the queue, `taken_total` counting) that last answered it: an
        # ack, a refusal, a record.
        self._answered_at: dict[str, int] = {}
        # Per symbol, the subscribe already judged (its `SubscribeSent.frame`).
        self._judged: dict[str, int] = {}
        # Per symbol, (its subscribe's frame, the queue's put_total when its deadline was
        # first seen passed): judged once the parser has taken that many frames.
        self._deadline_marks: dict[str, tuple[int, int]] = {}
        self._judged_session = -1  # the connection judged (`Connection.session`)
        self._unanswered = 0  # checks in a row that found a symbol unanswered
        self.records_total = 0
        # Records the spool refused while stopping: the first chunk's said at once, the rest
        # added up here and said when the loop ends.
        self._unspooled_said = False
        self._unspooled = 0
        self.last_message_unix: float | None = None
        self.beat = time.monotonic()  # last loop turn (watchdog progress)
        # The freshness clock when a reconnect was last asked for because every symbol was
        # stale (None: not all are).
        self._all_stale_at: float | None = None

    def records_per_s(self) -> float:
        """Records/s over the last ~15 s, up to now (for /healthz and `status`): a parser held
        up (a spool refusing writes) shows its rate falling, not the last one it saw."""
        window = list(self._rate_window)
        if not window:
            return 0.0
        t0, n0 = window[0]
        t1, n1 = time.monotonic(), self.records_total
        return (n1 - n0) / (t1 - t0) if t1 > t0 else 0.0

    def run(self) -> None:
        last_check = 0.0
        while True:
            self.beat = time.monotonic()
            ws_done = self._ws_finished.is_set()
            # Bounded chunks: a backlog of frames is parsed and spooled a slice at a time, so
            # parsed records (far bigger than their frames) never pile up in memory.
            chunk = self._frames.get_all(timeout_s=IDLE_WAIT_S, max_items=PARSE_CHUNK_MAX)
            if chunk:
                # (its first frame's place in the queue: the connection tells which frames
                # came from a connection already replaced)
                self._handle(chunk, self._frames.taken_total - len(chunk))
            now = time.monotonic()
            if now - last_check >= 1.0:
                last_check = now
                self._periodic(now)
            if ws_done and not chunk and not len(self._frames):
                if self._unspooled:
                    log.error("records_dropped_unspooled", extra={
                        "dropped": self._unspooled, "after_the_first": True,
                        "reason": "stopping while the spool refuses writes"})
                return

    def _handle(self, chunk: list[Frame], first_index: int | None = None) -> None:
        """Parse `chunk`, whose first frame is the queue's `first_index`-th (`taken_total`
        counting; None: unknown, for a chunk not taken from the queue, and then no frame
        answers a subscribe or is told apart from an earlier connection's)."""
        adapter, metrics = self._adapter, self._metrics
        parse = adapter.parse
        wanted = self._wanted
        answered = self._answered_at
        kinds: dict[Kind, int] = {}
        out: list[PriceFeed] = []
        duplicates = 0
        parse_errors = 0
        for i, frame in enumerate(chunk):
            payload, received_ns = frame
            try:
                parsed = parse(payload, received_ns)
            except ParseError as exc:
                parse_errors += 1
                self._log_parse_error(exc, payload)
                continue
            kind = parsed.kind
            kinds[kind] = kinds.get(kind, 0) + 1
            if parsed.records:
                out.extend(parsed.records)
                if first_index is not None and type(frame) is not RetiredFrame:
                    # Data answers a subscribe too: at the frame it came in (an earlier
                    # connection's, or the one being handed over, answers none of this one).
                    index = first_index + i
                    for rec in parsed.records:
                        if rec.symbol in wanted:
                            answered[rec.symbol] = index
            if parsed.duplicates:
                duplicates += parsed.duplicates
            if parsed.invalid:  # items skipped inside an otherwise good message
                parse_errors += len(parsed.invalid)
                for reason in parsed.invalid:
                    self._log_parse_error(ParseError(reason), payload)
            retry = parsed.retry_subscribe
            if first_index is not None and (parsed.subscribed or parsed.rejected
                                            or retry is not None):
                # (a refusal naming no symbol answers them all: it is retried for them all)
                self._mark_answered(first_index + i, parsed.subscribed, parsed.rejected,
                               (retry or tuple(wanted)) if retry is not None else ())
            if retry is not None:
                self._retry_subscribe(parsed.error, retry)
            elif kind is Kind.ERROR or parsed.rejected:
                self._venue_error(parsed.error, parsed.rejected)
            elif kind is Kind.SUBSCRIBED and not parsed.error:
                # (not "already subscribed": a failure that keeps coming back, named or not,
                # must meet a growing backoff)
                self._subscribe_backoff.reset()
            elif kind is Kind.STATUS and parsed.error:
                self._log_venue_status(parsed.error)
            if parsed.reconnect:  # (not for a connection being handed over already)
                self._conn.request_reconnect(
                    "server_shutdown", retired=type(frame) is RetiredFrame,
                    frame_index=None if first_index is None else first_index + i)
        per_symbol = TallyCounter(rec.symbol for rec in out)
        if not per_symbol.keys() <= self._wanted:
            parsed_records = len(out)
            out = self._drop_unwanted(out, per_symbol)
            parse_errors += parsed_records - len(out)
        if out:
            self._conn.data_seen()
            # Backpressure: wait for the spool rather than drop. Frames queue up in front of us
            # meanwhile (bounded in bytes; the ws thread pauses reading when they fill it).
            not_taken = self._records.put_many_waiting(out, self._stop)
            if not_taken:  # stopping while the spool refuses writes (e.g. disk full)
                metrics.queue_dropped.inc(not_taken)
                if not self._unspooled_said:
                    # Said at once (the stop may not wait for this thread: a spool that hangs
                    # holds it); later chunks' in one more line when the loop ends.
                    self._unspooled_said = True
                    log.error("records_dropped_unspooled", extra={
                        "dropped": not_taken,
                        "reason": "stopping while the spool refuses writes"})
                else:
                    self._unspooled += not_taken
            self._record_metrics(out, per_symbol)
        for kind, n in kinds.items():
            self._kind_counters[kind].inc(n)
        if duplicates:
            metrics.duplicates.inc(duplicates)
        if parse_errors:
            metrics.parse_errors.inc(parse_errors)
        self.records_total += len(out)
        self.last_message_unix = chunk[-1][1] / 1e9

    def _drop_unwanted(self, records: list[PriceFeed],
                       per_symbol: TallyCounter[str]) -> list[PriceFeed]:
        """`records` without those of symbols not subscribed (counted as parse errors, logged
        at most every PARSE_ERROR_LOG_INTERVAL_S); `per_symbol` loses them too."""
        unwanted = sorted(per_symbol.keys() - self._wanted)
        now = time.monotonic()
        if now - self._last_unwanted_log >= PARSE_ERROR_LOG_INTERVAL_S:
            self._last_unwanted_log = now
            log.warning("unsubscribed_symbol_dropped", extra={
                "symbols": unwanted[:5], "records": sum(per_symbol[s] for s in unwanted)})
        for symbol in unwanted:
            del per_symbol[symbol]
        wanted = self._wanted
        return [rec for rec in records if rec.symbol in wanted]

    def _record_metrics(self, records: list[PriceFeed], per_symbol: TallyCounter[str]) -> None:
        """Per-symbol counters, last-record times and freshness, and the lag histogram: once
        per symbol and once per chunk, not once per record."""
        metrics, now = self._metrics, time.monotonic()
        last_received = {rec.symbol: rec.received_ns for rec in records}
        metrics.lag.observe_many([max(0.0, (rec.received_ns - rec.exchange_ns) / 1e9)
                                  for rec in records if rec.exchange_ns])
        for symbol, n in per_symbol.items():
            counter, gauge = metrics.symbol_children(symbol)
            counter.inc(n)
            gauge.set(last_received[symbol] / 1e9)
            if self.freshness.seen(symbol, now):
                log.info("symbol_fresh", extra={"symbol": symbol})
                metrics.set_stale(symbol, False)

    def _venue_error(self, error: str | None, rejected: tuple[str, ...]) -> None:
        active = self._conn.symbols
        bad = [s for s in rejected if s in active]
        if not bad:
            self._log_venue_error(error)
            return
        for symbol in bad:
            self._metrics.subscription_error(symbol)
            self._metrics.symbol_rejected(symbol)
            self.freshness.forget(symbol)
        remaining = [s for s in active if s not in bad]
        self._wanted = frozenset(remaining)
        log.error("symbol_rejected", extra={
            "symbols": bad, "error": error, "remaining": remaining,
            "hint": "the venue does not list these markets; fix SYMBOLS"})
        self._conn.replace_symbols(remaining,
                                   resubscribe=self._adapter.resubscribe_after_reject)

    def _retry_subscribe(self, error: str | None, named: tuple[str, ...],
                         session: int | None = None) -> None:
        """The venue refused a subscribe for a passing reason (or never answered it): send it
        again after a backoff (the named symbols, or every symbol when it named none;
        resending one already subscribed is harmless), on connection `session` only when
        given."""
        active = self._conn.symbols
        symbols = [s for s in named if s in active] if named else active
        if not symbols:
            self._log_venue_error(error)
            return
        now = time.monotonic()
        if now < self._resubscribe_due:
            # Another refusal of the subscribe already being retried: its symbols join that
            # retry, at its time (one backoff step and one log line per refused subscribe,
            # not per symbol refused).
            self._conn.request_resubscribe(symbols, after_s=self._resubscribe_due - now,
                                           session=session)
            return
        delay = self._subscribe_backoff.next_delay()
        self._resubscribe_due = now + delay
        log.warning("subscribe_retry", extra={"symbols": symbols, "error": error,
                                              "retry_in_s": round(delay, 2)})
        self._conn.request_resubscribe(symbols, after_s=delay, session=session)

    def _mark_answered(self, index: int, *named: tuple[str, ...]) -> None:
        wanted = self._wanted  # (a venue naming other symbols must not grow the dict)
        for symbols in named:
            for symbol in symbols:
                if symbol in wanted:
                    self._answered_at[symbol] = index

    def _check_subscribe_answered(self) -> None:
        """Send again, for each symbol, a subscribe the venue has not answered (no ack, no
        refusal, no data) within SUBSCRIBE_ANSWER_DEADLINE_S, and replace the connection after
        SUBSCRIBE_UNANSWERED_RECONNECT checks in a row found one: heartbeats keep a connection
        alive whose subscribe was lost, and it would deliver nothing for good. Each symbol's
        latest subscribe on the current connection is judged once, while that connection is
        up, and only when every frame queued by its deadline has been parsed; what it asks
        for is for that connection only."""
        conn = self._conn
        if conn.connected_since is None:
            return
        session, sent = conn.subscribe_sent()
        if session != self._judged_session:
            self._judged_session, self._judged, self._unanswered = session, {}, 0
            self._deadline_marks = {}
        if not sent:
            return
        now = time.monotonic()
        deadline_s = SUBSCRIBE_ANSWER_DEADLINE_S
        judged, answered, marks = self._judged, self._answered_at, self._deadline_marks
        taken = self._frames.taken_total
        active = set(conn.symbols)
        missing: list[str] = []
        judged_now = 0
        waited_s = 0.0
        for symbol, sub in sent.items():
            if now - sub.at < deadline_s or judged.get(symbol) == sub.frame:
                continue
            # Its deadline has passed: judged once every frame queued by now is parsed (a
            # backlog is not an unanswered request).
            mark = marks.get(symbol)
            if mark is None or mark[0] != sub.frame:
                mark = marks[symbol] = (sub.frame, self._frames.put_total)
            if taken < mark[1]:
                continue
            judged[symbol] = sub.frame
            judged_now += 1
            if symbol in active and answered.get(symbol, -1) < sub.frame:
                missing.append(symbol)
                waited_s = max(waited_s, now - sub.at)
        if not missing:
            if judged_now:
                self._unanswered = 0
            return
        self._unanswered += 1
        if self._unanswered >= SUBSCRIBE_UNANSWERED_RECONNECT:
            self._unanswered = 0
            log.warning("subscribe_unanswered", extra={
                "symbols": missing[:20], "waited_s": round(waited_s, 1),
                "action": "reconnecting"})
            conn.request_reconnect("subscribe_unanswered", session=session)
            return
        self._retry_subscribe(f"no answer to the subscribe within {waited_s:.0f} s",
                              tuple(missing), session=session)

    def _periodic(self, now: float) -> None:
        self._rate_window.append((now, self.records_total))
        self._check_subscribe_answered()
        # No connection: staleness is the connection's problem, not the symbols' (nothing is
        # reported, and the freshness clock stops).
        quiet, never = self.freshness.check(now, self._conn.connected_since)
        for symbol in quiet:
            self._metrics.set_stale(symbol, True)
            log.warning("symbol_stale", extra={"symbol": symbol,
                                               "threshold_s": self.freshness.stale_after_s})
        for symbol in never:
            self._metrics.set_stale(symbol, True)
            self._metrics.subscription_error(symbol)
            log.error("symbol_no_data", extra={
                "symbol": symbol, "waited_s": FIRST_DATA_TIMEOUT_S,
                "hint": "subscribed but the venue sent nothing for it: is the market listed?"})
        self._maybe_reconnect_all_stale(now)

    def _maybe_reconnect_all_stale(self, now: float) -> None:
        """Every subscribed symbol stale while the connection stays up (its pongs still
        arrive), on a venue that pushes tickers on a clock (`reconnect_when_all_stale`): the
        stream is stuck, and only a new connection can mend that, so ask for one (the
        connection's backoff paces them while none delivers). Once per `stale_after_s` of
        connected time while nothing comes back."""
        freshness = self.freshness
        watched = freshness.last.keys()
        if (not self._adapter.reconnect_when_all_stale or not watched
                or not freshness.stale >= watched):
            self._all_stale_at = None
            return
        clock = freshness.clock(now)
        if self._all_stale_at is not None and clock - self._all_stale_at < freshness.stale_after_s:
            return
        self._all_stale_at = clock
        log.warning("all_symbols_stale", extra={
            "symbols": sorted(watched), "threshold_s": freshness.stale_after_s,
            "action": "reconnecting"})
        self._conn.request_reconnect("all_symbols_stale")

    def _log_parse_error(self, exc: ParseError, payload: bytes) -> None:
        """Log the error with its reason, once per PARSE_ERROR_LOG_INTERVAL_S per kind of
        reason (the reason with its quoted values and numbers masked), so a flood of one
        defect does not hide another; `since_last_log` counts the ones of its kind not logged."""
        error = str(exc)
        not_logged = self._parse_log.admit(error, time.monotonic())
        if not_logged is None:
            return  # counted in parse_errors_total, like every other
        log.warning("parse_failed", extra={"error": error,
                                           "sample": payload[:200].decode("utf-8", "replace"),
                                           "frame_bytes": len(payload),
                                           "since_last_log": not_logged})

    def _log_venue_status(self, status: str) -> None:
        """A venue's system status other than online (Kraken's `maintenance`, `cancel_only`,
        ...), sampled like its errors: a new status is said at once, a repeated one (a venue,
        or a hostile peer, may repeat it every frame) once per interval."""
        not_logged = self._status_log.admit(status, time.monotonic())
        if not_logged is not None:
            log.warning("venue_status", extra={"status": status, "since_last_log": not_logged})

    def _log_venue_error(self, error: str | None) -> None:
        """An error message from the venue, sampled like parse errors: the venue writes the
        text, so it may be a new one every time (each is counted in
        messages_received_total{kind="error"} when the adapter classed the frame an error)."""
        not_logged = self._venue_log.admit(error or "", time.monotonic())
        if not_logged is not None:
            log.error("venue_error", extra={"error": error, "since_last_log": not_logged})
