"""Every registered adapter, fed anything, returns valid records or raises ParseError; nothing else,
with either JSON decoder (the standard library's default and the service's msgspec one).

Also checks the dependency rule of `collectors/exchanges/*`: standard library, `collectors.model`,
`collectors.errors` and `collectors.exchanges.*` only.
"""

from __future__ import annotations

import ast
import copy
import json
import math
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import collectors.exchanges
from collectors.decoding import decode_frame
from collectors.errors import ParseError
from collectors.exchanges import REGISTRY
from collectors.exchanges import create as make_adapter
from collectors.exchanges.base import Adapter, Kind, Parsed
from collectors.model import PriceFeed, canonical_symbol_ok, parse_iso

FIXTURES = Path(__file__).parents[1] / "fixtures"
# "coinbase" uses the adapters' stdlib decoder, "coinbase+msgspec" the service's decoder.
VENUES = sorted(REGISTRY) + [f"{v}+msgspec" for v in sorted(REGISTRY)]
SETTINGS = settings(max_examples=250, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])
RECEIVED = st.integers(min_value=1_500_000_000 * 10**9, max_value=1_900_000_000 * 10**9)


def create(venue: str, worker_id: str) -> Adapter:
    name, _, decoder = venue.partition("+")
    if decoder:
        return make_adapter(name, worker_id, decode_frame)
    return make_adapter(name, worker_id)


def _fixture_cases(venue: str) -> list[tuple[object, int]]:
    """(decoded frame, received_ns) of every golden case of the venue."""
    path = FIXTURES / venue.partition("+")[0] / "cases.jsonl"
    out: list[tuple[object, int]] = []
    for line in path.read_text().splitlines():
        if line.strip():
            case = json.loads(line)
            frame = case["frame"]
            out.append((json.loads(frame) if isinstance(frame, str) else frame,
                        int(case["received_ns"])))
    return out


# Words the venues use, so that arbitrary documents reach the interesting branches.
WORDS = ["ticker", "heartbeat", "status", "subscribe", "subscriptions", "pong", "error", "update",
         "snapshot", "24hrTicker", "serverShutdown", "btcusdt@ticker", "BTCUSDT", "BTCUSD",
         "BTC/USD", "XBT/USD", "BTC-USD", "online", "maintenance", "0", "-1", "1e400", "NaN",
         "0.1", "2024-05-15T11:20:43.013486Z", "1970-01-01T00:00:00Z", ""]
KEYS = ["type", "channel", "method", "stream", "data", "e", "E", "s", "c", "p", "v", "b", "P",
        "n", "F", "price", "product_id", "volume_24h", "sequence", "time", "symbol", "last",
        "volume", "timestamp", "bid", "change", "result", "id", "error", "code", "msg", "success",
        "event", "system", "reason", "message", "channels", "product_ids", "name"]
SCALARS = (st.none() | st.booleans() | st.integers() | st.integers(-(10**400), 10**400)
           | st.floats() | st.text(max_size=30) | st.sampled_from(WORDS)
           | st.integers(1_000_000_000_000, 2_000_000_000_000))
JSON = st.recursive(
    SCALARS,
    lambda inner: (st.lists(inner, max_size=4)
                   | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=8), inner,
                                     max_size=6)),
    max_leaves=25,
)
# Values that have broken parsers: out-of-range and non-finite numbers, wrong types, placeholders.
EDGE: list[object] = [None, True, False, 0, -1, 0.0, -0.0, 1e-320, 1.7976931348623157e308,
                      10**400, -(10**400), 2**63, "", "0", "-1", "abc", "NaN", "Infinity",
                      "1e400", "1_000", " 1 ", "0001-01-01T00:00:00Z", "1970-01-01T00:00:00Z",
                      "9999-12-31T23:59:59Z", "x" * 500, [], {}, [1], {"a": 1}]
REPLACEMENT = st.sampled_from(EDGE) | JSON


def _paths(doc: object, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    yield prefix
    if isinstance(doc, dict):
        for key, value in doc.items():
            yield from _paths(value, (*prefix, key))
    elif isinstance(doc, list):
        for index, value in enumerate(doc):
            yield from _paths(value, (*prefix, index))


@st.composite
def mutated(draw: st.DrawFn, cases: list[tuple[object, int]]) -> tuple[str, int]:
    """A real fixture frame with 1-3 fields deleted or replaced by arbitrary JSON."""
    frame, received_ns = draw(st.sampled_from(cases))
    doc: Any = copy.deepcopy(frame)
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(list(_paths(doc))))
        delete = bool(path) and draw(st.booleans())
        doc = _mutate(doc, path, _DELETE if delete else draw(REPLACEMENT))
    return json.dumps(doc), received_ns


def _check(parsed: object) -> None:
    assert isinstance(parsed, Parsed)
    assert isinstance(parsed.kind, Kind)
    assert all(isinstance(x, str) for x in (*parsed.rejected, *parsed.subscribed,
                                            *parsed.invalid))
    for rec in parsed.records:
        assert isinstance(rec, PriceFeed)
        assert canonical_symbol_ok(rec.symbol), rec.symbol
        assert isinstance(rec.price, float) and math.isfinite(rec.price) and rec.price > 0
        assert rec.volume is None or (isinstance(rec.volume, float)
                                      and math.isfinite(rec.volume) and rec.volume >= 0)
        parse_iso(rec.timestamp)
        received_at = rec.metadata["received_at"]
        assert isinstance(received_at, str)
        parse_iso(received_at)
        assert rec.metadata["timestamp_source"] in ("exchange", "local")
        for value in rec.metadata.values():
            assert isinstance(value, float | int | str | bool)
        json.dumps(rec.to_json_dict(), allow_nan=False)  # the record is valid JSON


def _parse_all(adapter: Adapter, frames: list[tuple[str | bytes, int]]) -> None:
    for frame, received_ns in frames:
        try:
            parsed = adapter.parse(frame, received_ns)
        except ParseError:
            continue
        _check(parsed)


@pytest.mark.parametrize("venue", VENUES)
def test_every_adapter_has_golden_fixtures(venue: str) -> None:
    assert len(_fixture_cases(venue)) >= 5


@pytest.mark.parametrize("venue", VENUES)
@SETTINGS
@given(frame=st.text() | st.binary(), received_ns=RECEIVED)
def test_arbitrary_text_and_bytes(venue: str, frame: str | bytes, received_ns: int) -> None:
    _parse_all(create(venue, "w"), [(frame, received_ns)])


@pytest.mark.parametrize("venue", VENUES)
@SETTINGS
@given(docs=st.lists(JSON, min_size=1, max_size=3), received_ns=RECEIVED)
def test_arbitrary_json_values(venue: str, docs: list[object], received_ns: int) -> None:
    _parse_all(create(venue, "w"), [(json.dumps(doc), received_ns) for doc in docs])


@pytest.mark.parametrize("venue", VENUES)
@SETTINGS
@given(data=st.data())
def test_mutated_real_frames(venue: str, data: st.DataObject) -> None:
    cases = _fixture_cases(venue)
    # Several frames through one adapter, so that per-symbol state (dedup) is exercised too.
    frames = data.draw(st.lists(mutated(cases), min_size=1, max_size=3))
    _parse_all(create(venue, "w"), list(frames))


_DELETE = object()


def _mutate(frame: object, path: tuple[Any, ...], value: object) -> object:
    """A copy of `frame` with the field at `path` replaced by `value` (or deleted: `_DELETE`)."""
    if not path:
        return value
    doc: Any = copy.deepcopy(frame)
    parent = doc
    for step in path[:-1]:
        parent = parent[step]
    if value is _DELETE:
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    return doc


@pytest.mark.parametrize("venue", VENUES)
def test_every_field_of_every_real_frame_deleted_or_replaced_by_edge_values(venue: str) -> None:
    """Exhaustive single-field mutation: each path of each fixture frame, each edge value."""
    for frame, received_ns in _fixture_cases(venue):
        for path in _paths(frame):
            for value in [*EDGE, _DELETE] if path else EDGE:
                doc = _mutate(frame, path, value)
                # The real frame first, so that stateful adapters also see a possible duplicate.
                _parse_all(create(venue, "w"), [(json.dumps(frame), received_ns),
                                                (json.dumps(doc), received_ns)])


# ---- shaped decoding -----------------------------------------------------------------------------
# With the service's decoder, adapters decode their tickers straight into a typed shape. It must
# change nothing: same records (byte for byte), same Parsed, same ParseError text as the generic
# path, which an adapter takes when its decoder is a plain function.

def _generic_msgspec(frame: str | bytes) -> object:
    """The service's decoder without its shapes."""
    return decode_frame(frame)


def _outcomes(venue: str, decode: Any, frames: list[tuple[str, int]]) -> list[object]:
    adapter = make_adapter(venue, "w", decode)
    out: list[object] = []
    for frame, received_ns in frames:
        try:
            parsed = adapter.parse(frame, received_ns)
        except ParseError as exc:
            out.append(("ParseError", str(exc)))
            continue
        records = [(json.dumps(r.to_json_dict()), r.exchange_ns, r.received_ns)
                   for r in parsed.records]
        out.append((parsed.kind, records, parsed.duplicates, parsed.rejected, parsed.error,
                    parsed.reconnect, parsed.subscribed, parsed.invalid))
    return out


def _same_with_and_without_shapes(venue: str, frames: list[tuple[str, int]]) -> None:
    assert (_outcomes(venue, decode_frame, frames)
            == _outcomes(venue, _generic_msgspec, frames)), frames


# Decimal strings that msgspec and float() might read differently, and other number edges.
NUMBER_EDGE: list[object] = ["-0", "-0.0", "0.0", "0.00000000", "-0e3", "00", "1.", ".5", "+1",
                             "1E5", "null", "true", "1e-400", "-1e-400", "4.9e-324",
                             "18446744073709551617", -0.0, 5e-324, 2**64 + 1, 10**30, *EDGE]


@pytest.mark.parametrize("venue", sorted(REGISTRY))
@SETTINGS
@given(data=st.data())
def test_shaped_decoding_changes_nothing_on_mutated_frames(venue: str,
                                                          data: st.DataObject) -> None:
    frames = data.draw(st.lists(mutated(_fixture_cases(venue)), min_size=1, max_size=3))
    _same_with_and_without_shapes(venue, frames)


@pytest.mark.parametrize("venue", sorted(REGISTRY))
def test_shaped_decoding_changes_nothing_on_single_field_edits(venue: str) -> None:
    for frame, received_ns in _fixture_cases(venue):
        real = (json.dumps(frame), received_ns)
        for path in _paths(frame):
            for value in [*NUMBER_EDGE, _DELETE] if path else EDGE:
                _same_with_and_without_shapes(
                    venue, [real, (json.dumps(_mutate(frame, path, value)), received_ns)])


@pytest.mark.parametrize("venue", sorted(REGISTRY))
def test_real_tickers_take_the_shaped_path(venue: str) -> None:
    """The equivalence above is about the path the service's tickers really take."""
    adapter: Any = make_adapter(venue, "w", decode_frame)
    shaped = [frame for frame, _ in _fixture_cases(venue)
              if adapter._typed(json.dumps(frame)) is not None]
    assert len(shaped) >= 2


# ---- dependency rule -----------------------------------------------------------------------------

ALLOWED_PREFIXES = ("collectors.model", "collectors.errors", "collectors.exchanges")


def _imports(path: Path) -> Iterator[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: inside collectors.exchanges
                yield "collectors.exchanges." + (node.module or "")
            else:
                assert node.module is not None
                yield node.module


EXCHANGE_MODULES = sorted(Path(collectors.exchanges.__file__).parent.glob("*.py"))


@pytest.mark.parametrize("path", EXCHANGE_MODULES, ids=[p.name for p in EXCHANGE_MODULES])
def test_exchange_modules_import_only_stdlib_model_errors_and_exchanges(path: Path) -> None:
    bad = [name for name in _imports(path)
           if name.split(".")[0] not in sys.stdlib_module_names
           and not any(name == p or name.startswith(p + ".") for p in ALLOWED_PREFIXES)]
    assert not bad, f"{path.name} imports {bad}"


def test_the_boundary_check_sees_every_module() -> None:
    names = {p.name for p in EXCHANGE_MODULES}
    assert {"base.py", "binance.py", "coinbase.py", "kraken.py", "__init__.py"} <= names
