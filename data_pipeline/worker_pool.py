"""A process pool that survives its workers dying, for the converter.

`concurrent.futures.ProcessPoolExecutor` notices a dead worker (unlike `multiprocessing.Pool`, which
waits on it forever) but then fails every chunk in flight. `ordered_map` re-runs those chunks one
task at a time, names the task that kills its worker again, and goes on with a fresh pool, keeping
the results in task order.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

# After this many tasks in a row kill their worker even when run alone, the workers cannot work at
# all (an unpicklable `parse`, a broken install): stop rather than spawn a process per sample.
MAX_DEATHS_IN_A_ROW = 8


def ordered_map(process_chunk: Callable[[list], list], tasks: Iterator, workers: int, mp_context,
                initializer: Callable, init_args: tuple, chunksize: int,
                died: Callable[[Any], Any]) -> Iterator[Any]:
    """`process_chunk` over chunks of `tasks` in worker processes, one result per task, in task
    order. `process_chunk`, `initializer` and `died` must be picklable (module-level functions).

    A worker that dies (segfault, os._exit, OOM kill) breaks the whole `ProcessPoolExecutor`, which
    fails every chunk in flight. Those samples are then re-run one at a time in a single-worker pool:
    each that completes is kept, each that kills its worker again gives `died(task)` instead, and
    a fresh pool takes over the rest. The output is therefore the same as if nothing had died,
    apart from the culprits, and does not depend on which samples happened to share the pool.
    """
    def pool(n: int) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(n, mp_context=mp_context, initializer=initializer, initargs=init_args)

    def chunks() -> Iterator[list[tuple[int, Any]]]:
        it = iter(tasks)
        while chunk := list(itertools.islice(it, chunksize)):
            yield chunk

    def isolated(chunk: list[tuple[int, Any]]) -> Iterator[tuple[str, Any]]:
        nonlocal deaths
        solo = pool(1)
        try:
            for task in chunk:
                try:
                    (res,) = solo.submit(process_chunk, [task]).result()
                    deaths = 0
                except BrokenProcessPool:
                    deaths += 1
                    if deaths >= MAX_DEATHS_IN_A_ROW:
                        raise RuntimeError(f"{deaths} samples in a row killed their worker process, the last "
                                           f"one task {str(task)[:80]}: the workers cannot run (see their "
                                           "stderr)") from None
                    solo.shutdown(wait=True)
                    solo, res = pool(1), died(task)
                yield res
        finally:
            solo.shutdown(wait=True, cancel_futures=True)

    deaths = 0
    window = 4 * workers  # chunks in flight: enough to keep every worker busy, bounded memory
    source = chunks()
    inflight: deque = deque()
    ex = pool(workers)
    try:
        while True:
            while len(inflight) < window and (chunk := next(source, None)) is not None:
                inflight.append((chunk, ex.submit(process_chunk, chunk)))
            if not inflight:
                ex.shutdown(wait=True)
                return
            chunk, fut = inflight.popleft()
            try:
                yield from fut.result()
                continue
            except BrokenProcessPool:
                pass
            # The pool is dead. Chunks that finished before it died keep their results; the others
            # (this one included) are re-run sample by sample, in order.
            ex.shutdown(wait=True, cancel_futures=True)
            for c, f in [(chunk, fut), *inflight]:
                if f.done() and not f.cancelled() and f.exception() is None:
                    yield from f.result()
                else:
                    yield from isolated(c)
            inflight.clear()
            ex = pool(workers)
    finally:  # after a normal end this is a no-op; if the caller stopped early (an error, Ctrl-C), kill what runs
        procs = list((getattr(ex, "_processes", None) or {}).values())  # shutdown() forgets them
        ex.shutdown(wait=False, cancel_futures=True)
        for proc in procs:
            proc.terminate()
