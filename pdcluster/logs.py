"""Log records that a client cannot forge: every message is escaped, and JSON lines on request.

Request ids, prompts' fragments in error texts and the like come from the network. A newline or an
ANSI escape in one of them would start a fake log line or repaint the terminal, so every record's
message is escaped when it is formatted (in this process, whatever handler writes it): control
characters and line/paragraph separators become \\n, \\x00, \\u2028 ..., and ANSI colour sequences
(Ray's exception texts carry them) are dropped. Tracebacks are left as they
are; `--log-format json` writes each record, traceback included, as one JSON object per line.
"""
from __future__ import annotations

import json
import logging
import re
import time
import unicodedata

_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t", "\\": "\\\\"}
_ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]")     # terminal colour/cursor sequences (Ray's exceptions)


def escape(s: str) -> str:
    """s without ANSI sequences, every other control, format or line-separator character written
    as a Python escape."""
    if s.isprintable() and "\\" not in s:
        return s
    s = _ANSI.sub("", s)
    out = []
    for ch in s:
        if ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif ch == " " or unicodedata.category(ch)[0] not in "CZ":
            out.append(ch)
        else:                                  # Cc, Cf, Cs, Co, Cn, Zl, Zp, and Zs other than space
            out.append(ch.encode("unicode_escape").decode("ascii"))
    return "".join(out)


class _EscapedRecord(logging.LogRecord):
    def getMessage(self) -> str:
        return escape(super().getMessage())


def clip(value, limit: int = 64) -> str:
    """repr of a client's value for an error message, at most ~limit characters: a message echoing it whole
    could pass gRPC's 16 KiB metadata bound (the client then saw RESOURCE_EXHAUSTED, not its INVALID_ARGUMENT)."""
    r = repr(value)
    return r if len(r) <= limit else f"{r[:limit]}... ({len(r)} characters)"


def install_escaping() -> None:
    """Make every LogRecord created from now on in this process escape its message. Idempotent."""
    if logging.getLogRecordFactory() is not _EscapedRecord:
        logging.setLogRecordFactory(_EscapedRecord)


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ts (UTC, ISO 8601), level, logger, msg, and exc when present."""

    def format(self, record: logging.LogRecord) -> str:
        doc = {"ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
               "level": record.levelname, "logger": record.name,
               "msg": logging.LogRecord.getMessage(record)}    # raw: json.dumps escapes it whole
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, ensure_ascii=True)           # \u2028 and kin escaped too: one line


LOG_FORMATS = ("text", "json")


def setup_logging(level: str | int = "INFO", fmt: str = "text") -> None:
    """The serving process's logging: escaped messages, text or JSON lines on stderr."""
    if fmt not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)}, got {fmt!r}")
    install_escaping()
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else
                         logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level, handlers=[handler], force=True)
