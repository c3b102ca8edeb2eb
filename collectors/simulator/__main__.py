"""`python -m collectors.simulator EXCHANGE...`: the simulator without the main CLI."""

from __future__ import annotations

import argparse
import sys

from collectors.logsetup import setup_logging
from collectors.simulator.cli import add_arguments, main


def run(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m collectors.simulator",
                                     description="Exchange simulator on loopback.")
    add_arguments(parser)
    args = parser.parse_args(argv)
    setup_logging("warning")
    return main(args)


if __name__ == "__main__":
    sys.exit(run())
