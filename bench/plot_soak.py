"""Plot bench/results/soak.csv (from bench/soak.py) as bench/results/soak.png.

matplotlib is not a project dependency; it runs from the peer's virtualenv:

    /tmp/cf-venv/bin/pip install matplotlib
    /tmp/cf-venv/bin/python bench/plot_soak.py [--name soak]
"""

from __future__ import annotations

import argparse
import csv
import itertools
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no screen here
import matplotlib.pyplot as plt

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--name", default="soak")
    args = parser.parse_args()
    with (RESULTS / f"{args.name}.csv").open() as f:
        rows = [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]
    minutes = [r["t_s"] / 60 for r in rows]
    cpu_pct = [0.0] + [(b["cpu_s"] - a["cpu_s"]) / (b["t_s"] - a["t_s"]) * 100
                       for a, b in itertools.pairwise(rows)]
    backlog = [r["sent"] - r["stored"] for r in rows]

    fig, axes = plt.subplots(3, 1, figsize=(9, 8), sharex=True)
    rss = [r["rss_mb"] for r in rows]
    axes[0].plot(minutes, rss, color="tab:blue")
    axes[0].set_ylabel("RSS (MB)")
    axes[0].set_ylim(0, max(rss) * 1.25)  # a flat line at the top edge would be hidden
    axes[1].plot(minutes, cpu_pct, color="tab:orange", linewidth=0.8)
    axes[1].set_ylabel("CPU (% of a core)")
    axes[1].set_ylim(bottom=0)
    axes[2].plot(minutes, backlog, color="tab:green", linewidth=0.8)
    axes[2].set_ylabel("sent - stored (records)")
    axes[2].set_xlabel("minutes")
    fig.suptitle("chrono-collector soak: Coinbase, 5 symbols (bench/soak.py)")
    fig.tight_layout()
    out = RESULTS / f"{args.name}.png"
    fig.savefig(out, dpi=100)
    print(out)


if __name__ == "__main__":
    main()
