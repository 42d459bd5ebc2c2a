"""`infir2 bench` end to end on the CPU: the whole orchestration (planning, one `infir2 train` child per variant
through the real launcher and torchrun, the console tee, the results) with a stand-in for the Megatron entry
(tests/fakes/fake_megatron.py) that prints Megatron's log lines, writes profiler traces and memory snapshots,
fails or hangs on request."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from infir2_cpt.recipe.shape import ModelShape

REPO = Path(__file__).resolve().parents[2]
FAKE_ENTRY = REPO / "tests" / "fakes" / "fake_megatron.py"


def _value(argv: list[str], flag: str) -> str:
    """The value of the last occurrence of `flag` (argparse: last one wins)."""
    index = len(argv) - 1 - argv[::-1].index(flag)
    return argv[index + 1]


def _bench(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items()
                if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    full_env.update(INFIR2_EXP_ROOT=str(tmp_path / "exp"), INFIR2_ENTRY=str(FAKE_ENTRY), INFIR2_GPU_CHECK="0",
                    **(env or {}))
    return subprocess.run([sys.executable, "-m", "infir2_cpt.cli", "bench", *args], cwd=REPO, env=full_env,
                          capture_output=True, text=True, timeout=400)


@pytest.mark.slow
def test_end_to_end_speed(tmp_path):
    """Three variants, each through `infir2 train` -> torchrun -> the stand-in entry; results from its log lines."""
    proc = _bench(tmp_path, "--recipe", "7b", "--layers", "8", "--seq", "8192", "--variants", "bf16,fp8-blockwise",
                  "--variant", "fp8-mbs2:base=fp8-blockwise,parallel.micro_batch_size=2",
                  "--gpu-name", "NVIDIA H200", "--exp-name", "bench-e2e", "--also-against", "fp8-blockwise")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    root = tmp_path / "exp" / "bench-e2e"
    data = json.loads((root / "bench.json").read_text())
    assert data["mode"] == "speed" and data["gpu"]["peak"]["label"] == "H200 SXM" and data["train_iters"] == 25
    results = {v["name"]: v for v in data["variants"]}
    assert list(results) == ["bf16", "fp8-blockwise", "fp8-mbs2"]
    for name, r in results.items():
        assert r["status"] == "ok", r
        m = r["metrics"]
        assert m["timed_iterations"] == 20 and len(r["iterations"]) == 25
        assert m["checkpoints_saved"] == []  # Megatron would have printed its saves
        assert m["model_tflops_per_gpu"] == pytest.approx(m["megatron_tflops_per_gpu"], rel=2e-3)
        assert not any((root / name / "checkpoints").iterdir())
        argv = json.loads((root / name / "fake_megatron_argv.json").read_text())["argv"]
        assert "--save" not in argv and _value(argv, "--num-layers") == "8"
        assert "--no-gradient-accumulation-fusion" not in argv  # added by infir2_cpt.runtime.entry, not the launcher
    bf16, fp8, mbs2 = results["bf16"], results["fp8-blockwise"], results["fp8-mbs2"]
    assert bf16["metrics"]["step_ms"] == 1988.0 and fp8["metrics"]["step_ms"] == 1686.0
    assert fp8["ratios"]["step_time"] == pytest.approx(1686 / 1988)
    assert fp8["ratios"]["max_allocated"] == pytest.approx(67891.25 / 69530.5)
    assert bf16["metrics"]["mfu"] == pytest.approx(bf16["metrics"]["model_tflops_per_gpu"] / 989)
    assert fp8["metrics"]["mfu"] == pytest.approx(fp8["metrics"]["model_tflops_per_gpu"] / 1979)
    assert "--set parallel.micro_batch_size=2" not in " ".join(fp8["command"])
    assert "parallel.micro_batch_size=2" in mbs2["command"]
    argv = json.loads((root / "fp8-mbs2" / "fake_megatron_argv.json").read_text())["argv"]
    assert _value(argv, "--micro-batch-size") == "2" and _value(argv, "--global-batch-size") == "8"
    assert (root / "bench.png").read_bytes()[:4] == b"\x89PNG"
    table = (root / "table.md").read_text()
    assert "| fp8-blockwise | ok | 1686.0 |" in table and "0.848" in table
    # --also-against: a second baseline's ratios, in bench.json and as columns of their own
    assert bf16["other_ratios"]["fp8-blockwise"]["step_time"] == pytest.approx(1988 / 1686)
    head = next(line for line in table.splitlines() if line.startswith("| variant"))
    bf16_row = next(line for line in table.splitlines() if line.startswith("| bf16 |"))
    assert head.endswith("| x fp8-blockwise time | x fp8-blockwise alloc |")
    assert bf16_row.split(" | ")[-2] == "1.179"  # 1988 / 1686
    assert "| fp8-blockwise | ok | 1686.0 |" in proc.stdout
    assert "[fp8-blockwise] iteration 25/25" in proc.stderr  # progress echo
    assert (root / "bf16" / "bench-console.log").is_file() and (root / "bf16" / "launch.sh").is_file()


def _toy_dataset(tmp_path: Path) -> Path:
    """An empty indexed-dataset prefix and tokenizer folder (tmp_path/tok): the fake Megatron reads neither."""
    prefix = tmp_path / "data" / "toy_text_document"
    prefix.parent.mkdir()
    for suffix in (".bin", ".idx"):
        Path(str(prefix) + suffix).write_bytes(b"")
    (tmp_path / "tok").mkdir()
    return prefix


@pytest.mark.slow
def test_end_to_end_fidelity(tmp_path):
    prefix = _toy_dataset(tmp_path)
    proc = _bench(tmp_path, "--fidelity", "--recipe", "tiny", "--data", str(prefix), "--tokenizer",
                  str(tmp_path / "tok"), "--steps", "200", "--exp-name", "fid")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = json.loads((tmp_path / "exp" / "fid" / "bench.json").read_text())
    assert data["mode"] == "fidelity" and data["fidelity"]["target"] == 0.005
    gap = data["fidelity"]["gaps"]["fp8-blockwise"]
    assert gap["relative_gap"] == pytest.approx(0.002, rel=1e-3) and gap["within_target"]
    fp8 = next(v for v in data["variants"] if v["name"] == "fp8-blockwise")
    assert len(fp8["iterations"]) == 200 and fp8["metrics"]["loss_window"] == 20
    # the HF tokenizer's vocabulary came from Megatron's 'padded vocab' line into the FLOP count
    assert fp8["metrics"]["flops_per_iteration"] == pytest.approx(
        ModelShape(4, 1024, 2816, 8, 2, 1024, 32000).flops_per_iteration(16))
    assert "within 0.5 %" in proc.stdout
    assert (tmp_path / "exp" / "fid" / "bench.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_fidelity_over_seeds_pairs_each_run_with_the_baseline_of_its_seed(tmp_path):
    """Four runs, two at a time: the results come back in the plan's order, each FP8 run against its seed's BF16."""
    prefix = _toy_dataset(tmp_path)
    proc = _bench(tmp_path, "--fidelity", "--recipe", "tiny", "--data", str(prefix), "--tokenizer",
                  str(tmp_path / "tok"), "--steps", "100", "--seeds", "10,11", "--parallel", "2", "--exp-name", "seeds")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    root = tmp_path / "exp" / "seeds"
    data = json.loads((root / "bench.json").read_text())
    assert [v["name"] for v in data["variants"]] == ["bf16.seed10", "fp8-blockwise.seed10", "bf16.seed11",
                                                     "fp8-blockwise.seed11"]
    argv = json.loads((root / "fp8-blockwise.seed11" / "fake_megatron_argv.json").read_text())["argv"]
    assert _value(argv, "--seed") == "11"
    # each FP8 run against the BF16 run of its own seed: 0.2 % (the fake's seeds move both by the same factor)
    for name in ("fp8-blockwise.seed10", "fp8-blockwise.seed11"):
        assert data["fidelity"]["gaps"][name]["relative_gap"] == pytest.approx(0.002, rel=1e-3)
    bf16, fp8 = data["fidelity"]["across_seeds"]
    assert (bf16["variant"], fp8["variant"]) == ("bf16", "fp8-blockwise") and fp8["seeds_ok"] == 2
    assert bf16["spread"] == pytest.approx(0.001, rel=1e-2) and fp8["gap"] == pytest.approx(0.002, rel=1e-3)
    assert fp8["within_target"] and fp8["beyond_baseline_spread"]
    assert "| fp8-blockwise | 2/2 |" in (root / "table.md").read_text()
    assert ("fp8-blockwise: mean final loss over 2 seed(s) +0.20 % against bf16: within 0.5 %; larger than bf16's "
            "own spread across seeds") in proc.stdout


@pytest.mark.slow
def test_end_to_end_profile_and_a_failing_variant(tmp_path):
    proc = _bench(tmp_path, "--recipe", "tiny", "--profile", "--variants", "fp8-blockwise",
                  "--variant", "boom:base=bf16", "--exp-name", "prof", env={"FAKE_MEGATRON_FAIL": "boom"})
    assert proc.returncode == 1, proc.stdout + proc.stderr
    root = tmp_path / "exp" / "prof"
    data = json.loads((root / "bench.json").read_text())
    fp8, boom = data["variants"]
    assert fp8["status"] == "ok" and boom["status"] == "failed (exit 1)"
    assert any("CUDA out of memory" in line for line in boom["console_tail"])
    assert data["profile_window"] == [5, 8]
    b = fp8["breakdown"]
    assert b["trace"].endswith("prof/fp8-blockwise/torch_profile/rank-0.json.gz") and b["steps"] == 3
    assert b["categories"]["gemm fp8"]["ms_per_step"] == pytest.approx(0.9)
    assert b["categories"]["quantize/cast"]["ms_per_step"] == pytest.approx(0.12)
    assert b["exposed_communication_ms_per_step"] == pytest.approx(0.06)
    assert (root / "breakdown.png").read_bytes()[:4] == b"\x89PNG"
    assert "| gemm fp8 | 0.90 |" in (root / "table.md").read_text()
    assert "boom: failed (exit 1)" in proc.stdout


@pytest.mark.slow
def test_end_to_end_memory_snapshot(tmp_path):
    """Each variant's snapshot (written where --memory-snapshot-path says) is read back into bench.json and
    table.md: what is live at the peak, by phase, beside Megatron's max allocated."""
    proc = _bench(tmp_path, "--recipe", "tiny", "--memory-snapshot", "--variants", "bf16,fp8-blockwise",
                  "--steps", "2", "--warmup-steps", "2", "--exp-name", "mem")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    root = tmp_path / "exp" / "mem"
    data = json.loads((root / "bench.json").read_text())
    assert data["memory_snapshot"] is True
    bf16, fp8 = data["variants"]
    assert bf16["memory"]["snapshot"] == str(root / "bf16" / "memory_snapshot.pickle")
    assert fp8["memory"]["phases"]["forward"]["gib"] - bf16["memory"]["phases"]["forward"]["gib"] == pytest.approx(
        20 / 1024, abs=1e-3)  # fake_snapshot.QUANTIZED
    table = (root / "table.md").read_text()
    assert "| live at the peak, by phase | bf16 GiB | fp8-blockwise GiB |" in table
    assert "| max allocated (Megatron) |" in table
    assert "slows every iteration" in proc.stderr


@pytest.mark.slow
def test_end_to_end_a_hung_variant_is_stopped_at_the_timeout(tmp_path):
    proc = _bench(tmp_path, "--recipe", "tiny", "--variants", "bf16", "--timeout-minutes", "0.1", "--exp-name", "hang",
                  env={"FAKE_MEGATRON_HANG": "bf16"})
    assert proc.returncode == 1, proc.stdout + proc.stderr
    data = json.loads((tmp_path / "exp" / "hang" / "bench.json").read_text())
    (r,) = data["variants"]
    assert r["status"] == "timed out" and r["seconds"] < 120
    assert "stopping it (SIGTERM" in proc.stderr
