"""`python -m collectors.ingest [serve|migrate]` is `chrono-collector ingest [serve|migrate]`."""

from __future__ import annotations

import sys

from collectors.ingest.server import main

if __name__ == "__main__":
    sys.exit(main())
