"""`chrono-collector`: run | ingest | simulate | status. Exit codes: 0 clean stop, 2 bad usage or
configuration (one line on stderr, no traceback), 1 anything else."""

from __future__ import annotations

import argparse
import gc
import logging
import os
import sys
from collections.abc import Sequence

from collectors import __version__, exchanges
from collectors.errors import ConfigError

PROG = "chrono-collector"
EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report it


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        """argparse prints usage plus the error; we print one line and exit 2."""
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Chrono price-oracle collectors: exchange ticker "
                     "feeds -> normalized records -> the Chrono ingest API.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    run = sub.add_parser("run", help="run one exchange's collector in the foreground",
                         description="Run one exchange's collector in the foreground (what "
                         "supervisord and systemd start). Configuration comes from environment "
                         "variables: API_BASE_URL, API_KEY or API_KEY_FILE, WORKER_ID, SYMBOLS, "
                         "BATCH_SIZE, BATCH_INTERVAL_MS, LOG_LEVEL, WS_URL, METRICS_HOST, "
                         "METRICS_PORT, SPOOL_DIR, SPOOL_MAX_BYTES, SPOOL_FSYNC_INTERVAL_MS, "
                         "HTTP_CONNECT_TIMEOUT_S, HTTP_READ_TIMEOUT_S, WS_LIVENESS_TIMEOUT_S, "
                         "DELIVERY_RETRY_MAX_S, DELIVERY_CONCURRENCY (see README).")
    run.add_argument("exchange", metavar="EXCHANGE",
                     help="one of: " + ", ".join(exchanges.known()))

    ingest = sub.add_parser("ingest", help="run the reference ingest API",
                            description="Run the reference ingest API (POST /internal/ingest). "
                            "Configuration: INGEST_HOST, INGEST_PORT, API_KEY / API_KEYS / "
                            "API_KEY_FILE, DATABASE_URL (see README).")
    _ingest_arguments(ingest)

    sim = sub.add_parser("simulate", help="run the exchange simulator on loopback",
                         description="Run an exchange simulator on 127.0.0.1 speaking each "
                         "venue's real WebSocket protocol, for demos, tests and benchmarks.")
    _simulate_arguments(sim)

    status = sub.add_parser("status", help="one table of every collector's state",
                            description="Show every collector: process state, connected, last "
                            "message age, records/s, queue, spool, last flush. Exits 1 when "
                            "anything is down or stale.")
    _status_arguments(status)
    return parser


#: The commands that run until stopped: under supervisord they stop when it dies.
LONG_RUNNING = ("run", "ingest", "simulate")


def main(argv: Sequence[str] | None = None) -> int:
    parent_pid = os.getppid()  # the parent seen at start (see collectors.parentwatch)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command in LONG_RUNNING:
        from collectors.parentwatch import stop_with_supervisord

        if not stop_with_supervisord(parent_pid):
            print(f"{PROG}: error: supervisord (pid {parent_pid}) exited before this program "
                  "started; not starting", file=sys.stderr)
            return EXIT_FAILURE
    try:
        if args.command == "run":
            return _run(args.exchange)
        if args.command == "ingest":
            return _ingest(args)
        if args.command == "simulate":
            return _simulate(args)
        if args.command == "status":
            return _status(args)
    except ConfigError as exc:
        # Whatever raised it, a value it echoes (a URL) may hold the key: said redacted.
        from collectors.keys import Redactor, keys_in_env

        print(f"{PROG}: error: {Redactor(keys_in_env(os.environ))(str(exc))}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        # Ctrl-C in a command without a stop handler of its own (`status --wait`): it did
        # not finish, so it must not read as success (deploy/install.sh ends with that
        # check). The long-running commands stop cleanly on SIGINT and exit 0 themselves.
        return EXIT_INTERRUPTED
    parser.error(f"unknown command {args.command!r}")
    return EXIT_USAGE


#: The GIL switch interval of a collector process (CPython's default is 5 ms).
SWITCH_INTERVAL_S = 0.001


def _run(exchange: str) -> int:
    if exchange not in exchanges.REGISTRY:
        print(f"{PROG}: error: unknown exchange {exchange!r} (known: "
              f"{', '.join(exchanges.known())})", file=sys.stderr)
        return EXIT_USAGE
    from prometheus_client import disable_created_metrics

    from collectors.config import CollectorConfig
    from collectors.logsetup import setup_logging, warn_about_keys
    from collectors.service import CollectorService

    # `*_created` series double the series count and no dashboard or alert here uses them.
    disable_created_metrics()  # type: ignore[no-untyped-call]

    # The parse thread is busy Python while the delivery threads mostly wait on sockets and
    # SQLite; each of their many short steps needs the GIL back, and with CPython's default
    # 5 ms switch interval a burst kept a claim or a POST waiting tens of ms for it. 1 ms:
    # +14 % stored/s in bench/throughput.py (docs/benchmarks.md, session 5).
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    config = CollectorConfig.from_env(exchange)
    setup_logging(config.log_level, static={"exchange": config.exchange,
                                            "worker_id": config.worker_id},
                  secrets=[config.api_key])
    warn_about_keys([config.api_key], "API_KEY")
    service = CollectorService(config)
    # Everything made so far (modules, the service) lives as long as the process: moved out of
    # the cyclic GC's sight, so an occasional full collection has only the recent objects to
    # walk (a 16-36 ms pause with every thread stopped before: the p99.9 of bench/latency.py).
    gc.collect()
    gc.freeze()
    code = service.run()
    if service.threads_left:
        # A thread still held (a spool another process keeps locked, a connect that does not
        # give up): the interpreter would wait for it at exit, past supervisord's and
        # systemd's stop timeouts and their SIGKILL. collector_stopped said which; the spool
        # is safe as after a kill (every commit is atomic, the claim is re-sent by its key).
        logging.shutdown()
        os._exit(code)
    return code


def _ingest_arguments(parser: argparse.ArgumentParser) -> None:
    from collectors.ingest.cli import configure_parser

    configure_parser(parser)


def _ingest(args: argparse.Namespace) -> int:
    from collectors.ingest.server import run_command

    return run_command(args)


def _simulate_arguments(parser: argparse.ArgumentParser) -> None:
    from collectors.simulator.cli import add_arguments

    add_arguments(parser)


def _simulate(args: argparse.Namespace) -> int:
    from collectors.simulator.cli import main as simulate_main

    return simulate_main(args)


def _status_arguments(parser: argparse.ArgumentParser) -> None:
    from collectors.status import add_arguments

    add_arguments(parser)


def _status(args: argparse.Namespace) -> int:
    from collectors.status import main as status_main

    return status_main(args)


if __name__ == "__main__":
    sys.exit(main())
