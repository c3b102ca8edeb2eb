"""Exchange simulator: each venue's real WebSocket protocol on loopback, with scriptable faults.

    with Simulator("coinbase", rate_hz=5, seed=1) as sim:
        ws = websocket.create_connection(sim.url)
        ...
        sim.wait_for(10)          # ten tickers written
        sim.go_silent(True)       # connection open, nothing sent

`python -m collectors.simulator coinbase kraken` runs it from the command line.
"""

from __future__ import annotations

from collectors.simulator.core import (
    EXCHANGES,
    ClosedConnection,
    ReceivedMessage,
    Simulator,
    SimulatorError,
)

__all__ = ["EXCHANGES", "ClosedConnection", "ReceivedMessage", "Simulator", "SimulatorError"]
