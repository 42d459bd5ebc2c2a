"""What occupies GPU memory at the peak of a run, from a PyTorch CUDA memory snapshot.

Megatron writes the snapshot with `--record-memory-history --memory-snapshot-path FILE` (the allocator's
current blocks plus a window of its last 100,000 alloc/free events, each with the Python stack of the
allocation); `infir2 bench --memory-snapshot` turns that on per variant. `peak_breakdown` replays the event
window to find the moment the allocated bytes were highest and attributes every block live at that moment
to a phase of training (model construction, DDP buffers, optimizer, forward, backward) and to the call site
that allocated it, so two precisions can be compared block for block instead of guessed from the code.

The snapshot format (torch.cuda.memory._snapshot()): `segments` (each with `address`, `device` and `blocks`
laid out back to back: `size`, `state`, `frames`) and `device_traces` (per device, events with `action`
alloc / free_requested / free_completed / segment_*, `addr`, `size`, `frames`). Frames are innermost first.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence

from ..errors import BenchError, Problem

GIB = 1024**3
LIVE_STATES = ("active_allocated", "active_pending_free")
# Phases, first match wins. Each is a test on the allocation's Python stack (file names and function names).
PHASE_ORDER = ("optimizer (main params, Adam states)", "DDP buffers (params, grads)", "model construction",
               "backward", "forward", "no Python stack (autograd engine: backward of native ops)", "other")
BEFORE_WINDOW = "allocated before the event window"  # a block freed in the window, allocated before it
REPORT_PHASES = (*PHASE_ORDER, BEFORE_WINDOW)  # the order of a breakdown's phases
_OUR_CODE = ("transformer_engine/", "megatron/", "infir2_cpt/")
_SKIPPED_SITES = ("torch/nn/modules/module.py", "torch/autograd/", "torch/utils/", "contextlib.py", "functools.py")


@dataclass
class Block:
    size: int
    frames: list[dict[str, Any]]
    known_allocation: bool = True  # False: allocated before the event window; frames are where it was freed


def _files(frames: Sequence[Mapping[str, Any]]) -> list[str]:
    return [str(f.get("filename", "")) for f in frames]


def _names(frames: Sequence[Mapping[str, Any]]) -> set[str]:
    return {str(f.get("name", "")) for f in frames}


def phase_of(frames: Sequence[Mapping[str, Any]]) -> str:
    """The training phase an allocation belongs to, from its Python stack."""
    if not frames:  # the autograd engine's own thread runs native backward ops without a Python stack
        return PHASE_ORDER[5]
    files, names = _files(frames), _names(frames)
    if any("/optimizer/" in f or "/optimizers/" in f for f in files):
        return PHASE_ORDER[0]
    if any("param_and_grad_buffer" in f or "distributed_data_parallel" in f for f in files):
        return PHASE_ORDER[1]
    if names & {"get_model", "build_distributed_models", "model_provider", "_build_model_wrapper"}:
        return PHASE_ORDER[2]
    if names & {"backward_step", "backward"}:
        return PHASE_ORDER[3]
    if names & {"forward_step", "forward"}:
        return PHASE_ORDER[4]
    return PHASE_ORDER[6]


def _short(filename: str) -> str:
    for marker in _OUR_CODE + ("torch/",):
        at = filename.rfind(marker)
        if at >= 0:
            return filename[at:]
    return filename.rsplit("/", 1)[-1]


def site_of(frames: Sequence[Mapping[str, Any]]) -> str:
    """The innermost frame in Transformer Engine, Megatron or infir2 (else the innermost one not in torch's
    module/autograd plumbing): `file.py:line function`."""
    if not frames:
        return "<no Python stack>"
    ours = [f for f in frames if any(m in str(f.get("filename", "")) for m in _OUR_CODE)]
    plain = [f for f in frames if not any(s in str(f.get("filename", "")) for s in _SKIPPED_SITES)]
    frame = (ours or plain or list(frames))[0]
    return f"{_short(str(frame.get('filename', '?')))}:{frame.get('line', '?')} {frame.get('name', '?')}"


def live_blocks_at_end(snapshot: Mapping[str, Any], device: int) -> dict[int, Block]:
    """Blocks allocated when the snapshot was taken, by address (blocks lie back to back in a segment)."""
    live: dict[int, Block] = {}
    for segment in snapshot.get("segments", []):
        if segment.get("device", device) != device:
            continue
        address = int(segment["address"])
        for block in segment.get("blocks", []):
            if block.get("state") in LIVE_STATES:
                live[address] = Block(int(block["size"]), list(block.get("frames") or []))
            address += int(block["size"])
    return live


def live_blocks_at_start(end: Mapping[int, Block], events: Sequence[Mapping[str, Any]]) -> dict[int, Block]:
    """Walk the events backwards from the end state: a block allocated in the window was not live before it;
    a block freed in the window was (its allocation stack is unknown then: the free's stack stands in)."""
    live = dict(end)
    for event in reversed(events):
        action = event.get("action")
        if action == "alloc":
            live.pop(int(event["addr"]), None)
        elif action == "free_completed":
            frames = list(event.get("frames") or [])
            live[int(event["addr"])] = Block(int(event["size"]), frames, known_allocation=False)
    return live


def _replay(start: Mapping[int, Block], events: Sequence[Mapping[str, Any]],
            stop: Optional[int] = None) -> tuple[dict[int, Block], int, int]:
    """Apply events [0, stop) to the start state; returns (live blocks, peak bytes, index after the peak)."""
    live = dict(start)
    total = sum(b.size for b in live.values())
    peak, peak_at = total, 0
    for i, event in enumerate(events[:stop] if stop is not None else events):
        action = event.get("action")
        if action == "alloc":
            live[int(event["addr"])] = Block(int(event["size"]), list(event.get("frames") or []))
            total += int(event["size"])
        elif action == "free_completed":
            block = live.pop(int(event["addr"]), None)
            total -= block.size if block is not None else int(event["size"])
        if total > peak:
            peak, peak_at = total, i + 1
    return live, peak, peak_at


def _group(blocks: Iterable[Block], key: Any) -> dict[str, dict[str, Any]]:
    groups: dict[str, dict[str, Any]] = {}
    for block in blocks:
        name = key(block)
        entry = groups.setdefault(name, {"bytes": 0, "blocks": 0})
        entry["bytes"] += block.size
        entry["blocks"] += 1
    return groups


def peak_breakdown(snapshot: Mapping[str, Any], device: int = 0, top: int = 25) -> dict[str, Any]:
    """The blocks live at the highest point of the snapshot's event window, by phase and by call site."""
    traces = snapshot.get("device_traces") or []
    events = list(traces[device]) if device < len(traces) and traces[device] else []
    end = live_blocks_at_end(snapshot, device)
    start = live_blocks_at_start(end, events)
    _, peak, peak_at = _replay(start, events)
    at_peak, _, _ = _replay(start, events, stop=peak_at)
    total = sum(b.size for b in at_peak.values()) or 1
    phase = {id(b): phase_of(b.frames) if b.known_allocation else BEFORE_WINDOW for b in at_peak.values()}
    phases = _group(at_peak.values(), lambda b: phase[id(b)])
    sites = _group(at_peak.values(), lambda b: f"{phase[id(b)] if b.known_allocation else 'before window'} | "
                   f"{site_of(b.frames)}" + ("" if b.known_allocation else " (freed here)"))
    ordered_phases = {name: phases[name] for name in REPORT_PHASES if name in phases}
    for entry in [*ordered_phases.values(), *sites.values()]:
        entry["gib"] = round(entry["bytes"] / GIB, 3)
        entry["share"] = round(entry["bytes"] / total, 4)
    top_sites = sorted(sites.items(), key=lambda kv: -kv[1]["bytes"])[:top]
    return {
        "device": device,
        "events": len(events),
        "peak_event": peak_at,
        "peak_gib": round(peak / GIB, 3),
        "start_gib": round(sum(b.size for b in start.values()) / GIB, 3),
        "end_gib": round(sum(b.size for b in end.values()) / GIB, 3),
        "phases": ordered_phases,
        "top_sites": [{"site": name, **entry} for name, entry in top_sites],
    }


def load_snapshot(path: Path) -> dict[str, Any]:
    """A snapshot pickle as Megatron dumps it (torch.cuda.memory._snapshot())."""
    with open(path, "rb") as f:
        try:
            snapshot = pickle.load(f)  # noqa: S301 - our own run's file, read as torch's memory_viz reads it
        except (pickle.UnpicklingError, EOFError) as exc:
            raise ValueError(f"{path}: not a readable pickle ({type(exc).__name__}: {exc})") from None
    if not isinstance(snapshot, dict) or "segments" not in snapshot:
        raise ValueError(f"{path}: not a CUDA memory snapshot (no 'segments')")
    return snapshot


def snapshot_breakdown(path: Path, device: Optional[int] = None, top: int = 25) -> dict[str, Any]:
    """peak_breakdown of a snapshot file, on the device that has events (the run's own GPU) by default."""
    snapshot = load_snapshot(path)
    if device is None:
        traces = snapshot.get("device_traces") or []
        device = next((i for i, t in enumerate(traces) if t), 0)
    return {"snapshot": str(path), **peak_breakdown(snapshot, device, top)}


def format_memory_breakdown(breakdown: Mapping[str, Any]) -> str:
    """Plain text: the peak, then GiB by phase and by call site."""
    lines = [f"# {breakdown.get('snapshot', 'snapshot')}: peak {breakdown['peak_gib']:.2f} GiB allocated at event "
             f"{breakdown['peak_event']} of {breakdown['events']} (window start {breakdown['start_gib']:.2f} GiB, "
             f"end {breakdown['end_gib']:.2f} GiB)", "", "| phase | GiB | share | blocks |", "|---|---|---|---|"]
    for name, entry in breakdown["phases"].items():
        lines.append(f"| {name} | {entry['gib']:.2f} | {entry['share'] * 100:.1f} % | {entry['blocks']} |")
    lines += ["", "| phase, call site | GiB | blocks |", "|---|---|---|"]
    for entry in breakdown["top_sites"]:
        lines.append(f"| {entry['site']} | {entry['gib']:.3f} | {entry['blocks']} |")
    return "\n".join(lines)


def snapshot_file_report(path: Path) -> str:
    """The breakdown of a snapshot file as text; BenchError when the file cannot be read as a snapshot."""
    try:
        return format_memory_breakdown(snapshot_breakdown(path))
    except (OSError, ValueError, KeyError) as exc:
        raise BenchError([Problem("SNAPSHOT", str(exc), str(path))], "infir2: cannot read the memory snapshot") from None
