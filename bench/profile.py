"""Profile the collector's hot path with py-spy while bench/throughput.py's burst runs.

py-spy is not a project dependency: install it into a separate virtualenv first.

    python3.11 -m venv /tmp/cf-venv && /tmp/cf-venv/bin/pip install py-spy
    .venv/bin/python bench/profile.py --py-spy /tmp/cf-venv/bin/py-spy          # coinbase, 60k
    .venv/bin/python bench/profile.py --venue kraken --records 100000

py-spy samples the collector subprocess (all threads, 250 Hz, `--nonblocking`, idle threads
left out; with `--gil` only the thread holding the GIL; with `--idle` waiting threads too, so the
summary says where each thread waits) into collapsed stacks; the summary ranks
functions by the share of samples in which they are on the stack (inclusive) and at its top
(self), per thread. The collapsed file is kept under bench/results/ for flame graphs.
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.harness import RESULTS, machine, write_results
from bench.throughput import HEADER, run_venue


@contextmanager
def py_spy(binary: str, out: Path, rate_hz: int, gil: bool,
           idle: bool = False) -> Iterator[object]:
    def attach(pid: int) -> Iterator[None]:
        proc = subprocess.Popen([binary, "record", "--pid", str(pid), "--rate", str(rate_hz),
                                 "--format", "raw", "--threads", "--nonblocking",
                                 *(["--gil"] if gil else []), *(["--idle"] if idle else []),
                                 "--output", str(out)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(0.5)  # py-spy attaches before the burst starts
        try:
            yield None
        finally:
            proc.send_signal(signal.SIGINT)  # py-spy writes the file on SIGINT
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)

    yield contextmanager(attach)


def _frame_name(frame: str) -> str:
    # raw format: "function (path/to/file.py:line)"; keep function + file name
    name, _, where = frame.partition(" (")
    file = where.rsplit("/", 1)[-1].rstrip(")")
    file = file.split(":", 1)[0]
    return f"{name} ({file})"


def summarize(collapsed: Path, top: int) -> str:
    self_count: Counter[tuple[str, str]] = Counter()
    incl_count: Counter[tuple[str, str]] = Counter()
    per_thread: Counter[str] = Counter()
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, n_text = line.rpartition(" ")
        if not stack:
            continue
        n = int(n_text)
        frames = stack.split(";")
        # "thread (7972): spool-writer" with --threads: keep the thread's name
        thread = frames[0].partition("): ")[2] or frames[0]
        names = [_frame_name(f) for f in frames[1:]] or [thread]
        total += n
        per_thread[thread] += n
        self_count[(thread, names[-1])] += n
        for name in set(names):
            incl_count[(thread, name)] += n
    lines = [f"{total} samples.\n", "| thread | samples | share |", "| --- | ---: | ---: |"]
    for thread, n in per_thread.most_common():
        lines.append(f"| {thread} | {n} | {n / total:.1%} |")
    lines += ["", "Top frames by self time (the function at the top of the stack):", "",
              "| thread | function | self % of all samples |", "| --- | --- | ---: |"]
    for (thread, name), n in self_count.most_common(top):
        lines.append(f"| {thread} | `{name}` | {n / total:.1%} |")
    lines += ["", "Top frames by inclusive time (on the stack):", "",
              "| thread | function | inclusive % of all samples |", "| --- | --- | ---: |"]
    for (thread, name), n in incl_count.most_common(top * 2):
        lines.append(f"| {thread} | `{name}` | {n / total:.1%} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--py-spy", default="/tmp/cf-venv/bin/py-spy", dest="py_spy")
    parser.add_argument("--venue", default="coinbase")
    parser.add_argument("--records", type=int, default=60_000)
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    parser.add_argument("--top", type=int, default=20)
    parser.add_argument("--gil", action="store_true",
                        help="only samples holding the GIL (py-spy --gil): where the "
                             "GIL-bound pipeline spends its one core")
    parser.add_argument("--idle", action="store_true",
                        help="wall-clock samples (py-spy --idle): waiting threads too, so "
                             "where each thread waits shows as well as where it works")
    parser.add_argument("--name", default="profile")
    args = parser.parse_args()
    if args.gil and args.idle:
        parser.error("--gil and --idle exclude each other")
    RESULTS.mkdir(parents=True, exist_ok=True)
    suffix = "-gil" if args.gil else "-idle" if args.idle else ""
    collapsed = RESULTS / f"{args.name}-{args.venue}{suffix}.collapsed.txt"
    with py_spy(args.py_spy, collapsed, args.rate, args.gil, args.idle) as around:
        result = run_venue(args.venue, args.records, 90.0, around=around)  # type: ignore[arg-type]
    text = (f"### Profile of the collector during a {args.records:,}-ticker {args.venue} burst\n\n"
            f"{machine()}; py-spy {args.rate} Hz, --nonblocking"
            f"{', --gil (only samples holding the GIL)' if args.gil else ''}"
            f"{', --idle (wall clock: waiting threads too)' if args.idle else ''}"
            f"{'' if args.gil or args.idle else ', on-CPU samples'} "
            f"(profiling slows the run itself).\n\n{HEADER}\n{result.row()}\n\n" + summarize(collapsed, args.top))
    write_results(f"{args.name}-{args.venue}{suffix}", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
