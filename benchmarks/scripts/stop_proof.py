"""GPU proof of the graceful stop: stop signals (and a stop request) at every point of a run on one GPU.

Each case starts `infir2 train` (or `infir2 decay`) on the tiny recipe, waits for a moment in its log,
sends a signal to the launcher's PID only (as a scheduler or a terminal would), and records: the iteration
reached, the checkpoint the stop wrote, the launcher's exit code, the seconds from signal to exit and the
save's own duration (Megatron's "saving checkpoint" and "successfully saved" lines). Then it runs the same
command again, checks that Megatron loads that iteration, and stops that run too.

    python3 benchmarks/scripts/stop_proof.py --out $OUT [--cases before,after,...]

Cases run side by side on the GPU (tiny needs ~3 GB each). Experiments go to $INFIR2_EXP_ROOT
(default /tmp/stop-exp). Writes stop_proof.json and one log per case into --out.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ITER_RE = re.compile(r"iteration\s+(\d+)/\s*\d+")
SAVE_RE = re.compile(r"\[([\d-]+ [\d:.]+)\] saving checkpoint at iteration\s+(\d+)")
SAVED_RE = re.compile(r"\[([\d-]+ [\d:.]+)\] successfully saved checkpoint from iteration\s+(\d+)")
LOADED_RE = re.compile(r"successfully loaded checkpoint from .* at iteration (\d+)")


@dataclass
class Case:
    name: str
    command: list[str]
    signum: signal.Signals = signal.SIGTERM
    at_iteration: int | None = None  # stop once the log shows this iteration
    at_save: int | None = None  # stop as soon as the save of this iteration starts
    request: bool = False  # `infir2 stop` instead of a signal
    after: str | None = None  # start once that case has finished (decay from its checkpoint)


@dataclass
class Result:
    name: str
    signal: str
    command: list[str]
    signal_iteration: int | None = None
    exit_code: int | None = None
    exit_seconds: float | None = None
    saves_after_signal: list[dict] = field(default_factory=list)
    exited_on_signal_line: bool = False
    checkpoints: list[str] = field(default_factory=list)
    tracker: str | None = None
    resume_loaded_iteration: int | None = None
    resume_exit_code: int | None = None
    error: str | None = None


def last_iteration(text: str) -> int:
    found = ITER_RE.findall(text)
    return int(found[-1]) if found else 0


def wait_until(log: Path, proc: subprocess.Popen, test, timeout: float = 600) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace") if log.exists() else ""
        if test(text):
            return text
        if proc.poll() is not None:
            raise RuntimeError(f"exited {proc.returncode} before the moment to stop")
        time.sleep(0.2)
    raise RuntimeError("timed out waiting for the moment to stop")


def stop(case: Case, proc: subprocess.Popen, exp: str) -> None:
    if case.request:
        subprocess.run(["infir2", "stop", exp], check=True)
    else:
        proc.send_signal(case.signum)


def run_case(case: Case, out: Path, exp_root: Path, done: dict[str, threading.Event]) -> Result:
    result = Result(case.name, "stop request" if case.request else case.signum.name, case.command)
    if case.after:
        done[case.after].wait()
    exp = case.command[case.command.index("--exp") + 1]
    log = out / f"{case.name}.log"
    procs: list[subprocess.Popen] = []
    try:
        with open(log, "wb") as f:
            proc = subprocess.Popen(case.command, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        procs.append(proc)
        needle = f"saving checkpoint at iteration {case.at_save or 0:7d}"
        if case.at_save is not None:
            text = wait_until(log, proc, lambda t: needle in t)
            since = text.find(needle) - 30  # the save in progress counts: include its line
        else:
            text = wait_until(log, proc, lambda t: last_iteration(t) >= case.at_iteration)
            since = len(text)
        t0 = time.monotonic()
        stop(case, proc, exp)
        result.signal_iteration = last_iteration(text)
        result.exit_code = proc.wait(timeout=900)
        result.exit_seconds = round(time.monotonic() - t0, 1)
        text = log.read_text(errors="replace")
        after = text[max(0, since):]
        starts = {int(i): s for s, i in SAVE_RE.findall(after)}
        ends = {int(i): s for s, i in SAVED_RE.findall(after)}
        for iteration, start in sorted(starts.items()):
            result.saves_after_signal.append({"iteration": iteration, "start": start, "end": ends.get(iteration)})
        result.exited_on_signal_line = "exiting program after receiving SIGTERM" in text
        ckpt = exp_root / exp / "checkpoints"
        result.checkpoints = sorted(p.name for p in ckpt.glob("iter_*"))
        tracker = ckpt / "latest_checkpointed_iteration.txt"
        result.tracker = tracker.read_text().strip() if tracker.exists() else None
        # the same command again: it must load the stop's checkpoint; then stop it as well
        log2 = out / f"{case.name}-resume.log"
        with open(log2, "wb") as f:
            proc2 = subprocess.Popen(case.command, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        procs.append(proc2)
        text2 = wait_until(log2, proc2, lambda t: LOADED_RE.search(t) is not None and
                           last_iteration(t) > int(LOADED_RE.search(t).group(1)))
        result.resume_loaded_iteration = int(LOADED_RE.search(text2).group(1))
        proc2.send_signal(signal.SIGTERM)
        result.resume_exit_code = proc2.wait(timeout=900)
    except Exception as exc:  # recorded, the other cases go on
        result.error = f"{type(exc).__name__}: {exc}"
        for p in procs:
            if p.poll() is None:
                p.kill()
    finally:
        done[case.name].set()
    return result


def cases(port0: int) -> list[Case]:
    def train(exp: str, port: int, *sets: str) -> list[str]:
        cmd = ["infir2", "train", "--recipe", "tiny", "--exp", exp, "--rdzv-endpoint", f"localhost:{port}"]
        for s in sets:
            cmd += ["--set", s]
        return cmd

    asyn = "checkpoint.async_save=true"
    return [
        Case("before", train("stop-before", port0 + 1), at_iteration=50),
        Case("after", train("stop-after", port0 + 2), at_iteration=150),
        Case("during", train("stop-during", port0 + 3), at_save=100),
        Case("async-after", train("stop-async-after", port0 + 4, asyn), at_iteration=150),
        Case("async-during", train("stop-async-during", port0 + 5, asyn), at_save=100),
        Case("sigint", train("stop-sigint", port0 + 6), signal.SIGINT, at_iteration=150),
        Case("sighup", train("stop-sighup", port0 + 7), signal.SIGHUP, at_iteration=150),
        Case("request", train("stop-request", port0 + 8), at_iteration=150, request=True),
        Case("decay", ["infir2", "decay", "--recipe", "tiny", "--load", "iter_0000100", "--stable-exp", "stop-after",
                       "--exp", "stop-after_decay", "--set", "checkpoint.save_interval=20",
                       "--rdzv-endpoint", f"localhost:{port0 + 9}"], at_iteration=130, after="after"),
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--cases", default="", help="comma-separated case names (default: all)")
    parser.add_argument("--port", type=int, default=29600)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    exp_root = Path(os.environ.setdefault("INFIR2_EXP_ROOT", "/tmp/stop-exp"))
    chosen = [c for c in cases(args.port) if not args.cases or c.name in args.cases.split(",")]
    done = {c.name: threading.Event() for c in cases(args.port)}
    for name, event in done.items():
        if name not in {c.name for c in chosen}:
            event.set()
    results: dict[str, Result] = {}
    threads = [threading.Thread(target=lambda c=c: results.__setitem__(c.name, run_case(c, args.out, exp_root, done)))
               for c in chosen]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ordered = [results[c.name] for c in chosen]
    (args.out / "stop_proof.json").write_text(json.dumps([asdict(r) for r in ordered], indent=1))
    print(f"{'case':14} {'signal':12} {'at it':>6} {'saved':>22} {'exit':>4} {'s':>6} {'tracker':>7} {'resume':>6} {'rc2':>3}")
    for r in ordered:
        saved = ",".join(str(s["iteration"]) + ("" if s["end"] else "?") for s in r.saves_after_signal)
        print(f"{r.name:14} {r.signal:12} {r.signal_iteration!s:>6} {saved:>22} {r.exit_code!s:>4} "
              f"{r.exit_seconds!s:>6} {r.tracker!s:>7} {r.resume_loaded_iteration!s:>6} {r.resume_exit_code!s:>3}"
              + (f"  ERROR {r.error}" if r.error else ""))
    ok = all(r.error is None and r.exit_code == 0 and r.resume_exit_code == 0
             and r.tracker is not None and r.resume_loaded_iteration == int(r.tracker) for r in ordered)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
