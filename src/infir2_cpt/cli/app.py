"""The `infir2` command line: the table of commands. It only parses and delegates; each command's docstring is
its --help, and every refusal (an Infir2Error) is reported in one place, _ReportingGroup."""

from __future__ import annotations

import sys
from typing import Any

import typer
from typer.core import TyperGroup

from ..errors import Infir2Error
from . import bench, convert, data, evaluate, reports, train
from .options import Command, PassThroughCommand, from_request


class _ReportingGroup(TyperGroup):
    """The one place where a refusal becomes output: every Infir2Error a command raises is printed as its title
    and its problems (key, bad value, what would be valid) on stderr, and the command exits with its status."""

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except Infir2Error as exc:
            print(exc, file=sys.stderr)
            raise typer.Exit(exc.exit_code) from None


def _typer(help: str) -> typer.Typer:
    # Plain click formatting, not rich panels: full option names and wrapped help at any width, and usage
    # errors on one line that a script (or a test) can read
    return typer.Typer(cls=_ReportingGroup, help=help, no_args_is_help=True, add_completion=False,
                       pretty_exceptions_enable=False, rich_markup_mode=None)


app = _typer("FP8 continual pre-training of Qwen2.5 on Megatron: recipes, validation, launch, resume, decay.")
app.info.name = "infir2"

# launching
app.command("train", cls=PassThroughCommand, short_help="Train a recipe (warmup, stable, decay); resumes.")(from_request(train.train, exclude=("decay_load", "stable_exp")))
app.command("decay", cls=PassThroughCommand, short_help="Anneal from a stable checkpoint (own experiment).")(from_request(train.decay, required=("decay_load",)))
app.command("stop", cls=Command, short_help="Save a checkpoint and stop a running launch.")(train.stop)
app.command("recipes", cls=Command, short_help="List the shipped recipes.")(train.list_recipes)
app.command("show", cls=Command, short_help="Print a recipe resolved, as YAML.")(train.show)
app.command("sbatch", cls=PassThroughCommand, short_help="Write a Slurm batch script that requeues itself.")(from_request(train.sbatch))
# reading a run back
app.command("checkpoints", cls=Command, short_help="An experiment's checkpoints: phase, LR, tokens.")(reports.checkpoints)
app.command("schedule", cls=Command, short_help="The learning-rate curve of a recipe.")(reports.schedule)
# evaluating
app.command("eval", cls=Command, short_help="Held-out loss of an experiment's checkpoints.")(
    from_request(evaluate.eval_checkpoints))
# data
app.command("prepare-data", cls=Command, short_help="Tokenize a corpus into an indexed dataset.")(data.prepare_data)
app.command("inspect-data", cls=Command, short_help="Show what an indexed dataset holds.")(data.inspect_data)
# checkpoint conversion
convert_app = _typer("Hugging Face <-> Megatron (torch_dist) checkpoints of Qwen2.5-shaped models; see "
                     "docs/conversion.md.")
convert_app.command("hf-to-megatron", cls=Command, short_help="Hugging Face Qwen2.5 -> Megatron checkpoint.")(from_request(convert.hf_to_megatron))
convert_app.command("megatron-to-hf", cls=Command, short_help="Megatron checkpoint -> Hugging Face folder.")(from_request(convert.megatron_to_hf))
convert_app.command("check-logits", cls=Command, short_help="Compare a Megatron checkpoint's logits with HF's.")(from_request(convert.check_logits))
app.add_typer(convert_app, name="convert", short_help="Hugging Face <-> Megatron checkpoints.")
# benchmarking
app.command("bench", cls=PassThroughCommand, short_help="FP8 against BF16: step time, memory, fidelity.")(from_request(bench.bench, extra=bench.COMPATIBILITY_OPTIONS))
app.command("bench-variants", cls=Command, short_help="List the built-in bench variants.")(bench.bench_variants)
app.command("trace-breakdown", cls=Command, short_help="GPU time per kernel category of a profile.")(bench.trace_breakdown)
app.command("memory-breakdown", cls=Command, short_help="What is live at a CUDA memory snapshot's peak.")(bench.memory_breakdown)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
