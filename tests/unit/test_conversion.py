"""HF <-> Megatron conversion on the CPU (issue 6).

- the pure mapping on random weights of tiny Qwen2 models (tied and untied): hf -> megatron -> hf is bit-exact;
  the fused QKV and fc1 layouts are checked against an independent computation on a random input; padding rows;
- config.json: what megatron-to-hf writes loads with transformers and gives the source model's logits;
- an HF config that disagrees with the recipe: every problem listed, exit 2;
- Megatron itself (tests/fakes/megatron_cpu_convert.py): the recipe's arguments through parse_and_validate_args,
  the model from GPTModelBuilder, Megatron's save_checkpoint (release), the checkpoint read back, and the
  Megatron forward against transformers' logits; then `infir2 convert megatron-to-hf` for real (torchrun, gloo).
The GPU parts (Transformer Engine layers, BF16 on CUDA, FP8-trained checkpoints) are benchmarks/scripts/convert_proof.sh.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from infir2_cpt.convert import mapping as cv  # noqa: E402
from infir2_cpt.recipe.shape import ModelShape  # noqa: E402
from infir2_cpt.recipe.load import load_recipe, recipe_to_yaml  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
WORKER = REPO / "tests" / "fakes" / "megatron_cpu_convert.py"

TINY = dict(num_layers=2, hidden_size=256, ffn_hidden_size=512, num_attention_heads=4, num_query_groups=2,
            vocab=1000, padded=1024)
TINY_SETS = ["model.num_layers=2", "model.hidden_size=256", "model.ffn_hidden_size=512",
             "model.num_attention_heads=4", "model.num_query_groups=2", "model.seq_length=64",
             "model.max_position_embeddings=64", "model.vocab_size=1000", "model.padded_vocab_size=1024"]
# Megatron without Transformer Engine, on the CPU (the GPU run uses the recipe's transformer_engine)
CPU_MEGATRON = ["--transformer-impl", "local", "--no-rope-fusion", "--use-cpu-initialization",
                "--no-bias-swiglu-fusion", "--no-masked-softmax-fusion", "--no-persist-layer-norm"]


def tiny_sets(tied: bool) -> list[str]:
    return TINY_SETS + [f"model.untie_embeddings={'false' if tied else 'true'}"]


def set_args(sets: list[str]) -> list[str]:
    return [arg for s in sets for arg in ("--set", s)]


def qwen2_config(tied: bool, **overrides):
    values = dict(vocab_size=TINY["vocab"], hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, rope_theta=1000000.0, rms_norm_eps=1e-6,
                  tie_word_embeddings=tied, max_position_embeddings=64, bos_token_id=7, eos_token_id=8)
    values.update(overrides)
    return transformers.Qwen2Config(**values)


def tiny_model(tied: bool, dtype=torch.float32, seed: int = 0, **overrides):
    """A random Qwen2 whose norms and biases are not the default ones/zeros (so a swap would show)."""
    torch.manual_seed(seed)
    model = transformers.Qwen2ForCausalLM(qwen2_config(tied, **overrides))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.normal_(1.0, 0.1)
            elif name.endswith("bias"):
                param.normal_(0.0, 0.1)
    return model.to(dtype).eval()


def tiny_shape(tied: bool, padded: int = TINY["padded"]) -> ModelShape:
    return ModelShape(num_layers=2, hidden_size=256, ffn_hidden_size=512, num_attention_heads=4,
                      num_query_groups=2, seq_length=64, kv_channels=64, tied_embeddings=tied,
                      vocab_size=TINY["vocab"], padded_vocab_size=padded, rotary_base=1000000.0, norm_epsilon=1e-6,
                      max_position_embeddings=64)


def source_state(model, tied: bool) -> dict:
    """What a saved HF checkpoint holds: transformers leaves the tied lm_head out."""
    return {k: v for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_cli(*args: str, cwd: Path | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    return subprocess.run([sys.executable, "-m", "infir2_cpt.cli", *args], cwd=cwd or REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


# --------------------------------------------------------------------------- the pure mapping


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_hf_megatron_hf_is_bit_exact(tied, dtype):
    model = tiny_model(tied, dtype)
    source = source_state(model, tied)
    shape = tiny_shape(tied)
    megatron = cv.hf_to_megatron_state(source, shape)
    assert {k: tuple(v.shape) for k, v in megatron.items()} == cv.expected_megatron_shapes(shape)
    assert all(v.dtype == dtype for v in megatron.values())
    back = cv.megatron_to_hf_state(megatron, shape)
    assert set(back) == set(source)
    for key, tensor in source.items():
        assert back[key].dtype == tensor.dtype and torch.equal(back[key], tensor), key
    # nothing shares storage with the input (safetensors refuses shared tensors; in-place edits must not leak)
    pointers = {t.untyped_storage().data_ptr() for t in source.values()}
    assert not any(t.untyped_storage().data_ptr() in pointers for t in megatron.values())


def test_tied_checkpoint_with_an_explicit_equal_lm_head_is_accepted():
    model = tiny_model(True)
    state = model.state_dict()  # lm_head.weight present, the same tensor as the embedding
    megatron = cv.hf_to_megatron_state(state, tiny_shape(True))
    assert "output_layer.weight" not in megatron


def test_padding_rows_are_zero_and_dropped_again():
    model = tiny_model(False)
    shape = tiny_shape(False, padded=1152)
    megatron = cv.hf_to_megatron_state(source_state(model, False), shape)
    for key, hf_key in (("embedding.word_embeddings.weight", "model.embed_tokens.weight"),
                        ("output_layer.weight", "lm_head.weight")):
        assert megatron[key].shape == (1152, 256)
        assert torch.equal(megatron[key][:1000], model.state_dict()[hf_key])
        assert not megatron[key][1000:].any()
    megatron["embedding.word_embeddings.weight"][1000:] = 5.0  # trained padding rows are dropped on export
    back = cv.megatron_to_hf_state(megatron, shape)
    assert back["model.embed_tokens.weight"].shape == (1000, 256)
    assert torch.equal(back["model.embed_tokens.weight"], model.state_dict()["model.embed_tokens.weight"])


def test_padded_vocab_argument_overrides_the_shape():
    model = tiny_model(True)
    megatron = cv.hf_to_megatron_state(source_state(model, True), tiny_shape(True), padded_vocab=1280)
    assert megatron["embedding.word_embeddings.weight"].shape == (1280, 256)


def test_qkv_layout_against_an_independent_projection():
    """Megatron's documented GQA layout: per group j, [q heads of j, k_j, v_j]. Project a random input with the
    fused weight and bias and split the output that way; it must equal HF's q/k/v projections."""
    model = tiny_model(False)
    shape = tiny_shape(False)
    megatron = cv.hf_to_megatron_state(source_state(model, False), shape)
    attn = model.model.layers[1].self_attn
    x = torch.randn(3, 5, 256)
    fused = torch.nn.functional.linear(x, megatron["decoder.layers.1.self_attention.linear_qkv.weight"],
                                       megatron["decoder.layers.1.self_attention.linear_qkv.bias"])
    groups, per_group, d = 2, 2, 64  # 4 query heads, 2 key/value heads, kv_channels 64
    fused = fused.view(3, 5, groups, (per_group + 2) * d)
    with torch.no_grad():
        q = attn.q_proj(x).view(3, 5, 4, d)
        k = attn.k_proj(x).view(3, 5, 2, d)
        v = attn.v_proj(x).view(3, 5, 2, d)
    for j in range(groups):
        block = fused[:, :, j]
        for n in range(per_group):  # HF query head j*per_group+n shares key/value head j (repeat_kv)
            torch.testing.assert_close(block[..., n * d:(n + 1) * d], q[:, :, j * per_group + n], rtol=0, atol=1e-5)
        torch.testing.assert_close(block[..., per_group * d:(per_group + 1) * d], k[:, :, j], rtol=0, atol=1e-5)
        torch.testing.assert_close(block[..., (per_group + 1) * d:], v[:, :, j], rtol=0, atol=1e-5)


def test_fc1_is_gate_then_up():
    """Megatron's SwiGLU applies the activation to the first half of fc1's output (mlp.py glu)."""
    model = tiny_model(False)
    megatron = cv.hf_to_megatron_state(source_state(model, False), tiny_shape(False))
    mlp = model.model.layers[0].mlp
    x = torch.randn(4, 256)
    first, second = torch.nn.functional.linear(x, megatron["decoder.layers.0.mlp.linear_fc1.weight"]).chunk(2, -1)
    megatron_out = torch.nn.functional.linear(torch.nn.functional.silu(first) * second,
                                              megatron["decoder.layers.0.mlp.linear_fc2.weight"])
    with torch.no_grad():
        torch.testing.assert_close(megatron_out, mlp(x), rtol=1e-5, atol=1e-6)


def test_norms_and_projection_names():
    model = tiny_model(False)
    source = source_state(model, False)
    megatron = cv.hf_to_megatron_state(source, tiny_shape(False))
    assert torch.equal(megatron["decoder.layers.1.self_attention.linear_qkv.layer_norm_weight"],
                       source["model.layers.1.input_layernorm.weight"])
    assert torch.equal(megatron["decoder.layers.1.mlp.linear_fc1.layer_norm_weight"],
                       source["model.layers.1.post_attention_layernorm.weight"])
    assert torch.equal(megatron["decoder.layers.0.self_attention.linear_proj.weight"],
                       source["model.layers.0.self_attn.o_proj.weight"])
    assert torch.equal(megatron["decoder.final_layernorm.weight"], source["model.norm.weight"])


def test_qkv_split_inverts_fuse_for_7b_and_1_5b_shapes():
    for heads, groups, hidden in ((28, 4, 3584), (12, 2, 1536)):
        shape = ModelShape(num_layers=1, hidden_size=hidden, ffn_hidden_size=128, num_attention_heads=heads,
                           num_query_groups=groups, seq_length=64, kv_channels=hidden // heads, tied_embeddings=False,
                           vocab_size=8, padded_vocab_size=8)
        q = torch.randn(shape.q_size, 3)
        k, v = torch.randn(shape.kv_size, 3), torch.randn(shape.kv_size, 3)
        assert all(torch.equal(a, b) for a, b in zip(cv.split_qkv(cv.fuse_qkv(q, k, v, shape), shape), (q, k, v)))


def test_wrong_hf_tensors_are_all_reported():
    model = tiny_model(False)
    state = source_state(model, False)
    del state["model.layers.1.mlp.up_proj.weight"]
    state["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(3)
    state["model.layers.0.self_attn.q_norm.weight"] = torch.zeros(64)
    with pytest.raises(cv.ConversionError) as err:
        cv.hf_to_megatron_state(state, tiny_shape(False))
    text = str(err.value)
    assert "model.layers.1.mlp.up_proj.weight: missing" in text
    assert "model.layers.0.self_attn.q_proj.bias: has shape [3], expected [256]" in text
    assert "1 unexpected tensor(s): model.layers.0.self_attn.q_norm.weight" in text


def test_tied_lm_head_that_differs_is_refused():
    state = tiny_model(True).state_dict()
    state["lm_head.weight"] = state["lm_head.weight"].clone() + 1
    with pytest.raises(cv.ConversionError, match="differs from model.embed_tokens.weight"):
        cv.hf_to_megatron_state(state, tiny_shape(True))


def test_unstack_layers_and_local_spec_names():
    stacked = {"decoder.layers.mlp.linear_fc2.weight": torch.arange(12.).view(2, 2, 3),
               "decoder.final_layernorm.weight": torch.ones(3)}
    flat = cv.unstack_layers(stacked, 2)
    assert torch.equal(flat["decoder.layers.1.mlp.linear_fc2.weight"], torch.arange(6., 12.).view(2, 3))
    with pytest.raises(ValueError):
        cv.unstack_layers(stacked, 3)
    te = {"decoder.layers.0.self_attention.linear_qkv.layer_norm_weight": 1,
          "decoder.layers.0.mlp.linear_fc1.layer_norm_weight": 2, "decoder.final_layernorm.weight": 3}
    local_keys = ["decoder.layers.0.input_layernorm.weight", "decoder.layers.0.pre_mlp_layernorm.weight",
                  "decoder.final_layernorm.weight"]
    local = cv.to_model_names(te, local_keys)
    assert sorted(local) == sorted(local_keys)
    assert cv.from_model_names(local) == te
    assert cv.to_model_names(te, list(te)) == te  # the TE model keeps them


# --------------------------------------------------------------------------- config.json


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("with_base", [True, False], ids=["source-config", "shape-only"])
def test_written_folder_loads_with_transformers_and_gives_the_same_logits(tmp_path, tied, with_base):
    model = tiny_model(tied, torch.float32, seed=3)
    shape = tiny_shape(tied)
    megatron = cv.hf_to_megatron_state(source_state(model, tied), shape)
    base = model.config.to_dict() if with_base else None
    config = cv.hf_config_dict(shape, base, dtype="float32")
    out = tmp_path / "hf"
    cv.write_hf_folder(cv.megatron_to_hf_state(megatron, shape), config, out)
    loaded = transformers.Qwen2ForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    written = json.loads((out / "config.json").read_text())
    assert written["architectures"] == ["Qwen2ForCausalLM"] and written["hidden_act"] == "silu"
    assert written["rope_theta"] == 1000000.0 and written["rms_norm_eps"] == 1e-6
    assert written["tie_word_embeddings"] is tied and written["vocab_size"] == 1000
    assert written["torch_dtype"] == "float32" and written["max_position_embeddings"] == 64
    if with_base:
        assert written["bos_token_id"] == 7 and written["eos_token_id"] == 8
    tokens = torch.randint(0, 1000, (2, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=tokens).logits, model(input_ids=tokens).logits)
    assert loaded.config.rope_parameters["rope_theta"] == 1000000.0


def test_sharded_safetensors_with_index_load(tmp_path):
    model = tiny_model(False, torch.bfloat16)
    shape = tiny_shape(False)
    state = cv.megatron_to_hf_state(cv.hf_to_megatron_state(source_state(model, False), shape), shape)
    written = cv.write_hf_folder(state, cv.hf_config_dict(shape, None), tmp_path / "hf", max_shard_bytes=1 << 20)
    names = [p.name for p in written]
    assert cv.SAFETENSORS_INDEX in names and "model-00001-of-00004.safetensors" in names
    assert cv.hf_tensor_shapes(tmp_path / "hf") == cv.expected_hf_shapes(shape)
    loaded = transformers.Qwen2ForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.bfloat16)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in state.items())


def test_config_for_the_published_qwen2_5_shapes():
    recipe = load_recipe("1.5b").recipe
    shape = ModelShape.from_recipe(recipe, padded_vocab_size=151936, vocab_size=151936)
    config = cv.hf_config_dict(shape, None)
    assert (config["hidden_size"], config["intermediate_size"], config["num_key_value_heads"]) == (1536, 8960, 2)
    assert config["tie_word_embeddings"] is True and config["vocab_size"] == 151936
    assert cv.expected_megatron_shapes(shape)["decoder.layers.0.self_attention.linear_qkv.weight"] == (2048, 1536)
    seven = ModelShape.from_recipe(load_recipe("7b").recipe, padded_vocab_size=152064, vocab_size=152064)
    assert seven.kv_channels == 128 and seven.qkv_rows == 4608 and not seven.tied_embeddings


def test_bench_and_conversion_share_one_model_shape():
    """One type for the FLOP count and the mapping; a FLOP-only shape (no HF vocabulary) cannot be mapped."""
    from infir2_cpt.bench import plan as bench

    assert bench.ModelShape is cv.ModelShape is ModelShape
    recipe = load_recipe("7b").recipe
    shape = ModelShape.from_recipe(recipe, padded_vocab_size=152064)
    assert shape.vocab_size == recipe.model.vocab_size and shape.seq_length == recipe.model.seq_length
    flop_only = ModelShape(shape.num_layers, shape.hidden_size, shape.ffn_hidden_size, shape.num_attention_heads,
                           shape.num_query_groups, shape.seq_length, shape.padded_vocab_size)
    assert flop_only.kv_channels is None and flop_only.head_dim == shape.kv_channels == 128
    assert flop_only.qkv_rows == shape.qkv_rows == 4608
    assert flop_only.flops_per_iteration(8) == shape.flops_per_iteration(8)
    assert shape.problems() == []
    assert [str(p) for p in flop_only.problems()] == ["vocab_size: must be positive (got 0)"]


# --------------------------------------------------------------------------- HF config vs recipe


def test_every_disagreement_with_the_recipe_is_listed():
    recipe = load_recipe("7b").recipe
    config = qwen2_config(True, rope_theta=10000.0, rms_norm_eps=1e-5, hidden_act="gelu",
                          vocab_size=160000).to_dict()
    problems = [str(p) for p in cv.compare_hf_config_with_recipe(config, recipe, 152064, 3)]
    text = "\n".join(problems)
    for fragment in ("num_hidden_layers: is 2 but the recipe's model.num_layers gives 28",
                     "hidden_size: is 256", "intermediate_size: is 512", "num_attention_heads: is 4",
                     "num_key_value_heads: is 2", "tie_word_embeddings: is True", "rope_theta: is 10000.0",
                     "rms_norm_eps: is 1e-05", "hidden_act: must be silu",
                     "model.padded_vocab_size: is smaller than the HF vocabulary (160000 rows)",
                     "--tp: 3 does not divide model.num_attention_heads (28)",
                     "--tp: 3 does not divide model.num_query_groups (4)"):
        assert fragment in text, (fragment, text)


def test_published_qwen2_5_configs_agree_with_the_shipped_recipes():
    seven = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu",
             "hidden_size": 3584, "intermediate_size": 18944, "num_attention_heads": 28, "num_hidden_layers": 28,
             "num_key_value_heads": 4, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 131072,
             "tie_word_embeddings": False, "use_sliding_window": False, "vocab_size": 152064,
             "max_position_embeddings": 131072, "bos_token_id": 151643, "eos_token_id": 151643}
    one_five = {**seven, "hidden_size": 1536, "intermediate_size": 8960, "num_attention_heads": 12,
                "num_key_value_heads": 2, "tie_word_embeddings": True, "vocab_size": 151936}
    for config, name in ((seven, "7b"), (one_five, "1.5b")):
        recipe = load_recipe(name).recipe
        padded, why = cv.recipe_padded_vocab(recipe)
        assert why is None
        assert cv.compare_hf_config_with_recipe(config, recipe, padded) == [], name


def test_padded_vocab_from_the_recipe():
    assert cv.recipe_padded_vocab(load_recipe("tiny").recipe) == (32768, None)  # NullTokenizer, Megatron's padding
    assert cv.recipe_padded_vocab(load_recipe("tiny", ["parallel.tensor_parallel=2"]).recipe)[0] == 32768
    assert cv.recipe_padded_vocab(load_recipe("tiny", ["model.vocab_size=32769"]).recipe)[0] == 32896
    padded, why = cv.recipe_padded_vocab(load_recipe("7b", ["model.padded_vocab_size=null"]).recipe)
    assert padded is None and "must be set" in str(why)


# --------------------------------------------------------------------------- the CLI on the CPU


def save_hf(model, path: Path) -> Path:
    model.save_pretrained(str(path))
    return path


def test_hf_to_megatron_dry_run_prints_the_bf16_tp1_command(tmp_path):
    hf = save_hf(tiny_model(False, torch.bfloat16), tmp_path / "hf")
    result = run_cli("convert", "hf-to-megatron", "--hf", str(hf), "--out", str(tmp_path / "meg"),
                     "--recipe", "tiny", *set_args(tiny_sets(False)), "--dry-run")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "-m infir2_cpt.runtime.convert_entry hf-to-megatron" in out and "--standalone" in out
    assert "--padded-vocab-size 1024" in out and "--vocab-size 1000" in out
    assert f"--save {tmp_path / 'meg'}" in out and "--bf16" in out and "--transformer-impl transformer_engine" in out
    assert "--fp8" not in out and "--use-distributed-optimizer" not in out
    assert "--tensor-model-parallel-size 1" in out and "--untie-embeddings-and-output-weights" in out
    assert "vocabulary padded with 24 zero rows" in out
    assert not (tmp_path / "meg").exists()


def test_hf_to_megatron_lists_every_problem_and_exits_2(tmp_path):
    hf = save_hf(tiny_model(True, torch.bfloat16, rope_theta=10000.0), tmp_path / "hf")
    (tmp_path / "meg").mkdir()
    (tmp_path / "meg" / "old").write_text("x")
    result = run_cli("convert", "hf-to-megatron", "--hf", str(hf), "--out", str(tmp_path / "meg"),
                     "--recipe", "tiny", *set_args(tiny_sets(False)), "--tp", "3", "--dry-run")
    assert result.returncode == 2
    err = result.stderr
    assert "cannot convert HF -> Megatron" in err
    for fragment in ("tie_word_embeddings: is True", "rope_theta: is 10000.0", "--out: exists and is not empty",
                     "--tp: 3 does not divide model.num_attention_heads (4)"):
        assert fragment in err, err


def test_hf_to_megatron_checks_the_safetensors(tmp_path):
    hf = save_hf(tiny_model(False, torch.bfloat16), tmp_path / "hf")
    config = json.loads((hf / "config.json").read_text())
    (hf / "model.safetensors").unlink()
    result = run_cli("convert", "hf-to-megatron", "--hf", str(hf), "--out", str(tmp_path / "m"), "--recipe", "tiny",
                     *set_args(tiny_sets(False)), "--dry-run")
    assert result.returncode == 2 and "no model.safetensors" in result.stderr
    from safetensors.torch import save_file

    state = source_state(tiny_model(False, torch.bfloat16), False)
    state.pop("model.norm.weight")
    save_file(state, str(hf / "model.safetensors"), metadata={"format": "pt"})
    (hf / "config.json").write_text(json.dumps(config))
    result = run_cli("convert", "hf-to-megatron", "--hf", str(hf), "--out", str(tmp_path / "m"), "--recipe", "tiny",
                     *set_args(tiny_sets(False)), "--dry-run")
    assert result.returncode == 2 and "HF model.norm.weight: missing" in result.stderr


def test_hf_recipe_needs_a_stated_padded_vocab(tmp_path):
    hf = save_hf(tiny_model(False, torch.bfloat16), tmp_path / "hf")
    sets = [s for s in tiny_sets(False) if not s.startswith("model.padded_vocab_size")] + [
        "model.padded_vocab_size=null", "tokenizer.type=HuggingFaceTokenizer"]
    result = run_cli("convert", "hf-to-megatron", "--hf", str(hf), "--out", str(tmp_path / "m"), "--recipe", "tiny",
                     *set_args(sets), "--dry-run")
    assert result.returncode == 2 and "model.padded_vocab_size: must be set" in result.stderr


# --------------------------------------------------------------------------- Megatron on the CPU


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


def test_logit_errors():
    from infir2_cpt.runtime.convert_entry import logit_errors

    reference = torch.tensor([[[1.0, -4.0, 2.0]]])
    errors = logit_errors(reference, reference + torch.tensor([[[0.0, 0.5, 0.0]]]))
    assert errors["max_abs"] == 0.5 and errors["max_rel"] == 0.125 and errors["top1_agreement"] == 1.0
