"""The model's shape: the one typed description of a Qwen2-style decoder that infir2 computes with, and every
number derived from it: the padded vocabulary, the parameter count and the training FLOPs.

Used by the free-space check (launch/preflight.py), the benchmark's MFU (bench/) and the HF <-> Megatron tensor
mapping (convert/mapping.py); derived from a recipe's `model` section by ModelShape.from_recipe.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import Problem
from .schema import Recipe

# Megatron's --make-vocab-size-divisible-by; infir2 leaves it at its default.
VOCAB_MULTIPLE = 128


def padded_vocab(vocab_size: int, tensor_parallel: int) -> int:
    """Megatron's padding when --padded-vocab-size is not given: the tokenizer's vocabulary rounded up to a multiple
    of 128 x TP (megatron-core 0.19.2, build_tokenizer -> vocab_size_with_padding)."""
    multiple = VOCAB_MULTIPLE * max(tensor_parallel, 1)
    return -(-vocab_size // multiple) * multiple


def embedding_rows(recipe: Recipe) -> int | None:
    """The rows of the run's embedding (and output layer) as far as the recipe decides them.

    model.padded_vocab_size when set. Otherwise Megatron pads the tokenizer's vocabulary: with NullTokenizer that
    is model.vocab_size itself (the wheel's NullTokenizer has exactly --vocab-size ids, the last one being EOD, so
    no row is added), padded at the recipe's TP. With a Hugging Face tokenizer Megatron pads the tokenizer's own
    length, which the recipe does not know: None."""
    m = recipe.model
    if m.padded_vocab_size is not None:
        return m.padded_vocab_size
    if recipe.tokenizer.type == "NullTokenizer":
        return padded_vocab(m.vocab_size, recipe.parallel.tensor_parallel)
    return None


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
    def from_recipe(cls, recipe: Recipe, *, padded_vocab_size: int | None = None,
                    vocab_size: int | None = None) -> ModelShape:
        """The recipe's model. padded_vocab_size defaults to embedding_rows(recipe); with a Hugging Face
        tokenizer and no model.padded_vocab_size, to model.vocab_size padded the same way (an estimate, exact when
        model.vocab_size is the tokenizer's length). vocab_size (the HF rows) defaults to model.vocab_size."""
        m = recipe.model
        if padded_vocab_size is None:
            padded_vocab_size = embedding_rows(recipe) or padded_vocab(m.vocab_size, recipe.parallel.tensor_parallel)
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

    @property
    def parameters(self) -> int:
        """Parameters of the GPT: per layer the QKV weight and bias, the attention output projection (no bias), the
        SwiGLU fc1 (gate and up) and fc2, two RMSNorms; the embedding, the output layer when untied, the final
        RMSNorm."""
        h, ffn = self.hidden_size, self.ffn_hidden_size
        per_layer = h * self.qkv_rows + self.qkv_rows + self.q_size * h + 3 * ffn * h + 2 * h
        embedding = self.padded_vocab_size * h
        output = 0 if self.tied_embeddings else embedding
        return embedding + output + self.num_layers * per_layer + h

    def flops_per_sequence(self) -> dict[str, float]:
        """Training FLOPs (forward + backward) of one sequence, by part.

        Every matrix multiply of m x k by k x n costs 2mkn (multiply-add) in the forward pass and twice that in
        the backward pass (data and weight gradients): 6mkn per training step. With s = sequence length,
        h = hidden, q = heads x head_dim, g = query groups x head_dim, f = FFN size, V = padded vocabulary,
        L = layers:
          attention projections  6 s L h (q + 2g + q)   -- Q, K, V and the output projection
          core attention         6 s^2 L q              -- QK^T and softmax(QK^T)V, 4 s^2 q forward, halved by
                                                           the causal mask
          MLP (SwiGLU)           6 s L 3 h f            -- gate and up (h -> 2f) and down (f -> h)
          logits                 6 s h V                -- the output layer
        Biases, norms, RoPE, softmax, activations, the embedding lookup and the loss are not counted. These
        are the conventions of Megatron's own num_floating_point_operations (dense GPT, BSHD), so both give the
        same number; tests/unit/test_bench.py holds them equal.
        """
        s, h, L = self.seq_length, self.hidden_size, self.num_layers
        q, g = self.q_size, self.kv_size
        return {
            "attention_projections": 6.0 * s * L * h * (q + 2 * g + q),
            "attention_core": 6.0 * s * s * L * q,
            "mlp": 6.0 * s * L * 3 * h * self.ffn_hidden_size,
            "logits": 6.0 * s * h * self.padded_vocab_size,
        }

    def flops_per_iteration(self, global_batch_size: int) -> float:
        """Training FLOPs of one iteration (global_batch_size sequences); see flops_per_sequence."""
        return global_batch_size * sum(self.flops_per_sequence().values())

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
