"""The GPU half of `infir2 convert hf-to-megatron`, run on the CPU for tests/process/test_conversion_runs.py.

Real Megatron code with the CUDA-only calls stubbed: torch.cuda.current_device (RoPE and the attention buffer
move tensors to it), torch.cuda.synchronize (dist_checkpointing's save), the CUDA RNG state (save_checkpoint
collects it) and the CUDA RNG tracker's fork (attention dropout). Differences from the GPU run: a gloo process
group with model parallelism set up directly instead of initialize_megatron (which asserts CUDA), the local
layer spec instead of Transformer Engine's (TE is not installed here), the dtype of the given arguments (the
tests give no --bf16: fp32), and an explicit causal mask (the unfused attention otherwise builds one on CUDA).

    python megatron_cpu_convert.py SPEC.json

SPEC: {"hf": dir, "shape": {...}, "megatron_args": [...], "result": file, "port": int}. Converts the HF folder
with convert_entry's functions and Megatron's own save_checkpoint (release, into --save), reads the written
checkpoint back model-free, runs the Megatron model and transformers on the same tokens, and loads the
checkpoint into a fresh model as check-logits does. Writes the result JSON.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))


def stub_cuda() -> None:
    import torch
    from megatron.core.tensor_parallel import random as megatron_random

    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.synchronize = lambda *args, **kwargs: None
    torch.cuda.get_rng_state = lambda *args, **kwargs: torch.zeros(16, dtype=torch.uint8)
    megatron_random.CudaRNGStatesTracker.fork = lambda self, name=None: contextlib.nullcontext()


def init_like_megatron(megatron_argv: list[str]):
    """parse_and_validate_args as on the GPU; then a gloo group and TP=PP=1 instead of initialize_megatron."""
    import torch
    from megatron.core import parallel_state

    from infir2_cpt.runtime.wheel_workarounds import adjust_megatron_argv, skip_dataset_helper_compilation

    argv, _ = adjust_megatron_argv(megatron_argv)
    skip_dataset_helper_compilation()
    sys.argv = [sys.argv[0], *argv]
    from megatron.training.arguments import parse_and_validate_args

    args = parse_and_validate_args()
    torch.distributed.init_process_group("gloo", init_method="env://", rank=0, world_size=1)
    parallel_state.initialize_model_parallel(1, 1)
    return args


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(spec["port"]))
    stub_cuda()
    import torch

    from infir2_cpt.convert import mapping as cv
    from infir2_cpt.runtime import convert_entry as ce

    shape = cv.ModelShape(**spec["shape"])
    args = init_like_megatron(spec["megatron_args"])
    models = ce.build_models(args)
    model = ce.unwrap(models[0])
    result: dict = {"model_keys": sorted(ce.model_weights(model))}
    mapped = cv.hf_to_megatron_state(cv.read_hf_state(Path(spec["hf"])), shape)
    result["copy_problems"] = ce.copy_into_model(model, mapped)
    ce.save_release(models)
    out = Path(args.save)
    result["tracker"] = (out / "latest_checkpointed_iteration.txt").read_text().strip()
    result["release_files"] = sorted(p.name for p in (out / "release").iterdir())
    result["checkpoint_shapes"] = {k: list(v) for k, v in ce.checkpoint_tensor_shapes(out / "release").items()}
    written = ce.read_checkpoint_folder(out / "release", shape)
    result["written_equals_model"] = ce.compare_exact(cv.from_model_names(ce.model_weights(model)), written) == []
    result["written_equals_mapped"] = ce.compare_exact(mapped, written) == []
    ce.write_conversion_record(out, Path(spec["hf"]), shape)

    tokens = ce.random_tokens(2, 24, shape.vocab_size, seed=7)
    positions = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
    causal = torch.triu(torch.ones(tokens.shape[1], tokens.shape[1]), diagonal=1).bool()[None, None]
    model.eval()
    with torch.no_grad():
        full = models[0](tokens, positions, causal)
    meg = full[..., : shape.vocab_size].float()
    ref = ce.hf_logits(Path(spec["hf"]), tokens, "bf16" if args.bf16 else "fp32").float()
    result["logits"] = ce.logit_errors(ref, meg)
    result["padded_logits_zero"] = bool((full[..., shape.vocab_size:] == 0).all()) \
        if shape.padded_vocab_size > shape.vocab_size else None
    # check-logits' path: a fresh model loaded from the written checkpoint gives the same logits
    fresh = ce.build_models(args)
    result["reload_problems"] = ce.copy_into_model(ce.unwrap(fresh[0]), written)
    ce.unwrap(fresh[0]).eval()
    with torch.no_grad():
        result["reloaded_logits_equal"] = bool(torch.equal(fresh[0](tokens, positions, causal), full))
    Path(spec["result"]).write_text(json.dumps(result, indent=2))
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
