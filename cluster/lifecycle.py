"""Signals and bounded waits for the CLI: SIGTERM stops a command the way Ctrl-C does, a second
signal exits at once, and connecting to a cluster that is gone or going down gives up in time.

Ray's driver installs its own SIGTERM handler in ``ray.init`` (it dumps C++ frames and aborts),
so :func:`install` runs again after every connect, not only at start-up.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that every ``finally`` and ``except KeyboardInterrupt``
    path that cleans up after an interrupted command runs for it too."""


class _State:
    signum: int | None = None


_STATE = _State()


def _handler(signum: int, _frame: Any) -> None:
    if _STATE.signum is not None:
        # The operator insists: no drain, no clean-up, exit now (128 + signal, as shells do).
        os._exit(128 + signum)
    _STATE.signum = signum
    if signum == signal.SIGTERM:
        raise Terminated()
    raise KeyboardInterrupt()


def install() -> None:
    """Route SIGTERM and SIGINT to :class:`Terminated`/``KeyboardInterrupt`` (first signal)
    and to an immediate exit (second signal). A no-op outside the main thread."""
    if threading.current_thread() is not threading.main_thread():
        return
    signal.signal(signal.SIGTERM, _handler)
    signal.signal(signal.SIGINT, _handler)


def received() -> int | None:
    """The stop signal that arrived (``signal.SIGTERM``/``SIGINT``), or ``None``. Libraries
    may catch the raised exception and raise a plain ``KeyboardInterrupt`` of their own (Ray
    Train does), so exit codes are chosen from this, not from the exception's class."""
    return _STATE.signum


def reset() -> None:
    """Forget an earlier signal (tests run several commands in one process)."""
    _STATE.signum = None


def bounded(call: Callable[[], T], timeout_s: float, what: str) -> T:
    """Run ``call`` (a blocking connect) in a helper thread and wait at most ``timeout_s``.

    ``ray.init(address=...)`` retries for minutes against a cluster whose head is dead or
    shutting down and cannot be interrupted from Python; waiting here instead keeps the main
    thread free for signals and lets the command fail with one line. The helper is a daemon
    thread, so a connect that never returns does not hold the process.
    """
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["value"] = call()
        except BaseException as err:  # handed to the caller's thread below
            outcome["error"] = err

    worker = threading.Thread(target=run, name=f"taskray-{what}", daemon=True)
    worker.start()
    worker.join(timeout_s)
    if worker.is_alive():
        raise TimeoutError(f"{what} did not finish within {timeout_s:.0f}s")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]
