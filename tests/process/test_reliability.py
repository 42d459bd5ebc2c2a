"""Reliability: every bad input refused with exit code 2, one clear message and nothing written;
free space checked before launch; the wall-clock budget; signals and the experiment lock on real launches.

Bad inputs go through the real CLI (typer's CliRunner on infir2_cpt.cli.app). Problems of the machine
(missing files, a checkpoint that is not there, too little disk) only warn in --dry-run, so those cases
launch for real, with INFIR2_ENTRY pointing at a stand-in worker (and INFIR2_GPU_CHECK=0: no GPU checks) and
with execute() replaced by a tripwire: a refusal must come before anything is written or exec'd.
The signal tests start `infir2 train` as a process and signal it; docs/reliability.md lists them all.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest
from click.testing import Result

from infir2_cpt.bench.run import free_port
from infir2_cpt.launch import execute
from infir2_cpt.launch import plan as launch
from infir2_cpt.launch import locking
from infir2_cpt.launch import preflight
from infir2_cpt.layout import ExperimentPaths
from infir2_cpt.recipe.load import load_recipe
from infir2_cpt.recipe.shape import ModelShape, embedding_rows

WORKER = Path(__file__).resolve().parents[1] / "fakes" / "sleepy_worker.py"


# --------------------------------------------------------------------------- helpers


def snapshot(root: Path) -> list[tuple[str, int, int]] | None:
    """Every path under root with size and mtime: equal snapshots mean nothing was written."""
    if not root.exists():
        return None
    return sorted((str(p.relative_to(root)), p.stat().st_size if p.is_file() else -1, p.stat().st_mtime_ns)
                  for p in root.rglob("*"))


def problems_of(result: Result) -> list[str]:
    return [line[4:] for line in result.stderr.splitlines() if line.startswith("  - ")]


def assert_refused(result: Result, *needles: str, count: int | None = 1) -> None:
    assert result.exit_code == 2, (result.exit_code, result.output)
    problems = problems_of(result)
    assert problems, result.stderr
    if count is not None:
        assert len(problems) == count, problems
    for needle in needles:
        assert any(needle in p for p in problems), (needle, problems)


@pytest.fixture
def launch_env(exp_root: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A real launch with the stand-in worker, where execute() is a tripwire: reaching it fails the test."""

    def tripwire(plan: launch.LaunchPlan) -> None:
        raise AssertionError(f"the launch was not refused: it reached execute() for {plan.paths.root}")

    monkeypatch.setenv("INFIR2_ENTRY", str(WORKER))
    monkeypatch.setenv("INFIR2_GPU_CHECK", "0")
    monkeypatch.setattr(execute, "execute", tripwire)
    return exp_root


def make_checkpoint(ckpt_dir: Path, iteration: int, complete: bool = True, tracker: bool = True) -> Path:
    folder = ckpt_dir / f"iter_{iteration:07d}"
    folder.mkdir(parents=True)
    (folder / "__0_0.distcp").write_bytes(b"\0" * 16)
    (folder / "metadata.json").write_text("{}")
    if complete:
        (folder / ".metadata").write_bytes(b"\0")
    if tracker:
        (ckpt_dir / "latest_checkpointed_iteration.txt").write_text(f"{iteration}\n")
    return folder


def write_recipe(tmp_path: Path, text: str, name: str = "r.yaml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


# --------------------------------------------------------------------------- the bad-input catalogue


def test_unknown_recipe_name(cli: Callable[..., Result], exp_root: Path) -> None:
    result = cli("train", "--recipe", "7bb", "--dry-run")
    assert_refused(result, "unknown recipe", "did you mean '7b'?")
    assert snapshot(exp_root) is None


def test_yaml_syntax_error_names_line_and_column(cli: Callable[..., Result], exp_root: Path, tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path, "extends: tiny\nmodel:\n  num_layers: 4\n   hidden_size: 8\n")
    result = cli("train", "--recipe", recipe, "--dry-run")
    assert_refused(result, "YAML syntax error at line 4, column 15")
    assert snapshot(exp_root) is None


def test_unknown_key_suggests_the_right_one(cli: Callable[..., Result], exp_root: Path, tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path, "extends: tiny\nmodel:\n  num_layer: 4\n")
    assert_refused(cli("train", "--recipe", recipe, "--dry-run"), "model.num_layer: unknown key",
                   "did you mean 'num_layers'?")
    assert snapshot(exp_root) is None


@pytest.mark.parametrize("text, needle", [
    ("parallel:\n  tensor_parallel: four\n", "parallel.tensor_parallel: expected an integer (got 'four')"),
    ("schedule:\n  lr: fast\n", "schedule.lr: expected a number (got 'fast')"),
    ("data:\n  mock: maybe\n", "data.mock: expected true or false (got 'maybe')"),
    ("model: 28\n", "model: expected a mapping of ModelConfig keys (got 28)"),
])
def test_wrong_value_type(cli: Callable[..., Result], exp_root: Path, tmp_path: Path, text: str, needle: str) -> None:
    recipe = write_recipe(tmp_path, "extends: tiny\n" + text)
    assert_refused(cli("train", "--recipe", recipe, "--dry-run"), needle)
    assert snapshot(exp_root) is None


def test_tensor_parallel_not_dividing_the_heads(cli: Callable[..., Result], exp_root: Path) -> None:
    result = cli("train", "--recipe", "tiny", "--set", "parallel.tensor_parallel=3", "--nproc-per-node", "3",
                 "--set", "precision.fp8=null", "--dry-run")
    # 3 divides neither the 8 heads nor the 2 query groups: both are named, with the valid sizes
    assert_refused(result, "must divide model.num_attention_heads=8; valid: 1, 2, 4, 8 (got 3)",
                   "must divide model.num_query_groups=2", count=2)
    assert snapshot(exp_root) is None


def test_tensor_parallel_not_dividing_the_query_groups(cli: Callable[..., Result], exp_root: Path) -> None:
    result = cli("train", "--recipe", "tiny", "--set", "parallel.tensor_parallel=4", "--nproc-per-node", "4",
                 "--set", "precision.fp8=null", "--dry-run")
    assert_refused(result, "must divide model.num_query_groups=2 (each TP rank needs whole key/value heads); "
                           "valid: 1, 2 (got 4)")
    assert snapshot(exp_root) is None


def test_missing_data_files(cli: Callable[..., Result], launch_env: Path, tmp_path: Path) -> None:
    corpus = tmp_path / "data" / "corpus"
    corpus.parent.mkdir()
    (tmp_path / "data" / "corpus.bin").write_bytes(b"")  # the .idx is missing
    result = cli("train", "--recipe", "tiny", "--set", "data.mock=false",
                 "--set", f"data.blend=[{{path: {corpus}, weight: 1.0}}]")
    assert_refused(result, f"data.blend[0].path: missing {corpus}.idx")
    assert snapshot(launch_env) is None


def test_missing_data_files_only_warn_in_a_dry_run(cli: Callable[..., Result], exp_root: Path) -> None:
    result = cli("train", "--recipe", "tiny", "--set", "data.mock=false",
                 "--set", "data.blend=[{path: /nonexistent/corpus, weight: 1.0}]", "--dry-run")
    assert result.exit_code == 0, result.output
    assert "warning: data.blend[0].path: missing /nonexistent/corpus.bin and /nonexistent/corpus.idx" in result.stderr
    assert snapshot(exp_root) is None


def test_missing_tokenizer(cli: Callable[..., Result], launch_env: Path) -> None:
    result = cli("train", "--recipe", "tiny", "--set", "tokenizer.type=HuggingFaceTokenizer",
                 "--set", "tokenizer.model=/nonexistent/Qwen2.5-7B")
    assert_refused(result, "tokenizer.model: tokenizer directory not found (got '/nonexistent/Qwen2.5-7B')")
    assert snapshot(launch_env) is None


def test_load_of_a_nonexistent_iteration(cli: Callable[..., Result], launch_env: Path) -> None:
    make_checkpoint(launch_env / "tiny" / "checkpoints", 100)
    before = snapshot(launch_env)
    result = cli("decay", "--recipe", "tiny", "--load", "iter_0000200")
    assert_refused(result, "iter_0000200 does not exist; complete checkpoints there: iter_0000100")
    assert snapshot(launch_env) == before


def test_load_of_a_partial_checkpoint(cli: Callable[..., Result], launch_env: Path) -> None:
    ckpt = launch_env / "tiny" / "checkpoints"
    make_checkpoint(ckpt, 100)
    make_checkpoint(ckpt, 200, complete=False, tracker=False)
    before = snapshot(launch_env)
    result = cli("decay", "--recipe", "tiny", "--load", "iter_0000200")
    assert_refused(result, "iter_0000200 is a partial checkpoint (missing .metadata)")
    assert snapshot(launch_env) == before


@pytest.mark.parametrize("iteration", [300, 301])
def test_decay_from_at_or_past_the_end_of_the_stable_run(cli: Callable[..., Result], launch_env: Path,
                                                          iteration: int) -> None:
    make_checkpoint(launch_env / "tiny" / "checkpoints", iteration)  # tiny: train_iters 300
    before = snapshot(launch_env)
    result = cli("decay", "--recipe", "tiny", "--load", f"iter_{iteration:07d}")
    assert_refused(result, f"iteration {iteration} is at or past the stable recipe's train_iters (300)")
    assert snapshot(launch_env) == before
    # a configuration problem: refused in --dry-run too
    assert_refused(cli("decay", "--recipe", "tiny", "--load", f"iter_{iteration:07d}", "--dry-run"), "at or past")


@pytest.mark.parametrize("spec, needle", [
    ("latest", "'latest' is not an iteration"),
    ("iter_0000000", "iteration 0 cannot be selected"),
])
def test_load_of_something_that_is_not_an_iteration(cli: Callable[..., Result], exp_root: Path, spec: str,
                                                    needle: str) -> None:
    assert_refused(cli("decay", "--recipe", "tiny", "--load", spec, "--dry-run"), needle)
    assert snapshot(exp_root) is None


@pytest.mark.parametrize("option, value, needle", [
    ("--nnodes", "0", "launch.nnodes: must be >= 1 (got 0)"),
    ("--nnodes", "-2", "launch.nnodes: must be >= 1 (got -2)"),
    ("--nproc-per-node", "0", "launch.nproc_per_node: must be >= 1 (got 0)"),
])
def test_zero_nodes_or_processes(cli: Callable[..., Result], exp_root: Path, option: str, value: str,
                                 needle: str) -> None:
    assert_refused(cli("train", "--recipe", "7b", option, value, "--dry-run"), needle)
    assert snapshot(exp_root) is None


@pytest.mark.parametrize("endpoint", ["node1", "node1:", ":29400", "node1:99999", "node1:0", "a b:29400",
                                      "node1:29400:1", "http://node1:29400"])
def test_malformed_rendezvous_endpoint(cli: Callable[..., Result], exp_root: Path, endpoint: str) -> None:
    result = cli("train", "--recipe", "tiny", "--rdzv-endpoint", endpoint, "--dry-run")
    assert_refused(result, f"launch.rdzv_endpoint: must be HOST:PORT with a port in 1-65535 (got {endpoint!r})")
    assert snapshot(exp_root) is None


def test_loopback_rendezvous_endpoint_with_several_nodes(cli: Callable[..., Result], exp_root: Path) -> None:
    result = cli("train", "--recipe", "tiny", "--nnodes", "2", "--dry-run")
    assert_refused(result, "is a loopback address but nnodes=2")
    assert snapshot(exp_root) is None


@pytest.mark.parametrize("assignment, needle", [
    ("model.num_layer=3", "--set model.num_layer: no key 'num_layer' in model; did you mean 'num_layers'?"),
    ("modle.num_layers=3", "--set modle.num_layers: no key 'modle' in recipe; did you mean 'model'?"),
    ("model.num_layers.x=3", "--set model.num_layers.x: 'model.num_layers' is not a section"),
    ("launch.nnodes", "--set: expected SECTION.KEY=VALUE (got 'launch.nnodes')"),
])
def test_set_on_a_key_that_does_not_exist(cli: Callable[..., Result], exp_root: Path, assignment: str,
                                          needle: str) -> None:
    assert_refused(cli("train", "--recipe", "tiny", "--set", assignment, "--dry-run"), needle)
    assert snapshot(exp_root) is None


@pytest.mark.parametrize("name", ["../escape", "a/b", "", ".", "..", "/tmp/elsewhere", "-x", "has space"])
def test_experiment_name_must_be_one_folder(cli: Callable[..., Result], launch_env: Path, tmp_path: Path,
                                            name: str) -> None:
    """--exp ../x or /abs would put checkpoints outside exp/, '' or '.' into exp/ itself (refused since)."""
    assert_refused(cli("train", "--recipe", "tiny", "--exp", name), "the experiment name", "must be one folder name")
    assert snapshot(launch_env) is None
    assert not (tmp_path / "escape").exists()


def test_every_problem_is_reported_at_once(cli: Callable[..., Result], exp_root: Path) -> None:
    result = cli("train", "--recipe", "tiny", "--nnodes", "0", "--rdzv-endpoint", "nohost",
                 "--set", "model.num_layer=3", "--dry-run")
    assert_refused(result, "launch.nnodes", "launch.rdzv_endpoint", "--set model.num_layer", count=3)


# --------------------------------------------------------------------------- free space for a checkpoint


def test_7b_checkpoint_estimate_is_plausible() -> None:
    recipe = load_recipe("7b").recipe
    assert ModelShape.from_recipe(recipe).parameters == 7_615_616_512  # Qwen2.5-7B (HF safetensors total)
    assert 100e9 < preflight.checkpoint_bytes(recipe) < 110e9  # 7.62e9 x 14 bytes = 106.6 GB
    bf16 = load_recipe("7b", ["precision.fp8=null"]).recipe
    assert preflight.checkpoint_bytes(bf16) == preflight.checkpoint_bytes(recipe)  # FP8 params saved as bf16


def test_1_5b_parameter_count_has_tied_embeddings() -> None:
    assert ModelShape.from_recipe(load_recipe("1.5b").recipe).parameters == 1_543_714_304  # Qwen2.5-1.5B


def test_embedding_rows_are_padded_like_megatron() -> None:
    """Megatron's own rule is checked in test_megatron_parser.py::test_padded_vocab_rule_is_megatrons."""
    tiny = load_recipe("tiny").recipe  # NullTokenizer: 32767 ids (EOD the last), padded to 32768
    assert embedding_rows(tiny) == 32768
    even = load_recipe("tiny", ["model.vocab_size=32768", "parallel.tensor_parallel=2"]).recipe
    assert embedding_rows(even) == 32768  # already a multiple of 128 x 2: no row added for EOD


def test_too_little_free_space_refuses_the_launch(cli: Callable[..., Result], launch_env: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    asked: list[Path] = []

    def free(path: Path) -> int:
        asked.append(path)
        return 10**9

    monkeypatch.setattr(preflight, "free_bytes", free)
    need = preflight.checkpoint_bytes(load_recipe("tiny").recipe)
    assert need > 10**9
    result = cli("train", "--recipe", "tiny")
    assert_refused(result, "checkpoint: not enough free space for one checkpoint",
                   f"needs about {need / 1e9:.1f} GB", "has 1.0 GB free")
    assert asked == [launch_env / "tiny" / "checkpoints"]
    assert snapshot(launch_env) is None


def test_too_little_free_space_only_warns_in_a_dry_run(cli: Callable[..., Result], exp_root: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(preflight, "free_bytes", lambda path: 10**9)
    result = cli("train", "--recipe", "7b", "--dry-run")
    assert result.exit_code == 0, result.output
    assert "warning: checkpoint: not enough free space for one checkpoint: it needs about 106.6 GB" in result.stderr
    assert "# one checkpoint needs about" not in result.stdout  # said once, as the warning
    assert snapshot(exp_root) is None


def test_enough_free_space_passes_and_the_estimate_is_described(cli: Callable[..., Result], exp_root: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(preflight, "free_bytes", lambda path: 10**13)
    result = cli("train", "--recipe", "tiny", "--dry-run")
    assert result.exit_code == 0, result.output
    assert "not enough free space" not in result.stderr
    assert "10000.0 GB free in" in result.stdout


# --------------------------------------------------------------------------- wall-clock budget


def test_exit_duration_from_a_set_and_the_signal_handler_always(cli: Callable[..., Result], exp_root: Path) -> None:
    result = cli("train", "--recipe", "tiny", "--set", "launch.exit_duration_minutes=230", "--dry-run")
    assert result.exit_code == 0, result.output
    assert "--exit-duration-in-mins 230" in result.stdout
    assert "--exit-signal-handler" in result.stdout
    plain = cli("train", "--recipe", "tiny", "--dry-run")
    assert "--exit-signal-handler" in plain.stdout and "--exit-duration-in-mins" not in plain.stdout
    assert_refused(cli("train", "--recipe", "tiny", "--set", "launch.exit_duration_minutes=0", "--dry-run"),
                   "launch.exit_duration_minutes: must be >= 1")
    assert snapshot(exp_root) is None


# --------------------------------------------------------------------------- the lock through the CLI


def _lock_holder(root: Path, name: str) -> subprocess.Popen:
    code = (f"import time; from pathlib import Path; from infir2_cpt.launch import locking; "
            f"from infir2_cpt.layout import ExperimentPaths; "
            f"locking.acquire(ExperimentPaths({name!r}, Path({str(root / name)!r}))); print('held', flush=True); "
            f"time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_launch_is_refused_naming_the_holder(cli: Callable[..., Result], exp_root: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    def no_exec(*args: object) -> None:
        raise AssertionError("exec'd although the experiment is locked")

    monkeypatch.setenv("INFIR2_ENTRY", str(WORKER))
    monkeypatch.setenv("INFIR2_GPU_CHECK", "0")
    monkeypatch.setattr(execute.os, "execve", no_exec)
    monkeypatch.setattr(execute, "start_console_tee", no_exec, raising=False)
    holder = _lock_holder(exp_root, "tiny")
    try:
        before = snapshot(exp_root)
        result = cli("train", "--recipe", "tiny")
        assert_refused(result, "already being written by a running launch", f"pid {holder.pid}",
                       f"host {socket.gethostname()}", "since ")
        assert snapshot(exp_root) == before  # nothing but the holder's lock
    finally:
        holder.kill()
        holder.wait()


def test_a_dry_run_never_takes_the_lock(cli: Callable[..., Result], exp_root: Path) -> None:
    holder = _lock_holder(exp_root, "tiny")
    try:
        before = snapshot(exp_root)
        assert cli("train", "--recipe", "tiny", "--dry-run").exit_code == 0
        assert snapshot(exp_root) == before
    finally:
        holder.kill()
        holder.wait()
    assert cli("train", "--recipe", "tiny", "--exp", "fresh", "--dry-run").exit_code == 0
    assert not (exp_root / "fresh").exists()


# --------------------------------------------------------------------------- signals on real launches (CPU)


class Launch:
    """`infir2 train` as a process, with the stand-in worker."""

    def __init__(self, tmp_path: Path, args: list[str], tag: str = "a", **env: str) -> None:
        self.out = tmp_path / "out"
        self.log = tmp_path / f"launch-{tag}.log"
        full_env = {**os.environ, "INFIR2_EXP_ROOT": str(tmp_path / "exp"), "INFIR2_ENTRY": str(WORKER),
                    "INFIR2_GPU_CHECK": "0",
                    "SLEEPY_OUT": str(self.out), **env}
        full_env.pop("INFIR2_EXP_DIR", None)
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "infir2_cpt.cli", "train", *args], env=full_env,
                                         stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def wait_for(self, name: str, timeout: float = 120) -> dict:
        path = self.out / name
        deadline = time.monotonic() + timeout
        while not path.exists():
            if self.proc.poll() is not None and not path.exists():
                raise AssertionError(f"launcher exited {self.proc.returncode} before {name}:\n{self.text()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no {name} after {timeout}s:\n{self.text()}")
            time.sleep(0.1)
        return json.loads(path.read_text())

    def wait(self, timeout: float = 120) -> int:
        return self.proc.wait(timeout=timeout)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for ready in self.out.glob("ready-*.json"):  # workers run in their own sessions
            try:
                os.kill(json.loads(ready.read_text())["pid"], signal.SIGKILL)
            except (ProcessLookupError, ValueError, KeyError):
                pass


def _cmdline(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()


@pytest.mark.slow
def test_sigterm_reaches_the_worker_and_the_same_command_runs_again(tmp_path: Path) -> None:
    args = ["--recipe", "tiny", "--nproc-per-node", "1", "--rdzv-endpoint", f"localhost:{free_port()}"]
    first = Launch(tmp_path, args)
    try:
        ready = first.wait_for("ready-0.json")
        lock = json.loads((tmp_path / "exp" / "tiny" / ".infir2.lock").read_text())
        # exec kept the PID: the launcher's PID is now torchrun (our wrapper), the lock names it
        assert lock["pid"] == first.proc.pid == ready["ppid"]
        assert "infir2_cpt.runtime.torchrun" in _cmdline(first.proc.pid)
        assert ready["exp_dir"] == str(tmp_path / "exp" / "tiny")

        second = Launch(tmp_path, args, tag="b")
        assert second.wait() == 2
        assert f"already being written by a running launch (host {socket.gethostname()}, pid {first.proc.pid}" \
            in second.text()

        first.proc.send_signal(signal.SIGTERM)
        code = first.wait()
        marker = json.loads((tmp_path / "out" / "signal-0.json").read_text())
        assert marker["signal"] == "SIGTERM" and marker["pid"] == ready["pid"]
        assert code == 0, first.text()  # the worker exited 0 after SIGTERM, so does the launch
    finally:
        first.kill()
    paths = ExperimentPaths("tiny", tmp_path / "exp" / "tiny")
    assert not paths.lock_file.exists()  # torchrun (infir2_cpt.runtime.torchrun) released it on its way out

    again = Launch(tmp_path, args, tag="c", SLEEPY_SECONDS="0")
    try:
        assert again.wait() == 0, again.text()
        assert (tmp_path / "out" / "done-0.json").exists()
        assert not re.search(r"\block\b", again.text())  # no stale lock taken over, none refused
        assert not paths.lock_file.exists()
    finally:
        again.kill()


@pytest.mark.slow
def test_sigkill_leaves_a_stale_lock_that_waits_for_orphaned_workers(tmp_path: Path) -> None:
    """SIGKILL to the launcher (torchrun) releases nothing and leaves its workers running in their own
    sessions: the next launch names them and refuses; once they are gone it takes the stale lock over."""
    args = ["--recipe", "tiny", "--rdzv-endpoint", f"localhost:{free_port()}"]
    first = Launch(tmp_path, args)
    worker = None
    try:
        worker = first.wait_for("ready-0.json")["pid"]
        first.proc.send_signal(signal.SIGKILL)
        assert first.wait() == -signal.SIGKILL
        paths = ExperimentPaths("tiny", tmp_path / "exp" / "tiny")
        assert json.loads(paths.lock_file.read_text())["pid"] == first.proc.pid  # left behind

        blocked = Launch(tmp_path, args, tag="b", SLEEPY_SECONDS="0")
        assert blocked.wait() == 2, blocked.text()
        assert f"processes it started are still running: pids {worker}" in blocked.text()

        os.kill(worker, signal.SIGTERM)
        deadline = time.monotonic() + 30
        while locking.orphaned_workers(paths.root) and time.monotonic() < deadline:
            time.sleep(0.1)
        again = Launch(tmp_path, args, tag="c", SLEEPY_SECONDS="0")
        assert again.wait() == 0, again.text()
        assert f"took over the stale lock of experiment tiny: its launch (host {socket.gethostname()}, " \
               f"pid {first.proc.pid}" in again.text()
    finally:
        first.kill()
        if worker is not None:
            try:
                os.kill(worker, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.mark.slow
def test_sigint_becomes_sigterm_for_the_workers(tmp_path: Path) -> None:
    run = Launch(tmp_path, ["--recipe", "tiny", "--rdzv-endpoint", f"localhost:{free_port()}"])
    try:
        run.wait_for("ready-0.json")
        run.proc.send_signal(signal.SIGINT)
        assert run.wait() == 0, run.text()
        assert json.loads((tmp_path / "out" / "signal-0.json").read_text())["signal"] == "SIGTERM"
    finally:
        run.kill()


@pytest.mark.slow
def test_a_worker_that_does_not_stop_is_killed_after_the_grace_period(tmp_path: Path) -> None:
    """The worker ignores SIGTERM: after the grace period (launch.stop_grace_seconds) it is SIGKILLed and the
    launch exits 128 + SIGTERM = 143."""
    run = Launch(tmp_path, ["--recipe", "tiny", "--rdzv-endpoint", f"localhost:{free_port()}",
                            "--set", "launch.stop_grace_seconds=2"], SLEEPY_IGNORE_SIGTERM="1")
    try:
        run.wait_for("ready-0.json")
        start = time.monotonic()
        run.proc.send_signal(signal.SIGTERM)
        code = run.wait()
        assert 2 <= time.monotonic() - start < 25  # the grace asked for, not torchrun's own 30 s
        assert code == 128 + signal.SIGTERM, run.text()
        assert not (tmp_path / "out" / "signal-0.json").exists()
    finally:
        run.kill()


@pytest.mark.slow
def test_plain_torchrun_exits_1_after_forwarding_sigterm(tmp_path: Path) -> None:
    """Why infir2 does not exec torch.distributed.run itself: plain torchrun forwards the signal, but exits
    1 (an uncaught SignalException) even when every worker exited 0, and SIGKILLs them after 30 s. On a loaded
    2-core machine it was also seen to SIGKILL its worker and then not exit at all: no clean stop either."""
    out = tmp_path / "out"
    env = {**os.environ, "SLEEPY_OUT": str(out)}
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc-per-node=1",
                             "--rdzv-backend=c10d", f"--rdzv-endpoint=localhost:{free_port()}", str(WORKER)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (out / "ready-0.json").exists():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        try:
            _, stderr = proc.communicate(timeout=150)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, stderr = proc.communicate()
            assert "forcefully exiting via 9" in stderr, stderr[-2000:]  # it killed the worker, then hung
            return
        assert json.loads((out / "signal-0.json").read_text())["signal"] == "SIGTERM"
        assert proc.returncode == 1
        assert "SignalException" in stderr
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.slow
def test_two_nodes_of_one_job_on_one_host_share_the_lock(tmp_path: Path) -> None:
    """Both launchers of a two-node job on one machine: the first on the rendezvous host takes the lock, the
    second joins without refusing; no other launch can take the experiment meanwhile."""
    endpoint = f"{socket.gethostname()}:{free_port()}"
    args = ["--recipe", "tiny", "--nnodes", "2", "--nproc-per-node", "1", "--rdzv-endpoint", endpoint]
    # each "node" its own (non-existent) GPUs: on a GPU host the lock refuses two launchers on the same GPUs
    node_a = Launch(tmp_path, args, tag="a", CUDA_VISIBLE_DEVICES="none-a")
    node_b = None
    try:
        deadline = time.monotonic() + 60
        lock_file = tmp_path / "exp" / "tiny" / ".infir2.lock"
        while not lock_file.exists():
            assert node_a.proc.poll() is None and time.monotonic() < deadline, node_a.text()
            time.sleep(0.05)
        node_b = Launch(tmp_path, args, tag="b", CUDA_VISIBLE_DEVICES="none-b")
        node_a.wait_for("ready-0.json")
        node_b.wait_for("ready-1.json")
        assert json.loads(lock_file.read_text())["pid"] == node_a.proc.pid
        assert "another node of this multi-node job holds the experiment lock" in node_b.text()
        single = Launch(tmp_path, ["--recipe", "tiny", "--rdzv-endpoint", f"localhost:{free_port()}"], tag="c")
        assert single.wait() == 2 and "already being written" in single.text()
        node_a.proc.send_signal(signal.SIGTERM)
        node_b.proc.send_signal(signal.SIGTERM)
        assert node_a.wait() == 0, node_a.text()
        assert node_b.wait() == 0, node_b.text()
    finally:
        node_a.kill()
        if node_b is not None:
            node_b.kill()
