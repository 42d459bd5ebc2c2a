"""The entry point's CPU-checkable parts: the megatron-core 0.19.2 wheel workarounds, Megatron's own
argument parsing and global setup of the tiny recipe (W&B offline run and TensorBoard writer included),
the console tee and the worker's death with its launcher."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from infir2_cpt.launch import plan as launch
from infir2_cpt.launch.execute import format_command
from infir2_cpt.launch.plan import LaunchEnv, LaunchRequest, plan_run
from infir2_cpt.runtime.wheel_workarounds import adjust_megatron_argv, apex_wgrad_fusion_available


def test_gradient_accumulation_fusion_is_disabled_without_apex() -> None:
    argv, notes = adjust_megatron_argv(["--bf16"], apex_available=False)
    assert argv == ["--bf16", "--no-gradient-accumulation-fusion"]
    assert "APEX" in notes[0]


def test_gradient_accumulation_fusion_is_kept_with_apex_or_when_already_off() -> None:
    assert adjust_megatron_argv(["--bf16"], apex_available=True) == (["--bf16"], [])
    already = ["--no-gradient-accumulation-fusion"]
    assert adjust_megatron_argv(already, apex_available=False) == (already, [])


def test_apex_probe_matches_this_environment() -> None:
    try:
        import fused_weight_gradient_mlp_cuda  # noqa: F401
        present = True
    except ImportError:
        present = False
    assert apex_wgrad_fusion_available() is present


def test_te_cross_entropy_fusion_becomes_native_and_last_value_wins() -> None:
    argv = ["--cross-entropy-loss-fusion", "--cross-entropy-fusion-impl", "native",
            "--cross-entropy-fusion-impl", "te"]
    fixed, notes = adjust_megatron_argv(argv, apex_available=True)
    assert fixed[-1] == "native" and fixed[2] == "native"
    assert "refuses --cross-entropy-fusion-impl te" in notes[0]


def test_te_cross_entropy_fusion_given_with_an_equals_sign_is_rewritten_too() -> None:
    """The launch host's checks and this rewrite read a flag the same way (infir2_cpt.argv): `--flag=value`
    counts, and the last occurrence wins whichever way it is written."""
    fixed, notes = adjust_megatron_argv(["--cross-entropy-fusion-impl", "native", "--cross-entropy-fusion-impl=te"],
                                        apex_available=True)
    assert fixed == ["--cross-entropy-fusion-impl", "native", "--cross-entropy-fusion-impl=native"] and notes
    kept = ["--cross-entropy-fusion-impl=te", "--cross-entropy-fusion-impl", "native"]
    assert adjust_megatron_argv(kept, apex_available=True) == (kept, [])


def test_dataset_helper_compilation_is_skipped_and_helpers_are_real() -> None:
    code = textwrap.dedent("""
        import megatron.core.datasets.utils as u
        from infir2_cpt.runtime.wheel_workarounds import skip_dataset_helper_compilation
        skip_dataset_helper_compilation()
        u.compile_helpers()  # would run `make` in the wheel, which ships no Makefile
        from megatron.core.datasets import helpers_cpp
        assert hasattr(helpers_cpp, "build_sample_idx_int32") or hasattr(helpers_cpp, "build_sample_idx")
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]


def _tiny_megatron_argv(tmp_path: Path, *sets: str) -> list[str]:
    env = LaunchEnv.read({**os.environ, "INFIR2_EXP_ROOT": str(tmp_path / "exp"), "INFIR2_GPU_CHECK": "0"})
    plan = plan_run(LaunchRequest(recipe="tiny", dry_run=True, sets=list(sets)), env)
    return plan.megatron_args


def test_megatron_sets_up_the_tiny_recipe_with_an_offline_wandb_run(tmp_path: Path) -> None:
    """parse_and_validate_args + set_global_variables (tokenizer, TensorBoard and W&B writers) on the CPU,
    exactly as the entry calls them, with W&B enabled: an offline run appears under exp/<name>/logs."""
    argv = _tiny_megatron_argv(tmp_path, "logging.wandb_project=infir2-test", "precision.precision_aware_optimizer=false")
    argv, _ = adjust_megatron_argv(argv + ["--no-rope-fusion"])  # the CPU has no TE for the rope kernel
    code = textwrap.dedent(f"""
        import json, sys
        from infir2_cpt.runtime.wheel_workarounds import skip_dataset_helper_compilation
        skip_dataset_helper_compilation()
        sys.argv = ["entry"] + {argv!r}
        from megatron.training.arguments import parse_and_validate_args
        from megatron.training.argument_utils import gpt_config_from_args, pretrain_cfg_container_from_args
        from megatron.training.global_vars import get_wandb_writer, get_tensorboard_writer
        args = parse_and_validate_args()
        cfg = pretrain_cfg_container_from_args(args, gpt_config_from_args(args))
        wandb = get_wandb_writer()
        wandb.log({{"probe": 1.0}}, step=1)
        wandb.finish()
        print(json.dumps({{"padded_vocab": args.padded_vocab_size, "fp8_recipe": args.fp8_recipe,
                          "grad_fusion": args.gradient_accumulation_fusion, "tb": get_tensorboard_writer() is not None,
                          "container": type(cfg).__name__}}))
    """)
    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "WANDB_MODE": "offline",
           "WANDB_SILENT": "true"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result == {"padded_vocab": 32768, "fp8_recipe": "blockwise", "grad_fusion": False, "tb": True,
                      "container": "PretrainConfigContainer"}
    logs = tmp_path / "exp" / "tiny" / "logs"
    runs = list(logs.glob("wandb/offline-run-*"))
    assert runs, f"no offline W&B run under {logs}: {list(logs.rglob('*'))[:10]}"
    assert list((tmp_path / "exp" / "tiny" / "tensorboard").glob("events.out.tfevents.*"))


def test_code_dir_launches_that_checkouts_pretrain_gpt(tmp_path: Path) -> None:
    checkout = tmp_path / "Megatron-LM"
    checkout.mkdir()
    (checkout / "pretrain_gpt.py").write_text("# stand-in\n")
    os.environ["INFIR2_EXP_ROOT"] = str(tmp_path / "exp")
    try:
        plan = plan_run(LaunchRequest(recipe="tiny", dry_run=True, sets=[f"megatron.code_dir={checkout}"]))
    finally:
        del os.environ["INFIR2_EXP_ROOT"]
    assert plan.launcher[-1] == str(checkout / "pretrain_gpt.py")
    assert "-m" not in plan.launcher[plan.launcher.index("--max-restarts=0"):]
    assert plan.env["PYTHONPATH"].endswith(str(checkout))


def test_missing_code_dir_is_reported(tmp_path: Path) -> None:
    os.environ["INFIR2_EXP_ROOT"] = str(tmp_path / "exp")
    try:
        plan = plan_run(LaunchRequest(recipe="tiny", dry_run=True, sets=[f"megatron.code_dir={tmp_path / 'nope'}"]))
    finally:
        del os.environ["INFIR2_EXP_ROOT"]
    assert any(p.key == "megatron.code_dir" and "pretrain_gpt.py" in p.message for p in plan.findings.machine)


def test_console_tee_copies_everything_and_survives_group_signals(tmp_path: Path) -> None:
    """The tee that launch.execute starts before exec: output of the exec'd program and its children
    lands in the log and on the terminal, even when the process group is signalled."""
    log_file = tmp_path / "console.log"
    code = textwrap.dedent(f"""
        import os, sys
        from pathlib import Path
        from infir2_cpt.launch.execute import start_console_tee
        print("before exec", flush=True)
        start_console_tee(Path({str(log_file)!r}))
        os.execvp("bash", ["bash", "-c", "echo from-exec; (echo from-child >&2); kill -TERM 0; echo after-signal"])
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         start_new_session=True)
    deadline = time.monotonic() + 10
    while "from-child" not in (log_file.read_text() if log_file.exists() else "") and time.monotonic() < deadline:
        time.sleep(0.1)
    logged = log_file.read_text()
    assert "from-exec" in logged and "from-child" in logged
    assert "from-exec" in out.stdout  # the terminal copy
    assert "before exec" not in logged  # only what follows the tee's start


def test_worker_dies_with_its_launcher(tmp_path: Path) -> None:
    """entry.die_with_launcher: a SIGKILLed parent takes its worker with it (torchrun's workers live in
    sessions of their own, so a process-group kill would otherwise miss them)."""
    marker = tmp_path / "worker.pid"
    worker = (f"import os, time, sys; sys.path.insert(0, {str(Path(launch.__file__).parents[2])!r}); "
              f"from infir2_cpt.runtime.entry import die_with_launcher; die_with_launcher(); "
              f"open({str(marker)!r}, 'w').write(str(os.getpid())); time.sleep(60)")
    parent_code = (f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {worker!r}], "
                   f"start_new_session=True); time.sleep(60)")
    parent = subprocess.Popen([sys.executable, "-c", parent_code])
    deadline = time.monotonic() + 30
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    worker_pid = int(marker.read_text())
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 10
    while Path(f"/proc/{worker_pid}").exists() and time.monotonic() < deadline:
        state = Path(f"/proc/{worker_pid}/stat").read_text().split()[2] if Path(f"/proc/{worker_pid}/stat").exists() else "X"
        if state in ("Z", "X"):
            break
        time.sleep(0.1)
    alive = Path(f"/proc/{worker_pid}/stat").exists() and Path(f"/proc/{worker_pid}/stat").read_text().split()[2] not in ("Z", "X")
    assert not alive, f"worker {worker_pid} outlived its launcher"


def test_shlex_roundtrip_of_dry_run_command(tmp_path: Path) -> None:
    """The dry-run text is a runnable shell command: its flags parse back to the plan's argument list."""
    os.environ["INFIR2_EXP_ROOT"] = str(tmp_path / "exp")
    try:
        plan = plan_run(LaunchRequest(recipe="7b", dry_run=True, sets=["data.blend=[{path: '/data/a b', weight: 1.0}]"]))
    finally:
        del os.environ["INFIR2_EXP_ROOT"]
    text = format_command(plan)
    command_text = "\n".join(line for line in text.splitlines() if not line.startswith("export "))
    assert shlex.split(command_text.replace("\\\n", " ")) == plan.command
