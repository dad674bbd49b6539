"""The garbage collector paused while start-up imports run.

Importing torch, Ray and scikit-learn makes several hundred thousand objects and no garbage,
and Python 3.11's collector walks them again and again: ~16% of the CPU those imports take,
measured on this project's 2-core machine (2.47 s -> 2.10 s of CPU for torch, scikit-learn's
datasets and Ray; 2.41 s -> 2.00 s for the fork server's imports). On the way to the first
step that CPU is shared with Ray's start, so it is time. The driver pauses the collector while
its checks import and build (driver.py), the fork server while it imports (forked_workers.py).
"""

from __future__ import annotations

import contextlib
import gc
import threading
from collections.abc import Iterator

_lock = threading.Lock()
_pauses = 0  # how many `collection_paused` blocks are running, on any thread
_collector_was_enabled = False


@contextlib.contextmanager
def collection_paused() -> Iterator[None]:
    """Within (on any thread): no garbage collection in this process. Pauses may nest and
    overlap across threads; the last to end restores the collector as the first found it."""
    global _pauses, _collector_was_enabled
    with _lock:
        if _pauses == 0:
            _collector_was_enabled = gc.isenabled()
            gc.disable()
        _pauses += 1
    try:
        yield
    finally:
        with _lock:
            _pauses -= 1
            if _pauses == 0 and _collector_was_enabled:
                gc.enable()
