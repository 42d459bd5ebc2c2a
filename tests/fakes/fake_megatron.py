"""A stand-in for the Megatron entry that prints what Megatron's training loop prints, for `infir2 bench` on the CPU.

tests/unit/test_bench.py runs `infir2 bench` with INFIR2_ENTRY pointing here: the real bench orchestration, the real
`infir2 train` launcher and torchrun start this script instead of infir2_cpt.runtime.entry. It reads the Megatron
arguments it was given and prints, in the wheel's own formats (megatron/training/training.py training_log and
utils/common_utils.py report_memory), one line per iteration with a step time that depends on the precision,
the memory reports (after iterations 1 and 2, and every --log-memory-interval), the padded-vocabulary line,
and "successfully saved checkpoint" lines where Megatron would save (`--save` set and at a save interval, or
at the end off an interval). With --profile --use-pytorch-profiler it writes a small Chrome trace where
Megatron's trace handler would (<tensorboard-dir>/../torch_profile/rank-<R>.json.gz); with --record-memory-history
it rewrites a CUDA memory snapshot (tests/fakes/fake_snapshot.py) at --memory-snapshot-path every iteration, as
Megatron does on the last rank. Its arguments go to
$INFIR2_EXP_DIR/fake_megatron_argv.json. FAKE_MEGATRON_FAIL=<experiment name> makes that run die like an OOM;
FAKE_MEGATRON_HANG=<experiment name> makes it hang.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import pickle
import sys
import time
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from fake_snapshot import iteration_snapshot  # noqa: E402
from infir2_cpt.recipe.shape import ModelShape  # noqa: E402

STEP_MS = {None: 1988.0, "blockwise": 1686.0, "tensorwise": 1620.0, "delayed": 1600.0, "mxfp8": 1500.0}
MAX_ALLOCATED_MB = {None: 69530.5, "blockwise": 67891.25, "tensorwise": 67891.25, "delayed": 68000.0, "mxfp8": 66000.0}


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(allow_abbrev=False)
    for flag in ("--train-iters", "--global-batch-size", "--micro-batch-size", "--seq-length", "--num-layers",
                 "--hidden-size", "--ffn-hidden-size", "--num-attention-heads", "--num-query-groups",
                 "--padded-vocab-size", "--vocab-size", "--log-memory-interval", "--save-interval",
                 "--profile-step-start", "--profile-step-end", "--tensor-model-parallel-size", "--seed"):
        p.add_argument(flag, type=int)
    for flag in ("--fp8-recipe", "--fp8-format", "--tensorboard-dir", "--save", "--data-path", "--lr",
                 "--memory-snapshot-path"):
        p.add_argument(flag)
    for flag in ("--profile", "--use-pytorch-profiler", "--mock-data", "--record-memory-history"):
        p.add_argument(flag, action="store_true")
    args, _ = p.parse_known_args(argv)
    return args


def write_trace(path: Path, fp8: bool, steps: int) -> None:
    """Kernels of a few steps: GEMMs, attention, casts, optimizer, an NCCL kernel overlapping compute."""
    events, t = [], 0.0
    for step in range(steps):
        events.append({"ph": "X", "cat": "user_annotation", "name": f"ProfilerStep#{step + 5}", "pid": 1, "tid": 1,
                       "ts": t, "dur": 2000.0})
        gemm = "nvjet_sm90_qqtst_128x256_e4m3_gemm" if fp8 else "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n"
        kernels = [(gemm, 900.0 if fp8 else 1200.0),
                   ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_nt_n (logits)", 150.0),
                   ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16", 300.0),
                   ("void at::native::vectorized_elementwise_kernel<4, rmsnorm>", 50.0),
                   ("multi_tensor_apply_kernel<AdamFunctor>", 40.0)]
        if fp8:
            kernels.append(("transformer_engine::quantize_transpose_vector_blockwise::block_scaled_1d_cast_transpose_kernel",
                            120.0))
        start = t
        for name, dur in kernels:
            events.append({"ph": "X", "cat": "kernel", "name": name, "pid": 0, "tid": 7, "ts": start, "dur": dur})
            start += dur
        events.append({"ph": "X", "cat": "kernel", "name": "ncclDevKernel_ReduceScatter_Sum_f32_RING_LL",
                       "pid": 0, "tid": 20, "ts": start - 100.0, "dur": 160.0})  # 60 us past the last compute kernel
        events.append({"ph": "X", "cat": "gpu_memcpy", "name": "Memcpy HtoD (Pageable -> Device)", "pid": 0,
                       "tid": 7, "ts": start + 100.0, "dur": 10.0})
        t += 2000.0
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt") as f:
        json.dump({"schemaVersion": 1, "traceEvents": events}, f)


def main() -> None:
    argv = sys.argv[1:]
    args = parse(argv)
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    exp_dir = Path(os.environ["INFIR2_EXP_DIR"])
    if rank == 0:
        (exp_dir / "fake_megatron_argv.json").write_text(json.dumps({"argv": argv, "world_size": world}))
    fp8 = args.fp8_recipe if args.fp8_format else None
    padded = args.padded_vocab_size
    if padded is None:
        vocab = 32000 if args.data_path else args.vocab_size  # an HF tokenizer brings its own vocabulary
        multiple = 128 * (args.tensor_model_parallel_size or 1)
        padded = -(-vocab // multiple) * multiple
        print(f" > padded vocab (size: {vocab}) with {padded - vocab} dummy tokens (new size: {padded})", flush=True)
    if os.environ.get("FAKE_MEGATRON_FAIL") == exp_dir.name:
        print("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB", flush=True)
        sys.exit(1)
    if os.environ.get("FAKE_MEGATRON_HANG") == exp_dir.name:
        print("[before the training loop] a hung NCCL collective", flush=True)
        time.sleep(600)
    shape = ModelShape(args.num_layers, args.hidden_size, args.ffn_hidden_size, args.num_attention_heads,
                       args.num_query_groups, args.seq_length, padded)
    flops = shape.flops_per_iteration(args.global_batch_size)
    micro_batch_speedup = 0.97 if args.micro_batch_size == 2 else 1.0
    max_alloc = MAX_ALLOCATED_MB[fp8] * (1.3 if args.micro_batch_size == 2 else 1.0)
    consumed = 0
    for iteration in range(1, args.train_iters + 1):
        consumed += args.global_batch_size
        if iteration == 1:
            ms = 9000.0  # compilation, allocator warm-up
        else:
            ms = STEP_MS[fp8] * micro_batch_speedup * (1 + 0.002 * ((iteration * 7) % 5 - 2))
        throughput = flops / (ms / 1000.0 * 1e12 * world)
        if args.data_path:  # fidelity: a falling loss, FP8 0.2 % above BF16, seeds 0.1 % apart
            loss = (2.5 + 8.0 * math.exp(-iteration / 80.0)) * (1.002 if fp8 else 1.0) * (1 + 0.001 * ((args.seed or 0) % 2))
        else:
            loss = 11.93 - 0.01 * iteration
        stamp = datetime.now().strftime("%Y-%m-%d %H:%M:%S.%f")
        line = (f" [{stamp}] iteration {iteration:8d}/{args.train_iters:8d} | consumed samples: {consumed:12d} |"
                f" elapsed time per iteration (ms): {ms:.1f} | throughput per GPU (TFLOP/s/GPU): {throughput:.1f} |"
                f" learning rate: {1e-4:.6E} | global batch size: {args.global_batch_size:5d} |"
                f" lm loss: {loss:.6E} | loss scale: 1.0 | grad norm: 1.234 |"
                f" number of skipped iterations:   0 | number of nan iterations:   0 |")
        if rank == world - 1:
            print(line, flush=True)
            if args.record_memory_history:
                Path(args.memory_snapshot_path).write_bytes(pickle.dumps(iteration_snapshot(fp8=bool(fp8))))
        interval = args.log_memory_interval
        if rank == 0 and (iteration <= 2 or (interval and iteration % interval == 0)):
            peak = max_alloc * (0.8 if iteration == 1 else 1.0)
            print(f"[Rank {rank}] (after {iteration} iterations) memory (MB) | allocated: {peak * 0.6:.2f} | "
                  f"max allocated: {peak:.2f} | reserved: {peak + 2500:.2f} | max reserved: {peak + 3000:.2f}",
                  flush=True)
        if args.save and args.save_interval and iteration % args.save_interval == 0:
            print(f"  successfully saved checkpoint from iteration {iteration:7d} to {args.save}", flush=True)
        if args.profile and args.use_pytorch_profiler and rank == 0 and iteration == args.profile_step_end:
            steps = args.profile_step_end - args.profile_step_start
            write_trace(Path(args.tensorboard_dir).parent / "torch_profile" / f"rank-{rank}.json.gz", bool(fp8), steps)
    if args.save and args.train_iters % (args.save_interval or 1) != 0:  # Megatron's final save
        print(f"  successfully saved checkpoint from iteration {args.train_iters:7d} to {args.save}", flush=True)
    print("[after training is done]", flush=True)


if __name__ == "__main__":
    main()
