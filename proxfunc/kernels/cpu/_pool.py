"""The thread pool :mod:`.linf1` splits large calls over (:mod:`.soft_threshold` runs its
own on OpenMP threads).

A kernel's C loop is single-threaded and :mod:`ctypes` releases the GIL while it runs, so
independent blocks of one call run at once on Python threads: the calling thread runs the
first block, the pool the others. The pool is created at first use, grown when a call asks
for more workers, and rebuilt in a forked child (which has none of the parent's threads).
"""

from __future__ import annotations

import concurrent.futures
import os
import threading
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["run_blocks"]

_POOL: concurrent.futures.ThreadPoolExecutor | None = None
_POOL_SIZE = 0
_POOL_LOCK = threading.Lock()


def _pool(workers: int) -> concurrent.futures.ThreadPoolExecutor:
    """The pool, with at least ``workers`` threads (a smaller one is dropped, not shut down: a
    caller may still be submitting to it, and its idle threads exit once it is garbage)."""
    global _POOL, _POOL_SIZE
    with _POOL_LOCK:
        if _POOL is None or _POOL_SIZE < workers:
            _POOL = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="proxfunc-kernel")
            _POOL_SIZE = workers
        return _POOL


def _forget_pool() -> None:
    global _POOL, _POOL_SIZE, _POOL_LOCK
    _POOL, _POOL_SIZE, _POOL_LOCK = None, 0, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)


def run_blocks(fn: Callable[..., Any], calls: Sequence[tuple[Any, ...]]) -> None:
    """``fn(*args)`` for every ``args`` in ``calls``, at once: the calling thread runs the
    first, the pool the others; returns when all are done (re-raising the first error)."""
    if len(calls) == 1:
        fn(*calls[0])
        return
    pool = _pool(len(calls) - 1)
    futures = [pool.submit(fn, *args) for args in calls[1:]]
    try:
        fn(*calls[0])
    finally:
        for f in futures:
            f.result()
