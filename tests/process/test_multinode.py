"""Two `infir2 train` launchers as the two nodes of one job, on this machine, through real torchrun.

Each "node" runs the real console script: `infir2 train --recipe tiny --nnodes 2 --nproc-per-node 2
--rdzv-endpoint HEAD:PORT --exp NAME`, with INFIR2_ENTRY pointing at tests/fakes/multinode_worker.py (a
gloo worker that records what torchrun gave it) and one INFIR2_EXP_ROOT shared by both, as a shared
filesystem is on a cluster.

Two ways to make two nodes, chosen per test (the id says which):
- netns: two network namespaces joined by a veth pair, each with its own hostname (unshare --uts) and
  /etc/hosts (ip netns exec mounts /etc/netns/<ns>/hosts), so the nodes are two hosts as far as torchrun
  is concerned: separate addresses, the endpoint a hostname that only the first node owns. Needs root,
  `ip` and `unshare`; skipped where they do not work.
- local: both launchers in this namespace, the endpoint this machine's hostname (not loopback, which the
  launcher refuses for nnodes > 1). Whichever starts first hosts the store.
INFIR2_TEST_NODES=local|netns restricts the run to one of them.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from infir2_cpt.bench.run import free_port

INFIR2 = str(Path(sys.executable).with_name("infir2"))
WORKER = Path(__file__).resolve().parents[1] / "fakes" / "multinode_worker.py"
NPROC = 2
JOIN_TIMEOUT = 10
# Startup (recipe planning, torch import, spawning) on a loaded 2-core CI machine, on top of the timeout.
STARTUP_SLACK_S = 25
RUN_TIMEOUT_S = 150


# --------------------------------------------------------------------------- two nodes on one machine


@dataclass
class Nodes:
    mode: str
    hostnames: list[str]  # the nodes' own hostnames (the same twice in local mode)
    namespaces: list[str] = field(default_factory=list)

    @property
    def head(self) -> str:
        return self.hostnames[0]

    def wrap(self, index: int, argv: list[str]) -> list[str]:
        """argv as node `index` runs it."""
        if self.mode == "local":
            return argv
        return ["ip", "netns", "exec", self.namespaces[index], "unshare", "--uts", "--",
                "sh", "-c", 'hostname "$0" && exec "$@"', self.hostnames[index], *argv]


def _sh(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, timeout=30)


def _netns_teardown(namespaces: list[str]) -> None:
    for ns in namespaces:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
        shutil.rmtree(Path("/etc/netns") / ns, ignore_errors=True)


def _remove_stale_namespaces() -> None:
    """Namespaces left by an earlier run that was killed before its teardown (named after its pid)."""
    listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=30).stdout
    for name in (line.split()[0] for line in listing.splitlines() if line.startswith("i2mn")):
        digits = name[4:-1]
        if digits.isdigit() and not Path(f"/proc/{digits}").exists():
            _netns_teardown([name])


def _netns_nodes() -> tuple[Nodes | None, str]:
    """Two namespaces that can talk TCP to each other by hostname, or (None, why not)."""
    if os.geteuid() != 0:
        return None, "needs root"
    if not (shutil.which("ip") and shutil.which("unshare")):
        return None, "needs `ip` and `unshare`"
    _remove_stale_namespaces()
    tag = f"i2mn{os.getpid() % 100000}"
    namespaces = [f"{tag}a", f"{tag}b"]
    hostnames = [f"{tag}-node0", f"{tag}-node1"]
    addresses = ["10.231.7.1", "10.231.7.2"]
    veths = [f"{tag}va", f"{tag}vb"]
    try:
        for ns in namespaces:
            _sh("ip", "netns", "add", ns)
        _sh("ip", "link", "add", veths[0], "type", "veth", "peer", "name", veths[1])
        hosts = "127.0.0.1 localhost\n" + "".join(f"{a} {h}\n" for a, h in zip(addresses, hostnames))
        for ns, veth, address in zip(namespaces, veths, addresses):
            _sh("ip", "link", "set", veth, "netns", ns)
            _sh("ip", "-n", ns, "addr", "add", f"{address}/24", "dev", veth)
            _sh("ip", "-n", ns, "link", "set", veth, "up")
            _sh("ip", "-n", ns, "link", "set", "lo", "up")
            (Path("/etc/netns") / ns).mkdir(parents=True, exist_ok=True)
            (Path("/etc/netns") / ns / "hosts").write_text(hosts)
        nodes = Nodes("netns", hostnames, namespaces)
        # prove it: node1 reaches a server on node0 by node0's hostname
        server = subprocess.Popen(nodes.wrap(0, [sys.executable, "-c", (
            "import socket; s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); "
            "s.bind(('0.0.0.0', 29399)); s.listen(); s.settimeout(20); c, _ = s.accept(); c.sendall(b'ok')")]))
        try:
            probe = subprocess.run(nodes.wrap(1, [sys.executable, "-c", (
                "import socket, sys, time\n"
                f"host = {hostnames[0]!r}\n"
                "for _ in range(100):\n"
                "    try:\n"
                "        print(socket.gethostname(), socket.create_connection((host, 29399), 2).recv(2).decode())\n"
                "        sys.exit(0)\n"
                "    except OSError:\n"
                "        time.sleep(0.1)\n"
                "sys.exit(1)\n")]), capture_output=True, text=True, timeout=30)
        finally:
            server.kill()
            server.wait()
        if probe.returncode != 0 or probe.stdout.split() != [hostnames[1], "ok"]:
            raise RuntimeError(f"namespaces cannot talk: {probe.stdout!r} {probe.stderr[-300:]!r}")
    except (subprocess.SubprocessError, OSError, RuntimeError) as exc:
        _netns_teardown(namespaces)
        detail = getattr(exc, "stderr", b"") or b""
        return None, f"network namespaces unavailable: {exc} {detail[-200:]!r}"
    return nodes, ""


def _local_nodes() -> tuple[Nodes | None, str]:
    host = socket.gethostname()
    if host in ("localhost", "") or host.startswith("localhost."):
        return None, "this machine's hostname is localhost"
    return Nodes("local", [host, host]), ""


def _wanted(mode: str) -> bool:
    choice = os.environ.get("INFIR2_TEST_NODES", "")
    return choice in ("", mode)


@pytest.fixture(scope="module")
def netns_nodes():
    if not _wanted("netns"):
        pytest.skip("INFIR2_TEST_NODES excludes netns")
    nodes, why = _netns_nodes()
    if nodes is None:
        pytest.skip(why)
    yield nodes
    _netns_teardown(nodes.namespaces)


@pytest.fixture(scope="module")
def local_nodes():
    if not _wanted("local"):
        pytest.skip("INFIR2_TEST_NODES excludes local")
    nodes, why = _local_nodes()
    if nodes is None:
        pytest.skip(why)
    return nodes


@pytest.fixture(params=["netns", "local"])
def nodes(request):
    return request.getfixturevalue(f"{request.param}_nodes")


@pytest.fixture
def best_nodes(request):
    """netns where it works, else local (for the tests that need two nodes but not two hosts)."""
    try:
        return request.getfixturevalue("netns_nodes")
    except pytest.skip.Exception:
        return request.getfixturevalue("local_nodes")


# --------------------------------------------------------------------------- launching


@dataclass
class Launch:
    node: int
    proc: subprocess.Popen
    started: float
    output: str = ""
    returncode: int | None = None
    elapsed: float = 0.0


def _start(nodes: Nodes, index: int, *, port: int, exp: str, tmp_path: Path, join_timeout: int) -> Launch:
    argv = [INFIR2, "train", "--recipe", "tiny", "--nnodes", "2", "--nproc-per-node", str(NPROC),
            "--rdzv-endpoint", f"{nodes.head}:{port}", "--exp", exp,
            "--set", f"launch.join_timeout={join_timeout}"]
    env = dict(os.environ)
    env.update({"INFIR2_ENTRY": str(WORKER), "INFIR2_GPU_CHECK": "0", "INFIR2_EXP_ROOT": str(tmp_path / "exp"),
                "MULTINODE_OUT": str(tmp_path / f"ranks-{exp}"), "OMP_NUM_THREADS": "1",
                # two nodes on one GPU host must not share GPUs (the lock refuses that); the stand-in uses none
                "CUDA_VISIBLE_DEVICES": f"none-node{index}"})
    env.pop("TORCHELASTIC_RUN_ID", None)
    proc = subprocess.Popen(nodes.wrap(index, argv), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    return Launch(index, proc, time.monotonic())


def _finish(launch: Launch, timeout: float = RUN_TIMEOUT_S) -> Launch:
    try:
        launch.output, _ = launch.proc.communicate(timeout=max(1.0, timeout - (time.monotonic() - launch.started)))
    except subprocess.TimeoutExpired:
        os.killpg(launch.proc.pid, signal.SIGKILL)
        launch.output, _ = launch.proc.communicate()
        pytest.fail(f"node {launch.node} hung for {timeout} s:\n{launch.output[-3000:]}")
    launch.returncode = launch.proc.returncode
    launch.elapsed = time.monotonic() - launch.started
    return launch


def _reports(tmp_path: Path, exp: str) -> dict[int, dict]:
    out = tmp_path / f"ranks-{exp}"
    return {int(p.stem.split("-")[1]): json.loads(p.read_text()) for p in sorted(out.glob("rank-*.json"))}


def _check_job(nodes: Nodes, launches: list[Launch], tmp_path: Path, exp: str) -> None:
    for launch in launches:
        assert launch.returncode == 0, f"node {launch.node} exited {launch.returncode}:\n{launch.output[-4000:]}"
        assert "multi-node: 2 nodes x 2 processes meet at" in launch.output
    reports = _reports(tmp_path, exp)
    world = 2 * NPROC
    assert sorted(reports) == list(range(world)), "global ranks must be unique and complete"
    exp_dir = str(tmp_path / "exp" / exp)
    agents: dict[int, set] = {}
    hosts: dict[int, set] = {}
    for rank, report in reports.items():
        env = report["env"]
        assert report["rank"] == rank and int(env["RANK"]) == rank
        assert int(env["WORLD_SIZE"]) == world and report["world_size"] == world
        assert int(env["LOCAL_WORLD_SIZE"]) == NPROC and int(env["GROUP_WORLD_SIZE"]) == 2
        group, local = int(env["GROUP_RANK"]), int(env["LOCAL_RANK"])
        assert rank == group * NPROC + local, (rank, group, local)
        assert env["INFIR2_EXP_DIR"] == exp_dir
        assert report["rank_sum"] == sum(range(world))  # a real all_reduce over both nodes
        assert [g["rank"] for g in report["gathered"]] == list(range(world))
        agents.setdefault(group, set()).add(report["agent_pid"])
        hosts.setdefault(group, set()).add(report["hostname"])
    # every worker agrees on the whole job; each group (node) is one torchrun agent on one host
    first = reports[0]["gathered"]
    assert all(r["gathered"] == first for r in reports.values())
    assert sorted(agents) == [0, 1] and all(len(pids) == 1 for pids in agents.values())
    assert agents[0] != agents[1]
    assert len({r["env"]["TORCHELASTIC_RUN_ID"] for r in reports.values()}) == 1
    assert len({r["env"]["MASTER_ADDR"] for r in reports.values()}) == 1
    if nodes.mode == "netns":
        assert sorted(next(iter(h)) for h in hosts.values()) == sorted(nodes.hostnames)
        assert all(len(h) == 1 for h in hosts.values())
        # the launch record of each node, under the shared experiment folder
        logs = sorted(p.name for p in (tmp_path / "exp" / exp / "logs").glob("*.log"))
        assert [name for name in logs if name.endswith(f"-{nodes.hostnames[0]}.log")], logs
        assert [name for name in logs if name.endswith(f"-{nodes.hostnames[1]}.log")], logs


# --------------------------------------------------------------------------- tests


@pytest.mark.slow
def test_two_launchers_form_one_job(nodes: Nodes, tmp_path: Path) -> None:
    exp, port = "twonodes", free_port()
    launches = [_start(nodes, i, port=port, exp=exp, tmp_path=tmp_path, join_timeout=60) for i in (0, 1)]
    launches = [_finish(launch) for launch in launches]
    _check_job(nodes, launches, tmp_path, exp)


@pytest.mark.slow
def test_late_first_node_is_waited_for(netns_nodes: Nodes, tmp_path: Path) -> None:
    """The second node starts first: it waits for the first node's store (up to join_timeout), rather
    than torchrun's own 60 s connect timeout, and the job forms when the first node arrives."""
    exp, port = "latehead", free_port()
    second = _start(netns_nodes, 1, port=port, exp=exp, tmp_path=tmp_path, join_timeout=60)
    time.sleep(5)
    first = _start(netns_nodes, 0, port=port, exp=exp, tmp_path=tmp_path, join_timeout=60)
    launches = [_finish(first), _finish(second)]
    _check_job(netns_nodes, launches, tmp_path, exp)


@pytest.mark.slow
def test_node_that_never_arrives(best_nodes: Nodes, tmp_path: Path) -> None:
    """Alone, a node stops with a clear error after launch.join_timeout, not a hang: the first node (it
    hosts the rendezvous) waiting for the second, and, with two hosts, the second waiting for the first."""
    cases = [(0, "nosecond", ["infir2: rendezvous timed out: not all 2 nodes joined",
                              f"within {JOIN_TIMEOUT} s (launch.join_timeout)"])]
    if best_nodes.mode == "netns":
        cases.append((1, "nofirst", [f"infir2: no rendezvous at {best_nodes.head}:",
                                     f"after {JOIN_TIMEOUT} s (launch.join_timeout)",
                                     f"the first node, {best_nodes.head}, hosts it"]))
    launches = [(_start(best_nodes, node, port=free_port(), exp=exp, tmp_path=tmp_path, join_timeout=JOIN_TIMEOUT),
                 expected) for node, exp, expected in cases]
    for launch, expected in launches:
        _finish(launch, timeout=JOIN_TIMEOUT + STARTUP_SLACK_S + 60)
        assert launch.returncode not in (0, None), launch.output[-3000:]
        assert JOIN_TIMEOUT <= launch.elapsed <= JOIN_TIMEOUT + STARTUP_SLACK_S, (launch.elapsed, launch.output[-3000:])
        for text in expected:
            assert text in launch.output, launch.output[-3000:]
        assert "Traceback" not in launch.output, launch.output[-3000:]


def test_rendezvous_options_are_read_from_the_launch_command(monkeypatch, tmp_path: Path) -> None:
    """infir2_cpt.runtime.torchrun finds the endpoint and join_timeout in the command launch.py writes (if the
    format changed, the bounded wait for the first node would silently stop applying)."""
    from infir2_cpt.launch.plan import LaunchEnv, LaunchRequest, plan_run
    from infir2_cpt.runtime.rendezvous import parse_args

    env = LaunchEnv.read({"INFIR2_EXP_ROOT": str(tmp_path / "exp"), "INFIR2_ENTRY": str(WORKER), "INFIR2_GPU_CHECK": "0"})
    plan = plan_run(LaunchRequest(recipe="tiny", nnodes=2, nproc_per_node=2, rdzv_endpoint="node0.example:29411",
                                  exp="parse", sets=["launch.join_timeout=42"], dry_run=True), env)
    args = parse_args(plan.launcher[plan.launcher.index("infir2_cpt.runtime.torchrun") + 1:] + plan.megatron_args)
    assert args is not None
    assert (args.host, args.port, args.join_timeout, args.max_nodes) == ("node0.example", 29411, 42, 2)
    assert args.rdzv_id.startswith("infir2-parse-")
