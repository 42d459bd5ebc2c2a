"""The tokenizer prepare-data and inspect-data use: a Hugging Face tokenizer folder's tokenizer.json, loaded with
the `tokenizers` library alone (importing transformers costs seconds and adds nothing to encoding), and its end
of document token from tokenizer_config.json."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import DataError, Problem

_CONFIG_FILES = ("tokenizer_config.json", "special_tokens_map.json")  # where transformers looks for eos_token


@dataclass(frozen=True)
class LoadedTokenizer:
    tokenizer: Any  # tokenizers.Tokenizer, without truncation or padding
    path: Path  # the folder, absolute
    tokenizer_class: str | None  # tokenizer_config.json's tokenizer_class, for the record
    vocab_size: int  # with the added tokens: every id it can produce is below this
    eos_token: str | None
    eos_id: int | None
    sha256: str  # of tokenizer.json: the exact tokenizer a dataset was made with

    def record(self) -> dict[str, Any]:
        """What the stats file says about the tokenizer."""
        return {"name": self.path.name, "path": str(self.path), "class": self.tokenizer_class,
                "vocab_size": self.vocab_size, "eod_token": self.eos_token, "eod_id": self.eos_id,
                "tokenizer_json_sha256": self.sha256}


def _read_json(path: Path, problems: list[Problem]) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        problems.append(Problem("tokenizer", f"{path.name} is not readable JSON: {exc}", str(path)))
        return {}
    return value if isinstance(value, dict) else {}


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken object."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def load_tokenizer(tokenizer_dir: str | Path) -> LoadedTokenizer:
    """The folder's tokenizer.json and its eos_token. Raises DataError naming the folder."""
    path = Path(tokenizer_dir).expanduser().resolve()
    if not path.is_dir():
        raise DataError([Problem("tokenizer", "is not a directory", str(tokenizer_dir))])
    tokenizer_json = path / "tokenizer.json"
    if not tokenizer_json.is_file():
        raise DataError([Problem("tokenizer", "has no tokenizer.json (prepare-data needs a Hugging Face fast "
                                 "tokenizer's tokenizer.json)", str(tokenizer_dir))])
    try:
        from tokenizers import Tokenizer
    except ImportError as exc:
        raise DataError([Problem("tokenizers", f"cannot be imported ({exc}); install infir2-cpt[megatron]")]) from None
    raw = tokenizer_json.read_bytes()
    try:
        tokenizer = Tokenizer.from_str(raw.decode("utf-8"))
    except Exception as exc:  # tokenizers raises plain Exception for a file it cannot read
        raise DataError([Problem("tokenizer", f"cannot load {tokenizer_json}: {exc}", str(tokenizer_dir))]) from None
    # a tokenizer.json may carry truncation or padding settings, which would silently cut or pad documents
    tokenizer.no_truncation()
    tokenizer.no_padding()
    problems: list[Problem] = []
    configs = [_read_json(path / name, problems) for name in _CONFIG_FILES]
    if problems:
        raise DataError(problems)
    eos_token = next((t for t in (_token_text(c.get("eos_token")) for c in configs) if t), None)
    eos_id = tokenizer.token_to_id(eos_token) if eos_token is not None else None
    if eos_token is not None and eos_id is None:
        raise DataError([Problem("tokenizer", f"its eos_token {eos_token!r} (tokenizer_config.json) is not in "
                                 "tokenizer.json's vocabulary", str(tokenizer_dir))])
    tokenizer_class = configs[0].get("tokenizer_class")
    return LoadedTokenizer(tokenizer=tokenizer, path=path,
                           tokenizer_class=tokenizer_class if isinstance(tokenizer_class, str) else None,
                           vocab_size=tokenizer.get_vocab_size(with_added_tokens=True), eos_token=eos_token,
                           eos_id=eos_id, sha256=hashlib.sha256(raw).hexdigest())
