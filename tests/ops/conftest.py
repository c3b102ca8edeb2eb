"""A real collector stack for the monitoring tests: simulator and ingest API in this process,
`chrono-collector run coinbase` as a subprocess (tests/integration's helper)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from collectors.simulator import Simulator
from tests.integration.conftest import CollectorProcess, collector_process, wait_until
from tests.support.servers import running_ingest


@pytest.fixture
def collector(tmp_path: Path) -> Iterator[CollectorProcess]:
    with Simulator("coinbase", rate_hz=20, seed=3) as sim, running_ingest(tmp_path) as ingest, \
            collector_process(tmp_path, sim.url, ingest.url, ingest.key) as proc:
        # wait until records flowed and one batch was delivered: every family has samples
        assert wait_until(lambda: proc.metric("chrono_collector_records_delivered_total") > 0,
                          15), proc.log_path.read_text()
        yield proc
