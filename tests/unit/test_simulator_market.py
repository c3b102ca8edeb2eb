"""The simulator's market model: deterministic per seed, internally consistent ticks."""

from __future__ import annotations

from collectors.simulator.market import MarketSpec, MarketState, market_rng

SPEC = MarketSpec(symbol="BTC-USD", price=65000.0, price_decimals=2, trade_size=0.02,
                  daily_volume=12000.0)
NOW = 1_700_000_000_000_000_000


def state(seed: int = 1, spec: MarketSpec = SPEC) -> MarketState:
    return MarketState(spec, market_rng(seed, "coinbase", spec.symbol), NOW)


def test_same_seed_same_price_path_whatever_the_clock() -> None:
    a, b = state(7), state(7)
    path_a = [t.price for t in a.ticks(500, NOW)]
    path_b = [b.tick(NOW + i).price for i in range(500)]
    assert path_a == path_b
    assert [t.price for t in state(8).ticks(500, NOW)] != path_a


def test_ticks_are_consistent() -> None:
    market = state()
    previous = market.current
    assert previous.trade_time_ns < NOW  # the first ticker's trade is older than "now"
    for tick in market.ticks(5000, NOW):
        assert tick.serial == previous.serial + 1
        assert tick.sequence > previous.sequence
        assert tick.trade_id > previous.trade_id
        assert tick.first_trade_id + tick.trade_count - 1 == tick.trade_id
        assert 0 < tick.best_bid < tick.best_ask
        assert tick.best_bid <= tick.price <= tick.best_ask
        assert tick.low_24h <= tick.price <= tick.high_24h
        assert tick.last_size > 0 and tick.volume_24h > 0 and tick.volume_30d > tick.volume_24h
        assert round(tick.price, 2) == tick.price
        assert tick.side in ("buy", "sell")
        previous = tick
    # Mean reversion keeps a long burst near the anchor.
    assert 0.5 * SPEC.price < previous.price < 1.5 * SPEC.price


def test_cheap_market_never_reaches_zero() -> None:
    spec = MarketSpec(symbol="DOGE-USD", price=0.0002, price_decimals=5, trade_size=1000.0,
                      daily_volume=1e8)
    for tick in state(3, spec).ticks(2000, NOW):
        assert tick.price >= 0.00001
        assert tick.best_bid < tick.best_ask
