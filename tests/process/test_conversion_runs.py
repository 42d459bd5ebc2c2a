"""HF <-> Megatron conversion with Megatron itself, on the CPU: tests/fakes/megatron_cpu_convert.py runs the recipe's
arguments through parse_and_validate_args, builds the model with GPTModelBuilder, saves a release checkpoint with
Megatron's save_checkpoint and compares Megatron's forward with transformers' logits; then `infir2 convert
megatron-to-hf` runs for real (torchrun, gloo). The pure mapping is tests/unit/test_conversion.py."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from infir2_cpt.convert import mapping as cv  # noqa: E402
from infir2_cpt.recipe.load import load_recipe, recipe_to_yaml  # noqa: E402
from infir2_cpt.recipe.shape import ModelShape  # noqa: E402
from tiny_qwen2 import (CPU_MEGATRON, REPO, free_port, run_cli, save_hf, set_args, tiny_model,  # noqa: E402
                        tiny_sets, tiny_shape)

WORKER = REPO / "tests" / "fakes" / "megatron_cpu_convert.py"


def megatron_cpu_convert(tmp_path: Path, tied: bool) -> tuple[Path, Path, dict]:
    """HF folder -> Megatron release checkpoint through the worker; returns (hf dir, checkpoint dir, result)."""
    from infir2_cpt.convert import plan as convert_launch

    hf = save_hf(tiny_model(tied, torch.float32, seed=11), tmp_path / "hf")
    recipe = load_recipe("tiny", tiny_sets(tied)).recipe
    shape = ModelShape.from_recipe(recipe, padded_vocab_size=1024, vocab_size=1000)
    megatron_args = convert_launch.conversion_megatron_args(recipe, 1000, 1024, save=tmp_path / "meg",
                                                            dtype="fp32") + CPU_MEGATRON
    spec = {"hf": str(hf), "shape": shape.__dict__, "megatron_args": megatron_args,
            "result": str(tmp_path / "result.json"), "port": free_port()}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    proc = subprocess.run([sys.executable, str(WORKER), str(tmp_path / "spec.json")], capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return hf, tmp_path / "meg", json.loads((tmp_path / "result.json").read_text())


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def converted(request, tmp_path_factory):
    tied = request.param
    hf, meg, result = megatron_cpu_convert(tmp_path_factory.mktemp("untied" if not tied else "tied"), tied)
    return tied, hf, meg, result


@pytest.mark.slow
def test_megatron_model_takes_every_mapped_tensor(converted):
    tied, _, _, result = converted
    shape = tiny_shape(tied)
    assert result["copy_problems"] == []
    assert result["model_keys"] == sorted(cv.to_model_names(cv.expected_megatron_shapes(shape),
                                                             result["model_keys"]))


@pytest.mark.slow
def test_megatron_save_checkpoint_writes_a_release_checkpoint(converted):
    tied, _, meg, result = converted
    assert result["tracker"] == "release"
    assert result["release_files"] == [".metadata", "__0_0.distcp", "metadata.json"]
    # the checkpoint's keys are the TE names (the local spec maps its norms onto them), layers stacked
    expected = {k: list(v) for k, v in cv.expected_checkpoint_shapes(tiny_shape(tied)).items()}
    assert result["checkpoint_shapes"] == expected
    assert result["written_equals_model"] and result["written_equals_mapped"]
    from infir2_cpt.checkpoints import find_resume_point

    assert find_resume_point(meg).folder.release  # what the launcher and Megatron see as the base model


@pytest.mark.slow
def test_megatron_forward_matches_transformers(converted):
    _, _, _, result = converted
    assert result["logits"]["max_abs"] < 1e-4, result["logits"]
    assert result["logits"]["top1_agreement"] == 1.0
    assert result["padded_logits_zero"] is True
    assert result["reload_problems"] == [] and result["reloaded_logits_equal"]


@pytest.mark.slow
def test_megatron_to_hf_through_the_cli_is_bit_exact(converted, tmp_path):
    tied, hf, meg, _ = converted
    out = tmp_path / "export"
    tokenizer = tmp_path / "tok"
    tokenizer.mkdir()
    (tokenizer / "tokenizer_config.json").write_text("{}")
    (tokenizer / "generation_config.json").write_text('{"do_sample": false}')
    result = run_cli("convert", "megatron-to-hf", "--ckpt", str(meg), "--out", str(out), "--recipe", "tiny",
                     *set_args(tiny_sets(tied)), "--hf-config", str(hf), "--tokenizer", str(tokenizer))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "release" in result.stderr  # the checkpoints directory resolved through its tracker
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "model.safetensors",
                                                     "tokenizer_config.json"]
    source = cv.read_hf_state(hf)
    exported = cv.read_hf_state(out)
    assert set(exported) == set(source)
    assert all(torch.equal(exported[k], source[k]) for k in source)
    config = json.loads((out / "config.json").read_text())
    assert config["bos_token_id"] == 7 and config["vocab_size"] == 1000 and config["tie_word_embeddings"] is tied
    model = transformers.Qwen2ForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    reference = transformers.Qwen2ForCausalLM.from_pretrained(str(hf), dtype=torch.float32)
    tokens = torch.randint(0, 1000, (1, 9))
    with torch.no_grad():
        assert torch.equal(model(input_ids=tokens).logits, reference(input_ids=tokens).logits)


@pytest.mark.slow
def test_megatron_to_hf_takes_the_recipe_of_the_experiment(converted, tmp_path):
    """An iter_* folder inside exp/<name>/checkpoints: the shape comes from exp/<name>/recipe.yaml."""
    tied, hf, meg, _ = converted
    exp = tmp_path / "exp" / "cpt"
    shutil.copytree(meg / "release", exp / "checkpoints" / "iter_0000020")
    recipe = load_recipe("tiny", tiny_sets(tied) + [f"checkpoint.pretrained={meg}"]).recipe
    (exp / "recipe.yaml").write_text(recipe_to_yaml(recipe))
    result = run_cli("convert", "megatron-to-hf", "--ckpt", str(exp / "checkpoints" / "iter_0000020"),
                     "--out", str(tmp_path / "export"), "--dry-run")
    assert result.returncode == 0, result.stderr
    assert f"model shape from the experiment's recorded recipe {exp / 'recipe.yaml'}" in result.stdout
    assert f"--source-config {meg / cv.SOURCE_CONFIG_FILE}" in result.stdout
    assert "1000 of 1024 vocabulary rows kept" in result.stdout


@pytest.mark.slow
def test_conversion_keeps_the_source_config_beside_the_checkpoint(converted, tmp_path):
    """hf-to-megatron writes hf_config.json and conversion.json; converting back finds the source config there."""
    tied, hf, meg, _ = converted
    assert json.loads((meg / cv.SOURCE_CONFIG_FILE).read_text()) == json.loads((hf / "config.json").read_text())
    record = json.loads((meg / cv.CONVERSION_RECORD).read_text())
    assert record["checkpoint"] == "release" and record["written_tensor_parallel"] == 1
    assert record["shape"]["padded_vocab_size"] == 1024 and record["source"] == str(hf)
    result = run_cli("convert", "megatron-to-hf", "--ckpt", str(meg / "release"), "--out", str(tmp_path / "x"),
                     "--recipe", "tiny", *set_args(tiny_sets(tied)), "--dry-run")
    assert result.returncode == 0, result.stderr
    assert f"--source-config {meg / cv.SOURCE_CONFIG_FILE}" in result.stdout


@pytest.mark.slow
def test_megatron_to_hf_checks_the_checkpoint_against_the_recipe(converted, tmp_path):
    tied, _, meg, _ = converted
    sets = [s for s in tiny_sets(tied) if not s.startswith("model.ffn_hidden_size")] + ["model.ffn_hidden_size=768"]
    result = run_cli("convert", "megatron-to-hf", "--ckpt", str(meg / "release"), "--out", str(tmp_path / "x"),
                     "--recipe", "tiny", *set_args(sets), "--vocab-size", "1000")
    assert result.returncode == 2
    assert "decoder.layers.mlp.linear_fc1.weight has shape [2, 1024, 256], expected [2, 1536, 256]" in result.stderr
    assert not (tmp_path / "x").exists()
    result = run_cli("convert", "megatron-to-hf", "--ckpt", str(tmp_path), "--out", str(tmp_path / "x"),
                     "--recipe", "tiny")
    assert result.returncode == 2 and "neither an iter_NNNNNNN or release folder" in result.stderr


@pytest.mark.slow
def test_check_logits_dry_run(converted, tmp_path):
    tied, hf, meg, _ = converted
    result = run_cli("convert", "check-logits", "--hf", str(hf), "--ckpt", str(meg / "release"), "--recipe", "tiny",
                     *set_args(tiny_sets(tied)), "--dtype", "fp32", "--seq", "32", "--report",
                     str(tmp_path / "r.json"), "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "check-logits" in result.stdout and "--dtype fp32" in result.stdout and "--bf16" not in result.stdout
    assert "--padded-vocab-size 1024" in result.stdout and "--save" not in result.stdout
    result = run_cli("convert", "check-logits", "--hf", str(hf), "--ckpt", str(meg / "release"), "--recipe", "tiny",
                     *set_args(tiny_sets(tied)), "--seq", "65", "--dry-run")
    assert result.returncode == 2 and "--seq: exceeds model.max_position_embeddings (64)" in result.stderr
    result = run_cli("convert", "check-logits", "--hf", str(hf), "--ckpt", str(meg / "release"), "--recipe", "tiny",
                     *set_args(tiny_sets(tied)), "--seq", "65", "--dtype", "fp16", "--dry-run")
    assert result.returncode == 2 and "--dtype: must be bf16 or fp32" in result.stderr  # reported with the rest
    assert "--seq: exceeds model.max_position_embeddings (64)" in result.stderr
