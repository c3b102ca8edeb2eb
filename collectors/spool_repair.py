"""Reading damaged spool files: the WAL check and rebuild, and the row-by-row salvage read.

Pure functions over bytes and read-only connections; `collectors.spool` decides what to do with
what they find (move files aside, copy rows, count and log what was lost).
"""

from __future__ import annotations

import sqlite3
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

_MIN_ROWID = -(2**63)
_MAX_ROWID = 2**63 - 1
_WAL_MAGICS = (0x377F0682, 0x377F0683)
_WAL_VERSION = 3007000


# ---------------------------------------------------------------------- the WAL


def _wal_checksum(data: bytes, big_endian: bool, s0: int, s1: int) -> tuple[int, int]:
    """SQLite's WAL checksum (a Fletcher-like sum over 32-bit words), continued from (s0, s1)."""
    for x0, x1 in struct.iter_unpack(">II" if big_endian else "<II", data):
        s0 = (s0 + x0 + s1) & 0xFFFFFFFF
        s1 = (s1 + x1 + s0) & 0xFFFFFFFF
    return s0, s1


def _wal_header(data: bytes) -> tuple[int, int, bytes] | None:
    """(magic, page size, salts) of a valid WAL header, else None."""
    if len(data) < 32:
        return None
    magic, version, page_size, _seq, _s1, _s2, ck1, ck2 = struct.unpack(">8I", data[:32])
    if (
        magic not in _WAL_MAGICS
        or version != _WAL_VERSION
        or page_size < 512
        or page_size & (page_size - 1)
    ):
        return None
    if _wal_checksum(data[:24], bool(magic & 1), 0, 0) != (ck1, ck2):
        return None
    return magic, page_size, data[16:24]


def _frame_checksum(
    data: bytes, offset: int, frame_size: int, big_endian: bool, prev: tuple[int, int]
) -> tuple[int, int]:
    s = _wal_checksum(data[offset : offset + 8], big_endian, *prev)
    return _wal_checksum(data[offset + 24 : offset + frame_size], big_endian, *s)


def _u32_pair(data: bytes, offset: int) -> tuple[int, int]:
    first, second = struct.unpack_from(">II", data, offset)
    return int(first), int(second)


def _frame_ck(data: bytes, offset: int) -> tuple[int, int]:
    """The running checksum stored in the header of the frame at `offset`."""
    return _u32_pair(data, offset + 16)


def wal_problem(data: bytes) -> str | None:
    """Why this WAL content is damaged, or None.

    A torn tail (the last frames of a commit that never finished) and stale frames of an earlier
    WAL generation (other salts) are normal and SQLite ignores them. Damage is a bad header, or a
    frame failing its checksum that is followed by more frames of the same generation.
    """
    header = _wal_header(data)
    if header is None:
        return "WAL header is not valid" if len(data) >= 32 else "WAL header truncated"
    magic, page_size, salts = header
    big_endian = bool(magic & 1)
    frame_size = 24 + page_size
    prev = _u32_pair(data, 24)
    bad_frame: int | None = None
    offset, index = 32, 0
    while offset + frame_size <= len(data) and data[offset + 8 : offset + 16] == salts:
        if bad_frame is not None:
            return f"WAL frame {bad_frame} is damaged and frames after it were discarded"
        if _frame_checksum(data, offset, frame_size, big_endian, prev) != _frame_ck(data, offset):
            bad_frame = index
        prev = _frame_ck(data, offset)
        offset += frame_size
        index += 1
    return None


def _wal_guess(data: bytes, page_size_hint: int | None) -> tuple[int, int, bytes, int] | None:
    """For a WAL with a damaged header: (magic, page size, salts, first frame index).

    The first frame index is the first of two consecutive frames with the same salts where the
    second verifies against the first's stored checksum; that settles page size and byte order.
    """
    sizes = [page_size_hint] if page_size_hint else []
    sizes += [4096, 1024, 2048, 8192, 16384, 32768, 65536, 512]
    for page_size in dict.fromkeys(sizes):
        frame_size = 24 + page_size
        frames = (len(data) - 32) // frame_size
        for j in range(frames - 1):
            a = 32 + j * frame_size
            b = a + frame_size
            salts = data[a + 8 : a + 16]
            if data[b + 8 : b + 16] != salts:
                continue
            for magic in _WAL_MAGICS:
                ck = _frame_checksum(data, b, frame_size, bool(magic & 1), _frame_ck(data, a))
                if ck == _frame_ck(data, b):
                    return magic, page_size, salts, j
    return None


def wal_rebuild(data: bytes, page_size_hint: int | None) -> tuple[bytes, int, int] | None:
    """A valid WAL with every verifiable frame of the current generation: (bytes, kept, dropped).

    With a damaged header, the first frame found by _wal_guess cannot be verified (its checksum
    chains from the lost header) and is trusted; quick_check and the record checksums back it.
    None when nothing can be rebuilt.
    """
    header = _wal_header(data)
    if header is not None:
        magic, page_size, salts = header
        first = 0
        prev: tuple[int, int] | None = _u32_pair(data, 24)
        head = bytearray(data[:32])
    else:
        guess = _wal_guess(data, page_size_hint)
        if guess is None:
            return None
        magic, page_size, salts, first = guess
        prev = None
        head = bytearray(struct.pack(">6I", magic, _WAL_VERSION, page_size, 0, 0, 0))
        head[16:24] = salts
        head += struct.pack(">II", *_wal_checksum(bytes(head), bool(magic & 1), 0, 0))
    big_endian = bool(magic & 1)
    frame_size = 24 + page_size
    kept: list[int] = []
    dropped = first
    offset = 32 + first * frame_size
    while offset + frame_size <= len(data) and data[offset + 8 : offset + 16] == salts:
        stored = _frame_ck(data, offset)
        if prev is None or _frame_checksum(data, offset, frame_size, big_endian, prev) == stored:
            kept.append(offset)
        else:
            dropped += 1
        prev = stored
        offset += frame_size
    out = bytearray(head)
    chain = _u32_pair(bytes(head), 24)
    for offset in kept:
        frame = bytearray(data[offset : offset + frame_size])
        chain = _frame_checksum(bytes(frame), 0, frame_size, big_endian, chain)
        struct.pack_into(">II", frame, 16, *chain)
        out += frame
    return bytes(out), len(kept), dropped


# ---------------------------------------------------------------------- damaged databases


def open_damaged(path: Path, timeout_s: float) -> sqlite3.Connection | None:
    """A read-only connection to a damaged database that reads past what a normal open
    refuses (a file shorter than its header says, cells whose sizes do not add up); None when
    even that fails."""
    uri = f"file:{quote(str(path))}?mode=ro"
    try:
        conn = sqlite3.connect(uri, uri=True, isolation_level=None, timeout=timeout_s)
    except sqlite3.Error:
        return None
    try:
        conn.execute("PRAGMA writable_schema=ON")
        conn.execute("PRAGMA cell_size_check=ON")
    except sqlite3.Error:
        pass
    return conn


def query_int(conn: sqlite3.Connection, sql: str,
              args: tuple[int, ...] = ()) -> tuple[bool, int | None]:
    """(ok, value) of a one-integer query on a damaged database."""
    try:
        row = conn.execute(sql, args).fetchone()
    except sqlite3.DatabaseError:
        return False, None
    if isinstance(row, tuple) and row and isinstance(row[0], int):
        return True, row[0]
    return True, None


def table_names(conn: sqlite3.Connection) -> set[str] | None:
    """The tables of a damaged database, or None when its schema cannot be read."""
    try:
        return {str(r[0]) for r in conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table'")}
    except sqlite3.DatabaseError:
        return None


@dataclass(slots=True)
class TableRead:
    """What `read_table` could reach."""

    skipped_ids: int = 0        # ids jumped over in unreadable regions (a lower bound)
    tail_unknown: bool = False  # the end of the table could not be reached
    head_unknown: bool = False  # the start of the table could not be read (not counted)


def read_table(conn: sqlite3.Connection, table: str, columns: str,
               on_row: Callable[[tuple[object, ...]], None],
               last_id_of: Callable[[tuple[object, ...]], int] | None = None,
               count_from: int | None = None) -> TableRead:
    """Hand every row of `table` still readable to `on_row`, in id order (`columns` starts
    with `id`). Unreadable regions are skipped with O(log n) probes and counted in ids (only
    those from `count_from` on, when given).

    `last_id_of(row)` is the last id a row covers when a row stands for a range of ids (a
    chunk of records numbered from its id); by default a row covers its own id.
    """
    read = TableRead()

    def skipped(after: int, end: int) -> int:
        """Ids strictly between `after` and `end` that count."""
        if count_from is not None:
            after = max(after, count_from - 1)
        return max(0, end - after - 1)

    ok, max_id = query_int(conn, f"SELECT max(id) FROM {table}")
    max_id = max_id if ok else None
    ok, min_id = query_int(conn, f"SELECT min(id) FROM {table}")
    # Ids may be negative (records put back in front of the others). When the first id cannot
    # be read, the gap before the first readable row cannot be counted.
    after = min_id - 1 if ok and min_id is not None else _MIN_ROWID
    failed_at: int | None = None  # `after` at the previous read error
    while True:
        start = after
        try:
            for row in conn.execute(
                    f"SELECT {columns} FROM {table} WHERE id > ? ORDER BY id", (after,)):
                rid = row[0]
                if isinstance(rid, int):
                    after = rid if last_id_of is None else max(rid, last_id_of(row))
                on_row(tuple(row))
            return read
        except sqlite3.DatabaseError:
            pass
        nxt = _next_readable(conn, table, after, max_id)
        if nxt is None:
            read.tail_unknown = True
            return read
        probe, next_id = nxt
        if after == _MIN_ROWID:
            read.head_unknown = True  # how many ids precede the first readable one is unknown
        elif next_id is None:
            end = probe if max_id is None else min(probe, max_id + 1)
            read.skipped_ids += skipped(after, end)
        elif next_id == after + 1 and failed_at == after and start == after:
            # Its key is readable but its content is not: skip this one row.
            read.skipped_ids += skipped(after, after + 2)
            after = next_id
            continue
        else:
            read.skipped_ids += skipped(after, probe)
        if next_id is None:
            return read
        failed_at = after
        after = next_id - 1


def _next_readable(conn: sqlite3.Connection, table: str, after: int,
                   max_id: int | None) -> tuple[int, int | None] | None:
    """After a read error past id `after`: the smallest probe p whose `id >= p` seek works.

    Returns (p, first id >= p or None at the end); ids in (after, p) are unreadable. Probes
    double, then bisect, so a damaged page costs O(log n) seeks. None when no seek past `after`
    works at all (the end of the table is unreachable).
    """
    sql = f"SELECT min(id) FROM {table} WHERE id >= ?"
    last_fail, step = 0, 1
    found: tuple[int, int | None] | None = None
    while after + step <= _MAX_ROWID:
        ok, value = query_int(conn, sql, (after + step,))
        if ok:
            found = (step, value)
            break
        last_fail = step
        if max_id is not None and after + step > max_id:
            return None
        step *= 2
    if found is None:
        return None
    good_step, value = found
    while good_step - last_fail > 1:
        mid = (last_fail + good_step) // 2
        ok, mid_value = query_int(conn, sql, (after + mid,))
        if ok:
            good_step, value = mid, mid_value
        else:
            last_fail = mid
    return after + good_step, value
