"""A loop in a background thread for the length of a with-block (progress lines, the progress
bar, the Prefect progress artefact): one implementation of start, stop and join."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager


@contextmanager
def while_running(loop: Callable[[threading.Event], None], *, name: str) -> Iterator[None]:
    """Run `loop(stop)` in a daemon thread while the block runs; on exit (normal or not) set
    `stop` and wait for the loop, which must return once `stop` is set."""
    stop = threading.Event()
    thread = threading.Thread(target=loop, args=(stop,), name=name, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
