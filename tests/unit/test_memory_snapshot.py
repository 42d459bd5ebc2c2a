"""bench/memory.py: the peak of a CUDA memory snapshot and what is live then (hand-built snapshots in
torch's format, tests/fakes/fake_snapshot.py), and `infir2 memory-breakdown`."""

from __future__ import annotations

import pickle

import pytest

from fake_snapshot import ACTIVATIONS, ADAM, GRADS, MIB, OLD, PARAMS, QUANTIZED, iteration_snapshot
from infir2_cpt.bench.memory import (GIB, PHASE_ORDER, live_blocks_at_end, live_blocks_at_start, peak_breakdown,
                                        phase_of, site_of, snapshot_breakdown)

PERSISTENT = PARAMS + GRADS + ADAM


def _gib(mib: float) -> float:
    return round(mib * MIB / GIB, 3)


def test_end_state_counts_live_blocks_of_the_device_only():
    end = live_blocks_at_end(iteration_snapshot(), device=0)
    assert sorted(b.size // MIB for b in end.values()) == [PARAMS, GRADS, ADAM]  # not device 1's, not inactive ones


def test_start_state_adds_blocks_freed_in_the_window_and_drops_those_allocated_in_it():
    snap = iteration_snapshot(fp8=True)
    start = live_blocks_at_start(live_blocks_at_end(snap, 0), snap["device_traces"][0])
    assert sum(b.size for b in start.values()) == (PERSISTENT + OLD) * MIB
    (old,) = [b for b in start.values() if not b.known_allocation]
    assert old.size == OLD * MIB


@pytest.mark.parametrize("fp8", [False, True])
def test_peak_and_its_attribution(fp8):
    b = peak_breakdown(iteration_snapshot(fp8=fp8), device=0)
    extra = QUANTIZED if fp8 else 0
    assert b["peak_gib"] == _gib(PERSISTENT + OLD + ACTIVATIONS + extra + 40 + 60)
    assert b["start_gib"] == _gib(PERSISTENT + OLD) and b["end_gib"] == _gib(PERSISTENT)
    gib = {name: entry["gib"] for name, entry in b["phases"].items()}
    assert gib == {PHASE_ORDER[0]: _gib(ADAM), PHASE_ORDER[1]: _gib(GRADS), PHASE_ORDER[2]: _gib(PARAMS),
                   PHASE_ORDER[3]: _gib(40), PHASE_ORDER[4]: _gib(ACTIVATIONS + extra), PHASE_ORDER[5]: _gib(60),
                   "allocated before the event window": _gib(OLD)}
    assert list(b["phases"]) == [*PHASE_ORDER[:6], "allocated before the event window"]  # report order
    assert sum(e["share"] for e in b["phases"].values()) == pytest.approx(1.0, abs=1e-3)
    sites = {e["site"]: e["gib"] for e in b["top_sites"]}
    assert sites["forward | transformer_engine/pytorch/module/linear.py:300 forward"] == _gib(ACTIVATIONS)
    assert sites.get("forward | transformer_engine/pytorch/tensor/float8_blockwise_tensor.py:120 quantize") == (
        _gib(QUANTIZED) if fp8 else None)
    assert sites["before window | megatron/core/optimizer/optimizer.py:450 step (freed here)"] == _gib(OLD)
    assert [e["gib"] for e in b["top_sites"]] == sorted((e["gib"] for e in b["top_sites"]), reverse=True)


def test_a_snapshot_without_events_reports_its_live_blocks():
    snap = iteration_snapshot()
    snap["device_traces"] = [[], []]
    b = peak_breakdown(snap, device=0)
    assert b["events"] == 0 and b["peak_gib"] == b["end_gib"] == _gib(PERSISTENT)


def test_phase_and_site_rules():
    stack = [{"filename": "/v/torch/nn/modules/module.py", "line": 1, "name": "_call_impl"},
             {"filename": "/v/megatron/core/transformer/mlp.py", "line": 7, "name": "forward"},
             {"filename": "/v/megatron/core/pipeline_parallel/schedules.py", "line": 9, "name": "forward_step"}]
    assert phase_of(stack) == "forward" and site_of(stack) == "megatron/core/transformer/mlp.py:7 forward"
    assert phase_of([]) == PHASE_ORDER[5] and site_of([]) == "<no Python stack>"
    assert phase_of([{"filename": "/x/y.py", "line": 1, "name": "f"}]) == "other"
    assert site_of([{"filename": "/v/torch/nn/modules/module.py", "line": 1, "name": "_call_impl"},
                    {"filename": "/x/mine.py", "line": 3, "name": "f"}]) == "mine.py:3 f"


def test_snapshot_file_and_cli(tmp_path, cli):
    path = tmp_path / "snap.pickle"
    path.write_bytes(pickle.dumps(iteration_snapshot(fp8=True)))
    b = snapshot_breakdown(path)
    assert b["snapshot"] == str(path) and b["device"] == 0
    result = cli("memory-breakdown", str(path))
    assert result.exit_code == 0, result.output
    assert cli("bench", "--memory-breakdown", str(path)).stdout == result.stdout  # the older spelling still works
    assert f"peak {_gib(PERSISTENT + OLD + ACTIVATIONS + QUANTIZED + 100):.2f} GiB" in result.stdout
    assert f"| forward | {_gib(ACTIVATIONS + QUANTIZED):.2f} |" in result.stdout
    bad = tmp_path / "bad.pickle"
    bad.write_bytes(b"not a pickle")
    result = cli("memory-breakdown", str(bad))
    assert result.exit_code == 2 and "not a readable pickle" in result.stderr
