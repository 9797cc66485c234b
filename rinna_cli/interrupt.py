"""Ctrl-C: during generation the first press asks the model to stop after the current token; long work
in a thread of its own (downloads, loading) ends at once."""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Any, Callable, TypeVar

_T = TypeVar("_T")


@contextmanager
def sigint_sets(event: threading.Event):
    """While inside, SIGINT sets ``event``; a second SIGINT raises KeyboardInterrupt as usual."""
    if threading.current_thread() is not threading.main_thread():
        yield event
        return

    def handler(signum, frame):
        if event.is_set():
            raise KeyboardInterrupt
        event.set()

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield event
    finally:
        signal.signal(signal.SIGINT, previous)


def in_a_daemon_thread(work: Callable[[], _T], name: str) -> _T:
    """``work()`` on a daemon thread that ends with it, waited for here: its result, or its exception raised here.

    Ctrl-C interrupts the wait at once (a blocking call on the main thread would hold it until done)
    and the process does not wait for the abandoned thread.
    """
    done: dict[str, Any] = {}

    def run() -> None:
        try:
            done["value"] = work()
        except BaseException as err:  # noqa: BLE001 - raised again on the waiting thread
            done["error"] = err

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.1)
    if "error" in done:
        raise done["error"]
    return done["value"]
