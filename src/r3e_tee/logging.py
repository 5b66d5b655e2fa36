"""JSON structured logs with request ids.

One line per event, machine-readable, so operators can ship ``kubectl logs`` to any collector.
Secrets are never passed to loggers; as a second line of defence, values of keys that look
secret (token, key, secret, password, authorization) are replaced before a line is written.
"""

from __future__ import annotations

import contextvars
import functools
import json
import logging
import re
import sys
import time
from typing import Any

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)

_SECRET_KEY = re.compile(r"(?i)(token|secret|password|passwd|authorization|api_?key|pin|kek|private)")
_NOT_SECRET_SUFFIXES = ("_id", "_hash", "_name", "_sha256", "_count", "_file", "_path", "_created", "_label")
_STD_ATTRS = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {
    "message",
    "asctime",
    "taskName",
    "color_message",
}


@functools.lru_cache(maxsize=4096)
def _secret_key(key: str) -> bool:
    return bool(_SECRET_KEY.search(key)) and not key.endswith(_NOT_SECRET_SUFFIXES)


def _scrub(key: str, value: Any) -> Any:
    if _secret_key(key):
        return "***"
    return value


_ENCODER = json.JSONEncoder(default=str, separators=(",", ":"))


@functools.lru_cache(maxsize=4)
def _second(seconds: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": f"{_second(int(record.created))}.{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        rid = request_id_var.get()
        if rid:
            out["request_id"] = rid
        for key, value in record.__dict__.items():
            if key not in _STD_ATTRS and not key.startswith("_"):
                out[key] = "***" if _secret_key(key) else value
        if record.exc_info and record.exc_info[0] is not None:
            out["exc_type"] = record.exc_info[0].__name__
        return _ENCODER.encode(out)


def configure_logging(level: str = "info", *, stream: Any = None) -> None:
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # uvicorn's own access log duplicates ours (which carries the request id)
    logging.getLogger("uvicorn.access").disabled = True
    # the JSON lines carry none of these; skipping them makes every record cheaper (the
    # "Optimization" section of the logging HOWTO): no caller lookup, thread or process names
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True


def get_logger(name: str) -> logging.Logger:
    return logging.getLogger(name)
