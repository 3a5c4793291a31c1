"""Waiting on events, not the clock: tests that a call does not wait for something the test holds.

A test blocks a slow path on an event it controls (a patch fit, a disk read, a copy-out, the store's
lock), calls what must not wait for it through :func:`returns`, and then asserts that the block is
still in force (the fit has not returned, the lock is still held).  A call that did wait could only
return once the block ended — released by the test, which it does only afterwards, or given up by
the blocked path after its own wait — so it fails the test either at the guard or at that
assertion, never passes slowly.  The guard is a deadlock guard, long enough for any busy machine,
not a bound on how fast the call is (speed is measured in ``bench/``).
"""

from __future__ import annotations

import threading
from typing import Callable, TypeVar

T = TypeVar("T")

GUARD_S = 60.0  # longer than any wait a test's own blocked path gives up after (30 s)


def returns(fn: Callable[[], T], guard_s: float = GUARD_S) -> T:
    """``fn()`` run on another thread; its result (or its exception) once it has returned.

    AssertionError if it has not returned within ``guard_s`` seconds: it is waiting for what the
    test holds blocked.
    """
    out: list = []
    done = threading.Event()

    def call() -> None:
        try:
            out.append((True, fn()))
        except BaseException as e:  # handed to the test's thread
            out.append((False, e))
        finally:
            done.set()

    threading.Thread(target=call, name="tests-returns", daemon=True).start()
    assert done.wait(guard_s), f"{getattr(fn, '__name__', fn)} waited for what the test holds blocked"
    ok, value = out[0]
    if not ok:
        raise value
    return value
