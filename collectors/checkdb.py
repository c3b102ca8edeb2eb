"""`python -m collectors.checkdb`: the original design's check query on the ingest store.

    SELECT source, COUNT(*), COUNT(DISTINCT symbol), MAX(timestamp) FROM price_feeds
    GROUP BY source

Uses DATABASE_URL like the ingest API (default: SQLite in the state directory).
"""

from __future__ import annotations

import os
import sqlite3
import sys

from collectors import paths

CHECK_QUERY = ("SELECT source, COUNT(*), COUNT(DISTINCT symbol), MAX(timestamp) "
               "FROM price_feeds GROUP BY source")


def main() -> int:
    url = os.environ.get("DATABASE_URL", "").strip() or f"sqlite:///{paths.state_dir()}/ingest.db"
    if url.startswith("sqlite:///"):
        path = url[len("sqlite:///"):]
        if not os.path.exists(path):
            print(f"no database yet at {path}: is the ingest API running?", file=sys.stderr)
            return 1
        try:
            with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as conn:
                rows = conn.execute(CHECK_QUERY).fetchall()
            conn.close()
        except sqlite3.Error as exc:
            print(f"the database at {path} cannot be read: {exc}", file=sys.stderr)
            return 1
    elif url.startswith(("postgresql://", "postgres://")):
        import psycopg

        try:
            with psycopg.connect(url, connect_timeout=5) as pg:
                rows = pg.execute(CHECK_QUERY).fetchall()
        except psycopg.Error as exc:
            # psycopg's messages name host and port, never the password.
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            print(f"PostgreSQL cannot be read: {first}", file=sys.stderr)
            return 1
    else:
        print("DATABASE_URL: expected sqlite:///path or postgresql://...", file=sys.stderr)
        return 2
    print(f"{'source':<12} {'count':>8} {'symbols':>8}  latest timestamp")
    for source, count, symbols, latest in rows:
        print(f"{source:<12} {count:>8} {symbols:>8}  {latest}")
    if not rows:
        print("(no rows yet)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
