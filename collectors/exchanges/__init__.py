"""The explicit registry of venues: name -> adapter factory (the adapter gets the worker id)."""

from __future__ import annotations

from collections.abc import Callable

from collectors.exchanges.base import Adapter, Decoder, Kind, Parsed, load_json
from collectors.exchanges.binance import binance, binance_us
from collectors.exchanges.coinbase import CoinbaseAdapter
from collectors.exchanges.kraken import KrakenAdapter

#: name -> factory(worker_id, decode).
REGISTRY: dict[str, Callable[[str, Decoder], Adapter]] = {
    "coinbase": CoinbaseAdapter,
    "binance": binance,
    "binanceus": binance_us,
    "kraken": KrakenAdapter,
}

#: Fixed default metrics ports, one per venue, so several collectors share a host.
DEFAULT_METRICS_PORTS: dict[str, int] = {
    "coinbase": 9101,
    "binance": 9102,
    "binanceus": 9103,
    "kraken": 9104,
}


def known() -> list[str]:
    return sorted(REGISTRY)


def create(name: str, worker_id: str, decode: Decoder = load_json) -> Adapter:
    """The venue's adapter, decoding frames with `decode` (the service passes msgspec's, see
    collectors/decoding.py). Raises KeyError for an unknown venue (callers turn it into a usage
    error)."""
    return REGISTRY[name](worker_id, decode)


__all__ = ["DEFAULT_METRICS_PORTS", "REGISTRY", "Adapter", "Kind", "Parsed", "create", "known"]
