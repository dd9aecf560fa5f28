"""Waiting in tests without depending on the machine's speed.

No test may assume how fast the machine is (speed lives in `tests/benchmarks/`): a shared 2-core machine under
load runs the same command 10-20 times slower than an idle one. So tests wait for *events* (a status, a line, a
process exit), and the one wall-clock limit anywhere in the suite is `BACKSTOP_S`, a hang detector that no correct
run reaches: one hour by default, `GCFG_TEST_BACKSTOP_S` sets another value (e.g. a short one while debugging).
`tests/test_no_fixed_timeouts.py` keeps other limits out.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

BACKSTOP_S = float(os.environ.get("GCFG_TEST_BACKSTOP_S", "3600"))
POLL_S = 0.05


def wait_until(predicate: Callable[[], T], what: str, *, poll_s: float = POLL_S,
               describe: Callable[[], str] | None = None) -> T:
    """Poll `predicate` until it returns something truthy and return that; an AssertionError after the backstop.

    `describe` adds the state seen last to the failure message (e.g. the job's log tail).
    """
    deadline = time.monotonic() + BACKSTOP_S
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            detail = f": {describe()}" if describe is not None else ""
            raise AssertionError(f"still waiting for {what} after the {BACKSTOP_S:g} s backstop{detail}")
        time.sleep(poll_s)
