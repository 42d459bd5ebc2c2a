"""`infir2 sbatch`: a Slurm batch script that runs `infir2 train` once per node and requeues itself.

What the script does, in order:
1. `#SBATCH` lines: whole nodes (one task per node: the infir2 launcher, which starts one process per GPU
   through torchrun), GPUs per node, partition, time limit, job name, the batch log under
   exp/<name>/logs, `--requeue`, and `--signal=B:USR1@<seconds>` (a warning to the batch shell only, that
   many seconds before the time limit).
2. The rendezvous endpoint is the first node of the allocation: `scontrol show hostnames
   "$SLURM_JOB_NODELIST" | head -n1`, port 29400; the rendezvous id is the job id, which stays the same
   when the job is requeued.
3. `srun` starts `infir2 train` on every node with the same recipe, --set values and experiment, plus
   `--nnodes $SLURM_NNODES --nproc-per-node G --rdzv-endpoint $HEAD:29400`; each node's console goes to
   exp/<name>/logs/slurm-<jobid>-<node>.log (appended across requeues).
4. On SIGUSR1 (the time-limit warning; also `scancel --batch --signal=USR1 <jobid>` to stop and requeue
   by hand, or a preemption where SlurmctldParameters=preempt_send_user_signal) the batch shell runs
   `infir2 stop` once: a stop request in the experiment folder, which the launcher on every node sees
   within seconds; each sends SIGTERM to its own workers only, and they save a checkpoint and exit
   (Megatron --exit-signal-handler, given launch.stop_grace_seconds). Not a signal through srun: Slurm
   delivers that to every process of the step, the workers' checkpoint writers too, and the save would
   fail. Then `scontrol requeue $SLURM_JOB_ID`: the same script runs again and `infir2 train` resumes from
   the last complete checkpoint (a request left from the earlier attempt is removed before srun).
5. A step that exits 0 before schedule.train_iters after making progress (launch.exit_duration_minutes)
   is requeued the same way. SIGTERM to the batch shell (scancel, preemption, the time limit itself) is not
   forwarded a second time: Slurm signals the step's processes itself. Such a job is requeued only by
   Slurm (PreemptMode=REQUEUE; the script asks for --requeue), so that `scancel` stops a run for good.

Everything is validated before a line is printed: Slurm options and the recipe for this world size
(the same checks as `infir2 train`, through launch.plan_run in dry-run mode), all problems at once.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .. import checkpoints as ck
from ..layout import stop_request_path
from .. import requests
from ..errors import LaunchError, Problem, RecipeError, SlurmError
from ..requests import EXP_HELP, EXTRA_HELP, RECIPE_HELP, SET_HELP, argument
from .plan import LaunchPlan, LaunchRequest, plan_run

DEFAULT_PORT = 29400
DEFAULT_SIGNAL_SECONDS = 300
# A placeholder for validation only: the real endpoint is the allocation's first node, known at run time.
_VALIDATION_HOST = "slurm-first-node"
_TIME_RE = re.compile(r"^(?:(?P<days>\d+)-)?(?P<h>\d{1,2}):(?P<m>\d{2}):(?P<s>\d{2})$")
_SAFE_WORD_RE = re.compile(r"^[A-Za-z0-9_.,+=@:-]+$")
_SAFE_PATH_RE = re.compile(r"^[A-Za-z0-9_./+=,@:-]+$")
_OPTION_KEY_RE = re.compile(r"^[A-Za-z][A-Za-z0-9-]*$")




@dataclass
class SbatchRequest:
    """What `infir2 sbatch` is asked for."""

    recipe: str = requests.option("--recipe", "-r", help=RECIPE_HELP, metavar="NAME|FILE")
    nodes: int = requests.option("--nodes", "-N", help="Nodes to allocate; `infir2 train` runs once on each.")
    partition: str | None = requests.option("--partition", "-p", help="Slurm partition.", default=None)
    time: str | None = requests.option("--time", "-t", help="Time limit, HH:MM:SS or D-HH:MM:SS (default: the partition's).",
                              default=None)
    gpus_per_node: int | None = requests.option(
        "--gpus-per-node", help="GPUs (training processes) per node (default: the recipe's launch.nproc_per_node).",
        default=None)
    sets: list[str] = requests.option("--set", "-s", help=SET_HELP, default_factory=list, metavar="KEY=VALUE")
    exp: str | None = requests.option("--exp", help=EXP_HELP, default=None, metavar="NAME")
    port: int = requests.option("--port", help="Rendezvous port on the first node.", default=DEFAULT_PORT)
    signal_seconds: int = requests.option(
        "--signal-seconds", help="Seconds before the time limit at which the job saves a checkpoint and requeues "
        "itself.", default=DEFAULT_SIGNAL_SECONDS)
    exclusive: bool = requests.option("--exclusive/--no-exclusive",
                             help="Ask for whole nodes (all their CPUs for the data loaders).", default=True)
    sbatch_options: list[str] = requests.option(  # KEY=VALUE or KEY -> #SBATCH --KEY=VALUE
        "--sbatch-option", metavar="KEY=VALUE",
        help="Another #SBATCH option, e.g. --sbatch-option account=proj --sbatch-option qos=high (repeatable).",
        default_factory=list)
    output: str | None = requests.option(
        "--output", "-o", metavar="FILE", help="Write the script to FILE (made executable) instead of stdout.",
        default=None)
    extra_args: list[str] = argument(EXTRA_HELP, default_factory=list, metavar="-- MEGATRON_FLAGS", show_default=False)


@dataclass
class BatchScript:
    text: str
    plan: LaunchPlan
    logs_dir: Path
    warnings: list[Problem]


# --------------------------------------------------------------------------- validation


def parse_time_limit(text: str) -> int | None:
    """Seconds in a Slurm time limit written HH:MM:SS or D-HH:MM:SS; None when malformed."""
    match = _TIME_RE.match(text.strip())
    if not match:
        return None
    days, hours, minutes, seconds = (int(match.group(k) or 0) for k in ("days", "h", "m", "s"))
    if minutes > 59 or seconds > 59 or (days and hours > 23):
        return None
    total = ((days * 24 + hours) * 60 + minutes) * 60 + seconds
    return total or None


def _check_slurm_options(req: SbatchRequest) -> list[Problem]:
    problems: list[Problem] = []
    if req.nodes < 1:
        problems.append(Problem("--nodes", "must be >= 1", req.nodes))
    if req.gpus_per_node is not None and req.gpus_per_node < 1:
        problems.append(Problem("--gpus-per-node", "must be >= 1", req.gpus_per_node))
    if req.partition is not None and not _SAFE_WORD_RE.match(req.partition):
        problems.append(Problem("--partition", "must be a Slurm partition name (letters, digits, _.,-)", req.partition))
    if not 1 <= req.port <= 65535:
        problems.append(Problem("--port", "must be in 1-65535", req.port))
    if not 1 <= req.signal_seconds <= 65535:
        problems.append(Problem("--signal-seconds", "must be in 1-65535 (Slurm's --signal limit)", req.signal_seconds))
    if req.time is not None:
        limit = parse_time_limit(req.time)
        if limit is None:
            problems.append(Problem("--time", "must be HH:MM:SS or D-HH:MM:SS (minutes and seconds < 60), "
                                    "and not zero", req.time))
        elif req.signal_seconds >= limit:
            problems.append(Problem("--signal-seconds", f"the stop warning must come before the time limit "
                                    f"({req.time} = {limit} s)", req.signal_seconds))
    for option in req.sbatch_options:
        key, _, value = option.lstrip("-").partition("=")
        if not _OPTION_KEY_RE.match(key) or (value and not _SAFE_WORD_RE.match(value)):
            problems.append(Problem("--sbatch-option", "must be KEY=VALUE or KEY (for #SBATCH --KEY=VALUE): "
                                    "no spaces, quotes or newlines", option))
        elif key in _MANAGED_OPTIONS:
            problems.append(Problem("--sbatch-option", f"--{key} is written by infir2 sbatch itself; use its own "
                                    "option", option))
    return problems


# #SBATCH options the script sets itself (a duplicate from --sbatch-option would silently win or clash).
_MANAGED_OPTIONS = frozenset({
    "nodes", "N", "ntasks-per-node", "gpus-per-node", "partition", "p", "time", "t", "job-name", "J", "output",
    "o", "error", "e", "open-mode", "requeue", "no-requeue", "signal", "chdir", "D", "exclusive",
})


def _validate(req: SbatchRequest) -> tuple[LaunchPlan | None, list[Problem], list[Problem]]:
    """The plan `infir2 train` would make on these nodes (dry run), the problems and the warnings."""
    problems = _check_slurm_options(req)
    # The GPU check belongs to the compute nodes, not the login node this runs on.
    launch_req = LaunchRequest(
        recipe=req.recipe, sets=list(req.sets), extra_args=list(req.extra_args),
        nnodes=req.nodes if req.nodes >= 1 else None, nproc_per_node=req.gpus_per_node,
        rdzv_endpoint=f"{_VALIDATION_HOST}:{req.port}" if 1 <= req.port <= 65535 else None,
        exp=req.exp, dry_run=True, check_gpu=False)
    try:
        plan = plan_run(launch_req)
    except RecipeError as exc:
        return None, problems + exc.problems, []
    except LaunchError as exc:
        return None, problems + exc.problems, exc.warnings
    root = str(plan.paths.root)
    if not _SAFE_PATH_RE.match(root):
        problems.append(Problem("exp", "the experiment folder must have no spaces, quotes or '%' in its path: "
                                "Slurm reads it from an #SBATCH line (set INFIR2_EXP_ROOT)", root))
    return plan, problems, plan.findings.machine


# --------------------------------------------------------------------------- rendering


def _infir2_executable() -> str:
    """The `infir2` of this installation, so the compute nodes run the same code (override: $INFIR2_BIN)."""
    beside = Path(sys.executable).with_name("infir2")
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("infir2")
    return str(Path(found).absolute()) if found else "infir2"


def _recipe_ref(recipe: str) -> str:
    """A recipe file is passed by absolute path; a shipped recipe by name."""
    path = Path(recipe)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return str(path.absolute())
    return recipe


def train_arguments(req: SbatchRequest, plan: LaunchPlan) -> list[str]:
    """`infir2 train` and its options, one flag per item: literals quoted, the Slurm values as "$VARS"."""
    quoted = ["train", f"--recipe {shlex.quote(_recipe_ref(req.recipe))}"]
    quoted += [f"--set {shlex.quote(assignment)}" for assignment in req.sets]
    quoted += ['--nnodes "$SLURM_NNODES"', f"--nproc-per-node {plan.recipe.launch.nproc_per_node}",
               '--rdzv-endpoint "$HEAD:$PORT"', '--rdzv-id "$RDZV_ID"']
    if req.exp is not None:
        quoted.append(f"--exp {shlex.quote(req.exp)}")
    if req.extra_args:
        quoted.append("-- " + " ".join(shlex.quote(a) for a in req.extra_args))
    return quoted


def _command_line(req: SbatchRequest) -> str:
    words = ["infir2", "sbatch", "--recipe", req.recipe, "--nodes", str(req.nodes)]
    for flag, value in (("--partition", req.partition), ("--time", req.time),
                        ("--gpus-per-node", req.gpus_per_node), ("--exp", req.exp)):
        if value is not None:
            words += [flag, str(value)]
    for assignment in req.sets:
        words += ["--set", assignment]
    if req.port != DEFAULT_PORT:
        words += ["--port", str(req.port)]
    if req.signal_seconds != DEFAULT_SIGNAL_SECONDS:
        words += ["--signal-seconds", str(req.signal_seconds)]
    if not req.exclusive:
        words.append("--no-exclusive")
    for option in req.sbatch_options:
        words += ["--sbatch-option", option]
    if req.extra_args:
        words += ["--", *req.extra_args]
    return " ".join(shlex.quote(w) for w in words)


def _sbatch_lines(req: SbatchRequest, plan: LaunchPlan, logs: Path) -> list[str]:
    lines = [
        f"--job-name={plan.recipe.name}",
        f"--nodes={req.nodes}",
        "--ntasks-per-node=1",
        f"--gpus-per-node={plan.recipe.launch.nproc_per_node}",
    ]
    if req.partition:
        lines.append(f"--partition={req.partition}")
    if req.time:
        lines.append(f"--time={req.time}")
    if req.exclusive:
        lines.append("--exclusive")
    lines += [
        f"--chdir={Path.cwd()}" if _SAFE_PATH_RE.match(str(Path.cwd())) else None,
        f"--output={logs}/slurm-%j.out",
        "--open-mode=append",
        "--requeue",
        f"--signal=B:USR1@{req.signal_seconds}",
    ]
    for option in req.sbatch_options:
        key, sep, value = option.lstrip("-").partition("=")
        lines.append(f"--{key}={value}" if sep else f"--{key}")
    return [f"#SBATCH {line}" for line in lines if line]


# The script's body, after the #SBATCH lines: a shell file with @NAME@ placeholders (package data).
BODY_TEMPLATE = Path(__file__).with_name("sbatch_body.sh")


def render(req: SbatchRequest) -> BatchScript:
    """Validate the request and write the script text. Raises SlurmError with every problem."""
    plan, problems, warnings = _validate(req)
    if problems or plan is None:
        raise SlurmError(problems)
    paths = plan.paths
    header = [
        "#!/bin/bash",
        f"# Generated by infir2 on {time.strftime('%Y-%m-%d %H:%M:%S %z')}:",
        f"#   {_command_line(req)}",
        f"# Submit it with sbatch. Experiment {paths.name}: {paths.root}",
        f"# Preemption and the time limit: SIGUSR1 {req.signal_seconds} s before the end -> checkpoint -> "
        "requeue -> resume.",
        *_sbatch_lines(req, plan, paths.logs),
    ]
    values = {
        "@EXP_ROOT@": shlex.quote(str(paths.root.parent)),
        "@EXP_DIR@": shlex.quote(str(paths.root)),
        "@LOGS@": shlex.quote(str(paths.logs)),
        "@TRACKER@": shlex.quote(str(paths.checkpoints / ck.TRACKER)),
        "@STOP_REQUEST@": shlex.quote(str(stop_request_path(paths.root))),
        "@TRAIN_ITERS@": str(plan.schedule.train_iters),
        "@PORT@": str(req.port),
        "@INFIR2@": shlex.quote(_infir2_executable()),
        "@TRAIN_ARGS@": " \\\n        ".join(train_arguments(req, plan)),
    }
    template = BODY_TEMPLATE.read_text()
    body = template[template.index("\n\n") + 1:]  # after the template's own comment
    for key, value in values.items():
        body = body.replace(key, value)
    return BatchScript(text="\n".join(header) + "\n" + body, plan=plan, logs_dir=paths.logs, warnings=warnings)


def emit(req: SbatchRequest) -> BatchScript:
    """render(), then create exp/<name>/logs (Slurm opens the batch log there before the script starts)
    and write the script to req.output (executable), or return it for printing."""
    output = req.output
    script = render(req)
    if not script.logs_dir.is_dir():
        try:
            script.logs_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise SlurmError([Problem("exp", f"cannot create the log folder: {exc}", str(script.logs_dir))]) from None
        print(f"infir2: created {script.logs_dir} (Slurm opens the job's log there before the script runs)",
              file=sys.stderr)
    if output is not None:
        target = Path(output)
        try:
            target.write_text(script.text)
            target.chmod(target.stat().st_mode | 0o111)
        except OSError as exc:
            raise SlurmError([Problem("--output", str(exc), output)]) from None
    return script
