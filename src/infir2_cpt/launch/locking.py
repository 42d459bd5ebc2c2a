"""One writer per experiment: a lock file in exp/<name>/ naming the launch that owns it.

The launcher creates exp/<name>/.infir2.lock with O_CREAT|O_EXCL before it writes anything else, then
execs torchrun. exec keeps the PID, so the lock names torchrun for the whole run, and once torchrun has
exited the lock is stale: the next launch on this host finds the PID gone and takes the lock over (with a
message). Nothing ever deletes the lock on a clean exit, because nothing of ours runs after the exec.

The lock holds JSON: host, pid, start time, the PID's kernel start time and the boot id (so a PID that was
reused by an unrelated process, or a reboot, still reads as stale), and the rendezvous identity.

Rules (docs/reliability.md explains them):
- held by a live process on this host: refuse, naming host, pid and since when;
- held by a dead process on this host (or a reused PID, or before a reboot): take it over, unless workers
  of that run are still alive (torchrun killed with SIGKILL leaves them running): then refuse, naming them;
- held by another host: never taken over automatically (whether that PID lives cannot be checked from
  here); the message says how to remove it by hand. One exception: a lock taken by an earlier run of the
  same Slurm job (same SLURM_JOB_ID, lower SLURM_RESTART_COUNT: the job was requeued, possibly onto other
  nodes), since Slurm ends every process of a job before it runs it again;
- released by the holder itself when torchrun exits (infir2_cpt.runtime.torchrun calls release_at_exit()), so a
  run that ended, even by a signal, leaves no lock; only a SIGKILL or a crash of the node leaves a stale one;
- multi-node (nnodes > 1): only the launcher on the host that owns the rendezvous endpoint's address (the
  one whose torchrun hosts the c10d store, like torch's own is_host rule) takes the lock; the other nodes
  skip it. A second launcher of the *same* multi-node job on the same host (same rendezvous id and
  endpoint; one-machine tests, or two nodes' worth of GPUs split by CUDA_VISIBLE_DEVICES) joins without the
  lock instead of refusing, unless it would use the same GPUs as the first: on a host with NVIDIA GPUs and
  the same CUDA_VISIBLE_DEVICES that is the same command typed twice on one node, which would take the
  other node's place in the rendezvous and share its GPUs, so it is refused.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import LockError
from ..layout import DEFAULT_ENTRY, ENTRY_ENV, EXP_DIR_ENV, ExperimentPaths
from ..recipe.validate import parse_endpoint

LOCK_VERSION = 1
# How long a reader waits for the holder to finish writing a lock it has just created (O_EXCL then write).
_PARTIAL_WAIT_S = 2.0
# A takeover guard older than this belongs to a launcher that died mid-takeover.
_GUARD_STALE_S = 60.0
_ACQUIRE_ATTEMPTS = 20




@dataclass(frozen=True)
class LockInfo:
    host: str
    pid: int
    started: str  # local time, ISO 8601 with offset
    started_epoch: float
    proc_start: int | None = None  # /proc/<pid>/stat field 22 (clock ticks after boot); None off Linux
    boot_id: str | None = None
    rdzv_id: str | None = None
    rdzv_endpoint: str | None = None
    nnodes: int = 1
    slurm_job_id: str | None = None
    slurm_restart_count: int = 0
    cuda_visible_devices: str | None = None  # the GPUs this launch's workers see (None: all of them)
    command: list[str] = field(default_factory=list)
    version: int = LOCK_VERSION

    def describe(self) -> str:
        return f"host {self.host}, pid {self.pid}, since {self.started}"

    @classmethod
    def from_json(cls, text: str) -> "LockInfo":
        data = json.loads(text)
        if not isinstance(data, dict) or not isinstance(data.get("host"), str) or not isinstance(data.get("pid"), int):
            raise ValueError("not an infir2 lock")
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass(frozen=True)
class LockResult:
    """What acquire() did: `held` is the lock this launch now owns (None when it skipped the lock)."""

    held: LockInfo | None
    messages: list[str]


# --------------------------------------------------------------------------- this process and others


def this_host() -> str:
    return socket.gethostname()


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip() or None
    except OSError:
        return None


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, start time in clock ticks after boot) of a PID, from /proc; None when unavailable."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the command name (field 2) may contain spaces and parentheses: split after the last ')'
    fields = text[text.rfind(")") + 2:].split()
    try:
        return fields[0], int(fields[19])
    except (IndexError, ValueError):
        return None


def _same_host(host: str) -> bool:
    return host == this_host()


def holder_alive(info: LockInfo) -> bool:
    """Whether the lock's PID is still the process that took it (call only for a lock of this host)."""
    if info.boot_id and _boot_id() and info.boot_id != _boot_id():
        return False  # the machine rebooted since
    try:
        os.kill(info.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by another user
    stat = _proc_stat(info.pid)
    if stat is not None:
        state, start = stat
        if state in ("Z", "X"):
            return False  # exited, not yet reaped
        if info.proc_start is not None and start != info.proc_start:
            return False  # the PID now belongs to another process
    return True


TRAINING_ENTRIES = (DEFAULT_ENTRY, "pretrain_gpt.py")
ORPHAN_EXIT_WAIT_S = 20.0  # DataLoader workers notice their dead parent within ~5 s


def _environ_entries(environ: bytes) -> list[bytes]:
    return environ.split(b"\0")


def _is_training_process(pid: int, environ: list[bytes]) -> bool:
    """A worker of the run (or a DataLoader process forked from one): its command line names the entry.

    Helpers a worker spawned with other command lines (multiprocessing's resource tracker, compile workers)
    inherit INFIR2_EXP_DIR too, but they neither train nor write checkpoints, so they do not block a launch.
    """
    entries = [e.encode() for e in TRAINING_ENTRIES]
    override = ENTRY_ENV.encode() + b"="
    entries += [item[len(override):] for item in environ if item.startswith(override)]
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return any(entry and entry in arg for arg in cmdline for entry in entries)


def orphaned_workers(exp_dir: Path) -> list[int]:
    """Live training processes started for this experiment (they carry INFIR2_EXP_DIR=<exp_dir>): torchrun's
    workers run in their own sessions and can outlive a SIGKILL of torchrun. Linux only."""
    needle = EXP_DIR_ENV.encode() + b"=" + os.fsencode(str(exp_dir))
    found = []
    proc = Path("/proc")
    if not proc.is_dir():
        return found
    for entry in proc.iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = _environ_entries((entry / "environ").read_bytes())
        except OSError:
            continue
        if needle in environ and _is_training_process(int(entry.name), environ):
            stat = _proc_stat(int(entry.name))
            if stat is None or stat[0] not in ("Z", "X"):
                found.append(int(entry.name))
    return sorted(found)


def wait_for_orphans(exp_dir: Path, timeout: float | None = None) -> list[int]:
    """The orphaned workers still alive after giving them `timeout` seconds to exit on their own."""
    deadline = time.monotonic() + (ORPHAN_EXIT_WAIT_S if timeout is None else timeout)
    orphans = orphaned_workers(exp_dir)
    while orphans and time.monotonic() < deadline:
        time.sleep(0.5)
        orphans = orphaned_workers(exp_dir)
    return orphans


# --------------------------------------------------------------------------- multi-node


def is_rendezvous_host(endpoint: str) -> bool:
    """Whether this machine (this network namespace) owns the rendezvous endpoint's address.

    This machine's own hostname qualifies (torch's rule for hosting the store); otherwise the address is
    resolved and a socket is bound to it: binding succeeds exactly for this machine's own addresses
    (loopback included), in this network namespace.
    """
    parsed = parse_endpoint(endpoint)
    if parsed is None:  # the launch refuses such an endpoint before it gets here
        return False
    host = parsed[0].strip("[]")
    if host in ("localhost", this_host()):
        return True
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError):
        return False
    for family, _, _, _, sockaddr in infos:
        try:
            with socket.socket(family, socket.SOCK_STREAM) as sock:
                sock.bind((sockaddr[0], 0))
            return True
        except OSError:
            continue
    return False


# --------------------------------------------------------------------------- reading and writing the lock


def new_info(*, rdzv_id: str | None = None, rdzv_endpoint: str | None = None, nnodes: int = 1) -> LockInfo:
    pid = os.getpid()
    stat = _proc_stat(pid)
    now = time.time()
    restarts = os.environ.get("SLURM_RESTART_COUNT", "0")
    return LockInfo(host=this_host(), pid=pid, started=time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(now)),
                    started_epoch=round(now, 3), proc_start=stat[1] if stat else None, boot_id=_boot_id(),
                    rdzv_id=rdzv_id, rdzv_endpoint=rdzv_endpoint, nnodes=nnodes,
                    slurm_job_id=os.environ.get("SLURM_JOB_ID") or None,
                    slurm_restart_count=int(restarts) if restarts.isdigit() else 0,
                    cuda_visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES"), command=list(sys.argv)[:64])


def host_has_nvidia_gpus() -> bool:
    """True where the NVIDIA driver's control device exists (no CUDA initialisation needed)."""
    return os.path.exists("/dev/nvidiactl")


def _duplicate_node_message(paths: ExperimentPaths, holder: LockInfo) -> str:
    gpus = holder.cuda_visible_devices if holder.cuda_visible_devices is not None else "all"
    return (f"this host already runs a launcher of this multi-node job ({holder.describe()}) on the same GPUs "
            f"(CUDA_VISIBLE_DEVICES: {gpus}): the same command started twice on one node would take another "
            f"node's place in the rendezvous and share these GPUs. Run it once per node, each on its own host; "
            f"to run two nodes of experiment {paths.name} on one host, give each its own CUDA_VISIBLE_DEVICES")


def _earlier_run_of_this_slurm_job(holder: LockInfo, me: LockInfo) -> bool:
    return bool(holder.slurm_job_id and holder.slurm_job_id == me.slurm_job_id
                and holder.slurm_restart_count < me.slurm_restart_count)


def _create(path: Path, info: LockInfo) -> bool:
    """Create the lock atomically; False when it already exists."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    try:
        os.write(fd, (json.dumps(asdict(info), indent=1) + "\n").encode())
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        path.unlink(missing_ok=True)
        raise
    os.close(fd)
    return True


class _Unreadable(Exception):
    pass


def read_lock(path: Path, wait_s: float = _PARTIAL_WAIT_S) -> LockInfo | None:
    """The lock's holder; None when there is no lock. A lock that is empty or not JSON is re-read for
    `wait_s` (its creator may be between O_EXCL and write), then raises _Unreadable."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            text = path.read_text()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise _Unreadable(str(exc)) from None
        try:
            return LockInfo.from_json(text)
        except (ValueError, TypeError) as exc:
            if time.monotonic() >= deadline:
                raise _Unreadable(f"not a readable infir2 lock ({exc})") from None
        time.sleep(0.05)


def _guard_path(lock: Path) -> Path:
    return lock.with_name(lock.name + ".takeover")


def _take_over(lock: Path, stale: LockInfo) -> bool:
    """Remove `lock` if it still holds `stale`, under a guard file so two launchers never both remove (the
    second would delete the first one's fresh lock). True when the lock is gone (by us or someone else)."""
    guard = _guard_path(lock)
    try:
        fd = os.open(guard, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        try:
            if time.time() - guard.stat().st_mtime > _GUARD_STALE_S:
                guard.unlink(missing_ok=True)
        except FileNotFoundError:
            pass
        return False
    try:
        os.write(fd, f"{this_host()} {os.getpid()}\n".encode())
        os.close(fd)
        try:
            current = read_lock(lock, wait_s=0)
        except _Unreadable:
            return False
        if current is None:
            return True
        if current != stale:
            return False
        lock.unlink(missing_ok=True)
        return True
    finally:
        guard.unlink(missing_ok=True)


def _foreign_message(paths: ExperimentPaths, holder: LockInfo) -> str:
    return (f"experiment {paths.name} is locked by another host ({holder.describe()}); a lock from another "
            f"host is never taken over automatically. If no run of this experiment is alive there (check on "
            f"{holder.host}: `ps -p {holder.pid}`), remove {paths.lock_file} by hand and launch again")


def _held_message(paths: ExperimentPaths, holder: LockInfo) -> str:
    return (f"experiment {paths.name} is already being written by a running launch ({holder.describe()}); "
            f"one writer per experiment: wait for it to end or stop it (kill -TERM {holder.pid} saves a "
            f"checkpoint and exits), or launch under another name with --exp")


def acquire(paths: ExperimentPaths, *, nnodes: int = 1, rdzv_endpoint: str | None = None,
            rdzv_id: str | None = None, gpus_present: bool | None = None) -> LockResult:
    """Take the experiment's lock for this process (kept across exec). Raises LockError when another live
    launch holds it, when it belongs to another host, or when it cannot be read. Creates exp/<name>/.
    gpus_present: whether this host has NVIDIA GPUs (default: looked up)."""
    lock = paths.lock_file
    messages: list[str] = []
    if nnodes > 1:
        if not rdzv_endpoint or not is_rendezvous_host(rdzv_endpoint):
            messages.append(f"not the rendezvous host ({rdzv_endpoint}): this node leaves the experiment lock "
                            f"to the launcher on that host")
            return LockResult(None, messages)
    paths.root.mkdir(parents=True, exist_ok=True)
    me = new_info(rdzv_id=rdzv_id, rdzv_endpoint=rdzv_endpoint, nnodes=nnodes)
    for _ in range(_ACQUIRE_ATTEMPTS):
        if _create(lock, me):
            return LockResult(me, messages)
        try:
            holder = read_lock(lock)
        except _Unreadable as exc:
            raise LockError(f"{lock} exists but {exc}; if no run of experiment {paths.name} is alive, remove "
                            f"it by hand and launch again") from None
        if holder is None:
            continue  # released between our create and our read
        if not _same_host(holder.host):
            if not _earlier_run_of_this_slurm_job(holder, me):
                raise LockError(_foreign_message(paths, holder))
            if _take_over(lock, holder):
                messages.append(f"took over the lock of experiment {paths.name} left by an earlier run of Slurm job "
                                f"{holder.slurm_job_id} (restart {holder.slurm_restart_count}, {holder.describe()})")
            else:
                time.sleep(0.1)
            continue
        if holder.pid == me.pid and holder.proc_start == me.proc_start:
            return LockResult(holder, messages)  # this very process already holds it
        if holder_alive(holder):
            if (nnodes > 1 and holder.nnodes > 1 and holder.rdzv_id == rdzv_id
                    and holder.rdzv_endpoint == rdzv_endpoint):
                if gpus_present is None:
                    gpus_present = host_has_nvidia_gpus()
                if gpus_present and holder.cuda_visible_devices == me.cuda_visible_devices:
                    raise LockError(_duplicate_node_message(paths, holder))
                messages.append(f"another node of this multi-node job holds the experiment lock on this host "
                                f"({holder.describe()}); joining it without the lock")
                return LockResult(None, messages)
            raise LockError(_held_message(paths, holder))
        orphans = wait_for_orphans(paths.root)
        if orphans:
            raise LockError(f"the launch that held experiment {paths.name} ({holder.describe()}) is gone, but "
                            f"processes it started are still running: pids {', '.join(map(str, orphans))}; "
                            f"stop them (kill -TERM {' '.join(map(str, orphans))}) before launching again")
        if _take_over(lock, holder):
            messages.append(f"took over the stale lock of experiment {paths.name}: its launch ({holder.describe()}) "
                            f"is no longer running")
        else:
            time.sleep(0.1)
    raise LockError(f"could not take {lock} after {_ACQUIRE_ATTEMPTS} attempts (other launches keep racing for "
                    f"it); retry")


def acquire_for_launch(paths: ExperimentPaths, *, nnodes: int, rdzv_endpoint: str, rdzv_id: str) -> LockInfo | None:
    """acquire(), printing what it did to stderr (the launcher's call)."""
    result = acquire(paths, nnodes=nnodes, rdzv_endpoint=rdzv_endpoint, rdzv_id=rdzv_id)
    for message in result.messages:
        print(f"infir2: {message}", file=sys.stderr)
    return result.held


def release(paths: ExperimentPaths, info: LockInfo) -> bool:
    """Remove the lock if `info` still holds it (for callers that do not exec). True when removed."""
    try:
        current = read_lock(paths.lock_file, wait_s=0)
    except _Unreadable:
        return False
    if current != info:
        return False
    try:
        paths.lock_file.unlink()
    except FileNotFoundError:
        return False
    return True


def held_by_this_process(paths: ExperimentPaths) -> LockInfo | None:
    """The experiment's lock when this very process holds it (the launcher after its exec), else None."""
    try:
        holder = read_lock(paths.lock_file, wait_s=0)
    except _Unreadable:
        return None
    stat = _proc_stat(os.getpid())
    if (holder is None or holder.host != this_host() or holder.pid != os.getpid()
            or (stat is not None and holder.proc_start is not None and holder.proc_start != stat[1])):
        return None
    return holder


def release_at_exit(environ: dict[str, str] | None = None) -> bool:
    """Called by the lock's holder (torchrun, after the exec) when it exits: remove the lock of
    $INFIR2_EXP_DIR if this very process holds it. True when removed."""
    exp_dir = (os.environ if environ is None else environ).get(EXP_DIR_ENV)
    if not exp_dir:
        return False
    paths = ExperimentPaths(name=Path(exp_dir).name, root=Path(exp_dir))
    holder = held_by_this_process(paths)
    return holder is not None and release(paths, holder)


def lock_status(paths: ExperimentPaths) -> str | None:
    """One line about the experiment's lock for --dry-run and status output; None when there is none."""
    try:
        holder = read_lock(paths.lock_file, wait_s=0)
    except _Unreadable as exc:
        return f"lock {paths.lock_file}: {exc}"
    if holder is None:
        return None
    if not _same_host(holder.host):
        return f"locked by another host ({holder.describe()})"
    return (f"locked by a running launch ({holder.describe()})" if holder_alive(holder)
            else f"stale lock of a finished launch ({holder.describe()}); the next launch takes it over")

