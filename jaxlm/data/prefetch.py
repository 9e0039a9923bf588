"""A loader's next batch, built on a background thread while the step runs."""
from __future__ import annotations

import concurrent.futures

import numpy as np


class Prefetcher:
    """Wraps a loader: while the step runs, a background thread computes the batch at the next
    cursor (cursor + global_batch). Requests are keyed by (cursor, global_batch, process
    index, count), so after a restore or skip the stale batch is dropped, never served. All
    loader calls run on the one worker thread, so the loader's caches need no lock."""

    def __init__(self, loader):
        self.loader = loader
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="jaxlm-prefetch")
        self._pending: dict[tuple, concurrent.futures.Future] = {}

    def __getattr__(self, name):
        return getattr(self.loader, name)

    def batch(self, cursor: int, global_batch: int, process_index: int = 0,
              process_count: int = 1) -> dict[str, np.ndarray]:
        key = (cursor, global_batch, process_index, process_count)
        future = self._pending.pop(key, None) or self._pool.submit(self.loader.batch, *key)
        for stale in self._pending.values():
            stale.cancel()
        nxt = (cursor + global_batch, global_batch, process_index, process_count)
        self._pending = {nxt: self._pool.submit(self.loader.batch, *nxt)}
        return future.result()

    def close(self) -> None:
        for f in self._pending.values():
            f.cancel()
        self._pool.shutdown(wait=True)
