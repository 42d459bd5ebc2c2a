"""Real text for GPU runs on a machine without internet: source and documentation files found under the given
folders (installed Python packages have plenty), as JSONL {"text": ...}, split by a hash of each file's path
into a training file and a held-out file (so no file is in both).

    python3 benchmarks/scripts/gather_text.py --out /tmp/text --train-mb 200 --heldout-percent 2 /usr/lib/python3 ...
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

SUFFIXES = {".py", ".md", ".rst", ".txt", ".c", ".h", ".cpp", ".cu", ".pyi"}


def files(roots: list[Path], max_bytes: int):
    seen: set[str] = set()
    for root in roots:
        for folder, dirs, names in os.walk(root):
            dirs.sort()
            for name in sorted(names):
                path = Path(folder) / name
                if path.suffix not in SUFFIXES or path.is_symlink():
                    continue
                try:
                    size = path.stat().st_size
                except OSError:
                    continue
                if not 200 <= size <= max_bytes:
                    continue
                real = str(path.resolve())
                if real not in seen:
                    seen.add(real)
                    yield path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--train-mb", type=float, default=200.0)
    parser.add_argument("--heldout-percent", type=float, default=2.0)
    parser.add_argument("--max-file-kb", type=int, default=512)
    parser.add_argument("roots", nargs="+", type=Path)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    limit = int(args.train_mb * 1e6)
    written = {"train": 0, "heldout": 0}
    counts = {"train": 0, "heldout": 0}
    with open(args.out / "train.jsonl", "w") as train, open(args.out / "heldout.jsonl", "w") as heldout:
        for path in files(args.roots, args.max_file_kb * 1024):
            try:
                text = path.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue
            bucket = int(hashlib.sha1(str(path).encode()).hexdigest()[:8], 16) % 10000
            split = "heldout" if bucket < args.heldout_percent * 100 else "train"
            if split == "train" and written["train"] >= limit:
                continue
            (heldout if split == "heldout" else train).write(json.dumps({"text": text}) + "\n")
            written[split] += len(text.encode())
            counts[split] += 1
            if written["train"] >= limit and written["heldout"] >= limit * args.heldout_percent / 100:
                break
    summary = {split: {"files": counts[split], "mb": round(written[split] / 1e6, 1)} for split in written}
    (args.out / "gather.json").write_text(json.dumps({"roots": [str(r) for r in args.roots], **summary}) + "\n")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
