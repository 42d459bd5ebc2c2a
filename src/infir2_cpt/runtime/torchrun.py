"""torchrun with a graceful stop: `python -m infir2_cpt.runtime.torchrun <torchrun arguments>`.

Plain torchrun, on SIGTERM/SIGINT, signals each worker's whole process group, SIGKILLs it 30 s later and
exits non-zero. For a CPT run that is wrong four ways: Megatron saves a checkpoint on SIGTERM
(--exit-signal-handler) and a large one needs more than 30 s; the save needs the helper processes the
worker started (the checkpoint writers and their result-queue manager, the DataLoader workers), which
share its process group and die with a signal sent to the group; SIGINT (Ctrl-C) makes the workers raise
KeyboardInterrupt instead of saving; and a scheduler reads the non-zero exit as a failure. Here:
- SIGINT and SIGHUP become SIGTERM, so every stop is a save-and-exit;
- the SIGTERM goes to each worker process alone, never to its group; once a worker has exited, what it
  left behind in its group is killed;
- the workers get INFIR2_STOP_GRACE_SECONDS (recipe key launch.stop_grace_seconds) to finish; a worker
  still running then is killed with its group, the last resort;
- a second stop signal while the workers save is reported and otherwise ignored: a repeated Ctrl-C or a
  scheduler's second SIGTERM must not cut a save short (SIGKILL still ends everything at once);
- a stop can also be asked for without a signal, by writing exp/<name>/.infir2.stop (`infir2 stop`, and
  the Slurm script on its time-limit warning, since a signal through srun reaches every process of the
  step, helpers included): the launcher of every node then stops its workers as for SIGTERM;
- when every worker then exited 0, so does this process.
Two more things happen around torch.distributed.run itself: on several nodes, a node that does not host the
rendezvous first waits (at most launch.join_timeout) for the first node (rendezvous.py), and a failed
rendezvous is reported in one line; when torchrun ends, the experiment lock the launcher took is released
(locking.py). On the host that holds the lock, a thread applies the checkpoint retention policy after each newly
completed checkpoint, and once more when training has ended (retention.py).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from ..layout import EXP_DIR_ENV, read_stop_request, stop_request_path

GRACE_ENV = "INFIR2_STOP_GRACE_SECONDS"
DEFAULT_GRACE_SECONDS = 900
SAVE_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
STOP_POLL_SECONDS = 2.0


class _StopOutcome:
    workers_exited_cleanly = True


def _say(message: str) -> None:
    print(f"infir2.torchrun: {message}", file=sys.stderr, flush=True)


def _signal_group(pgid: int, signum: signal.Signals) -> None:
    try:
        os.killpg(pgid, signum)
    except (ProcessLookupError, PermissionError):
        pass


@contextlib.contextmanager
def _later_stop_signals_reported(grace_seconds: float) -> Iterator[None]:
    """While the workers save, a further stop signal is only reported (torch's handler would raise and
    end this process, and with it, through PR_SET_PDEATHSIG, the workers in the middle of their save)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def report(signum: int, _frame: Any) -> None:
        _say(f"{signal.Signals(signum).name} received while the workers save a checkpoint: still waiting for "
             f"them (at most {grace_seconds:.0f} s from the first signal); SIGKILL abandons the save")

    previous = {signum: signal.signal(signum, report) for signum in SAVE_SIGNALS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def stop_workers(handlers: list[Any], grace_seconds: float) -> bool:
    """SIGTERM to each running worker alone, wait up to grace_seconds for all of them, kill the ones still
    running with their process group, then end whatever the workers left in their groups. True when every
    worker exited 0. `handlers` are torch's SubprocessHandlers (each .proc is a Popen whose pid leads a
    process group of its own: torch starts workers with start_new_session)."""
    with _later_stop_signals_reported(grace_seconds):
        for handler in handlers:
            if handler.proc.poll() is None:
                _say(f"sending SIGTERM to worker {handler.proc.pid} (local rank {handler.local_rank_id}); "
                     f"waiting up to {grace_seconds:.0f} s for it to save and exit")
                try:
                    handler.proc.send_signal(signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + grace_seconds
        for handler in handlers:
            try:
                handler.proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for handler in handlers:
            if handler.proc.poll() is None:
                _say(f"worker {handler.proc.pid} still running {grace_seconds:.0f} s after SIGTERM "
                     "(launch.stop_grace_seconds): killing it")
                _signal_group(handler.proc.pid, signal.SIGKILL)
                handler.proc.wait()
    end_leftover_helpers(handlers)
    return all(handler.proc.returncode == 0 for handler in handlers)


def end_leftover_helpers(handlers: list[Any]) -> None:
    """Kill what exited workers left in their process groups (writers, managers, DataLoader workers)."""
    for handler in handlers:
        if handler.proc.poll() is not None:
            _signal_group(handler.proc.pid, signal.SIGKILL)
        for stream in (getattr(handler, "_stdout", None), getattr(handler, "_stderr", None)):
            if stream is not None:
                stream.close()


def _install_graceful_close(grace_seconds: int) -> None:
    from torch.distributed.elastic.multiprocessing import api as mp_api

    plain_close = mp_api.SubprocessContext._close

    def graceful_close(self: Any, death_sig: signal.Signals, timeout: int = 30) -> None:
        handlers = list(self.subprocess_handlers.values())
        if death_sig in SAVE_SIGNALS:
            _StopOutcome.workers_exited_cleanly = stop_workers(handlers, grace_seconds)
            return
        plain_close(self, death_sig=death_sig, timeout=timeout)
        _StopOutcome.workers_exited_cleanly = all(h.proc.returncode == 0 for h in handlers)

    mp_api.SubprocessContext._close = graceful_close


def _watch_stop_requests(exp_dir: Path, since: float) -> None:
    """Turn a stop request written after this launcher started into a SIGTERM to this process, once torch's agent
    handles SIGTERM (before that, the signal's default action would end the launcher with nothing saved)."""
    path = stop_request_path(exp_dir)
    while True:
        request = read_stop_request(path)
        if (request is not None and request.time >= since
                and signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, signal.SIG_IGN, None)):
            _say(f"stop requested ({path}, by {request.origin}): stopping the workers as on SIGTERM")
            os.kill(os.getpid(), signal.SIGTERM)
            return
        time.sleep(STOP_POLL_SECONDS)


def start_stop_request_watcher() -> None:
    """A request is for the launches running when it was written: one written before this launcher started is
    left over (a relaunch after a stop must not stop again) and ignored."""
    exp_dir = os.environ.get(EXP_DIR_ENV)
    if exp_dir:
        threading.Thread(target=_watch_stop_requests, args=(Path(exp_dir), time.time()),
                         name="infir2-stop-request", daemon=True).start()


def start_retention_watcher() -> Callable[[], None]:
    """With a retention policy (INFIR2_RETENTION) and the experiment lock held by this process (one host of a
    multi-node run), prune after each newly completed checkpoint. Returns what to call when training has ended:
    it stops the watcher and prunes once more (the final checkpoint)."""
    from ..launch.locking import held_by_this_process
    from ..layout import ExperimentPaths
    from ..retention import RETENTION_ENV, RetentionPolicy, poll_seconds, prune_and_report, watch

    exp_dir = os.environ.get(EXP_DIR_ENV)
    policy = RetentionPolicy.from_env_value(os.environ.get(RETENTION_ENV))
    if not exp_dir or policy is None:
        return lambda: None
    paths = ExperimentPaths(name=Path(exp_dir).name, root=Path(exp_dir))

    def holds_lock() -> bool:
        return held_by_this_process(paths) is not None

    stop = threading.Event()
    threading.Thread(target=watch, args=(paths, policy, stop, poll_seconds(os.environ), holds_lock),
                     name="infir2-retention", daemon=True).start()

    def finish() -> None:
        stop.set()
        if holds_lock():
            prune_and_report(paths, policy, who="the launcher at the end of the run")

    return finish


def main(argv: list[str] | None = None) -> None:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.run import main as torchrun_main

    from .rendezvous import EXIT_RENDEZVOUS, before_torchrun, explain_failure

    _install_graceful_close(int(os.environ.get(GRACE_ENV, DEFAULT_GRACE_SECONDS)))
    start_stop_request_watcher()
    finish_retention = start_retention_watcher()
    args = sys.argv[1:] if argv is None else argv
    rdzv = None
    try:
        rdzv = before_torchrun(args)  # multi-node: wait (bounded by join_timeout) for the first node's store
        torchrun_main(args)
    except SignalException as exc:
        if _StopOutcome.workers_exited_cleanly:
            _say(f"stopped by {signal.Signals(exc.sigval).name}; all workers exited cleanly")
            sys.exit(0)
        sys.exit(128 + int(exc.sigval))
    except Exception as exc:  # a failed rendezvous: one line saying what to check, not a traceback
        message = explain_failure(exc, rdzv)
        if message is None:
            raise
        print(message, file=sys.stderr, flush=True)
        sys.exit(EXIT_RENDEZVOUS)
    finally:  # the workers are gone: a last prune (retention.py), then give up the experiment lock (locking.py)
        from ..launch.locking import release_at_exit

        finish_retention()
        release_at_exit()


if __name__ == "__main__":
    main()
