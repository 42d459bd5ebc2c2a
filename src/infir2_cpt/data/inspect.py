"""`infir2 inspect-data`: what an indexed dataset holds, checked against its .idx, with its first documents."""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import numpy as np

from ..errors import DataError, Problem
from .inputs import STATS_SUFFIX
from .tokenizer import load_tokenizer


@contextlib.contextmanager
def quiet_megatron() -> Iterator[None]:
    """Silence megatron.core's import- and rank-related warnings: on a host without CUDA, Transformer Engine
    or torch.distributed they say nothing about the data."""
    torch_logger = logging.getLogger("torch.utils.cpp_extension")
    level = torch_logger.level
    torch_logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        torch_logger.setLevel(level)


def megatron_indexed_dataset() -> ModuleType:
    """megatron.core's indexed_dataset module: inspect-data reads a dataset the way training will."""
    try:
        with quiet_megatron():
            from megatron.core.datasets import indexed_dataset
    except ImportError as exc:
        problem = Problem("megatron-core", f"cannot be imported ({exc}); install infir2-cpt[megatron]")
        raise DataError([problem]) from None
    return indexed_dataset


@dataclass(frozen=True)
class DocumentPreview:
    index: int
    tokens: int
    ids: list[int]
    text: str | None  # decoded, when a tokenizer was given


@dataclass(frozen=True)
class DatasetSummary:
    prefix: str
    documents: int
    sequences: int
    tokens: int
    dtype: str
    min_tokens: int
    mean_tokens: float
    max_tokens: int
    previews: list[DocumentPreview]
    stats_path: str | None


def resolve_prefix(prefix: str | Path) -> str:
    """Accept PREFIX_text_document, its .bin or .idx path, or the PREFIX given to prepare-data."""
    text = str(prefix)
    for suffix in (".bin", ".idx"):
        if text.endswith(suffix):
            text = text[: -len(suffix)]
    if not Path(text + ".idx").is_file() and Path(text + "_text_document.idx").is_file():
        text += "_text_document"
    missing = [text + s for s in (".bin", ".idx") if not Path(text + s).is_file()]
    if missing:
        raise DataError([Problem("prefix", f"missing {' and '.join(missing)}", str(prefix))])
    return text


def inspect_data(prefix: str | Path, tokenizer_dir: str | Path | None = None, n: int = 3) -> DatasetSummary:
    """Documents, tokens, dtype and the first n documents (decoded when a tokenizer is given). Raises DataError."""
    try:
        return _summarize(prefix, tokenizer_dir, n)
    except DataError as exc:  # the same checks as prepare-data's, reported under this command's title
        raise DataError(exc.problems, "infir2: cannot inspect data") from None


def _summarize(prefix: str | Path, tokenizer_dir: str | Path | None, n: int) -> DatasetSummary:
    if n < 0:
        raise DataError([Problem("n", "must be >= 0", n)])
    path = resolve_prefix(prefix)
    tokenizer = load_tokenizer(tokenizer_dir).tokenizer if tokenizer_dir is not None else None
    indexed = megatron_indexed_dataset()
    try:
        with quiet_megatron():
            dataset = indexed.IndexedDataset(path)
    except Exception as exc:  # Megatron asserts on a bad header or version
        raise DataError([Problem("prefix", f"not a readable indexed dataset: {exc!r}", path)]) from None
    lengths = np.asarray(dataset.sequence_lengths, dtype=np.int64)
    doc_index = np.asarray(dataset.document_indices, dtype=np.int64)
    dtype = np.dtype(dataset.index.dtype)
    expected = int(lengths.sum()) * dtype.itemsize
    actual = Path(path + ".bin").stat().st_size
    if actual != expected:
        raise DataError([Problem("prefix", f"{path}.bin holds {actual:,} bytes but its .idx describes {expected:,}; "
                                 "the dataset is truncated or its files come from different runs", path)])
    documents = len(doc_index) - 1
    doc_lengths = np.add.reduceat(lengths, doc_index[:-1]) if documents and lengths.size else np.zeros(0, np.int64)
    previews = []
    for d in range(min(n, documents)):
        ids = np.concatenate([dataset[s] for s in range(doc_index[d], doc_index[d + 1])]).tolist()
        text = tokenizer.decode(ids, skip_special_tokens=False) if tokenizer is not None else None
        previews.append(DocumentPreview(d, len(ids), ids, text))
    stats = Path(path + STATS_SUFFIX)
    return DatasetSummary(
        prefix=path, documents=documents, sequences=int(lengths.size), tokens=int(lengths.sum()), dtype=dtype.name,
        min_tokens=int(doc_lengths.min()) if doc_lengths.size else 0,
        mean_tokens=float(doc_lengths.mean()) if doc_lengths.size else 0.0,
        max_tokens=int(doc_lengths.max()) if doc_lengths.size else 0,
        previews=previews, stats_path=str(stats) if stats.is_file() else None)


def format_summary(summary: DatasetSummary, max_chars: int = 1000, max_ids: int = 64) -> str:
    lines = [
        f"prefix     {summary.prefix}",
        f"documents  {summary.documents:,}" + (f" ({summary.sequences:,} sequences)"
                                               if summary.sequences != summary.documents else ""),
        f"tokens     {summary.tokens:,} ({summary.dtype})",
        f"lengths    min {summary.min_tokens:,}, mean {summary.mean_tokens:,.1f}, max {summary.max_tokens:,} tokens",
    ]
    if summary.stats_path:
        lines.append(f"stats      {summary.stats_path}")
    for p in summary.previews:
        lines.append(f"--- document {p.index}: {p.tokens:,} tokens ---")
        if p.text is not None:
            lines.append(p.text if len(p.text) <= max_chars else p.text[:max_chars] + f" [... {len(p.text):,} chars]")
        else:
            shown = " ".join(map(str, p.ids[:max_ids]))
            lines.append(shown + (" ... (give --tokenizer to decode)" if len(p.ids) > max_ids else
                                  " (give --tokenizer to decode)"))
    return "\n".join(lines)
