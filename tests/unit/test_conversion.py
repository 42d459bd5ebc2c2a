"""HF <-> Megatron conversion on the CPU, in process.

- the pure mapping on random weights of tiny Qwen2 models (tied and untied): hf -> megatron -> hf is bit-exact;
  the fused QKV and fc1 layouts are checked against an independent computation on a random input; padding rows;
- config.json: what megatron-to-hf writes loads with transformers and gives the source model's logits;
- an HF config that disagrees with the recipe: every problem listed, exit 2.
Megatron itself on the CPU is tests/process/test_conversion_runs.py; the GPU parts (Transformer Engine layers,
BF16 on CUDA, FP8-trained checkpoints) are benchmarks/scripts/convert_proof.sh.
"""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from infir2_cpt.convert import mapping as cv  # noqa: E402
from infir2_cpt.recipe.load import load_recipe  # noqa: E402
from infir2_cpt.recipe.shape import ModelShape  # noqa: E402
from tiny_qwen2 import (qwen2_config, run_cli, save_hf, set_args, source_state, tiny_model,  # noqa: E402
                        tiny_sets, tiny_shape)


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


def test_logit_errors():
    from infir2_cpt.runtime.convert_entry import logit_errors

    reference = torch.tensor([[[1.0, -4.0, 2.0]]])
    errors = logit_errors(reference, reference + torch.tensor([[[0.0, 0.5, 0.0]]]))
    assert errors["max_abs"] == 0.5 and errors["max_rel"] == 0.125 and errors["top1_agreement"] == 1.0
