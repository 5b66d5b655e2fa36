"""Deploy-time checks of single-file Python code: parsed, never run (the service is no enclave)."""

from __future__ import annotations

import pytest

from r3e_tee.errors import InvalidRequestError
from r3e_tee.functions.model import FunctionConfig, check_code


def _check(code: str, handler: str = "handler") -> None:
    check_code(FunctionConfig(name="f", runtime="python", handler=handler), code.encode())


@pytest.mark.parametrize(
    "code",
    [
        "def handler(event, ctx):\n    return event\n",
        "async def handler(event, ctx):\n    return event\n",
        "import json\nif True:\n    def handler(event, ctx):\n        return event\n",
        "try:\n    from fast import impl as handler\nexcept ImportError:\n    handler = print\n",
        "from helpers import *\n",
        "class handler:\n    pass\n",
        "handler, other = make()\n",
        "with open('x') as handler:\n    pass\n",
    ],
)
def test_code_that_binds_its_handler_at_module_level_deploys(code: str) -> None:
    _check(code)


@pytest.mark.parametrize(
    ("code", "handler", "problem"),
    [
        ("x = 1\n", "handler", "defines no 'handler'"),
        ("def main():\n    handler = 1\n", "handler", "defines no 'handler'"),
        ("class C:\n    def handler(self): ...\n", "handler", "defines no 'handler'"),
        ("def handler(e, c):\n    return e\n", "run", "defines no 'run'"),
        ("def handler(e, c):\n    return e\nreturn 1\n", "handler", "does not compile"),
        ("def f(:\n", "handler", "does not compile"),
    ],
)
def test_code_without_its_handler_or_that_does_not_compile_is_refused(
    code: str, handler: str, problem: str
) -> None:
    with pytest.raises(InvalidRequestError, match=problem):
        _check(code, handler)
