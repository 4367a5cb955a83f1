"""The next global batch, prepared in a background thread while the current step runs.

`BatchPrefetcher(data_it, to_device)` pulls this host's numpy batch from the data iterator and
turns it into the step's global arrays in a thread, one batch ahead. With each batch it records
the iterator position *after* that batch (`DataPosition`), so a checkpoint written after step s
holds the position after s batches, not after the one already prefetched: resume stays exact.
Only the prefetch thread touches the iterator while the prefetcher runs.
"""

from __future__ import annotations

import queue
import threading
from typing import Any, Callable


class DataPosition:
    """A saved iterator position that `data_pipeline.data_state.DataSave` writes like the iterator."""

    def __init__(self, it, state: dict):
        self._state = state
        self.shard_ids, self.data_shards = it.shard_ids, it.data_shards

    def get_state(self) -> dict:
        return self._state


_DONE = object()


class BatchPrefetcher:
    def __init__(self, data_it, to_device: Callable[[dict], Any], depth: int = 1):
        self.data_it, self._to_device = data_it, to_device
        self._q: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="batch-prefetch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                batch = next(self.data_it)
                pos = DataPosition(self.data_it, self.data_it.get_state())
                item = (self._to_device(batch), pos)
                while not self._stop.is_set():
                    try:
                        self._q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, raised there
            self._q.put((_DONE, e))

    def next(self) -> tuple[Any, DataPosition]:
        """(global batch, iterator position after it); re-raises the data thread's error."""
        batch, pos = self._q.get()
        if batch is _DONE:
            raise pos
        return batch, pos

    def close(self) -> None:
        """Stops the thread; the iterator is then one prefetched batch ahead of what was consumed."""
        self._stop.set()
        while self._thread.is_alive():
            try:
                self._q.get_nowait()
            except queue.Empty:
                pass
            self._thread.join(timeout=0.1)
