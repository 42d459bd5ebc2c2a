"""Held-out loss of model weights evaluated in BF16 (Hugging Face transformers, one GPU).

Each MODEL is NAME=SOURCE, where SOURCE is either a masters file written by the training entry
(INFIR2_MASTERS_DUMP: FP32 masters by Megatron parameter name) or a Megatron checkpoint (a checkpoints
directory with its tracker, or an iter_* / release folder), whose model weights are read model-free.
The weights are mapped to a Hugging Face Qwen2 model (infir2's conversion mapping), cast to BF16, and
run on the first --windows windows of --seq + 1 tokens of the held-out dataset.

    python3 benchmarks/scripts/heldout_loss.py --recipe exp/base/recipe.yaml --heldout data/heldout_text_document \\
        --out heldout.json base=exp/base/checkpoints masters-fp8=/tmp/masters.pt
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any


def load_weights(source: Path, num_layers: int) -> dict[str, Any]:
    import torch

    from infir2_cpt.runtime.masters import checkpoint_folder, read_model_tensors

    if source.is_file():
        return torch.load(source, map_location="cpu")
    return read_model_tensors(checkpoint_folder(source), None, num_layers)


def heldout_windows(prefix: str, seq: int, count: int) -> Any:
    import numpy as np
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(prefix)
    need = count * (seq + 1)
    tokens: list[Any] = []
    have = 0
    for i in range(len(dataset)):
        doc = np.asarray(dataset[i], dtype=np.int64)
        tokens.append(doc)
        have += len(doc)
        if have >= need:
            break
    flat = np.concatenate(tokens)[: (have // (seq + 1)) * (seq + 1)][:need]
    return torch.from_numpy(flat).view(-1, seq + 1)


def bf16_loss(weights: dict[str, Any], recipe: Any, windows: Any, batch: int, device: str = "cuda") -> float:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from infir2_cpt.convert.mapping import hf_config_dict, megatron_to_hf_state
    from infir2_cpt.recipe.shape import ModelShape

    rows = weights["embedding.word_embeddings.weight"].shape[0]
    shape = ModelShape.from_recipe(recipe, padded_vocab_size=rows, vocab_size=rows)
    hf_state = megatron_to_hf_state({k: v.to(torch.bfloat16) for k, v in weights.items()}, shape)
    config = Qwen2Config(**{k: v for k, v in hf_config_dict(shape).items() if k != "architectures"})
    model = Qwen2ForCausalLM(config).to(dtype=torch.bfloat16)
    missing, unexpected = model.load_state_dict(hf_state, strict=False)
    missing = [k for k in missing if not (shape.tied_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise ValueError(f"weights do not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model = model.to(device).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(windows), batch):
            chunk = windows[start:start + batch].to(device)
            logits = model(input_ids=chunk[:, :-1]).logits.float()
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), chunk[:, 1:].reshape(-1),
                                                     reduction="sum")
            total += float(loss)
            count += chunk[:, 1:].numel()
    return total / count


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", required=True, help="the experiment's recipe.yaml (model shape)")
    parser.add_argument("--heldout", required=True, help="prefix of the held-out indexed dataset")
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--windows", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("models", nargs="+", help="NAME=SOURCE")
    args = parser.parse_args()

    from infir2_cpt.recipe.load import load_recipe

    recipe = load_recipe(args.recipe).recipe
    windows = heldout_windows(args.heldout, args.seq, args.windows)
    results: dict[str, Any] = {"heldout": args.heldout, "seq": args.seq, "windows": len(windows), "models": {}}
    for item in args.models:
        name, _, source = item.partition("=")
        try:
            loss = bf16_loss(load_weights(Path(source), recipe.model.num_layers), recipe, windows, args.batch,
                             args.device)
            results["models"][name] = {"source": source, "loss": loss, "ppl": math.exp(loss)}
        except Exception as exc:  # recorded; the others go on
            results["models"][name] = {"source": source, "error": f"{type(exc).__name__}: {exc}"}
        print(name, results["models"][name], flush=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    return 0 if all("loss" in m for m in results["models"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
