"""Multi-node rendezvous: a bounded wait for the first node, and plain-words errors (used by torchrun.py).

torchrun's c10d rendezvous has two ways to wait, and only one honours --rdzv-conf join_timeout:
- the node that hosts the store (its hostname or address is the endpoint's) waits join_timeout seconds for
  the other nodes, then raises a bare `RendezvousTimeoutError`;
- every other node first connects to that store, and does so with the store's read timeout (60 s), retried
  once after a random back-off: a late first node makes the others give up after 1-2 minutes whatever
  join_timeout says, and a first node that never comes makes them fail only after that.
So before torchrun starts, a node that will not host the store waits for the endpoint to accept a TCP
connection, for at most join_timeout (launch.join_timeout) seconds, and exits with an explanation if it
never does. The rendezvous errors torchrun raises are turned into one line that says what to check.
"""

from __future__ import annotations

import socket
import sys
import time
from dataclasses import dataclass

from ..recipe.validate import parse_endpoint

EXIT_RENDEZVOUS = 1
_PROBE_INTERVAL_S = 1.0


@dataclass(frozen=True)
class RendezvousArgs:
    """The rendezvous part of a torchrun command line (infir2 writes every option as --key=value)."""

    nnodes: str
    host: str
    port: int
    rdzv_id: str
    join_timeout: float

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def max_nodes(self) -> int:
        try:
            return int(self.nnodes.split(":")[-1])
        except ValueError:
            return 1


def parse_args(argv: list[str]) -> RendezvousArgs | None:
    """The c10d rendezvous options of a torchrun argv, up to the entry; None when they are not all there
    (another backend, or a command infir2 did not write): then nothing here applies."""
    options: dict[str, str] = {}
    for arg in argv:
        if not arg.startswith("--"):
            break  # the entry script: what follows are its own arguments
        key, sep, value = arg[2:].partition("=")
        if sep:
            options[key.replace("_", "-")] = value
    if options.get("rdzv-backend", "c10d") != "c10d" or "rdzv-endpoint" not in options:
        return None
    endpoint = parse_endpoint(options["rdzv-endpoint"])
    if endpoint is None:
        return None
    host, port = endpoint
    conf = dict(item.partition("=")[::2] for item in options.get("rdzv-conf", "").split(",") if item)
    try:
        join_timeout = float(conf.get("join_timeout", 600))
    except ValueError:
        join_timeout = 600.0
    return RendezvousArgs(nnodes=options.get("nnodes", "1"), host=host.strip("[]"), port=port,
                          rdzv_id=options.get("rdzv-id", "none"), join_timeout=join_timeout)


def hosts_store(args: RendezvousArgs) -> bool:
    """Whether torchrun on this machine will host the c10d store: torch's own rule (its hostname or one of
    its addresses is the endpoint's host). If that rule cannot be imported, assume it will (no wait)."""
    try:
        from torch.distributed.elastic.rendezvous.utils import _matches_machine_hostname
    except ImportError:
        return True
    try:
        return bool(_matches_machine_hostname(args.host))
    except OSError:
        return False


def wait_for_store(args: RendezvousArgs, clock=time.monotonic, sleep=time.sleep) -> str | None:
    """Wait until the endpoint accepts a TCP connection, for at most join_timeout seconds. None when it
    did; otherwise the message to print (the last connection error included)."""
    deadline = clock() + args.join_timeout
    last_error = "no answer"
    while True:
        remaining = deadline - clock()
        if remaining <= 0:
            break
        try:
            with socket.create_connection((args.host, args.port), timeout=max(0.1, min(2.0, remaining))):
                return None
        except OSError as exc:
            last_error = str(exc) or type(exc).__name__
        sleep(max(0.0, min(_PROBE_INTERVAL_S, deadline - clock())))
    return (f"infir2: no rendezvous at {args.endpoint} after {args.join_timeout:g} s (launch.join_timeout): "
            f"the first node, {args.host}, hosts it and could not be reached from {socket.gethostname()} "
            f"(last error: {last_error}). Start the same `infir2 train` command there, and check that "
            f"{args.host} resolves to that node from here and that port {args.port} is open.")


def explain_failure(exc: BaseException, args: RendezvousArgs | None) -> str | None:
    """One line for a rendezvous error raised by torchrun; None for any other exception."""
    try:
        from torch.distributed.elastic.rendezvous.api import (RendezvousConnectionError,
                                                              RendezvousTimeoutError)
    except ImportError:
        return None
    where = f"{args.endpoint} (id {args.rdzv_id})" if args else "the rendezvous endpoint"
    if isinstance(exc, RendezvousTimeoutError):
        nodes = f"not all {args.max_nodes} nodes" if args else "not all nodes"
        waited = f" within {args.join_timeout:g} s (launch.join_timeout)" if args else ""
        return (f"infir2: rendezvous timed out: {nodes} joined {where}{waited}. Run the same command, "
                f"with the same --rdzv-endpoint and --exp, on every node; a node that cannot resolve or "
                f"reach the endpoint never joins.")
    if isinstance(exc, RendezvousConnectionError):
        cause = exc.__cause__ or exc.__context__
        detail = f": {cause}" if cause else ""
        return (f"infir2: cannot reach the rendezvous store at {where}{detail}. The first node hosts it: "
                f"check that it runs the same command and that the port is open.")
    return None


def before_torchrun(argv: list[str]) -> RendezvousArgs | None:
    """Called by infir2_cpt.runtime.torchrun before torchrun starts: on a node that will not host the store,
    wait for it (bounded) or exit with EXIT_RENDEZVOUS. Returns the parsed options for explain_failure."""
    args = parse_args(argv)
    if args is None or hosts_store(args):
        return args
    message = wait_for_store(args)
    if message is not None:
        print(message, file=sys.stderr, flush=True)
        sys.exit(EXIT_RENDEZVOUS)
    return args
