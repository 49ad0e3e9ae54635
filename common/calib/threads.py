"""Run independent pieces of a calibration search on a pool of Python threads, each op single-threaded.

The searches' inner loops are many small ops (per-sample GEMMs, passes over one candidate batch). With
OpenMP intra-op threads every such op ends in a barrier: on 2 cores that made 2 threads barely faster
than 1 on an idle machine and 4-15x slower than 1 on a loaded one (bench/bench_aphq_calib.py,
docs/performance.md). Pieces on Python threads (torch releases the GIL inside ops) with one intra-op
thread each keep every core busy without barriers. Callers split the work into a fixed number of
pieces that does not depend on the thread count and add the partial results in a fixed order, so the
numbers are the same for any thread count and scheduling.
"""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence, TypeVar

import torch

__all__ = ["map_pieces", "sample_pieces", "ThreadBuffers"]

T = TypeVar("T")
R = TypeVar("R")

_lock = threading.Lock()


def sample_pieces(lo: int, hi: int, pieces: int) -> list[tuple[int, int]]:
    """[lo, hi) cut into at most `pieces` contiguous, non-empty, near-equal ranges."""
    n = hi - lo
    k = max(1, min(n, pieces))
    cuts = [lo + (n * i) // k for i in range(k + 1)]
    return [(a, b) for a, b in zip(cuts, cuts[1:]) if b > a]


def map_pieces(fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
    """[fn(item) for item in items], on torch.get_num_threads() Python threads when that is > 1.

    During the call torch runs single-threaded inside each piece (restored afterwards, also on error).
    Nested calls (a piece that itself calls map_pieces) run sequentially in their thread.
    """
    threads = torch.get_num_threads()
    if threads <= 1 or len(items) <= 1 or not _lock.acquire(blocking=False):
        return [fn(it) for it in items]
    try:
        torch.set_num_threads(1)
        with ThreadPoolExecutor(max_workers=min(threads, len(items))) as pool:
            return list(pool.map(fn, items))
    finally:
        torch.set_num_threads(threads)
        _lock.release()


class ThreadBuffers:
    """Reused scratch buffers, one set per thread (fresh large allocations cost more than the passes
    over them: a 60 MB division into a new tensor took 6 ms against 0.8 ms into a reused one)."""

    def __init__(self):
        self._local = threading.local()

    def get(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A buffer of `shape` and `dtype` (contents undefined), reused by later calls of this thread."""
        n = 1
        for d in shape:
            n *= d
        bufs = self._local.__dict__.setdefault("bufs", {})
        flat = bufs.get(name)
        if flat is None or flat.numel() < n or flat.dtype != dtype:
            flat = torch.empty(n, dtype=dtype)
            bufs[name] = flat
        return flat[:n].view(shape)

    def clear(self) -> None:
        """Drop every thread's buffers (the pool's threads end with each `map_pieces` call)."""
        self._local = threading.local()
