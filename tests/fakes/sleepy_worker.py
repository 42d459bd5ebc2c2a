"""A stand-in for Megatron in the signal tests: one torchrun worker that waits to be stopped.

The launcher under test runs this file instead of infir2_cpt.runtime.entry (INFIR2_ENTRY=<this file>). The worker
installs a SIGTERM handler, writes $SLEEPY_OUT/ready-<rank>.json, then sleeps up to $SLEEPY_SECONDS
(default 120). A SIGTERM makes it write $SLEEPY_OUT/signal-<rank>.json (which signal, its pid, what
torchrun told it) and exit 0, the way Megatron's --exit-signal-handler saves and exits. A worker that
is never signalled writes done-<rank>.json and exits 0 when the time is up. SLEEPY_IGNORE_SIGTERM=1 makes
it ignore SIGTERM (a worker that never finishes saving), so the launcher's grace period and SIGKILL show. The Megatron arguments the
launcher appended are recorded, not parsed.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

OUT = Path(os.environ.get("SLEEPY_OUT", "."))
RANK = os.environ.get("RANK", "x")


def _write(name: str, **extra: object) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    record = {"pid": os.getpid(), "ppid": os.getppid(), "rank": RANK, "argv": sys.argv[1:],
              "exp_dir": os.environ.get("INFIR2_EXP_DIR"), "time": time.time(), **extra}
    tmp = OUT / f".{name}-{RANK}.tmp"
    tmp.write_text(json.dumps(record))
    tmp.rename(OUT / f"{name}-{RANK}.json")


def _on_signal(signum: int, _frame: object) -> None:
    _write("signal", signal=signal.Signals(signum).name)
    sys.exit(0)


def main() -> int:
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, _on_signal)
    if os.environ.get("SLEEPY_IGNORE_SIGTERM") == "1":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _write("ready")
    deadline = time.monotonic() + float(os.environ.get("SLEEPY_SECONDS", "120"))
    while time.monotonic() < deadline:
        time.sleep(0.05)
    _write("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
