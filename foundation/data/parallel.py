"""An ordered, bounded parallel map for `prepare`: workers read and transform, the caller writes.

Every `prepare` splits its input into small independent units (a chunk of objects, a trajectory,
a chunk of records). `ordered_map` runs a function over the units in worker processes and yields
the results in input order, so the single `ShardSetWriter` in the calling process sees exactly the
sequence it would see with one process: keys, splits, shard assignment and bytes cannot depend on
the number of workers. At most `max_in_flight` units are submitted and not yet consumed, so
memory is bounded by that many results, whatever the size of the input.

The per-run context (opened sources, a tokenizer) is sent to each worker once, when it starts,
not with every unit. Workers start with `forkserver` (or `spawn`), never `fork`, so they do not
inherit the caller's open files and threads. An error in a unit is re-raised in the caller with
its own type and message (a `DataError` stays the same one line as with one process); the pool is
then stopped (units not started are cancelled, running ones finish), as it is on Ctrl-C or SIGTERM
(which the caller takes as KeyboardInterrupt while the map runs), so that the writer's `with`
block aborts and publishes nothing.
"""

from __future__ import annotations

import multiprocessing
import signal
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Any, TypeVar

from foundation.signals import sigterm_as_interrupt

Item = TypeVar("Item")
Result = TypeVar("Result")

#: The context of the worker process this module runs in (set once by `_start_worker`).
_worker_context: Any = None


def ordered_map(
    fn: Callable[[Any, Item], Result],
    items: Iterable[Item],
    workers: int = 1,
    *,
    context: Any = None,
    max_in_flight: int | None = None,
) -> Iterator[Result]:
    """Yield `fn(context, item)` for every item, in the order of `items`.

    `workers=1` runs inline, in this process. Otherwise `fn` (a module-level function) runs in
    `workers` processes, `context` is pickled once per worker, and at most `max_in_flight`
    (default 2 x workers) results are pending at any time."""
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if workers == 1:
        for item in items:
            yield fn(context, item)
        return
    limit = max_in_flight if max_in_flight is not None else 2 * workers
    if limit < 1:
        raise ValueError(f"max_in_flight must be >= 1, got {limit}")
    pool = ProcessPoolExecutor(
        workers,
        mp_context=start_context(__name__, fn.__module__),
        initializer=_start_worker,
        initargs=(context,),
    )
    pending: deque[Future] = deque()
    try:
        with sigterm_as_interrupt():
            for item in items:
                pending.append(pool.submit(_run_unit, fn, item))
                if len(pending) >= limit:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
    except BaseException:  # an error in a unit, Ctrl-C, SIGTERM, or the caller closing us early
        _stop(pool, pending)
        raise
    pool.shutdown(wait=True)


def start_context(*preload: str) -> multiprocessing.context.BaseContext:
    """forkserver where there is one (its server imports the `preload` modules once, and every
    worker of this process forks from it, ready), spawn elsewhere: never a fork of this process,
    whose other threads may hold a lock the child then waits for forever."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(list(preload))  # used when the server first starts
    return context


def _start_worker(context: Any) -> None:
    """Worker initialiser: keep the context; leave Ctrl-C to the caller, which stops the pool."""
    global _worker_context
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _worker_context = context


def _run_unit(fn: Callable[[Any, Item], Result], item: Item) -> Result:
    return fn(_worker_context, item)


def _stop(pool: ProcessPoolExecutor, pending: deque[Future]) -> None:
    """Cancel every unit that has not started and wait for the running ones (one small unit per
    worker). Workers are not killed: one killed while it sends a result would leave the pool's
    result pipe mid-message, and the pool's shutdown would then wait forever."""
    for future in pending:
        future.cancel()
    pool.shutdown(wait=True, cancel_futures=True)
