"""Start-up imports made cheaper: the garbage collector paused while they run, and the libraries
Ray imports besides Ray imported where the time is free.

* **The collector paused.** Importing torch, Ray and scikit-learn makes several hundred thousand
  objects and no garbage, and Python 3.11's collector walks them again and again: ~16% of the
  CPU those imports take, measured on this project's 2-core machine (2.47 -> 2.10 s of CPU for
  torch, scikit-learn's datasets and Ray; 2.41 -> 2.00 s for the fork server's imports). On the
  way to the first step that CPU is shared with Ray's start, so it is time. The driver pauses
  the collector while its checks import and build (driver.py), the fork server while it imports
  (forked_workers.py).
* **What Ray imports besides Ray.** Every Ray process's serialization context registers
  pydantic's types (importing pydantic's models and its whole `pydantic.v1` compatibility
  package) on its first task or actor, and Ray's modules import the rest of RAY_DEPENDENCIES;
  none of them reads the process's environment, as Ray does. The fork server imports them for
  every worker it forks (a worker's Ray imports: 0.41 -> 0.11 s of CPU); the driver's check
  thread, which waits for Ray's start anyway, imports them before the driver's first actor
  would (on the driver's main thread, between Ray's start and the first step).
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import threading
from collections.abc import Iterator

# Not pyarrow, which Ray's serialization context imports too: its allocator starts a background
# thread on import, which a worker forked after it would lack (the state it guards copied).
RAY_DEPENDENCIES = (
    "cloudpickle",
    "filelock",
    "google.protobuf",
    "jsonschema",
    "msgpack",
    "packaging.version",
    "pdb",
    "pydantic.v1.fields",  # Ray's `pydantic_compat` registers its ModelField
    "requests",
    "tqdm",
    "wcwidth",
)
PYDANTIC_NAMES = ("BaseModel", "Field", "PrivateAttr", "ValidationError", "validator")

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


def import_ray_dependencies() -> None:
    """RAY_DEPENDENCIES and pydantic's models, each where it is installed (Ray's optional
    dependencies may not be)."""
    for name in RAY_DEPENDENCIES:
        with contextlib.suppress(ImportError):
            importlib.import_module(name)
    with contextlib.suppress(ImportError):
        pydantic = importlib.import_module("pydantic")
        for name in PYDANTIC_NAMES:
            getattr(pydantic, name, None)  # pydantic imports its parts on first access
