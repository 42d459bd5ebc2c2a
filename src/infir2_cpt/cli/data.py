"""Data: `infir2 prepare-data` and `infir2 inspect-data`."""

from __future__ import annotations

import sys
from typing import Annotated, Optional

import typer


def prepare_data(
    tokenizer: Annotated[str, typer.Option(
        "--tokenizer", "-t", help="Local Hugging Face tokenizer folder (a fast tokenizer: tokenizer.json).",
        show_default=False)],
    output_prefix: Annotated[str, typer.Option(
        "--output-prefix", "-o", help="Writes OUTPUT_PREFIX_<text-key>_document.bin, .idx and .stats.json.",
        show_default=False)],
    inputs: Annotated[Optional[list[str]], typer.Option(
        "--input", "-i", help="A .jsonl/.json file (also .gz or .zst compressed), a .parquet file, or a folder of "
        "them (searched recursively); repeatable.", show_default=False)] = None,
    text_key: Annotated[str, typer.Option("--text-key", help="The record field (parquet column) holding the text.")] = "text",
    workers: Annotated[int, typer.Option("--workers", "-w", help="Tokenizer processes, one CPU core each.")] = 1,
    append_eod: Annotated[bool, typer.Option(
        "--append-eod/--no-append-eod", help="End every document with the tokenizer's EOS token, which Megatron's "
        "GPT dataset uses to separate documents packed into one sample.")] = True,
    strict: Annotated[bool, typer.Option(
        "--strict", help="Stop at the first malformed line or record without the text field, instead of skipping "
        "and counting it.")] = False,
    max_skipped_percent: Annotated[float, typer.Option(
        "--max-skipped-percent", metavar="PERCENT", help="Fail (exit 2, nothing written) when more than this share "
        "of the records are skipped as malformed, without the text field or not text; blank lines and empty "
        "documents do not count.")] = 10.0,
    force: Annotated[bool, typer.Option(
        "--force", help="Replace an existing dataset at the output prefix (only once the new one is complete).")] = False,
    more_inputs: Annotated[Optional[list[str]], typer.Argument(metavar="INPUT...",
        help="More inputs, so that a shell glob works: --input data/*.jsonl.", show_default=False)] = None,
) -> None:
    """Tokenize a raw corpus into a Megatron indexed dataset: OUTPUT_PREFIX_text_document.bin/.idx.

    Reads JSON Lines and parquet files or folders of them, tokenizes each record's --text-key field with the
    local tokenizer in --workers processes, and writes the dataset plus a .stats.json beside it (documents,
    tokens, skipped lines with file:line and reason, length histogram, time split). Put
    OUTPUT_PREFIX_text_document in a recipe's data.blend.

    Malformed lines and records without the text field are skipped and counted (--strict: fatal; more than
    --max-skipped-percent of them: the run fails and names the fields the records have); empty documents are
    skipped. An existing dataset is replaced only with --force. Files are written under temporary names and
    renamed at the end, so a failed or interrupted run leaves no final-named file. Progress (documents/s,
    tokens/s) goes to stderr.

    Examples:

    
      infir2 prepare-data --input corpus.jsonl.gz --tokenizer /models/Qwen2.5-7B --output-prefix data/corpus --workers 16
    """
    import time

    from ..data.prepare import format_prepare_report, prepare_data as prepare, process_age

    age = process_age()  # start-up is counted from the process start: the interpreter and imports are part of it
    try:
        result = prepare([*(inputs or []), *(more_inputs or [])], tokenizer, output_prefix, text_key=text_key,
                         workers=workers, append_eod=append_eod, strict=strict,
                         max_skipped_percent=max_skipped_percent, force=force,
                         clock_start=time.perf_counter() - age if age is not None else None)
    except KeyboardInterrupt:
        print("\ninfir2: prepare-data interrupted (nothing written)", file=sys.stderr)
        raise typer.Exit(130)
    print(format_prepare_report(result))


def inspect_data(
    prefix: Annotated[str, typer.Argument(metavar="PREFIX",
        help="PREFIX_text_document (or the PREFIX given to prepare-data, or the .bin/.idx path).", show_default=False)],
    tokenizer: Annotated[Optional[str], typer.Option(
        "--tokenizer", "-t", help="Tokenizer folder, to show the documents as text instead of token ids.",
        show_default=False)] = None,
    n: Annotated[int, typer.Option("--count", "-n", "--n", metavar="N",
                                   help="How many documents to show, from the first.")] = 3,
) -> None:
    """Show an indexed dataset: documents, tokens, token dtype, length range and its first documents.

    Also checks that the .bin holds exactly the tokens its .idx describes.

    Examples:

    
      infir2 inspect-data data/corpus_text_document --tokenizer /models/Qwen2.5-7B -n 2
    """
    from ..data.inspect import format_summary, inspect_data as inspect

    print(format_summary(inspect(prefix, tokenizer, n)))
