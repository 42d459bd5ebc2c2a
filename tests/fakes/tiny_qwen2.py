"""A tiny random Qwen2 (transformers) and the `tiny` recipe shaped like it, for the conversion tests: the pure
mapping (tests/unit/test_conversion.py) and Megatron on the CPU (tests/process/test_conversion_runs.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
import transformers

from infir2_cpt.bench.run import free_port  # noqa: F401  (the tests' rendezvous ports)
from infir2_cpt.recipe.shape import ModelShape

REPO = Path(__file__).resolve().parents[2]

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


def run_cli(*args: str, cwd: Path | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    return subprocess.run([sys.executable, "-m", "infir2_cpt.cli", *args], cwd=cwd or REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def save_hf(model, path: Path) -> Path:
    model.save_pretrained(str(path))
    return path

