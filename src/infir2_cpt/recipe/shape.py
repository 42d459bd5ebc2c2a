"""The model's shape: the one typed description of a Qwen2-style decoder that infir2 computes with.

Used by the FLOP count (bench.py) and by the HF <-> Megatron tensor mapping (conversion.py); derived from
a recipe's `model` section by ModelShape.from_recipe. It lives in its own module so that neither user
imports the other.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import Problem
from .load import Recipe


@dataclass(frozen=True)
class ModelShape:
    """A Qwen2-style decoder: GQA attention with QKV bias, SwiGLU MLP, RMSNorm, RoPE.

    The first seven fields are all the FLOP count needs (they may be given positionally); the rest have
    defaults so that a FLOP-only shape can leave them out. A shape for the mapping states them all:
    problems() refuses an unknown (0) vocab_size."""

    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    seq_length: int  # training sequence length (FLOPs only; the mapping does not depend on it)
    padded_vocab_size: int  # rows of the Megatron embedding and output layer (>= vocab_size)
    kv_channels: int | None = None  # head width; None: Megatron's default, hidden_size // heads
    vocab_size: int = 0  # rows of the HF embedding (config.json vocab_size); 0: unknown (FLOP-only shapes)
    tied_embeddings: bool = False
    rotary_base: float = 1000000.0
    norm_epsilon: float = 1e-6
    max_position_embeddings: int = 32768

    @classmethod
    def from_recipe(cls, recipe: Recipe, *, padded_vocab_size: int, vocab_size: int | None = None) -> ModelShape:
        """The recipe's model. The vocabulary sizes are passed in because they depend on more than the recipe:
        the padded rows on the tokenizer or the checkpoint, the HF rows on the HF config (default: the
        recipe's model.vocab_size)."""
        m = recipe.model
        return cls(
            num_layers=m.num_layers, hidden_size=m.hidden_size, ffn_hidden_size=m.ffn_hidden_size,
            num_attention_heads=m.num_attention_heads, num_query_groups=m.num_query_groups,
            seq_length=m.seq_length, padded_vocab_size=padded_vocab_size,
            # the recipe has no kv_channels: Megatron derives it; stated here so that records show the value
            kv_channels=m.hidden_size // m.num_attention_heads if m.num_attention_heads else 0,
            vocab_size=m.vocab_size if vocab_size is None else vocab_size,
            tied_embeddings=not m.untie_embeddings, rotary_base=float(m.rotary_base),
            norm_epsilon=float(m.norm_epsilon), max_position_embeddings=m.max_position_embeddings)

    @property
    def head_dim(self) -> int:
        """Width of one attention head (kv_channels, or Megatron's default when it is not stated)."""
        if self.kv_channels is not None:
            return self.kv_channels
        return self.hidden_size // self.num_attention_heads if self.num_attention_heads else 0

    @property
    def heads_per_group(self) -> int:
        return self.num_attention_heads // self.num_query_groups

    @property
    def q_size(self) -> int:
        """Rows of the query projection (all heads)."""
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        """Rows of the key (or the value) projection: one head per query group."""
        return self.num_query_groups * self.head_dim

    @property
    def qkv_rows(self) -> int:
        return self.q_size + 2 * self.kv_size

    def problems(self) -> list[Problem]:
        """Inconsistencies that make the HF <-> Megatron mapping impossible."""
        out: list[Problem] = []
        # kv_channels is checked as resolved (head_dim): None means Megatron's default, which is fine
        sizes = {"num_layers": self.num_layers, "hidden_size": self.hidden_size,
                 "ffn_hidden_size": self.ffn_hidden_size, "num_attention_heads": self.num_attention_heads,
                 "num_query_groups": self.num_query_groups, "kv_channels": self.head_dim,
                 "vocab_size": self.vocab_size, "padded_vocab_size": self.padded_vocab_size}
        for name, value in sizes.items():
            if value <= 0:
                out.append(Problem(name, "must be positive", value))
        if out:
            return out
        if self.num_attention_heads % self.num_query_groups:
            out.append(Problem("num_query_groups", f"must divide the {self.num_attention_heads} attention heads",
                               self.num_query_groups))
        if self.padded_vocab_size < self.vocab_size:
            out.append(Problem("padded_vocab_size", f"is smaller than the HF vocabulary ({self.vocab_size} rows)",
                               self.padded_vocab_size))
        return out
