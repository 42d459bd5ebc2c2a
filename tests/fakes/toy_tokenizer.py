"""Test helpers: the toy corpus and toy tokenizer of scripts/make_toy_corpus.py (nothing downloaded).

    from toy_tokenizer import build_toy_tokenizer, toy_documents
    tok_dir = build_toy_tokenizer(tmp_path / "tok")   # byte-level BPE, EOS <|endoftext|>, AutoTokenizer-loadable
    texts = toy_documents(50)                          # deterministic English-like documents

The script is the single implementation; this module only imports it (scripts/ is not a package).
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "make_toy_corpus.py"


def toy_corpus_module() -> ModuleType:
    name = "make_toy_corpus"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, SCRIPT)
        assert spec is not None and spec.loader is not None, SCRIPT
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def build_toy_tokenizer(out_dir: Path, vocab_size: int = 1000, sample_mb: float = 0.3, seed: int = 1234) -> Path:
    """A small BPE (1000 tokens by default, trained on 0.3 MB) saved as a Hugging Face tokenizer folder.

    Trained in a child process: BPE training starts the tokenizers thread pool, and a test process with
    threads would then fork prepare-data's workers from a multi-threaded parent, which the CLI never does.
    """
    out_dir = Path(out_dir)
    subprocess.run([sys.executable, str(SCRIPT), "--tokenizer-dir", str(out_dir), "--vocab-size", str(vocab_size),
                    "--tokenizer-sample-mb", str(sample_mb), "--seed", str(seed)], check=True, capture_output=True)
    return out_dir


def toy_documents(count: int, seed: int = 7) -> list[str]:
    generator = toy_corpus_module().ToyTextGenerator(seed, lexicon_size=5_000)
    return [generator.document() for _ in range(count)]


EOS_TOKEN: str = toy_corpus_module().EOS_TOKEN
