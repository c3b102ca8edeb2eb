"""The explicit registry of venues: name -> adapter factory (the adapter gets the worker id)."""

from __future__ import annotations

from collections.abc import Callable

from collectors.exchanges.base import Adapter, Kind, Parsed
from collectors.exchanges.binance import binance, binance_us
from collectors.exchanges.coinbase import CoinbaseAdapter
from collectors.exchanges.kraken import KrakenAdapter

REGISTRY: dict[str, Callable[[str], Adapter]] = {
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


def create(name: str, worker_id: str) -> Adapter:
    """Raises KeyError for an unknown venue (callers turn it into a usage error)."""
    return REGISTRY[name](worker_id)


__all__ = ["DEFAULT_METRICS_PORTS", "REGISTRY", "Adapter", "Kind", "Parsed", "create", "known"]
