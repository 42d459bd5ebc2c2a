"""The `infir2` command line: the table of commands. It only parses and delegates; each command's docstring is
its --help, and every refusal (an Infir2Error) is reported in one place, _ReportingGroup."""

from __future__ import annotations

import sys
from typing import Any

import typer
from typer.core import TyperGroup

from ..errors import Infir2Error
from . import bench, convert, data, evaluate, reports, train
from .options import from_request


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
    return typer.Typer(cls=_ReportingGroup, help=help, no_args_is_help=True, add_completion=False,
                       pretty_exceptions_enable=False)


app = _typer("FP8 continual pre-training of Qwen2.5 on Megatron: recipes, validation, launch, resume, decay.")
app.info.name = "infir2"

# launching
app.command("train")(from_request(train.train, exclude=("decay_load", "stable_exp")))
app.command("decay")(from_request(train.decay, required=("decay_load",)))
app.command("stop")(train.stop)
app.command("recipes")(train.list_recipes)
app.command("show")(train.show)
app.command("sbatch")(from_request(train.sbatch))
# reading a run back
app.command("checkpoints")(reports.checkpoints)
app.command("schedule")(reports.schedule)
# evaluating
app.command("eval")(from_request(evaluate.eval_checkpoints))
# data
app.command("prepare-data")(data.prepare_data)
app.command("inspect-data")(data.inspect_data)
# checkpoint conversion
convert_app = _typer("Hugging Face <-> Megatron (torch_dist) checkpoints of Qwen2.5-shaped models; see "
                     "docs/conversion.md.")
convert_app.command("hf-to-megatron")(from_request(convert.hf_to_megatron))
convert_app.command("megatron-to-hf")(from_request(convert.megatron_to_hf))
convert_app.command("check-logits")(from_request(convert.check_logits))
app.add_typer(convert_app, name="convert")
# benchmarking
app.command("bench")(from_request(bench.bench, extra=bench.COMPATIBILITY_OPTIONS))
app.command("bench-variants")(bench.bench_variants)
app.command("trace-breakdown")(bench.trace_breakdown)
app.command("memory-breakdown")(bench.memory_breakdown)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
