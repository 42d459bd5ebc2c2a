"""A worker that failed exits, whatever it started that could keep it alive.

When training raises, Python prints the traceback and then shuts down: it joins every non-daemon thread and runs
the libraries' exit handlers and destructors. One of those can wait forever (a background thread, a collective
still in flight): the rank then sits idle, holding its GPU and the allocation, while the other ranks and the
launcher wait for it. Measured on an H200: after an assertion in Megatron's overlapped parameter gather the worker
printed its traceback and was still alive 4.5 minutes later.

run_bounded(main) lets a failed run shut down normally (TensorBoard and W&B flush, checkpoint workers stop) and
ends the process with the run's exit status if that takes longer than EXIT_GRACE_SECONDS. A run that ends
normally, or with status 0 (a stop request honoured), is left alone.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from typing import Callable

EXIT_GRACE_SECONDS = 60.0


def _status(code: object) -> int:
    if isinstance(code, int):
        return code
    return 0 if code is None else 1  # SystemExit("message") exits with 1


def _exit_after(seconds: float, status: int) -> None:
    def end() -> None:
        time.sleep(seconds)
        print(f"infir2: the run failed and this process had not exited {seconds:g} s later (a thread or a "
              f"library's exit handler is holding it): exiting now with status {status}", file=sys.stderr, flush=True)
        os._exit(status)

    threading.Thread(target=end, name="infir2-exit-guard", daemon=True).start()


def run_bounded(main: Callable[[], None], grace_seconds: float = EXIT_GRACE_SECONDS) -> None:
    """main(); if it fails, the process ends at most grace_seconds later with the failure's exit status."""
    try:
        main()
    except SystemExit as stop:
        if _status(stop.code) != 0:
            _exit_after(grace_seconds, _status(stop.code))
        raise
    except BaseException:
        _exit_after(grace_seconds, 1)
        raise
