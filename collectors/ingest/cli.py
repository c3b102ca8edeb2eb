"""`chrono-collector ingest` arguments: light enough to import in every process (the collector
builds the whole command line too, and must not load waitress or psycopg for it)."""

from __future__ import annotations

import argparse

ENV_HELP = """\
environment:
  API_KEY, API_KEYS, API_KEY_FILE  accepted bearer key(s) (at least one; API_KEYS comma-separated)
  DATABASE_URL                     sqlite:///path/to/file.db (default: the state directory)
                                   or postgresql://user@host:port/db
  INGEST_HOST, INGEST_PORT         listen address (default 127.0.0.1:3000; port 0 = any free)
  INGEST_MAX_BODY_BYTES            largest request body (default 8388608)
  INGEST_MAX_FEEDS                 most records per batch (default 10000)
  INGEST_THREADS                   worker threads and database connections (default 8)
  LOG_LEVEL                        debug, info, warning, error (default info)
"""


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Add `chrono-collector ingest`'s arguments to a (sub)parser."""
    parser.add_argument(
        "action", nargs="?", choices=("serve", "migrate"), default="serve",
        help="serve (default): run the ingest API until SIGTERM; "
             "migrate: apply database schema migrations and exit")
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = ENV_HELP
