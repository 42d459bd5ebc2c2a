"""Qwen2 (Hugging Face) <-> Megatron GPTModel (Transformer Engine layer spec): the tensor mapping.

Everything here is pure and runs on the CPU: shapes, names, the fused-QKV and fused-fc1 layouts, vocabulary
padding, config.json generation, and the checks of an HF config against a recipe. Reading and writing
torch_dist checkpoints needs Megatron and lives in runtime/convert_entry.py.

Megatron names are the model's own `state_dict()` names with the Transformer Engine spec
(get_gpt_layer_with_transformer_engine_spec), which infir2 trains with:

    HF (Qwen2ForCausalLM)                           Megatron GPTModel, TE spec
    model.embed_tokens.weight          [V, h]       embedding.word_embeddings.weight          [Vp, h]
    model.layers.i.input_layernorm.weight           decoder.layers.i.self_attention.linear_qkv.layer_norm_weight
    model.layers.i.self_attn.{q,k,v}_proj.weight    decoder.layers.i.self_attention.linear_qkv.weight   (fused, below)
    model.layers.i.self_attn.{q,k,v}_proj.bias      decoder.layers.i.self_attention.linear_qkv.bias
    model.layers.i.self_attn.o_proj.weight          decoder.layers.i.self_attention.linear_proj.weight
    model.layers.i.post_attention_layernorm.weight  decoder.layers.i.mlp.linear_fc1.layer_norm_weight
    model.layers.i.mlp.{gate,up}_proj.weight        decoder.layers.i.mlp.linear_fc1.weight              [gate; up]
    model.layers.i.mlp.down_proj.weight             decoder.layers.i.mlp.linear_fc2.weight
    model.norm.weight                               decoder.final_layernorm.weight
    lm_head.weight                     [V, h]       output_layer.weight [Vp, h]   (untied only)

Fused QKV (grouped-query attention, g query groups, h/g query heads per group, rows of kv_channels):
for each group j in order, the rows of its query heads, then its key head, then its value head:
[q_{j*h/g} .. q_{(j+1)*h/g-1}, k_j, v_j]. HF's query head n uses key/value head n // (h/g) (repeat_kv), so
group j holds exactly the query heads that share HF's key/value head j. Megatron's attention splits
the output the same way (attention.py, get_query_key_value_tensors), and a TP>1 shard is a whole number
of groups, so this TP=1 layout is also the global layout of a torch_dist checkpoint.

The local (non-TE) spec keeps the two RMSNorms as separate modules (input_layernorm, pre_mlp_layernorm);
its sharded checkpoint keys are the TE ones, and LOCAL_SPEC_NAMES maps the state_dict names.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import shutil
from pathlib import Path
from typing import Any, Iterable, Mapping

from ..errors import ConversionError, Problem
from ..recipe.schema import Recipe
from ..recipe.shape import ModelShape, embedding_rows

Tensor = Any  # torch.Tensor; torch is imported lazily so that the CLI starts fast

QWEN2_ARCHITECTURE = "Qwen2ForCausalLM"
HF_CONFIG_FILE = "config.json"
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
SOURCE_CONFIG_FILE = "hf_config.json"  # hf-to-megatron keeps the source config.json beside the checkpoint
CONVERSION_RECORD = "conversion.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
                   "added_tokens.json", "tokenizer.model", "generation_config.json", "chat_template.jinja")
IGNORED_HF_KEYS = re.compile(r"(^|\.)rotary_emb\.inv_freq$")

# TE spec name -> local spec name (layer-relative)
LOCAL_SPEC_NAMES = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
}




# --------------------------------------------------------------------------- shape (ModelShape: recipe/shape.py)


def recipe_padded_vocab(recipe: Recipe) -> tuple[int | None, Problem | None]:
    """The embedding rows the recipe's training run will build, or why that cannot be known here.

    embedding_rows (recipe/shape.py); with a Hugging Face tokenizer Megatron pads the tokenizer's length, which
    need not match the checkpoint, so the recipe must state model.padded_vocab_size."""
    rows = embedding_rows(recipe)
    if rows is not None:
        return rows, None
    return None, Problem("model.padded_vocab_size",
                         "must be set for a converted checkpoint: with a Hugging Face tokenizer Megatron would pad the "
                         "tokenizer's own length instead, and the embedding would not match the checkpoint's rows "
                         "(set it to the HF config's vocab_size)")


def hf_rope_theta(config: Mapping[str, Any]) -> float | None:
    """rope_theta from a config.json: transformers 4.x writes rope_theta, 5.x rope_parameters.rope_theta."""
    params = config.get("rope_parameters")
    if isinstance(params, dict) and params.get("rope_theta") is not None:
        return float(params["rope_theta"])
    value = config.get("rope_theta")
    return None if value is None else float(value)


# --------------------------------------------------------------------------- checks


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=0.0)


def compare_hf_config_with_recipe(config: Mapping[str, Any], recipe: Recipe, padded_vocab: int | None,
                                  tensor_parallel: int | None = None) -> list[Problem]:
    """Every way an HF config.json disagrees with a recipe's model section (and the TP it will train at)."""
    out: list[Problem] = []
    m = recipe.model
    model_type = config.get("model_type")
    architectures = config.get("architectures") or []
    if model_type != "qwen2" and QWEN2_ARCHITECTURE not in architectures:
        out.append(Problem("config.json model_type", f"is not a Qwen2 model (architectures {architectures})",
                           model_type))
    pairs: list[tuple[str, str, Any, Any]] = [
        ("num_hidden_layers", "model.num_layers", config.get("num_hidden_layers"), m.num_layers),
        ("hidden_size", "model.hidden_size", config.get("hidden_size"), m.hidden_size),
        ("intermediate_size", "model.ffn_hidden_size", config.get("intermediate_size"), m.ffn_hidden_size),
        ("num_attention_heads", "model.num_attention_heads", config.get("num_attention_heads"), m.num_attention_heads),
        ("num_key_value_heads", "model.num_query_groups",
         config.get("num_key_value_heads", config.get("num_attention_heads")), m.num_query_groups),
        ("tie_word_embeddings", "model.untie_embeddings (negated)", bool(config.get("tie_word_embeddings", False)),
         not m.untie_embeddings),
    ]
    for hf_key, recipe_key, hf_value, recipe_value in pairs:
        if hf_value != recipe_value:
            out.append(Problem(f"config.json {hf_key}", f"is {hf_value!r} but the recipe's {recipe_key} gives "
                               f"{recipe_value!r}"))
    theta = hf_rope_theta(config)
    if theta is None or not _close(theta, float(m.rotary_base)):
        out.append(Problem("config.json rope_theta", f"is {theta!r} but the recipe's model.rotary_base is "
                           f"{m.rotary_base!r}"))
    eps = config.get("rms_norm_eps")
    if eps is None or not _close(float(eps), float(m.norm_epsilon)):
        out.append(Problem("config.json rms_norm_eps", f"is {eps!r} but the recipe's model.norm_epsilon is "
                           f"{m.norm_epsilon!r}"))
    if config.get("hidden_act", "silu") != "silu":
        out.append(Problem("config.json hidden_act", "must be silu (the recipe trains SwiGLU)", config.get("hidden_act")))
    heads = config.get("num_attention_heads") or 0
    if config.get("head_dim") and heads and int(config["head_dim"]) * int(heads) != int(config.get("hidden_size", 0)):
        out.append(Problem("config.json head_dim", "times num_attention_heads must equal hidden_size (Megatron "
                           "derives kv_channels from them)", config.get("head_dim")))
    if config.get("use_sliding_window"):
        out.append(Problem("config.json use_sliding_window", "sliding-window attention is not trained by infir2", True))
    rope_type = (config.get("rope_parameters") or {}).get("rope_type") if isinstance(
        config.get("rope_parameters"), dict) else None
    if config.get("rope_scaling") or (rope_type not in (None, "default")):
        out.append(Problem("config.json rope_scaling", "RoPE scaling is not modelled by the recipe",
                           config.get("rope_scaling") or rope_type))
    vocab = config.get("vocab_size")
    if not isinstance(vocab, int) or vocab <= 0:
        out.append(Problem("config.json vocab_size", "missing or not a positive integer", vocab))
    elif padded_vocab is not None and vocab > padded_vocab:
        out.append(Problem("model.padded_vocab_size", f"is smaller than the HF vocabulary ({vocab} rows)", padded_vocab))
    out.extend(tensor_parallel_problems(recipe, padded_vocab, tensor_parallel))
    return out


def tensor_parallel_problems(recipe: Recipe, padded_vocab: int | None, tensor_parallel: int | None) -> list[Problem]:
    """The checkpoint is written unsharded; these are the splits the training run's TP will need."""
    tp = tensor_parallel if tensor_parallel is not None else recipe.parallel.tensor_parallel
    key = "--tp" if tensor_parallel is not None else "parallel.tensor_parallel"
    if tp < 1:
        return [Problem(key, "must be at least 1", tp)]
    m = recipe.model
    out = []
    for what, value in (("model.num_attention_heads", m.num_attention_heads),
                        ("model.num_query_groups", m.num_query_groups), ("model.ffn_hidden_size", m.ffn_hidden_size),
                        ("padded vocabulary", padded_vocab)):
        if value is not None and value % tp:
            out.append(Problem(key, f"{tp} does not divide {what} ({value})", tp))
    return out


def expected_hf_shapes(shape: ModelShape) -> dict[str, tuple[int, ...]]:
    """Every tensor a Qwen2ForCausalLM checkpoint of this shape holds (lm_head only when untied)."""
    h, out = shape.hidden_size, {}
    out["model.embed_tokens.weight"] = (shape.vocab_size, h)
    for i in range(shape.num_layers):
        p = f"model.layers.{i}."
        out[p + "input_layernorm.weight"] = (h,)
        out[p + "self_attn.q_proj.weight"] = (shape.q_size, h)
        out[p + "self_attn.q_proj.bias"] = (shape.q_size,)
        out[p + "self_attn.k_proj.weight"] = (shape.kv_size, h)
        out[p + "self_attn.k_proj.bias"] = (shape.kv_size,)
        out[p + "self_attn.v_proj.weight"] = (shape.kv_size, h)
        out[p + "self_attn.v_proj.bias"] = (shape.kv_size,)
        out[p + "self_attn.o_proj.weight"] = (h, shape.q_size)
        out[p + "post_attention_layernorm.weight"] = (h,)
        out[p + "mlp.gate_proj.weight"] = (shape.ffn_hidden_size, h)
        out[p + "mlp.up_proj.weight"] = (shape.ffn_hidden_size, h)
        out[p + "mlp.down_proj.weight"] = (h, shape.ffn_hidden_size)
    out["model.norm.weight"] = (h,)
    if not shape.tied_embeddings:
        out["lm_head.weight"] = (shape.vocab_size, h)
    return out


def megatron_layer_shapes(shape: ModelShape) -> dict[str, tuple[int, ...]]:
    """Layer-relative TE names and their shapes."""
    h = shape.hidden_size
    return {
        "self_attention.linear_qkv.layer_norm_weight": (h,),
        "self_attention.linear_qkv.weight": (shape.qkv_rows, h),
        "self_attention.linear_qkv.bias": (shape.qkv_rows,),
        "self_attention.linear_proj.weight": (h, shape.q_size),
        "mlp.linear_fc1.layer_norm_weight": (h,),
        "mlp.linear_fc1.weight": (2 * shape.ffn_hidden_size, h),
        "mlp.linear_fc2.weight": (h, shape.ffn_hidden_size),
    }


def expected_megatron_shapes(shape: ModelShape) -> dict[str, tuple[int, ...]]:
    """Every weight of the GPTModel's state_dict (TE spec, TP=1), `_extra_state` entries left out."""
    out = {"embedding.word_embeddings.weight": (shape.padded_vocab_size, shape.hidden_size)}
    for i in range(shape.num_layers):
        for name, dims in megatron_layer_shapes(shape).items():
            out[f"decoder.layers.{i}.{name}"] = dims
    out["decoder.final_layernorm.weight"] = (shape.hidden_size,)
    if not shape.tied_embeddings:
        out["output_layer.weight"] = (shape.padded_vocab_size, shape.hidden_size)
    return out


def expected_checkpoint_shapes(shape: ModelShape) -> dict[str, tuple[int, ...]]:
    """The model's tensors in a torch_dist checkpoint: layers stacked on a leading axis (global, unsharded)."""
    out = {"embedding.word_embeddings.weight": (shape.padded_vocab_size, shape.hidden_size)}
    for name, dims in megatron_layer_shapes(shape).items():
        out[f"decoder.layers.{name}"] = (shape.num_layers, *dims)
    out["decoder.final_layernorm.weight"] = (shape.hidden_size,)
    if not shape.tied_embeddings:
        out["output_layer.weight"] = (shape.padded_vocab_size, shape.hidden_size)
    return out


def check_shapes(found: Mapping[str, tuple[int, ...]], expected: Mapping[str, tuple[int, ...]], where: str,
                 optional: Iterable[str] = (), ignore: re.Pattern[str] | None = None) -> list[Problem]:
    """Missing, unexpected and mis-shaped tensors, all of them (unexpected ones listed together)."""
    out: list[Problem] = []
    optional = set(optional)
    for key, dims in expected.items():
        if key not in found:
            out.append(Problem(f"{where} {key}", f"missing (expected shape {list(dims)})"))
        elif tuple(found[key]) != tuple(dims):
            out.append(Problem(f"{where} {key}", f"has shape {list(found[key])}, expected {list(dims)}"))
    unexpected = sorted(k for k in found if k not in expected and k not in optional
                        and not (ignore is not None and ignore.search(k)))
    if unexpected:
        shown = ", ".join(unexpected[:8]) + (f" and {len(unexpected) - 8} more" if len(unexpected) > 8 else "")
        out.append(Problem(where, f"{len(unexpected)} unexpected tensor(s): {shown}"))
    return out


def check_hf_state_shapes(found: Mapping[str, tuple[int, ...]], shape: ModelShape) -> list[Problem]:
    optional = ("lm_head.weight",) if shape.tied_embeddings else ()
    problems = check_shapes(found, expected_hf_shapes(shape), "HF", optional, IGNORED_HF_KEYS)
    if shape.tied_embeddings and "lm_head.weight" in found and tuple(found["lm_head.weight"]) != (
            shape.vocab_size, shape.hidden_size):
        problems.append(Problem("HF lm_head.weight", f"has shape {list(found['lm_head.weight'])}, expected "
                                f"{[shape.vocab_size, shape.hidden_size]}"))
    return problems


# --------------------------------------------------------------------------- fused layouts


def fuse_qkv(q: Tensor, k: Tensor, v: Tensor, shape: ModelShape) -> Tensor:
    """HF q/k/v projections (weights [rows, h] or biases [rows]) -> Megatron's grouped [q.., k, v] per group."""
    import torch

    g, d, hpg = shape.num_query_groups, shape.head_dim, shape.heads_per_group
    rest = tuple(q.shape[1:])
    grouped = torch.cat([q.reshape(g, hpg * d, *rest), k.reshape(g, d, *rest), v.reshape(g, d, *rest)], dim=1)
    return grouped.reshape(shape.qkv_rows, *rest)  # torch.cat made a new tensor: nothing to detach from


def split_qkv(qkv: Tensor, shape: ModelShape) -> tuple[Tensor, Tensor, Tensor]:
    """Inverse of fuse_qkv."""
    g, d, hpg = shape.num_query_groups, shape.head_dim, shape.heads_per_group
    rest = tuple(qkv.shape[1:])
    grouped = qkv.reshape(g, (hpg + 2) * d, *rest)
    q = grouped[:, : hpg * d].reshape(shape.q_size, *rest).clone()
    k = grouped[:, hpg * d: (hpg + 1) * d].reshape(shape.kv_size, *rest).clone()
    v = grouped[:, (hpg + 1) * d:].reshape(shape.kv_size, *rest).clone()
    return q, k, v


def fuse_gate_up(gate: Tensor, up: Tensor) -> Tensor:
    """SwiGLU: Megatron's fc1 is [gate; up] (it applies the activation to the first half)."""
    import torch

    return torch.cat([gate, up], dim=0)


def split_gate_up(fc1: Tensor) -> tuple[Tensor, Tensor]:
    gate, up = fc1.chunk(2, dim=0)
    return gate.clone(), up.clone()


def pad_vocab_rows(weight: Tensor, padded_rows: int) -> Tensor:
    """Zero rows appended up to padded_rows: never indexed by a real token; their logits start at 0."""
    import torch

    extra = padded_rows - weight.shape[0]
    if extra < 0:
        raise ValueError(f"cannot pad {weight.shape[0]} rows down to {padded_rows}")
    if extra == 0:
        return weight.clone()
    return torch.cat([weight, weight.new_zeros((extra, *weight.shape[1:]))], dim=0)


def unpad_vocab_rows(weight: Tensor, rows: int) -> Tensor:
    if weight.shape[0] < rows:
        raise ValueError(f"the checkpoint has {weight.shape[0]} vocabulary rows, fewer than the {rows} asked for")
    return weight[:rows].clone()


# --------------------------------------------------------------------------- the mapping


def hf_to_megatron_state(hf_state: Mapping[str, Tensor], shape: ModelShape,
                         padded_vocab: int | None = None) -> dict[str, Tensor]:
    """HF Qwen2 tensors -> the Megatron GPTModel state_dict (TE names, TP=1, vocabulary padded).

    Tensors keep their dtype; nothing is shared with the input. Raises ConversionError listing every
    missing, unexpected or mis-shaped tensor."""
    padded = shape.padded_vocab_size if padded_vocab is None else padded_vocab
    if padded != shape.padded_vocab_size:
        shape = dataclasses.replace(shape, padded_vocab_size=padded)
    problems = shape.problems() or check_hf_state_shapes({k: tuple(v.shape) for k, v in hf_state.items()}, shape)
    if shape.tied_embeddings and not problems and "lm_head.weight" in hf_state:
        import torch

        if not torch.equal(hf_state["lm_head.weight"], hf_state["model.embed_tokens.weight"]):
            problems.append(Problem("HF lm_head.weight", "differs from model.embed_tokens.weight although the "
                                    "embeddings are tied (tie_word_embeddings / model.untie_embeddings)"))
    if problems:
        raise ConversionError(problems, "HF weights do not fit the model shape")
    out = {"embedding.word_embeddings.weight": pad_vocab_rows(hf_state["model.embed_tokens.weight"], padded)}
    for i in range(shape.num_layers):
        hf, meg = f"model.layers.{i}.", f"decoder.layers.{i}."
        attn = hf + "self_attn."
        out[meg + "self_attention.linear_qkv.layer_norm_weight"] = hf_state[hf + "input_layernorm.weight"].clone()
        out[meg + "self_attention.linear_qkv.weight"] = fuse_qkv(
            hf_state[attn + "q_proj.weight"], hf_state[attn + "k_proj.weight"], hf_state[attn + "v_proj.weight"], shape)
        out[meg + "self_attention.linear_qkv.bias"] = fuse_qkv(
            hf_state[attn + "q_proj.bias"], hf_state[attn + "k_proj.bias"], hf_state[attn + "v_proj.bias"], shape)
        out[meg + "self_attention.linear_proj.weight"] = hf_state[attn + "o_proj.weight"].clone()
        out[meg + "mlp.linear_fc1.layer_norm_weight"] = hf_state[hf + "post_attention_layernorm.weight"].clone()
        out[meg + "mlp.linear_fc1.weight"] = fuse_gate_up(hf_state[hf + "mlp.gate_proj.weight"],
                                                          hf_state[hf + "mlp.up_proj.weight"])
        out[meg + "mlp.linear_fc2.weight"] = hf_state[hf + "mlp.down_proj.weight"].clone()
    out["decoder.final_layernorm.weight"] = hf_state["model.norm.weight"].clone()
    if not shape.tied_embeddings:
        out["output_layer.weight"] = pad_vocab_rows(hf_state["lm_head.weight"], padded)
    return out


def megatron_to_hf_state(megatron_state: Mapping[str, Tensor], shape: ModelShape) -> dict[str, Tensor]:
    """Inverse of hf_to_megatron_state: padding rows dropped (shape.vocab_size rows kept); no lm_head when tied
    (transformers ties it to the embedding, as in the published Qwen2.5-1.5B checkpoint)."""
    found = {k: tuple(v.shape) for k, v in megatron_state.items()}
    problems = shape.problems() or check_shapes(found, expected_megatron_shapes(shape), "Megatron")
    if problems:
        raise ConversionError(problems, "Megatron weights do not fit the model shape")
    out = {"model.embed_tokens.weight": unpad_vocab_rows(megatron_state["embedding.word_embeddings.weight"],
                                                         shape.vocab_size)}
    for i in range(shape.num_layers):
        hf, meg = f"model.layers.{i}.", f"decoder.layers.{i}."
        attn = hf + "self_attn."
        out[hf + "input_layernorm.weight"] = megatron_state[meg + "self_attention.linear_qkv.layer_norm_weight"].clone()
        q, k, v = split_qkv(megatron_state[meg + "self_attention.linear_qkv.weight"], shape)
        out[attn + "q_proj.weight"], out[attn + "k_proj.weight"], out[attn + "v_proj.weight"] = q, k, v
        q, k, v = split_qkv(megatron_state[meg + "self_attention.linear_qkv.bias"], shape)
        out[attn + "q_proj.bias"], out[attn + "k_proj.bias"], out[attn + "v_proj.bias"] = q, k, v
        out[attn + "o_proj.weight"] = megatron_state[meg + "self_attention.linear_proj.weight"].clone()
        out[hf + "post_attention_layernorm.weight"] = megatron_state[meg + "mlp.linear_fc1.layer_norm_weight"].clone()
        gate, up = split_gate_up(megatron_state[meg + "mlp.linear_fc1.weight"])
        out[hf + "mlp.gate_proj.weight"], out[hf + "mlp.up_proj.weight"] = gate, up
        out[hf + "mlp.down_proj.weight"] = megatron_state[meg + "mlp.linear_fc2.weight"].clone()
    out["model.norm.weight"] = megatron_state["decoder.final_layernorm.weight"].clone()
    if not shape.tied_embeddings:
        out["lm_head.weight"] = unpad_vocab_rows(megatron_state["output_layer.weight"], shape.vocab_size)
    return out


def unstack_layers(checkpoint_state: Mapping[str, Tensor], num_layers: int) -> dict[str, Tensor]:
    """torch_dist layout (decoder.layers.X stacked on a leading layer axis) -> per-layer state_dict names."""
    out: dict[str, Tensor] = {}
    for key, tensor in checkpoint_state.items():
        if key.startswith("decoder.layers."):
            name = key[len("decoder.layers."):]
            if tensor.shape[0] != num_layers:
                raise ValueError(f"{key} stacks {tensor.shape[0]} layers, expected {num_layers}")
            for i in range(num_layers):
                out[f"decoder.layers.{i}.{name}"] = tensor[i].clone()
        else:
            out[key] = tensor
    return out


def to_model_names(megatron_state: Mapping[str, Tensor], model_keys: Iterable[str]) -> dict[str, Tensor]:
    """TE-spec names -> the names a given GPTModel uses (the local spec has separate norm modules)."""
    keys = set(model_keys)
    out = {}
    for key, tensor in megatron_state.items():
        if key not in keys:
            for te_name, local_name in LOCAL_SPEC_NAMES.items():
                if key.endswith("." + te_name) and key[: -len(te_name)] + local_name in keys:
                    key = key[: -len(te_name)] + local_name
                    break
        out[key] = tensor
    return out


def from_model_names(model_state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Inverse of to_model_names: local-spec norm names back to the TE names."""
    out = {}
    for key, tensor in model_state.items():
        for te_name, local_name in LOCAL_SPEC_NAMES.items():
            if key.endswith("." + local_name):
                key = key[: -len(local_name)] + te_name
                break
        out[key] = tensor
    return out


# --------------------------------------------------------------------------- config.json


def _dtype_name(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.")


def hf_config_dict(shape: ModelShape, base: Mapping[str, Any] | None = None, dtype: str = "bfloat16") -> dict[str, Any]:
    """config.json for Qwen2ForCausalLM. Keys of `base` (the source model's config) are kept unless the shape
    sets them, so token ids, sliding-window settings and max_position_embeddings survive a round trip."""
    config: dict[str, Any] = {k: v for k, v in (base or {}).items()
                              if k not in ("_name_or_path", "transformers_version", "auto_map")}
    config.update({
        "architectures": [QWEN2_ARCHITECTURE],
        "model_type": "qwen2",
        "hidden_act": "silu",
        "hidden_size": shape.hidden_size,
        "intermediate_size": shape.ffn_hidden_size,
        "num_hidden_layers": shape.num_layers,
        "num_attention_heads": shape.num_attention_heads,
        "num_key_value_heads": shape.num_query_groups,
        "rms_norm_eps": shape.norm_epsilon,
        "rope_theta": float(shape.rotary_base),
        "tie_word_embeddings": shape.tied_embeddings,
        "vocab_size": shape.vocab_size,
        "torch_dtype": dtype,
    })
    if "dtype" in config:
        config["dtype"] = dtype
    params = config.get("rope_parameters")
    config["rope_parameters"] = {**(params if isinstance(params, dict) else {"rope_type": "default"}),
                                 "rope_theta": float(shape.rotary_base)}
    if config.get("head_dim") is not None:
        config["head_dim"] = shape.head_dim
    defaults = {"max_position_embeddings": shape.max_position_embeddings, "attention_dropout": 0.0,
                "initializer_range": 0.02, "use_cache": True, "use_sliding_window": False,
                "max_window_layers": shape.num_layers, "sliding_window": None}
    for key, value in defaults.items():
        config.setdefault(key, value)
    return dict(sorted(config.items()))


# --------------------------------------------------------------------------- HF folders


def read_hf_config(hf_dir: Path) -> dict[str, Any]:
    path = hf_dir / HF_CONFIG_FILE
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConversionError([Problem("--hf", f"no {HF_CONFIG_FILE} in {hf_dir}", str(hf_dir))]) from None
    except (OSError, ValueError) as exc:
        raise ConversionError([Problem("--hf", f"cannot read {path}: {exc}", str(hf_dir))]) from None
    if not isinstance(config, dict):
        raise ConversionError([Problem("--hf", f"{path} is not a JSON object", str(hf_dir))])
    return config


def safetensors_files(hf_dir: Path) -> list[Path]:
    """The weight files of an HF folder: model.safetensors, or the shards its index names."""
    index = hf_dir / SAFETENSORS_INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ConversionError([Problem("--hf", f"cannot read {index}: {exc}", str(hf_dir))]) from None
        return [hf_dir / name for name in sorted(set(weight_map.values()))]
    single = hf_dir / SAFETENSORS_FILE
    if single.is_file():
        return [single]
    legacy = sorted(p.name for p in hf_dir.glob("pytorch_model*.bin"))
    hint = f" (found {', '.join(legacy)}: save it with safe_serialization=True first)" if legacy else ""
    raise ConversionError([Problem("--hf", f"no {SAFETENSORS_FILE} or {SAFETENSORS_INDEX} in {hf_dir}{hint}",
                                   str(hf_dir))])


def hf_tensor_shapes(hf_dir: Path) -> dict[str, tuple[int, ...]]:
    """Names and shapes from the safetensors headers only (cheap, even for a 7B model)."""
    from safetensors import safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    problems = []
    for path in safetensors_files(hf_dir):
        if not path.is_file():
            problems.append(Problem("--hf", f"the index names {path.name}, which is missing", str(hf_dir)))
            continue
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                shapes[key] = tuple(f.get_slice(key).get_shape())
    if problems:
        raise ConversionError(problems)
    return shapes


def read_hf_state(hf_dir: Path) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    state: dict[str, Tensor] = {}
    for path in safetensors_files(hf_dir):
        state.update(load_file(str(path)))
    return state


def write_hf_folder(state: Mapping[str, Tensor], config: Mapping[str, Any], out_dir: Path,
                    max_shard_bytes: int = 5 * 1024**3) -> list[Path]:
    """safetensors (sharded with an index past max_shard_bytes, as transformers does) and config.json."""
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, Tensor]] = [{}]
    size = 0
    for key in state:
        nbytes = state[key].numel() * state[key].element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = state[key].contiguous()
        size += nbytes
    written = []
    if len(shards) == 1:
        names = [SAFETENSORS_FILE]
    else:
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, shard in zip(names, shards):
        save_file(shard, str(out_dir / name), metadata={"format": "pt"})
        written.append(out_dir / name)
    if len(shards) > 1:
        total = sum(t.numel() * t.element_size() for t in state.values())
        index = {"metadata": {"total_size": total},
                 "weight_map": {key: name for name, shard in zip(names, shards) for key in shard}}
        (out_dir / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n")
        written.append(out_dir / SAFETENSORS_INDEX)
    (out_dir / HF_CONFIG_FILE).write_text(json.dumps(dict(config), indent=2) + "\n")
    written.append(out_dir / HF_CONFIG_FILE)
    return written


def copy_tokenizer_files(tokenizer_dir: Path, out_dir: Path) -> list[str]:
    copied = []
    for name in TOKENIZER_FILES:
        source = tokenizer_dir / name
        if source.is_file():
            shutil.copy2(source, out_dir / name)
            copied.append(name)
    return copied


def state_dtype(state: Mapping[str, Tensor]) -> str:
    """The dtype of the (matrix) weights, for config.json's torch_dtype."""
    for key, tensor in state.items():
        if key.endswith("embed_tokens.weight") or key.endswith("word_embeddings.weight"):
            return _dtype_name(tensor.dtype)
    return "bfloat16"
