"""The entry `infir2 eval` starts on every GPU: Megatron's own evaluation of several checkpoints in one launch.

It is the training entry (entry.py: same model, forward step, loss and datasets) run with --skip-train, so that
Megatron's pretrain() builds the model without an optimizer, loads the first checkpoint (--load/--ckpt-step),
builds the validation data and evaluates. The one change: Megatron's evaluate_and_print_results is replaced, for
its first call (the validation set), by a loop over the checkpoints of the plan. For each one it points
--load/--ckpt-step at it, loads it with Megatron's load_checkpoint, builds a fresh validation iterator with
Megatron's build_train_valid_test_data_iterators (so that every checkpoint sees the same samples), and calls
Megatron's evaluate(). Its "lm loss" (token-weighted mean cross-entropy over eval_iters x the global batch) is
written, with its perplexity, to the file the plan names for that checkpoint, by the last rank. A later call
(the test set) does nothing.

The plan is the JSON file named by $INFIR2_EVAL_PLAN (written by launch/evaluate.py): {"items": [{"exp",
"ckpt_dir", "iteration", "out", "record": {...}}, ...]}; each result is the item's record plus the measured
fields.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Mapping

from . import entry

PLAN_ENV = "INFIR2_EVAL_PLAN"
LOSS_KEY = "lm loss"  # what entry.loss_func reports


def read_plan(environ: Mapping[str, str] = os.environ) -> list[dict[str, Any]]:
    path = environ.get(PLAN_ENV)
    if not path:
        raise SystemExit(f"infir2.eval: {PLAN_ENV} is not set (this entry is started by `infir2 eval`)")
    return list(json.loads(Path(path).read_text())["items"])


def write_result(item: dict[str, Any], loss: float, loaded: int, extra: dict[str, Any]) -> None:
    record = {**item.get("record", {}), "experiment": item["exp"], "iteration": item["iteration"],
              "checkpoint": str(Path(item["ckpt_dir"]) / f"iter_{item['iteration']:07d}"), "loss": loss,
              "ppl": math.exp(min(loss, 50.0)), "loaded_iteration": loaded, "time": time.time(), **extra}
    out = Path(item["out"])
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    tmp.replace(out)


def evaluate_checkpoints(items: list[dict[str, Any]], forward_step_func: Any, data_iterator: Any, model: Any,
                         config: Any, **kwargs: Any) -> None:
    """Evaluate every checkpoint of the plan with Megatron's own functions (the first one is already loaded)."""
    import megatron.training.training as training
    from megatron.training import get_args
    from megatron.training.checkpointing import load_checkpoint
    from megatron.training.utils import is_last_rank, print_rank_last

    args = get_args()
    for index, item in enumerate(items):
        if index == 0:
            loaded = args.iteration  # pretrain() loaded --load/--ckpt-step, which the plan's first item names
        else:
            args.load, args.ckpt_step = item["ckpt_dir"], item["iteration"]
            loaded, _ = load_checkpoint(model, None, None)
            _, data_iterator, _ = training.build_train_valid_test_data_iterators(
                entry.train_valid_test_datasets_provider)
        if loaded != item["iteration"]:
            raise RuntimeError(f"infir2.eval: asked for iteration {item['iteration']} of {item['ckpt_dir']}, "
                               f"Megatron loaded {loaded}")
        started = time.monotonic()
        losses, _, timelimit = training.evaluate(forward_step_func, data_iterator, model, None, config,
                                                 verbose=False, non_loss_data_func=None, **kwargs)
        if timelimit:
            print_rank_last("infir2.eval: stopped by --exit-duration-in-mins")
            return
        if is_last_rank():
            loss = float(losses[LOSS_KEY])
            samples = args.eval_iters * args.eval_global_batch_size
            write_result(item, loss, loaded, {
                "eval_iters": args.eval_iters, "eval_global_batch_size": args.eval_global_batch_size,
                "tokens_evaluated": samples * args.seq_length, "seconds": round(time.monotonic() - started, 3)})
            print_rank_last(f"infir2.eval: {item['exp']} iteration {item['iteration']}: held-out loss {loss:.4f}, "
                            f"perplexity {math.exp(min(loss, 50.0)):.3f} -> {item['out']}")


def install(items: list[dict[str, Any]]) -> None:
    """Replace Megatron's evaluate_and_print_results (called by pretrain() after loading with --skip-train)."""
    import megatron.training.training as training

    state = {"done": False}

    def evaluate_and_print_results(prefix: str, forward_step_func: Any, data_iterator: Any, model: Any,
                                   iteration: int, process_non_loss_data_func: Any, config: Any, verbose: bool = False,
                                   write_to_tensorboard: bool = True, non_loss_data_func: Any = None,
                                   **kwargs: Any) -> None:
        if state["done"]:  # the test split, when the data has one: not part of the evaluation
            return
        state["done"] = True
        evaluate_checkpoints(items, forward_step_func, data_iterator, model, config, **kwargs)

    training.evaluate_and_print_results = evaluate_and_print_results


def main(argv: list[str] | None = None) -> None:
    items = read_plan()
    entry.main(list(sys.argv[1:] if argv is None else argv), before_pretrain=lambda: install(items))


if __name__ == "__main__":
    from infir2_cpt.runtime.exit_guard import run_bounded

    run_bounded(main)
