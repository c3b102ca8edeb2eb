"""The reference ingest API: a WSGI app on waitress that validates batches and stores them.

::

    config.py    IngestConfig from the environment (all validation, nothing at import time)
    validate.py  pure request-body validation -> ValidFeed records or Problems
    storage/     the Storage protocol (base.py), SQLiteStorage (sqlite.py),
                 PostgresStorage (postgres.py); open_storage() and migrate() in __init__.py
    app.py       IngestApp, the WSGI application (auth, limits, idempotency, problem+json)
    server.py    waitress in-process: start_server() for tests, main() for the CLI
"""

from __future__ import annotations
