"""scripts/CPT/*.sh accept the seed's command lines and run infir2 (checked with --dry-run)."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from infir2_cpt import checkpoints as ck

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = REPO / "scripts" / "CPT"
BIN = Path(sys.executable).parent

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def run_script(name: str, *args: str, cwd: Path, exp_root: Path | None = None,
               use_module: bool = False) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("INFIR2_EXP_ROOT", "INFIR2")}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    if use_module:  # no infir2 executable: the wrapper falls back to python -m infir2_cpt.cli
        env["PATH"] = "/usr/bin:/bin"
        env["PYTHON"] = sys.executable
    if exp_root is not None:
        env["INFIR2_EXP_ROOT"] = str(exp_root)
    return subprocess.run(["bash", str(SCRIPTS / name), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)


def flags(stdout: str) -> dict[str, list[str]]:
    out = {}
    for line in stdout.splitlines():
        if line.startswith("    --"):
            words = shlex.split(line.rstrip("\\").strip())
            out[words[0]] = words[1:]
    return out


def megatron_lines(stdout: str) -> list[str]:
    return [line.rstrip(" \\").strip() for line in stdout.splitlines() if line.startswith("    --")]


def launcher(stdout: str) -> str:
    return next(line for line in stdout.splitlines() if "--rdzv-backend=c10d" in line)


@pytest.mark.parametrize("script,recipe_name,tp", [
    ("InfiR2_CPT_FP8_7B.sh", "InfiR2_CPT_FP8_7B", "4"),
    ("InfiR2_CPT_FP8_1.5B.sh", "InfiR2_CPT_FP8_1.5B", "2"),
])
def test_full_script_seed_command_line(script, recipe_name, tp, tmp_path):
    proc = run_script(script, "--nnodes", "4", "--rdzv_endpoint", "master_ip:29400", "--dry-run", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    line = launcher(proc.stdout)
    assert "--nnodes=4" in line and "--rdzv-endpoint=master_ip:29400" in line and "--nproc-per-node=8" in line
    f = flags(proc.stdout)
    assert f["--tensor-model-parallel-size"] == [tp]
    assert f["--save"] == [str(tmp_path / "exp" / recipe_name / "checkpoints")]  # exp/ under the cwd, like the seed
    assert list(tmp_path.iterdir()) == []  # dry run: nothing written


def test_unknown_arguments_go_to_megatron_last(tmp_path):
    proc = run_script("InfiR2_CPT_FP8_7B.sh", "--seq-length", "8192", "--nnodes", "1", "--recompute-activations",
                      "--dry-run", "--", "--eval-iters", "0", exp_root=tmp_path / "exp", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert megatron_lines(proc.stdout)[-3:] == ["--seq-length 8192", "--recompute-activations", "--eval-iters 0"]
    assert "--seq-length 32768" in megatron_lines(proc.stdout)  # the recipe's own, overridden by the last one


def test_equals_spellings_and_options(tmp_path):
    proc = run_script("InfiR2_CPT_FP8_1.5B.sh", "--nnodes=2", "--rdzv_endpoint=n0:1234", "--nproc_per_node", "4",
                      "--exp", "mine", "--set", "schedule.lr=2e-4", "--dry-run", exp_root=tmp_path / "exp",
                      cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    line = launcher(proc.stdout)
    assert "--nnodes=2" in line and "--rdzv-endpoint=n0:1234" in line and "--nproc-per-node=4" in line
    f = flags(proc.stdout)
    assert f["--lr"] == ["0.0002"]
    assert f["--save"] == [str(tmp_path / "exp" / "mine" / "checkpoints")]


_7B = ("InfiR2_CPT_FP8_7B_decay.sh", "InfiR2_CPT_FP8_7B", "InfiR2_CPT_FP8_7B_decay")
_1_5B = ("InfiR2_CPT_FP8_1.5B_decay.sh", "InfiR2_CPT_FP8_1.5B", "InfiR2_CPT_FP8_1.5B_decay")


@pytest.mark.parametrize("script,stable,decay,load_form", [
    (*_7B, "seed path"), (*_7B, "iter name"), (*_7B, "equals"), (*_1_5B, "seed path"),
])
def test_decay_script_seed_command_line(script, stable, decay, load_form, tmp_path):
    ckpts = tmp_path / "exp" / stable / "checkpoints"
    folder = ckpts / ck.iter_dir_name(35000)
    folder.mkdir(parents=True)
    for name in ck.REQUIRED_FILES:
        (folder / name).write_text("{}")
    load = {"seed path": ["--load", f"exp/{stable}/checkpoints/iter_0035000"],
            "iter name": ["--load", "iter_0035000"],
            "equals": [f"--load=exp/{stable}/checkpoints/iter_0035000"]}[load_form]
    proc = run_script(script, *load, "--dry-run", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    f = flags(proc.stdout)
    assert f["--load"] == [str(ckpts)]  # the directory with the tracker, never the iter_ folder
    assert f["--ckpt-step"] == ["35000"]
    assert f["--train-iters"] == ["40000"] and f["--lr-warmup-iters"] == ["0"]
    assert "--override-opt_param-scheduler" in f and "--exit-on-missing-checkpoint" in f
    assert f["--save"] == [str(tmp_path / "exp" / decay / "checkpoints")]
    assert "warning: --load" not in proc.stderr
    assert not (tmp_path / "exp" / decay).exists()


def test_decay_script_needs_load(tmp_path):
    proc = run_script("InfiR2_CPT_FP8_7B_decay.sh", "--dry-run", cwd=tmp_path)
    assert proc.returncode == 2
    assert "--load iter_0035000" in proc.stderr and "usage:" in proc.stderr


def test_full_script_load_becomes_pretrained(tmp_path):
    base = tmp_path / "Qwen2.5-1.5B_torch_dist"
    base.mkdir()
    (base / ck.TRACKER).write_text("release\n")
    proc = run_script("InfiR2_CPT_FP8_1.5B.sh", "--load", str(base), "--dry-run", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    f = flags(proc.stdout)
    assert f["--pretrained-checkpoint"] == [str(base)]
    assert f["--load"] == [str(tmp_path / "exp" / "InfiR2_CPT_FP8_1.5B" / "checkpoints")]
    assert "--exit-on-missing-checkpoint" in f
    assert "checkpoint.pretrained" in proc.stderr


def test_config_problem_exit_code_passes_through(tmp_path):
    proc = run_script("InfiR2_CPT_FP8_1.5B.sh", "--set", "parallel.tensor_parallel=4", "--dry-run", cwd=tmp_path)
    assert proc.returncode == 2
    assert "num_query_groups" in proc.stderr


def test_missing_option_value(tmp_path):
    proc = run_script("InfiR2_CPT_FP8_7B.sh", "--nnodes", cwd=tmp_path)
    assert proc.returncode == 2 and "--nnodes needs a value" in proc.stderr


def test_help(tmp_path):
    proc = run_script("InfiR2_CPT_FP8_7B_decay.sh", "--help", cwd=tmp_path)
    assert proc.returncode == 0
    assert "infir2 decay --recipe 7b" in proc.stdout


def test_without_infir2_on_path_uses_the_module(tmp_path):
    proc = run_script("InfiR2_CPT_FP8_7B.sh", "--dry-run", cwd=tmp_path, use_module=True)
    assert proc.returncode == 0, proc.stderr
    assert flags(proc.stdout)["--tensor-model-parallel-size"] == ["4"]


def test_scripts_are_executable():
    for name in ("InfiR2_CPT_FP8_7B.sh", "InfiR2_CPT_FP8_7B_decay.sh", "InfiR2_CPT_FP8_1.5B.sh",
                 "InfiR2_CPT_FP8_1.5B_decay.sh"):
        assert os.access(SCRIPTS / name, os.X_OK), name
