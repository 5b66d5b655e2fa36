"""The access line's fast path writes what the JSON formatter writes, one write per loop turn."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import threading
from collections.abc import Iterator

import pytest

from r3e_tee import logging as r3e_logging
from r3e_tee.ids import new_id
from r3e_tee.logging import JsonFormatter, LineHandler, access_log, request_id_var


class _CountingStream(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, s: str) -> int:
        self.writes += 1
        return super().write(s)


@pytest.fixture
def line_handler() -> Iterator[tuple[LineHandler, _CountingStream]]:
    stream = _CountingStream()
    root = logging.getLogger()
    saved = (root.handlers[:], root.level, r3e_logging._line_handler)
    r3e_logging.configure_logging("info", stream=stream)
    handler = r3e_logging._line_handler
    assert handler is not None
    try:
        yield handler, stream
    finally:
        root.handlers[:], root.level, r3e_logging._line_handler = saved


def test_access_line_fast_path_matches_the_formatter(
    line_handler: tuple[LineHandler, _CountingStream],
) -> None:
    handler, stream = line_handler
    logger = logging.getLogger("r3e_tee.service")
    token = request_id_var.set("req-\u00e9")
    try:
        access_log(logger, "POST", '/v1/functions/"\u2028x"/invoke', "/v1/functions/{name}/invoke", 200, 1.25)
        fast = json.loads(stream.getvalue().splitlines()[-1])
        # the same line through a LogRecord and the formatter (a second handler forces that path)
        other = io.StringIO()
        extra = logging.StreamHandler(other)
        extra.setFormatter(JsonFormatter())
        logger.addHandler(extra)
        try:
            access_log(
                logger, "POST", '/v1/functions/"\u2028x"/invoke', "/v1/functions/{name}/invoke", 200, 1.25
            )
        finally:
            logger.removeHandler(extra)
        slow = json.loads(other.getvalue().splitlines()[-1])
    finally:
        request_id_var.reset(token)
    assert list(fast) == list(slow)  # same keys, same order
    assert {k: v for k, v in fast.items() if k != "ts"} == {k: v for k, v in slow.items() if k != "ts"}
    assert fast["request_id"] == "req-\u00e9" and fast["path"] == '/v1/functions/"\u2028x"/invoke'


def test_lines_of_one_loop_turn_leave_in_one_write(line_handler: tuple[LineHandler, _CountingStream]) -> None:
    handler, stream = line_handler
    log = logging.getLogger("r3e_tee.test")

    async def turn() -> int:
        before = stream.writes
        for n in range(5):
            log.info("line", extra={"n": n})
        assert stream.writes == before  # nothing written before the turn ends
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        return stream.writes - before

    assert asyncio.run(turn()) == 1
    lines = [json.loads(line) for line in stream.getvalue().splitlines() if '"line"' in line]
    assert [entry["n"] for entry in lines] == list(range(5))
    # with no loop (a thread, or at exit) a line is written at once
    before = stream.writes
    worker = threading.Thread(target=lambda: log.info("from a thread"))
    worker.start()
    worker.join()
    assert stream.writes == before + 1 and "from a thread" in stream.getvalue()


def test_ids_are_v4_unique_and_not_shared_with_a_forked_child() -> None:
    ids = {new_id() for _ in range(2000)}
    assert len(ids) == 2000 and all(len(i) == 32 and i[12] == "4" and i[16] in "89ab" for i in ids)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.write(write, new_id().encode())
        os._exit(0)
    os.waitpid(pid, 0)
    child = os.read(read, 64).decode()
    os.close(read)
    os.close(write)
    assert child != new_id()
