"""One background thread per scoring call, so the forward pass never waits on reduction or writes.

The actor submits each scored batch's reduction (`ShardOutputs.add`: metric accumulators, maps; or the
raw outputs of set-normalised methods) and goes on to the next batch; torch releases the GIL in its
kernels, so both progress. One worker runs the calls in submission order, so accumulators are updated
in the same order as in series (bit-identical results). At most `max_pending` calls are outstanding
(the batch being reduced and one waiting): their outputs are held in memory until reduced. A failure
in the worker is raised in the submitting thread at the next `submit` or at `join`, so it fails the
shard rather than being lost.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

MAX_PENDING_REDUCTIONS = 2  # the batch being reduced and one queued behind it


class SerialWorker:
    """Runs submitted calls one at a time, in order, on one thread; bounded; re-raises failures."""

    def __init__(self, max_pending: int = MAX_PENDING_REDUCTIONS, name: str = "reduce") -> None:
        if max_pending < 1:
            raise ValueError(f"max_pending must be >= 1, got {max_pending}")
        self.max_pending = max_pending
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._pending: deque[Future] = deque()

    def submit(self, fn: Callable, *args) -> None:
        """Queue `fn(*args)`; first collect finished calls (raising a failure) and wait while full."""
        while self._pending and (self._pending[0].done() or len(self._pending) >= self.max_pending):
            self._pending.popleft().result()
        self._pending.append(self._pool.submit(_no_grad, fn, *args))

    @property
    def pending(self) -> int:
        """Calls submitted and not yet collected."""
        return len(self._pending)

    def join(self) -> None:
        """Wait for every submitted call; raises the first failure."""
        while self._pending:
            self._pending.popleft().result()

    def close(self) -> None:
        """Drop what has not started, wait for the running call, stop the thread."""
        self._pending.clear()
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> SerialWorker:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _no_grad(fn: Callable, *args):
    """`fn(*args)` without autograd (grad mode is per thread)."""
    import torch

    with torch.no_grad():
        return fn(*args)
