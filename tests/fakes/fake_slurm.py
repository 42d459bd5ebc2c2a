"""Stand-ins for sbatch, srun, scontrol and the compute nodes' `infir2`, for tests/process/test_slurm.py.

One file, several names: the test links it as bin/sbatch, bin/srun, bin/scontrol and bin/infir2 (the
name it is called by picks the role) and puts bin/ first on PATH. Every call appends a JSON record
(argv, the Slurm variables, pid) to $FAKE_SLURM_DIR/<role>.jsonl. What each does, like Slurm would:

- sbatch SCRIPT: reads the #SBATCH lines, sets SLURM_JOB_ID ($FAKE_JOB_ID), SLURM_JOB_NODELIST
  ($FAKE_NODELIST), SLURM_NNODES (from --nodes), SLURM_JOB_NAME, changes to --chdir, sends stdout and
  stderr to --output (%j expanded, appended with --open-mode=append), then execs `bash SCRIPT`: the
  test's process *is* the batch shell, so a signal sent to it reaches the script's traps.
- scontrol show hostnames LIST: one host per line (ranges like gpu-a[01-04] and comma lists).
  scontrol requeue ID: recorded only.
- srun [options] CMD...: one CMD per node of the allocation, concurrently, with SLURMD_NODENAME,
  SLURM_NODEID and SLURM_PROCID set and output to --output (%j, %N, %t expanded); forwards SIGTERM
  to every node's process (as srun forwards signals to its tasks); exits with the highest status.
- infir2 ...: a compute node's launcher. $FAKE_TRAIN says how the "training" goes:
  complete (node 0 writes the checkpoint tracker = $FAKE_TRAIN_ITERS), until-term (waits for
  SIGTERM or a stop request file, then node 0 saves iteration $FAKE_SAVE_ITER), early-exit (node 0 saves $FAKE_SAVE_ITER and
  exits 0, as launch.exit_duration_minutes does), fail (exit 3). With FAKE_DRY_RUN=1 node 0 also runs
  the real `infir2 train --dry-run` with the same arguments ($FAKE_REAL_INFIR2). `infir2 stop ...` (the batch
  shell's stop) runs the real command.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

LOG_DIR = Path(os.environ.get("FAKE_SLURM_DIR", "."))


def record(role: str, **extra) -> None:
    entry = {"argv": sys.argv[1:], "pid": os.getpid(), "cwd": os.getcwd(),
             "env": {k: v for k, v in os.environ.items() if k.startswith(("SLURM", "INFIR2_"))}, **extra}
    with open(LOG_DIR / f"{role}.jsonl", "a") as f:
        f.write(json.dumps(entry) + "\n")


def expand_hostlist(text: str) -> list[str]:
    hosts = []
    for part in re.findall(r"[^,\[]+(?:\[[^\]]*\])?", text):
        match = re.fullmatch(r"(.*)\[(.*)\]", part)
        if not match:
            hosts.append(part)
            continue
        prefix, ranges = match.groups()
        for item in ranges.split(","):
            lo, _, hi = item.partition("-")
            for n in range(int(lo), int(hi or lo) + 1):
                hosts.append(f"{prefix}{n:0{len(lo)}d}")
    return hosts


def sbatch() -> int:
    script = Path(sys.argv[1])
    options = {}
    for line in script.read_text().splitlines():
        if line.startswith("#SBATCH "):
            key, _, value = line[len("#SBATCH "):].strip().lstrip("-").partition("=")
            options[key] = value
    record("sbatch", options=options)
    job_id = os.environ.get("FAKE_JOB_ID", "4242")
    os.environ.update({"SLURM_JOB_ID": job_id, "SLURM_JOBID": job_id,
                       "SLURM_JOB_NODELIST": os.environ["FAKE_NODELIST"],
                       "SLURM_NNODES": options["nodes"], "SLURM_JOB_NAME": options.get("job-name", "")})
    if options.get("chdir"):
        os.chdir(options["chdir"])
    if options.get("output"):
        mode = os.O_APPEND if options.get("open-mode") == "append" else os.O_TRUNC
        fd = os.open(options["output"].replace("%j", job_id), os.O_WRONLY | os.O_CREAT | mode, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
    os.execvp("bash", ["bash", str(script.absolute())])
    return 1


def scontrol() -> int:
    record("scontrol")
    if sys.argv[1:3] == ["show", "hostnames"]:
        print("\n".join(expand_hostlist(sys.argv[3])))
    return 0


def srun() -> int:
    args = sys.argv[1:]
    options = {}
    while args and args[0].startswith("-"):
        key, _, value = args.pop(0).lstrip("-").partition("=")
        options[key] = value
    record("srun", options=options, command=args)
    job_id = os.environ["SLURM_JOB_ID"]
    hosts = expand_hostlist(os.environ["SLURM_JOB_NODELIST"])[: int(options.get("nodes", 1))]
    children = []
    for index, host in enumerate(hosts):
        env = dict(os.environ, SLURMD_NODENAME=host, SLURM_NODEID=str(index), SLURM_PROCID=str(index))
        out = subprocess.DEVNULL
        if options.get("output"):
            path = options["output"].replace("%j", job_id).replace("%N", host).replace("%t", str(index))
            out = open(path, "a" if options.get("open-mode") == "append" else "w")
        children.append(subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT))

    def forward(signum, _frame):
        record("srun-signal", signal=signal.Signals(signum).name)
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    (LOG_DIR / "srun.pid").write_text(str(os.getpid()))
    return max(child.wait() for child in children)


def save(iteration: int) -> None:
    tracker = Path(os.environ["INFIR2_EXP_ROOT"]) / os.environ["FAKE_EXP"] / "checkpoints" / "latest_checkpointed_iteration.txt"
    tracker.parent.mkdir(parents=True, exist_ok=True)
    tracker.write_text(f"{iteration}\n")


def infir2() -> int:
    if sys.argv[1:2] == ["stop"]:
        return infir2_stop()
    node = os.environ.get("SLURMD_NODENAME", "?")
    first = os.environ.get("SLURM_NODEID") == "0"
    print(f"fake infir2 on {node}: {' '.join(sys.argv[1:])}", flush=True)
    extra = {}
    if first and os.environ.get("FAKE_DRY_RUN") == "1":
        real = os.environ["FAKE_REAL_INFIR2"]
        argv = sys.argv[1:]
        dry = subprocess.run([real, argv[0], "--dry-run", *argv[1:]], capture_output=True, text=True, timeout=120)
        extra = {"dry_run_rc": dry.returncode, "dry_run_out": dry.stdout + dry.stderr}
    record("infir2", node=node, **extra)
    mode = os.environ.get("FAKE_TRAIN", "complete")
    if mode == "complete":
        if first:
            save(int(os.environ["FAKE_TRAIN_ITERS"]))
        return 0
    if mode == "fail":
        return 3
    if mode == "early-exit":
        if first:
            save(int(os.environ["FAKE_SAVE_ITER"]))
        return 0
    # until-term: train until SIGTERM or a stop request written after the start (what the real launcher's
    # watcher acts on), then save and exit 0 (the launcher's clean stop)
    stop = []
    signal.signal(signal.SIGTERM, lambda signum, _frame: stop.append(signum))
    request = Path(os.environ["INFIR2_EXP_ROOT"]) / os.environ["FAKE_EXP"] / ".infir2.stop"
    started = time.time()
    requested = lambda: request.exists() and json.loads(request.read_text())["time"] >= started  # noqa: E731
    (LOG_DIR / f"ready-{node}").write_text("1")
    deadline = time.monotonic() + 60
    while not stop and not requested() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.2)  # a SIGTERM on top of a request, or a second one, lands here and is counted
    record("infir2-stop", node=node, signals=len(stop), requests=int(requested()))
    if not stop and not requested():
        return 9
    if first:
        save(int(os.environ["FAKE_SAVE_ITER"]))
    how = "a stop request" if requested() else "SIGTERM"
    print(f"fake infir2 on {node}: saved and stopped on {how}", flush=True)
    return 0


def infir2_stop() -> int:
    """`infir2 stop EXP` from the batch shell: the real command writes the request."""
    record("infir2-stop-request")
    return subprocess.run([os.environ["FAKE_REAL_INFIR2"], *sys.argv[1:]]).returncode


if __name__ == "__main__":
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `scontrol ... | head -n1`: die quietly, like the real one
    role = Path(sys.argv[0]).name
    sys.exit({"sbatch": sbatch, "scontrol": scontrol, "srun": srun, "infir2": infir2}[role]())
