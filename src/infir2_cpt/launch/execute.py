"""Printing a plan (--dry-run) and carrying it out: the experiment's lock, its folders and records, then the
exec of torchrun, so that a scheduler's SIGTERM reaches torchrun and, through it, Megatron."""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import sys
import time
from pathlib import Path

from ..layout import EXP_DIR_ENV, RECIPE_FILE, SCHEDULE_FILE
from ..recipe.load import recipe_to_yaml
from .locking import acquire_for_launch
from .plan import LaunchPlan, rendezvous_id


def format_command(plan: LaunchPlan) -> str:
    """The environment and the command, shell-quoted, one flag (with its values) per line."""
    lines = [f"export {name}={shlex.quote(value)}" for name, value in plan.env.items()]
    lines.append(" ".join(shlex.quote(a) for a in plan.launcher) + " \\")
    flat = flag_lines(plan.megatron_args)
    for i, line in enumerate(flat):
        lines.append("    " + line + (" \\" if i < len(flat) - 1 else ""))
    return "\n".join(lines)


def flag_lines(args: list[str], prefix: str = "--") -> list[str]:
    """Shell-quoted lines of a command: a new line at every argument starting with `prefix`."""
    lines: list[list[str]] = []
    for arg in args:
        if arg.startswith(prefix) or not lines:
            lines.append([arg])
        else:
            lines[-1].append(arg)
    return [" ".join(shlex.quote(a) for a in line) for line in lines]


def describe(plan: LaunchPlan) -> str:
    out = [f"# infir2: experiment {plan.recipe.name} -> {plan.paths.root}"]
    out += [f"# {note}" for note in plan.notes]
    out.append("# environment (a variable you set yourself wins over the recipe):")
    out += [f"#   {s.name}={s.value}  [{s.source}]" for s in plan.env_report]
    return "\n".join(out)


def write_records(plan: LaunchPlan) -> None:
    """What a launch leaves in exp/<name>/ for later launches and reports: the resolved recipe, the schedule Megatron
    was given and, for a decay run, the stable checkpoint it anneals from."""
    (plan.paths.root / RECIPE_FILE).write_text(recipe_to_yaml(plan.recipe))
    (plan.paths.root / SCHEDULE_FILE).write_text(json.dumps(plan.schedule.record(), indent=2) + "\n")
    if plan.start.decay_source is not None:
        plan.start.decay_source.write(plan.paths.root)


def execute(plan: LaunchPlan) -> None:
    """Take the experiment's lock, create exp/<name>/, record the launch there, and exec torchrun. Does not return."""
    paths = plan.paths
    acquire_for_launch(paths, nnodes=plan.recipe.launch.nnodes, rdzv_endpoint=plan.recipe.launch.rdzv_endpoint,
                       rdzv_id=rendezvous_id(plan.recipe))  # one writer per experiment; the lock survives the exec
    paths.make_dirs()
    if plan.start.repair is not None:
        print(f"infir2: {plan.start.repair.apply()}", file=sys.stderr)
    write_records(plan)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    host = socket.gethostname().split(".")[0]
    log_file = paths.logs / f"{stamp}-{host}.log"
    launch_text = describe(plan) + "\n" + format_command(plan) + "\n"
    (paths.root / "launch.sh").write_text("#!/bin/bash\n" + launch_text)
    log_file.write_text(launch_text)
    env = dict(os.environ)
    env.update(plan.env)
    env["INFIR2_LOG_FILE"] = str(log_file)
    env[EXP_DIR_ENV] = str(paths.root)
    print(describe(plan), file=sys.stderr)
    print(f"# console log of this node (all local ranks): {log_file}", file=sys.stderr, flush=True)
    start_console_tee(log_file)
    os.execve(plan.command[0], plan.command, env)


def start_console_tee(log_file: Path) -> None:
    """Copy everything this process (and, after exec, torchrun and its workers) prints to log_file too.

    A forked child reads a pipe that replaces our stdout/stderr and writes to both the terminal and the
    log. It is not our parent, so signals sent to our PID still reach torchrun after the exec; it leaves
    the process group and ignores signals, so a Ctrl-C or a scheduler's SIGTERM to the group cannot kill
    it before the workers' last words (the checkpoint-saved lines) are written. It exits at end of file,
    when the last worker has exited.
    """
    read_end, write_end = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    tee_ignores = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2}
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, tee_ignores)  # no signal between fork and SIG_IGN
    if os.fork() == 0:  # the tee
        os.close(write_end)
        os.setsid()
        for signum in tee_ignores:
            signal.signal(signum, signal.SIG_IGN)
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        terminal = os.dup(1)
        with open(log_file, "ab", buffering=0) as log:
            while chunk := os.read(read_end, 1 << 16):
                log.write(chunk)
                try:
                    os.write(terminal, chunk)
                except OSError:
                    pass  # the terminal went away; keep logging
        os._exit(0)
    signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
    os.close(read_end)
    os.dup2(write_end, 1)
    os.dup2(write_end, 2)
    os.close(write_end)
