"""JSON structured logs with request ids.

One line per event, machine-readable, so operators can ship ``kubectl logs`` to any collector.
Secrets are never passed to loggers; as a second line of defence, values of keys that look
secret (token, key, secret, password, authorization) are replaced before a line is written.
"""

from __future__ import annotations

import asyncio
import collections
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


_encode_str = json.encoder.encode_basestring  # json.dumps(str, ensure_ascii=False)


class LineHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A stream handler that writes the lines of one event-loop turn together.

    On the loop's thread a line waits for the end of the current turn (one write for all the
    requests the turn finished); from any other thread, or with no loop, it is written at once.
    Nothing waits longer than that turn, and ``flush`` (called by ``logging.shutdown`` at exit)
    writes whatever is pending.
    """

    def __init__(self, stream: Any = None) -> None:
        super().__init__(stream)
        # appends and pops of a deque are atomic: any thread may add a line while one flushes
        self._pending: collections.deque[str] = collections.deque()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.write_line(self.format(record))
        except Exception:  # noqa: BLE001 - logging's own contract: report, never raise
            self.handleError(record)

    def write_line(self, line: str) -> None:
        pending = self._pending
        pending.append(line)
        if len(pending) == 1:  # the first of this turn: have it written at the end of the turn
            loop = asyncio._get_running_loop()
            if loop is None:
                self.flush()
            else:
                loop.call_soon(self.flush)

    def flush(self) -> None:
        pending = self._pending
        lines = []
        while pending:
            lines.append(pending.popleft())
        self.acquire()
        try:
            if lines:
                self.stream.write("\n".join(lines) + "\n")
            super().flush()
        finally:
            self.release()


_line_handler: LineHandler | None = None


def _plain_chain(logger: logging.Logger) -> bool:
    """No handler between ``logger`` and the root, and nothing stops propagation."""
    node: logging.Logger | None = logger
    while node is not None and node is not logging.root:
        if node.handlers or not node.propagate or node.disabled:
            return False
        node = node.parent
    return True


def access_log(logger: logging.Logger, method: str, path: str, route: str, status: int, ms: float) -> None:
    """The one line per request, written straight to the line handler when that is the only
    handler (what :func:`JsonFormatter` would write, without building a LogRecord); through
    ``logger`` otherwise, so any handler a test or an embedder adds still sees it."""
    handler = _line_handler
    if handler is None or logging.root.handlers != [handler] or not _plain_chain(logger):
        logger.info(
            "request",
            extra={"method": method, "path": path, "route": route, "status": status, "duration_ms": ms},
        )
        return
    now = time.time()
    seconds = int(now)
    rid = request_id_var.get()
    handler.write_line(
        f'{{"ts":"{_second(seconds)}.{int((now - seconds) * 1000):03d}Z","level":"info",'
        f'"logger":{_encode_str(logger.name)},"msg":"request",'
        + (f'"request_id":{_encode_str(rid)},' if rid else "")
        + f'"method":{_encode_str(method)},"path":{_encode_str(path)},"route":{_encode_str(route)},'
        f'"status":{status},"duration_ms":{float.__repr__(ms)}}}'
    )


def configure_logging(level: str = "info", *, stream: Any = None) -> None:
    global _line_handler
    handler = _line_handler = LineHandler(stream or sys.stderr)
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
