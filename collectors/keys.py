"""API keys: the key-file reader, the key format check, and redaction of a key in any form.

Shared by the collector's and the ingest's configuration, the log filter (logsetup) and the
sender's error details (delivery). Pure functions and one immutable class; nothing at import.
"""

from __future__ import annotations

import contextlib
import os
import re
import select
import stat
import time
from collections.abc import Iterable, Mapping

from collectors.errors import ConfigError

#: A key file is read up to this many bytes (a key is far shorter; /dev/zero must not fill
#: memory).
MAX_KEY_FILE_BYTES = 64 * 1024
#: How long a key file that is a pipe (process substitution, a FIFO a secrets agent writes)
#: may take to be written and closed: a FIFO nobody writes held the start for ever, silent.
KEY_PIPE_WAIT_S = 10.0
#: Longest key accepted (a header line's worth).
MAX_KEY_CHARS = 4096
#: Keys shorter than this are accepted (the API decides which keys it takes) but warned about:
#: easy to guess, and only redacted from the logs where they stand as a whole token (a run of
#: a short key's characters is too likely to be part of ordinary text).
MIN_KEY_CHARS = 16
#: Past this length a key's pieces are looked for at every `fragment_chars` offset instead of
#: every offset (a run twice that long is still always caught): bounds the redaction's work.
_ALL_OFFSETS_CHARS = 256

#: RFC 6750 `b64token` (token68): the characters a bearer token may carry, `=` only at the end.
_TOKEN68_RE = re.compile(r"[A-Za-z0-9._~+/-]+=*")
#: Characters that continue a word or an identifier: a short key is redacted only where
#: none is on either side (so in `/key/`, `=key&`, `Bearer key`, not in `networking`).
_WORD_CHAR = r"[A-Za-z0-9_-]"
KEY_ADVICE = ("at least 16 random characters of A-Z a-z 0-9 - . _ ~ + / (an RFC 6750 token), "
              "e.g. `python -c 'import secrets; print(secrets.token_urlsafe(32))'`")

REDACTED = "[REDACTED]"


def check_key(variable: str, key: str) -> str:
    """`key` if a header can carry it: 1 to MAX_KEY_CHARS visible ASCII characters.

    Raises ConfigError naming `variable`; the message never contains any part of the key.
    (`key_warnings` says what is merely unwise.)
    """
    if not 0 < len(key) <= MAX_KEY_CHARS or not all("!" <= ch <= "~" for ch in key):
        problem = ("the key is too long" if len(key) > MAX_KEY_CHARS else
                   "the key contains whitespace, control or non-ASCII characters")
        raise ConfigError(variable, problem, KEY_ADVICE)
    return key


def key_warnings(keys: Iterable[str]) -> list[str]:
    """What is unwise about these keys, never showing any part of them: `short` (under
    MIN_KEY_CHARS), `not_token68` (characters RFC 6750 does not allow in a bearer token)."""
    found: list[str] = []
    for key in keys:
        if len(key) < MIN_KEY_CHARS and "short" not in found:
            found.append("short")
        if _TOKEN68_RE.fullmatch(key) is None and "not_token68" not in found:
            found.append("not_token68")
    return found


def read_key_file(variable: str, path: str) -> str:
    """The stripped text of a key file, read up to MAX_KEY_FILE_BYTES (a larger file is
    refused, never read whole).

    Raises ConfigError naming `variable` for a missing, unreadable, non-UTF-8, oversized or
    empty file (the format of the key is `check_key`'s business).
    """
    try:
        data = _read_up_to(path, MAX_KEY_FILE_BYTES + 1)
    except TimeoutError:
        raise ConfigError(variable, f"{path} is a pipe nothing was written to (and closed) "
                          f"within {KEY_PIPE_WAIT_S:g} s", "a readable file holding the key, "
                          "or a pipe its writer fills and closes") from None
    except FileNotFoundError:
        raise ConfigError(variable, f"{path} does not exist",
                          "a readable file holding the key") from None
    except OSError as exc:
        raise ConfigError(variable, f"{path} cannot be read ({exc.strerror or type(exc).__name__})",
                          "a readable file holding the key") from None
    if len(data) > MAX_KEY_FILE_BYTES:
        raise ConfigError(variable, f"{path} is larger than {MAX_KEY_FILE_BYTES} bytes",
                          "a file holding one key")
    try:
        text = data.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise ConfigError(variable, f"{path} is not UTF-8 text",
                          "a UTF-8 file holding the key") from None
    if not text:
        raise ConfigError(variable, f"{path} is empty", "a file holding the key")
    return text


def _read_up_to(path: str, limit: int) -> bytes:
    """At most `limit` bytes of the file at `path`. A pipe or FIFO is opened without waiting
    for a writer and read until its writer closes it, for at most KEY_PIPE_WAIT_S (raises
    TimeoutError); OSError as `open` raises it."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    with os.fdopen(fd, "rb", buffering=0) as fh:
        if not stat.S_ISFIFO(os.fstat(fd).st_mode):
            os.set_blocking(fd, True)  # a file, a device: read as any file is
            return fh.read(limit) or b""
        deadline = time.monotonic() + KEY_PIPE_WAIT_S
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        data = b""
        while len(data) < limit:
            left = deadline - time.monotonic()
            if left <= 0 or not poller.poll(left * 1000):
                raise TimeoutError
            try:
                chunk = os.read(fd, limit - len(data))
            except BlockingIOError:
                continue
            if not chunk:  # its writer closed it
                break
            data += chunk
        return data


def _is_pipe(path: str) -> bool:
    try:
        return stat.S_ISFIFO(os.stat(path).st_mode)
    except OSError:
        return False


def keys_in_env(env: Mapping[str, str]) -> list[str]:
    """Every key the environment names (API_KEY, API_KEYS, API_KEY_FILE's content), for
    redacting a message said before or without the configuration's own keys. Never raises:
    an unreadable file names no key."""
    keys = [env.get("API_KEY", "").strip()]
    keys += [part.strip() for part in env.get("API_KEYS", "").split(",")]
    path = env.get("API_KEY_FILE", "").strip()
    if path and not _is_pipe(path):  # (a pipe was read once, by the configuration)
        with contextlib.suppress(ConfigError):
            keys.append(read_key_file("API_KEY_FILE", path))
    return [key for key in keys if key]


def _char_forms(ch: str) -> list[str]:
    """Every way one character of a key may be written in text we log: as is, percent-encoded
    (either hex case; URLs quote `+`, `/`, `=` and anything else), JSON- or repr-escaped."""
    code = ord(ch)
    forms = [re.escape(ch)]
    if code < 0x100:
        forms.append(f"%(?i:{code:02x})")
    if ch in "\"'\\/":
        forms.append(re.escape("\\" + ch))  # repr `\'`, `\\`; JSON `\"`, `\/`, `\\`
    if code < 0x10000:
        forms.append(f"\\\\u(?i:{code:04x})")  # JSON `\u002b`
    return forms


def fragment_chars(key: str) -> int:
    """The shortest run of a key's characters that is redacted: a third of the key (at least
    6, at most 12 characters). Any shorter run that shows (a value cut by a length limit, a
    key's first characters before `...`) leaves more than two thirds of the key unknown: with
    a 43-character token_urlsafe(32) key, at most 11 characters, 32 (192 bits) still hidden."""
    return max(6, min(12, len(key) // 3))


class Redactor:
    """Replaces every run of `fragment_chars(key)` or more consecutive characters of a key
    with `[REDACTED]`, whatever form each character takes (as is, percent-encoded, JSON- or
    repr-escaped): the whole key, a key cut short by a length limit, a key inside a URL.

    A key shorter than MIN_KEY_CHARS is replaced only whole, in any of those forms, and only
    where it stands apart from words (no letter, digit, `_` or `-` either side): "k" must not
    turn "networking" into "networ[REDACTED]ing", nor "short" the event `api_key_short`."""

    def __init__(self, secrets: Iterable[str]) -> None:
        # One regex finds the start of a run: any `least` consecutive characters of a key (one
        # group per (key, offset), in the order of `self._starts`); the run is then extended
        # one character at a time. Scanning left to right, the first window found is where a
        # run begins (an earlier start would have matched a window earlier).
        self._chars: list[list[re.Pattern[str]]] = []
        self._starts: list[tuple[int, int]] = []
        windows: list[str] = []
        self._literals: list[str] = []  # the windows as written plainly: a fast first check
        for number, secret in enumerate(dict.fromkeys(s for s in secrets if s)):
            forms = ["(?:" + "|".join(_char_forms(ch)) + ")" for ch in secret]
            self._chars.append([re.compile(form) for form in forms])
            if len(secret) < MIN_KEY_CHARS:  # whole, as a token of its own
                self._starts.append((number, len(secret)))
                windows.append(f"(?<!{_WORD_CHAR})(" + "".join(forms) + f")(?!{_WORD_CHAR})")
                self._literals.append(secret)
                continue
            least = fragment_chars(secret)
            step = 1 if len(secret) <= _ALL_OFFSETS_CHARS else least
            for start in range(0, len(secret) - least + 1, step):
                self._starts.append((number, start + least))
                windows.append("(" + "".join(forms[start:start + least]) + ")")
                self._literals.append(secret[start:start + least])
        self._re = re.compile("|".join(windows)) if windows else None

    def __bool__(self) -> bool:
        return self._re is not None

    def __call__(self, text: str) -> str:
        """`text` with every run of a key's characters replaced."""
        if self._re is None:
            return text
        if "%" not in text and "\\" not in text and not any(
                window in text for window in self._literals):
            return text  # nothing escaped, no window as written: the common case, fast
        pieces: list[str] = []
        at = 0
        while (found := self._re.search(text, at)) is not None:
            assert found.lastindex is not None  # every alternative is one group
            number, offset = self._starts[found.lastindex - 1]
            chars, end = self._chars[number], found.end()
            while offset < len(chars) and (more := chars[offset].match(text, end)) is not None:
                end, offset = more.end(), offset + 1
            pieces += (text[at:found.start()], REDACTED)
            at = end
        if not pieces:
            return text
        pieces.append(text[at:])
        return "".join(pieces)
