"""torchrun with a graceful stop: `python -m infir2_cpt.runtime.torchrun <torchrun arguments>`.

Plain torchrun, on SIGTERM/SIGINT, forwards the signal to its workers, SIGKILLs them 30 s later and
exits non-zero. For a CPT run that is wrong three ways: Megatron saves a checkpoint on SIGTERM
(--exit-signal-handler) and a large one needs more than 30 s; SIGINT (Ctrl-C) makes the workers raise
KeyboardInterrupt instead of saving; and a scheduler reads the non-zero exit as a failure. Here:
- SIGINT and SIGHUP are forwarded to the workers as SIGTERM, so every stop is a save-and-exit;
- the workers get INFIR2_STOP_GRACE_SECONDS (recipe key launch.stop_grace_seconds) to finish;
- when every worker then exited 0, so does this process.
Two more things happen around torch.distributed.run itself: on several nodes, a node that does not host the
rendezvous first waits (at most launch.join_timeout) for the first node (rendezvous.py), and a failed
rendezvous is reported in one line; when torchrun ends, the experiment lock the launcher took is released
(locking.py).
"""

from __future__ import annotations

import os
import signal
import sys

GRACE_ENV = "INFIR2_STOP_GRACE_SECONDS"
DEFAULT_GRACE_SECONDS = 900
SAVE_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class _StopOutcome:
    workers_exited_cleanly = True


def _install_graceful_close(grace_seconds: int) -> None:
    from torch.distributed.elastic.multiprocessing import api as mp_api

    plain_close = mp_api.SubprocessContext._close

    def graceful_close(self, death_sig: signal.Signals, timeout: int = 30) -> None:
        if death_sig in SAVE_SIGNALS:
            death_sig, timeout = signal.SIGTERM, max(timeout, grace_seconds)
        plain_close(self, death_sig=death_sig, timeout=timeout)
        codes = [handler.proc.returncode for handler in self.subprocess_handlers.values()]
        _StopOutcome.workers_exited_cleanly = all(code == 0 for code in codes)

    mp_api.SubprocessContext._close = graceful_close


def main(argv: list[str] | None = None) -> None:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.run import main as torchrun_main

    from .rendezvous import EXIT_RENDEZVOUS, before_torchrun, explain_failure

    _install_graceful_close(int(os.environ.get(GRACE_ENV, DEFAULT_GRACE_SECONDS)))
    args = sys.argv[1:] if argv is None else argv
    rdzv = None
    try:
        rdzv = before_torchrun(args)  # multi-node: wait (bounded by join_timeout) for the first node's store
        torchrun_main(args)
    except SignalException as exc:
        if _StopOutcome.workers_exited_cleanly:
            print(f"infir2.torchrun: stopped by {signal.Signals(exc.sigval).name}; all workers exited cleanly",
                  file=sys.stderr, flush=True)
            sys.exit(0)
        sys.exit(128 + int(exc.sigval))
    except Exception as exc:  # a failed rendezvous: one line saying what to check, not a traceback
        message = explain_failure(exc, rdzv)
        if message is None:
            raise
        print(message, file=sys.stderr, flush=True)
        sys.exit(EXIT_RENDEZVOUS)
    finally:  # the workers are gone: give up the experiment lock the launcher took (locking.py)
        from ..launch.locking import release_at_exit

        release_at_exit()


if __name__ == "__main__":
    main()
