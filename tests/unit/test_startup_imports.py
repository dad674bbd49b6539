"""Start-up imports (distrain/startup_imports.py): the garbage collector's pauses nest and overlap
across threads, the last one restoring the collector as the first found it; the libraries Ray
imports besides Ray are imported without Ray."""

from __future__ import annotations

import gc
import subprocess
import sys
import threading
from collections.abc import Iterator

import pytest

from distrain.startup_imports import collection_paused


@pytest.fixture
def collector_restored() -> Iterator[None]:
    enabled = gc.isenabled()
    yield
    (gc.enable if enabled else gc.disable)()


def test_overlapping_pauses_on_two_threads_end_with_the_last(collector_restored: None) -> None:
    gc.enable()
    entered, leave = threading.Event(), threading.Event()

    def other_thread() -> None:  # as the driver's check thread, beside its main thread
        with collection_paused():
            entered.set()
            leave.wait(10)

    thread = threading.Thread(target=other_thread)
    thread.start()
    assert entered.wait(10)
    assert not gc.isenabled()
    with collection_paused():
        leave.set()
        thread.join(10)
        assert not gc.isenabled()  # the other thread's pause ended; this one still runs
        with collection_paused():  # nested
            assert not gc.isenabled()
        assert not gc.isenabled()
    assert gc.isenabled()


def test_a_collector_disabled_before_stays_disabled(collector_restored: None) -> None:
    gc.disable()
    with collection_paused():
        assert not gc.isenabled()
    assert not gc.isenabled()  # not this module's to turn on


def test_the_pause_ends_when_its_block_raises(collector_restored: None) -> None:
    gc.enable()
    with pytest.raises(ValueError), collection_paused():
        raise ValueError("a failed import")
    assert gc.isenabled()


def test_the_libraries_ray_imports_are_imported_without_ray() -> None:
    """In a new interpreter, as the fork server imports them: Ray reads each worker's
    environment as it imports, so it must not come with them."""
    code = (
        "import sys\n"
        "from distrain.startup_imports import import_ray_dependencies\n"
        "import_ray_dependencies()\n"
        "print('pydantic.v1.fields' in sys.modules, 'pydantic.main' in sys.modules,"
        " any(name == 'ray' or name.startswith('ray.') for name in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.stdout.split() == ["True", "True", "False"], done.stdout + done.stderr


def test_the_drivers_checks_freeze_what_they_imported() -> None:
    """In a new interpreter, as the command runs them: after the checks the collector is on and
    never walks the objects of torch's, the supervisor's and Ray's imports again."""
    code = (
        "import gc\n"
        "from distrain import config, driver\n"
        "from distrain.cli import compose_job\n"
        "job = config.typed(compose_job('trainer.workers=1'))\n"
        "before = gc.get_freeze_count()\n"
        "driver.start_checks(job, background=False).done.result()\n"
        "print(before, gc.get_freeze_count(), gc.isenabled())\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    before, after, enabled = done.stdout.split()
    assert int(before) == 0 and int(after) > 100_000, done.stdout + done.stderr
    assert enabled == "True"
