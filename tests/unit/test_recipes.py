"""Recipe files, the schema, `extends:`, `--set`, and the docs that describe them."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from infir2_cpt.launch.plan import LaunchRequest, request_recipe
from infir2_cpt.errors import RecipeError
from infir2_cpt.recipe.load import (RECIPES_DIR, field_docs, load_raw, load_recipe, recipe_to_yaml,
                                shipped_recipe_names)

REPO = Path(__file__).resolve().parents[2]

# Table 1.2 of the reference: the seed scripts' exported environment (PYTHONPATH is only for a Megatron-LM
# checkout: megatron.code_dir).
SEED_ENV = {
    "WANDB_MODE": "offline",
    "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1",
    "CUDA_DEVICE_MAX_CONNECTIONS": "1",
    "TORCH_NCCL_AVOID_RECORD_STREAMS": "1",
    "NVTE_ALLOW_NONDETERMINISTIC_ALGO": "1",
    "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True",
    "NCCL_NVLS_ENABLE": "0",
    "NVTE_FUSED_ATTN": "1",
    "NVTE_DEBUG": "0",
}


def test_shipped_recipes():
    assert set(shipped_recipe_names()) >= {"7b", "7b-decay", "1.5b", "1.5b-decay", "tiny"}
    assert RECIPES_DIR == REPO / "src" / "infir2_cpt" / "recipe" / "recipes"


@pytest.mark.parametrize("name", shipped_recipe_names())
def test_every_shipped_recipe_loads_cleanly(name):
    loaded = load_recipe(name)
    recipe = loaded.recipe
    assert recipe.description and len(recipe.description.splitlines()) == 1
    assert recipe.name
    # the seed's environment, plus infir2's own switch (documented in docs/recipes.md under the deviations)
    assert {k: v for k, v in recipe.env.items() if not k.startswith("INFIR2_")} == SEED_ENV
    assert recipe.env.get("INFIR2_WGRAD_FUSION") == "1"


@pytest.mark.parametrize("name,full", [("7b-decay", "7b"), ("1.5b-decay", "1.5b")])
def test_decay_recipes_extend_their_full_recipe(name, full):
    own = yaml.safe_load((RECIPES_DIR / f"{name}.yaml").read_text())
    assert own["extends"] == full
    assert own["phase"] == "decay"
    assert set(own) <= {"extends", "description", "name", "phase", "stable_name", "schedule"}, "no copied sections"
    decay, stable = load_recipe(name).recipe, load_recipe(full).recipe
    assert decay.stable_name == stable.name
    assert decay.name == stable.name + "_decay"
    assert decay.schedule.warmup_iters == 0
    # everything else is the full recipe's
    for section in ("model", "parallel", "data", "tokenizer", "precision", "checkpoint", "logging", "launch"):
        assert getattr(decay, section) == getattr(stable, section), section
    assert (decay.schedule.lr, decay.schedule.min_lr, decay.schedule.decay_iters) == (1e-4, 1e-5, 5000)


def test_seed_shapes():
    r7, r15 = load_recipe("7b").recipe, load_recipe("1.5b").recipe
    assert (r7.model.hidden_size, r7.model.ffn_hidden_size, r7.model.num_attention_heads,
            r7.model.num_query_groups, r7.parallel.tensor_parallel, r7.model.untie_embeddings) == (
        3584, 18944, 28, 4, 4, True)
    assert (r15.model.hidden_size, r15.model.ffn_hidden_size, r15.model.num_attention_heads,
            r15.model.num_query_groups, r15.parallel.tensor_parallel, r15.model.untie_embeddings) == (
        1536, 8960, 12, 2, 2, False)
    assert r15.model.padded_vocab_size == 151936 and r7.model.padded_vocab_size == 152064
    for r in (r7, r15):
        assert (r.model.seq_length, r.parallel.global_batch_size, r.parallel.micro_batch_size) == (32768, 128, 1)
        assert (r.schedule.train_iters, r.schedule.warmup_iters, r.schedule.decay_iters) == (40000, 5000, 5000)
        assert r.precision.fp8 == "blockwise" and r.precision.fp8_format == "e4m3"
        assert r.logging.profile is False
        assert r.checkpoint.load_rng is False  # the seed's --no-load-rng
        assert r.launch.nproc_per_node == 8


def test_tiny_recipe_is_a_one_gpu_smoke_test():
    r = load_recipe("tiny").recipe
    assert r.data.mock and r.data.blend == []
    assert r.tokenizer.type == "NullTokenizer" and r.tokenizer.model is None
    assert r.launch.nproc_per_node == 1 and r.parallel.tensor_parallel == 1
    m = r.model
    kv = m.hidden_size // m.num_attention_heads
    qkv = (m.num_attention_heads + 2 * m.num_query_groups) * kv
    for size in (m.hidden_size, m.ffn_hidden_size, kv, qkv, m.seq_length):
        assert size % 128 == 0, size
    assert m.num_attention_heads > m.num_query_groups > 1  # grouped-query attention, like Qwen2.5
    assert r.precision.fp8 == "blockwise"
    assert r.schedule.warmup_iters + r.schedule.decay_iters < r.schedule.train_iters <= 1000


def test_extends_merges_mappings_and_replaces_lists(tmp_path):
    (tmp_path / "base.yaml").write_text(
        "extends: tiny\nname: base\nmegatron_extra_args: ['--a', '--b']\nparallel: {global_batch_size: 32}\n")
    (tmp_path / "child.yaml").write_text(
        "extends: base.yaml\nname: child\nmegatron_extra_args: ['--c']\nparallel: {micro_batch_size: 2}\n")
    r = load_recipe(str(tmp_path / "child.yaml")).recipe
    assert r.name == "child"
    assert r.megatron_extra_args == ["--c"]
    assert (r.parallel.global_batch_size, r.parallel.micro_batch_size) == (32, 2)
    assert r.model.hidden_size == 1024  # from tiny


def test_circular_extends(tmp_path):
    (tmp_path / "a.yaml").write_text("extends: b.yaml\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    with pytest.raises(RecipeError) as info:
        load_recipe(str(tmp_path / "a.yaml"))
    assert "circular extends: a.yaml -> b.yaml -> a.yaml" in str(info.value)


def test_set_overrides_with_types():
    r = load_recipe("7b", ["schedule.lr=2e-4", "parallel.global_batch_size=256", "logging.wandb_project=null",
                           "data.split=98,1,1", "precision.fp8=null", "env.NCCL_DEBUG=INFO"]).recipe
    assert r.schedule.lr == 2e-4 and isinstance(r.schedule.lr, float)
    assert r.parallel.global_batch_size == 256
    assert r.logging.wandb_project is None
    assert r.data.split == "98,1,1"
    assert r.precision.fp8 is None
    assert r.env["NCCL_DEBUG"] == "INFO" and r.env["NVTE_FUSED_ATTN"] == "1"


def test_set_problems_reported_together():
    with pytest.raises(RecipeError) as info:
        load_recipe("7b", ["parallel.tensor_paralel=2", "schedule.lr=fast", "nope=1"])
    assert len(info.value.problems) == 3


def test_show_output_round_trips(tmp_path):
    for name in ("7b", "1.5b-decay", "tiny"):
        recipe = load_recipe(name).recipe
        path = tmp_path / f"{name}.yaml"
        path.write_text(recipe_to_yaml(recipe))
        assert load_recipe(str(path)).recipe == recipe


def test_decay_of_a_recipe_without_a_decay_sibling():
    loaded = request_recipe(LaunchRequest(recipe="tiny", decay_load="iter_0000200"))
    assert loaded.problems == []
    r = loaded.recipe
    assert (r.phase, r.name, r.stable_name, r.schedule.warmup_iters) == ("decay", "tiny_decay", "tiny", 0)


def test_decay_command_uses_the_shipped_decay_recipe():
    loaded = request_recipe(LaunchRequest(recipe="7b", decay_load="iter_0035000"))
    assert loaded.recipe.name == "InfiR2_CPT_FP8_7B_decay"


# --------------------------------------------------------------------------- docs and README


def test_every_schema_key_is_documented():
    docs = (REPO / "docs" / "recipes.md").read_text()
    missing = [key for key, *_ in field_docs() if f"`{key}`" not in docs]
    assert not missing, f"run `python scripts/gen_recipe_docs.py --write`; undocumented keys: {missing}"


def test_readme_recipe_table_lists_every_recipe():
    readme = (REPO / "README.md").read_text()
    rows = re.findall(r"^\|\s*`([^`]+)`\s*\|", readme, flags=re.M)
    assert set(shipped_recipe_names()) <= set(rows)


def test_readme_test_command_is_what_ci_runs():
    """CI runs scripts/test.sh (with a cached venv), the README's test command; it runs the suite without GPUs."""
    ci = (REPO / ".ci" / "run").read_text()
    assert 'exec scripts/test.sh' in ci
    assert 'python -m pytest -q -m "not gpu"' in (REPO / "scripts" / "test.sh").read_text()
    readme = (REPO / "README.md").read_text()
    assert "scripts/test.sh" in readme and "scripts/quickstart.sh" in readme
    assert "infir2 train --recipe tiny" in readme


def test_readme_has_the_required_sections():
    readme = (REPO / "README.md").read_text()
    for heading in ("## Install", "## Quickstart", "## Recipes", "## Resume", "## Decay", "## Multi-node"):
        assert re.search(rf"^{re.escape(heading)}", readme, flags=re.M), heading


def test_recipes_raw_descriptions_match_the_list_command():
    for name in shipped_recipe_names():
        assert load_raw(name).get("description")


def test_recipe_reference_in_docs_is_generated_from_the_schema() -> None:
    """docs/recipes.md's reference section is exactly what scripts/gen_recipe_docs.py prints today."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    result = subprocess.run([sys.executable, str(root / "scripts" / "gen_recipe_docs.py"), "--check"],
                            capture_output=True, text=True, cwd=root)
    assert result.returncode == 0, result.stdout + result.stderr
