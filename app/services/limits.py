"""Bounded concurrency for expensive paths (edit previews, image inference).

When all slots are busy a request waits a little and then fails fast with 503 and a
``Retry-After`` header, instead of piling up until clients time out.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from app.errors import Unavailable


class ConcurrencyLimit:
    def __init__(self, name: str, slots: int, wait_s: float):
        self.name = name
        self.slots = slots
        self.wait_s = wait_s
        self._semaphore = threading.BoundedSemaphore(slots)

    @contextmanager
    def slot(self) -> Iterator[None]:
        if not self._semaphore.acquire(timeout=self.wait_s):
            raise Unavailable(f"the server is busy with other {self.name} requests; retry shortly",
                              headers={"Retry-After": "1"})
        try:
            yield
        finally:
            self._semaphore.release()
