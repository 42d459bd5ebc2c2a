"""CUDA memory snapshots in torch's format (torch.cuda.memory._snapshot()), built by hand for CPU tests.

One training iteration of a toy model, addresses and sizes chosen so that the peak and what is live then are
known exactly: persistent blocks from before the event window (parameters, DDP buffers, optimizer states,
each with its allocation stack in `segments`), then a window of alloc/free events: a forward pass that saves
activations (FP8 also keeps a quantized copy), a backward pass
(a TE backward with a Python stack, native ops without one) and an optimizer step, which frees a block allocated before the window.
"""

from __future__ import annotations

from typing import Any

MIB = 1024**2


def frames(*stack: tuple[str, int, str]) -> list[dict[str, Any]]:
    """Innermost first, as torch records them."""
    return [{"filename": f, "line": line, "name": name} for f, line, name in stack]


TRAIN = ("/venv/megatron/training/training.py", 900, "train_step")
FWD = ("/venv/megatron/core/pipeline_parallel/schedules.py", 400, "forward_step")
BWD = ("/venv/megatron/core/pipeline_parallel/schedules.py", 500, "backward_step")
LINEAR_FWD = ("/venv/transformer_engine/pytorch/module/linear.py", 300, "forward")
LINEAR_BWD = ("/venv/transformer_engine/pytorch/module/linear.py", 700, "backward")
QUANTIZE = ("/venv/transformer_engine/pytorch/tensor/float8_blockwise_tensor.py", 120, "quantize")
MODULE_CALL = ("/venv/torch/nn/modules/module.py", 1770, "_call_impl")
BUILD = ("/venv/megatron/training/training.py", 2050, "get_model")
TE_INIT = ("/venv/transformer_engine/pytorch/module/linear.py", 100, "__init__")
GRAD_BUFFER = ("/venv/megatron/core/distributed/param_and_grad_buffer.py", 800, "__init__")
ADAM_STATE = ("/venv/transformer_engine/pytorch/optimizers/fused_adam.py", 300, "_initialize_state")
OPT_STEP = ("/venv/megatron/core/optimizer/optimizer.py", 450, "step")

# Persistent blocks (MiB): live for the whole run, allocated before the event window.
PARAMS, GRADS, ADAM = 100, 200, 400
# Forward: activations saved for backward; FP8 keeps a quantized copy beside them.
ACTIVATIONS, QUANTIZED, OLD = 50, 20, 30


def iteration_snapshot(fp8: bool = False) -> dict[str, Any]:
    """Peak (MiB): PARAMS + GRADS + ADAM + OLD + ACTIVATIONS (+ QUANTIZED) + 40 (TE backward) + 60 (native
    backward), reached in the backward pass; OLD was allocated before the window and is freed at its end."""
    base = 1 << 32
    persistent = [(base, PARAMS, frames(TE_INIT, BUILD)), (base + 1024 * MIB, GRADS, frames(GRAD_BUFFER, BUILD)),
                  (base + 2048 * MIB, ADAM, frames(ADAM_STATE, OPT_STEP, TRAIN))]
    act, quant, old, te_bwd, native, opt_tmp = (base + (4096 + 256 * i) * MIB for i in range(6))
    events: list[dict[str, Any]] = []

    def alloc(addr: int, mib: int, stack: list[dict[str, Any]]) -> None:
        events.append({"action": "alloc", "addr": addr, "size": mib * MIB, "stream": 0, "frames": stack})

    def free(addr: int, mib: int, stack: list[dict[str, Any]]) -> None:
        for action in ("free_requested", "free_completed"):
            events.append({"action": action, "addr": addr, "size": mib * MIB, "stream": 0, "frames": stack})

    alloc(act, ACTIVATIONS, frames(LINEAR_FWD, MODULE_CALL, FWD, TRAIN))
    if fp8:
        alloc(quant, QUANTIZED, frames(QUANTIZE, LINEAR_FWD, MODULE_CALL, FWD, TRAIN))
    alloc(te_bwd, 40, frames(LINEAR_BWD))  # the autograd thread: no caller frames above TE's backward
    alloc(native, 60, [])
    free(native, 60, [])
    free(te_bwd, 40, frames(LINEAR_BWD))
    if fp8:
        free(quant, QUANTIZED, frames(LINEAR_BWD))
    free(act, ACTIVATIONS, frames(LINEAR_BWD))
    alloc(opt_tmp, 10, frames(OPT_STEP, TRAIN))
    free(opt_tmp, 10, frames(OPT_STEP, TRAIN))
    free(old, OLD, frames(OPT_STEP, TRAIN))
    segments = [{"device": 0, "address": addr, "total_size": 512 * MIB, "stream": 0,
                 "blocks": [{"size": mib * MIB, "requested_size": mib * MIB, "state": "active_allocated",
                             "frames": stack},
                            {"size": (512 - mib) * MIB, "requested_size": 0, "state": "inactive"}]}
                for addr, mib, stack in persistent]
    # A block of another device: must not count.
    segments.append({"device": 1, "address": base, "total_size": 64 * MIB, "stream": 0,
                     "blocks": [{"size": 64 * MIB, "requested_size": 64 * MIB, "state": "active_allocated",
                                 "frames": []}]})
    return {"segments": segments, "device_traces": [events, []]}
