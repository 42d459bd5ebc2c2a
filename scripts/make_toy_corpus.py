#!/usr/bin/env python3
"""A deterministic English-like toy corpus (JSONL) and a toy byte-level BPE tokenizer directory.

For tests, demos and benchmarks of `infir2 prepare-data`, where no real corpus or Hub tokenizer can be
downloaded. Needs only the standard library, `tokenizers` and `transformers`, so it runs on a bare host.

    # 200 MB of JSONL ({"id", "text", "source"} per line) and a 32k-vocabulary tokenizer trained on it
    python scripts/make_toy_corpus.py --output data/toy.jsonl --size-mb 200 \
        --tokenizer-dir data/toy-tokenizer --vocab-size 32000

The same seed always gives the same bytes. The text is not English, but it has English-like statistics:
real function words, a long Zipf-distributed tail of made-up words (so BPE learns sub-word merges and a
32k vocabulary fills up as on real text), sentences, paragraphs, numbers and punctuation.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections.abc import Iterable, Iterator
from itertools import accumulate
from pathlib import Path

EOS_TOKEN = "<|endoftext|>"  # Qwen2.5's end-of-document token, so recipes treat the toy like the real one

_FUNCTION_WORDS = (
    "the of and to a in is that for it as was with be by on not he i this are or his from at which but "
    "have an they you were her she there been one all we their has would when if so no will more can "
    "who its may into than some them these other out only over also new like time two first after any "
    "most where such should very through about between before our could under while many those both "
    "each because during since until without within upon among well then just even much still here"
).split()
_ONSETS = ("", "", "b", "c", "d", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w",
           "br", "ch", "cl", "dr", "fl", "gr", "pl", "pr", "sh", "st", "th", "tr")
_VOWELS = ("a", "a", "e", "e", "i", "o", "u", "ai", "ea", "ee", "ou", "oo", "y")
_CODAS = ("", "", "", "", "", "n", "r", "s", "t", "l", "m", "nd", "nt", "ng", "st", "ck")
_SUFFIXES = ("",) * 12 + ("s", "s", "ed", "ing", "ly", "er", "tion", "ment", "ness", "able", "al", "ic")


def make_lexicon(rng: random.Random, size: int) -> list[str]:
    """Function words first (most frequent), then distinct made-up words of one to four syllables."""
    words = list(dict.fromkeys(_FUNCTION_WORDS))
    seen = set(words)
    while len(words) < size:
        syllables = rng.choice((1, 1, 2, 2, 2, 3))
        word = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(syllables))
        word += rng.choice(_SUFFIXES)
        if word not in seen:
            seen.add(word)
            words.append(word)
    return words


class ToyTextGenerator:
    """Documents of Zipf-distributed words; the same seed gives the same documents."""

    def __init__(self, seed: int = 1234, lexicon_size: int = 60_000) -> None:
        self.rng = random.Random(seed)
        self.words = make_lexicon(self.rng, lexicon_size)
        # Zipf weights with an offset (rank + 2.7)^-1.07, roughly the shape of English word frequencies
        self.cum_weights = list(accumulate((rank + 2.7) ** -1.07 for rank in range(len(self.words))))
        self._buffer: list[str] = []

    def _word(self) -> str:
        # drawing words in large blocks keeps random.choices' per-call overhead out of the loop
        if not self._buffer:
            self._buffer = self.rng.choices(self.words, cum_weights=self.cum_weights, k=65_536)
        return self._buffer.pop()

    def sentence(self) -> str:
        rng = self.rng
        words = [self._word() for _ in range(rng.randint(4, 24))]
        if rng.random() < 0.15:
            words.insert(rng.randrange(len(words)), str(rng.choice((rng.randint(1, 99), rng.randint(1800, 2030)))))
        if rng.random() < 0.2:
            i = rng.randrange(len(words))
            words[i] = words[i].capitalize()  # a proper name
        if len(words) > 8 and rng.random() < 0.5:
            i = rng.randrange(2, len(words) - 2)
            words[i] += ","
        words[0] = words[0].capitalize()
        return " ".join(words) + rng.choice(".........?!;")

    def document(self) -> str:
        rng = self.rng
        # log-normal paragraph counts: most documents short, a few long (median ~1.3 KB, mean ~2.5 KB)
        paragraphs = max(1, min(60, round(rng.lognormvariate(0.9, 0.9))))
        return "\n\n".join(" ".join(self.sentence() for _ in range(rng.randint(2, 7))) for _ in range(paragraphs))

    def documents(self) -> Iterator[str]:
        while True:
            yield self.document()


def write_corpus(path: Path, size_mb: float, seed: int = 1234) -> tuple[int, int]:
    """Write JSONL records until the file holds at least size_mb * 10^6 bytes; returns (documents, bytes)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    target = int(size_mb * 1_000_000)
    written = docs = 0
    generator = ToyTextGenerator(seed)
    with open(path, "w", encoding="utf-8") as out:
        for text in generator.documents():
            if written >= target:
                break
            line = json.dumps({"id": f"toy-{docs:08d}", "text": text, "source": "toy"}, ensure_ascii=False) + "\n"
            out.write(line)
            written += len(line.encode("utf-8"))
            docs += 1
    return docs, written


def train_tokenizer(out_dir: Path, texts: Iterable[str], vocab_size: int = 32_000) -> Path:
    """Train a byte-level BPE (GPT-2/Qwen style) on texts and save it as a Hugging Face tokenizer directory
    (tokenizer.json + tokenizer_config.json) that transformers.AutoTokenizer loads, with EOS = <|endoftext|>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS_TOKEN],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer=trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS_TOKEN, pad_token=EOS_TOKEN)
    out_dir.mkdir(parents=True, exist_ok=True)
    wrapped.save_pretrained(str(out_dir))
    # transformers 5 records its own class name (TokenizersBackend), which transformers 4 cannot load;
    # PreTrainedTokenizerFast is understood by both
    config_path = out_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    return out_dir


def toy_texts(sample_mb: float, seed: int = 1234) -> Iterator[str]:
    """Generated documents totalling about sample_mb * 10^6 characters (for tokenizer training)."""
    budget = int(sample_mb * 1_000_000)
    for text in ToyTextGenerator(seed).documents():
        if budget <= 0:
            return
        budget -= len(text)
        yield text


def build_toy_tokenizer(out_dir: Path, vocab_size: int = 32_000, sample_mb: float = 20.0, seed: int = 1234) -> Path:
    """The toy tokenizer: BPE trained on sample_mb of the toy corpus (same seed -> same text)."""
    return train_tokenizer(out_dir, toy_texts(sample_mb, seed), vocab_size)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, help="JSONL file to write")
    parser.add_argument("--size-mb", type=float, default=200.0, help="corpus size in MB (10^6 bytes); default 200")
    parser.add_argument("--tokenizer-dir", type=Path, help="also write a toy BPE tokenizer directory here")
    parser.add_argument("--vocab-size", type=int, default=32_000, help="tokenizer vocabulary size; default 32000")
    parser.add_argument("--tokenizer-sample-mb", type=float, default=20.0,
                        help="MB of generated text the tokenizer is trained on; default 20")
    parser.add_argument("--seed", type=int, default=1234, help="random seed; default 1234")
    args = parser.parse_args(argv)
    if args.output is None and args.tokenizer_dir is None:
        parser.error("give --output (a corpus) and/or --tokenizer-dir (a tokenizer)")
    if args.output is not None:
        docs, size = write_corpus(args.output, args.size_mb, args.seed)
        print(f"wrote {args.output}: {docs:,} documents, {size / 1e6:.1f} MB", file=sys.stderr)
    if args.tokenizer_dir is not None:
        build_toy_tokenizer(args.tokenizer_dir, args.vocab_size, args.tokenizer_sample_mb, args.seed)
        print(f"wrote {args.tokenizer_dir}: byte-level BPE, vocabulary {args.vocab_size:,}, eos {EOS_TOKEN}",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
