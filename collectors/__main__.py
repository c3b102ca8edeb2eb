"""`python -m collectors` is `chrono-collector`."""

from __future__ import annotations

import sys

from collectors.cli import main

if __name__ == "__main__":
    sys.exit(main())
