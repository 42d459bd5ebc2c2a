"""Data against the model before launch: every dataset's token ids must index the model's embedding, and the
tokenizer a recipe names must be the one the data was made with. Without this a dataset tokenized with Qwen's
151,669-token vocabulary trains into a 32,768-row embedding until an out-of-range lookup stops it on the GPU.

What a dataset holds comes from its PREFIX.stats.json (prepare-data records the largest id written and its
tokenizer's size and tokenizer.json checksum); without one, from a sample of its .bin. The model's rows come
from model.padded_vocab_size, else from the tokenizer's vocabulary padded as Megatron pads it (recipe/shape.py).
All of it reads files on this host: machine problems (warnings in a dry run, as for a missing file).
"""

from __future__ import annotations

import dataclasses
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..data.indexed import INDEX_HEADER
from ..layout import read_json_object
from ..recipe.schema import BlendEntry, Recipe
from ..recipe.shape import embedding_rows, padded_vocab
from ..recipe.validate import Findings

STATS_SUFFIX = ".stats.json"
# megatron.core's indexed-dataset dtype codes (the .idx header's byte after the version)
_DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32, 8: np.uint16}
_SAMPLE_CHUNKS = 64  # a .bin without stats is sampled in this many evenly spaced chunks ...
_SAMPLE_TOKENS = 1 << 16  # ... of this many tokens each


@dataclass(frozen=True)
class TokenizerInfo:
    path: str
    vocab_size: int  # every id it produces is below this (added tokens included)
    sha256: str  # of tokenizer.json


@dataclass(frozen=True)
class DatasetVocabulary:
    max_token_id: int | None  # the largest id in the data, as far as known
    how: str  # where it comes from, for the message
    tokenizer: TokenizerInfo | None  # what the data was made with, when its stats say


def recipe_tokenizer(recipe: Recipe) -> TokenizerInfo | None:
    """The recipe's Hugging Face tokenizer, when its folder is readable here (else the file check reports it)."""
    tok = recipe.tokenizer
    if tok.type != "HuggingFaceTokenizer" or not tok.model or not (Path(tok.model) / "tokenizer.json").is_file():
        return None
    from ..data.tokenizer import load_tokenizer
    from ..errors import DataError

    try:
        loaded = load_tokenizer(tok.model)
    except DataError:
        return None
    return TokenizerInfo(str(loaded.path), loaded.vocab_size, loaded.sha256)


def follow_tokenizer(recipe: Recipe, tokenizer: TokenizerInfo | None, notes: list[str]) -> Recipe:
    """With a Hugging Face tokenizer, model.vocab_size (what --vocab-size and the size estimate use) is the
    tokenizer's own vocabulary, as Megatron takes it; the recipe's value is for NullTokenizer."""
    if tokenizer is None or tokenizer.vocab_size == recipe.model.vocab_size:
        return recipe
    notes.append(f"tokenizer.model has {tokenizer.vocab_size:,} tokens: --vocab-size and the size estimate use it "
                 f"(model.vocab_size {recipe.model.vocab_size:,} is for NullTokenizer)")
    return dataclasses.replace(recipe, model=dataclasses.replace(recipe.model, vocab_size=tokenizer.vocab_size))


def sampled_max_token_id(prefix: str) -> int | None:
    """The largest id in evenly spaced chunks of PREFIX.bin (its dtype from PREFIX.idx), or None if unreadable."""
    try:
        with open(prefix + ".idx", "rb") as f:
            header = f.read(len(INDEX_HEADER) + 9)
        if not header.startswith(INDEX_HEADER):
            return None
        dtype = _DTYPES.get(struct.unpack("<B", header[len(INDEX_HEADER) + 8:])[0])
        if dtype is None or Path(prefix + ".bin").stat().st_size == 0:
            return None
        tokens = np.memmap(prefix + ".bin", dtype=dtype, mode="r")
    except (OSError, ValueError, struct.error):
        return None
    starts = np.linspace(0, max(len(tokens) - _SAMPLE_TOKENS, 0), num=_SAMPLE_CHUNKS, dtype=np.int64)
    return int(max(tokens[s:s + _SAMPLE_TOKENS].max() for s in np.unique(starts)))


def dataset_vocabulary(prefix: str) -> DatasetVocabulary:
    stats = read_json_object(Path(prefix + STATS_SUFFIX))
    if stats is not None:
        tok = stats.get("tokenizer") if isinstance(stats.get("tokenizer"), dict) else {}
        info = None
        if isinstance(tok.get("vocab_size"), int) and isinstance(tok.get("tokenizer_json_sha256"), str):
            info = TokenizerInfo(str(tok.get("path")), tok["vocab_size"], tok["tokenizer_json_sha256"])
        top = stats.get("max_token_id")
        if isinstance(top, int):
            return DatasetVocabulary(top, f"its stats file: ids up to {top:,}", info)
        if isinstance(tok.get("vocab_size"), int):  # an older stats file: the tokenizer's size bounds the ids
            return DatasetVocabulary(tok["vocab_size"] - 1, f"its stats file: a {tok['vocab_size']:,}-token "
                                     "tokenizer", info)
    top = sampled_max_token_id(prefix)
    return DatasetVocabulary(top, f"a sample of its .bin: ids up to {top:,}" if top is not None else "", None)


def check_data_vocabulary(recipe: Recipe, tokenizer: TokenizerInfo | None) -> Findings:
    out = Findings()
    if recipe.data.mock:
        return out
    rows = embedding_rows(recipe)
    if rows is None and tokenizer is not None:
        rows = padded_vocab(tokenizer.vocab_size, recipe.parallel.tensor_parallel)
    blends: list[tuple[str, list[BlendEntry]]] = [("data.blend", recipe.data.blend),
                                                    ("data.valid_blend", recipe.data.valid_blend)]
    for key, entries in blends:
        for i, entry in enumerate(entries):
            if not (Path(entry.path + ".bin").is_file() and Path(entry.path + ".idx").is_file()):
                continue  # reported by the file check
            data = dataset_vocabulary(entry.path)
            if rows is not None and data.max_token_id is not None and data.max_token_id >= rows:
                out.add_machine(f"{key}[{i}].path", f"token ids go up to {data.max_token_id:,} ({data.how}), but "
                                f"the model's embedding has {rows:,} rows: tokenize the data with the model's "
                                f"tokenizer, or fix model.vocab_size / model.padded_vocab_size", entry.path)
            if tokenizer is not None and data.tokenizer is not None and data.tokenizer.sha256 != tokenizer.sha256:
                out.add_machine(f"{key}[{i}].path", f"was made with the tokenizer {data.tokenizer.path} "
                                f"({data.tokenizer.vocab_size:,} tokens), not with tokenizer.model "
                                f"{tokenizer.path} ({tokenizer.vocab_size:,} tokens): the same ids would be other "
                                f"tokens", entry.path)
    return out
