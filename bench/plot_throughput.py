"""Bar chart of the Binance `@ticker` throughput results: the collector, the bare
websocket-client ceiling and cryptofeed, all on the same bytes, from the markdown tables the
benchmarks wrote (bench/results/*.md) -> bench/results/throughput.png.

matplotlib is not a project dependency; it runs from the peer's virtualenv:

    /tmp/cf-venv/bin/python bench/plot_throughput.py

Reads: throughput.md (SQLite), throughput-postgres.md and throughput-postgres-c2.md
(`bench/throughput.py --venues binance --backend postgres [--concurrency 2] --name ...`),
ceiling.md, peer_cryptofeed.md and peer_cryptofeed_postgres.md. A missing file leaves its bars
out.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no screen here
import matplotlib.pyplot as plt

RESULTS = Path(__file__).resolve().parent / "results"


def table_rows(name: str) -> list[list[str]]:
    """The data rows of the markdown tables in results/<name>.md (cells, stripped)."""
    path = RESULTS / f"{name}.md"
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and not set(line) <= set("|-: ") and cells[0] != "venue":
            rows.append(cells)
    return rows


def number(cell: str) -> float:
    return float(cell.replace(",", "").rstrip("x"))


def main() -> None:
    bars: list[tuple[str, float, str]] = []  # (label, msgs/s, colour)
    for row in table_rows("ceiling"):
        if row[0] == "binance":
            bars.append(("websocket-client\nrecv + json.loads\n(ceiling)", number(row[1]),
                         "tab:gray"))
    for row in table_rows("peer_cryptofeed"):
        if row and row[0].replace(",", "").isdigit() and len(row) == 5:
            bars.append(("cryptofeed\ncallback only", number(row[2]), "tab:orange"))
    for row in table_rows("peer_cryptofeed_postgres"):
        if row and row[0].replace(",", "").isdigit():
            bars.append(("cryptofeed\n-> its PostgreSQL\nbackend (stored)", number(row[3]),
                         "tab:orange"))
    for name, label in (("throughput", "chrono: received"),):
        for row in table_rows(name):
            if row[0] == "binance":
                bars.append((label, number(row[4]), "tab:blue"))
                bars.append(("chrono: stored\nvia ingest API\n(SQLite)", number(row[5]),
                             "tab:blue"))
    for name, label in (("throughput-postgres", "chrono: stored\nvia ingest API\n(PostgreSQL)"),
                        ("throughput-postgres-c2", "chrono: stored\n(PostgreSQL,\n2 POSTs in "
                                                   "flight)")):
        for row in table_rows(name):
            if row[0] == "binance":
                bars.append((label, number(row[5]), "tab:blue"))

    fig, ax = plt.subplots(figsize=(11, 5))
    xs = range(len(bars))
    ax.bar(xs, [b[1] for b in bars], color=[b[2] for b in bars])
    for x, (_, value, _) in zip(xs, bars, strict=True):
        ax.text(x, value, f"{value / 1000:.1f}k", ha="center", va="bottom", fontsize=9)
    ax.set_xticks(list(xs), [b[0] for b in bars], fontsize=8)
    ax.set_ylabel("tickers per second")
    ax.set_title("Binance @ticker, same bytes from the simulator over loopback "
                 "(bench/throughput.py, ceiling.py, peer_cryptofeed.py)")
    fig.tight_layout()
    out = RESULTS / "throughput.png"
    fig.savefig(out, dpi=100)
    print(out)


if __name__ == "__main__":
    main()
