"""`infir2 prepare-data` / `inspect-data`: raw corpus -> Megatron indexed dataset, all on the CPU.

The tokenizer is a small BPE trained inside the session (tests/fakes/toy_tokenizer.py); expected token ids come
from transformers' own encoding of the same text, what was written is read back through megatron.core, and
compared byte for byte with what megatron.core's own IndexedDatasetBuilder writes for the same documents.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import multiprocessing
import os
import shutil
import signal
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from infir2_cpt.data import indexed, prepare, workers
from infir2_cpt.data.inspect import inspect_data
from infir2_cpt.data.prepare import PrepareResult, format_prepare_report, prepare_data
from infir2_cpt.errors import DataError, WorkerError
from toy_tokenizer import build_toy_tokenizer, toy_corpus_module, toy_documents

DOCS = toy_documents(60)


@pytest.fixture(scope="session")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_toy_tokenizer(tmp_path_factory.mktemp("toy-tokenizer"))


@pytest.fixture(scope="session")
def hf_tok(tok_dir: Path) -> Iterator[Any]:
    from transformers import AutoTokenizer

    # encoding in this process must not start the tokenizer's thread pool: prepare_data forks its workers
    previous = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    yield AutoTokenizer.from_pretrained(str(tok_dir))
    if previous is None:
        os.environ.pop("TOKENIZERS_PARALLELISM", None)
    else:
        os.environ["TOKENIZERS_PARALLELISM"] = previous


def expected(hf_tok: Any, texts: list[str], eod: bool = True) -> list[list[int]]:
    return [hf_tok(t, add_special_tokens=False).input_ids + ([hf_tok.eos_token_id] if eod else []) for t in texts]


def read_back(prefix: str) -> list[list[int]]:
    """Documents as megatron.core's IndexedDataset reads them."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "could not determine rank": there is no torch.distributed here
        dataset = IndexedDataset(prefix)
    bounds = dataset.document_indices
    return [np.concatenate([dataset[s] for s in range(bounds[d], bounds[d + 1])]).tolist()
            for d in range(len(bounds) - 1)]


def megatron_build(prefix: Path, documents: list[list[int]], dtype: Any) -> tuple[bytes, bytes]:
    """(.bin, .idx) as megatron.core's IndexedDatasetBuilder writes these documents, one add_document each."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=dtype)
    for ids in documents:
        builder.add_document(np.array(ids, dtype=np.int64), [len(ids)])
    builder.finalize(f"{prefix}.idx")
    return Path(f"{prefix}.bin").read_bytes(), Path(f"{prefix}.idx").read_bytes()


def write_jsonl(path: Path, lines: list[Any]) -> Path:
    """Records are JSON-encoded; str items are written verbatim (for broken lines)."""
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def run(inputs: list[Any], tok_dir: Path, out: Path, **kwargs: Any) -> PrepareResult:
    return prepare_data(inputs, tok_dir, out, progress=False, **kwargs)


def assert_nothing_written(folder: Path, stem: str = "toy") -> None:
    """No final-named file and no leftover temporary folder (.STEM_text_document.*.tmp)."""
    leftovers = sorted(p.name for p in folder.iterdir() if p.name.lstrip(".").startswith(stem + "_"))
    assert leftovers == []


# --------------------------------------------------------------------------- round trip


def test_tokens_written_equal_tokens_read_back(tmp_path: Path, tok_dir: Path, hf_tok: Any) -> None:
    src = write_jsonl(tmp_path / "corpus.jsonl", [{"id": i, "text": t} for i, t in enumerate(DOCS)])
    result = run([src], tok_dir, tmp_path / "out" / "toy")
    assert result.prefix == str(tmp_path / "out" / "toy_text_document")
    assert read_back(result.prefix) == expected(hf_tok, DOCS)
    stats = json.loads(Path(result.stats_path).read_text())
    assert stats["documents"] == len(DOCS)
    assert stats["tokens"] == sum(map(len, expected(hf_tok, DOCS)))
    assert stats["output"]["dtype"] == "uint16"  # 1000-token vocabulary
    assert stats["skipped"]["total"] == 0
    assert sum(stats["lengths_in_tokens"]["histogram"].values()) == len(DOCS)
    assert 0 < stats["time"]["tokenize_share_of_worker_time"] <= 1
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "toy_text_document.bin", "toy_text_document.idx", "toy_text_document.stats.json"]


def test_no_append_eod_and_text_key(tmp_path: Path, tok_dir: Path, hf_tok: Any) -> None:
    src = write_jsonl(tmp_path / "c.jsonl", [{"body": t} for t in DOCS[:5]])
    result = run([src], tok_dir, tmp_path / "toy", text_key="body", append_eod=False)
    assert result.prefix.endswith("toy_body_document")
    assert read_back(result.prefix) == expected(hf_tok, DOCS[:5], eod=False)


def test_workers_and_units_do_not_change_the_output(tmp_path: Path, tok_dir: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    src = write_jsonl(tmp_path / "c.jsonl", [{"text": t} for t in DOCS * 2])
    pq.write_table(pa.table({"text": DOCS[:30]}), tmp_path / "p.parquet", row_group_size=7)
    inputs = [src, tmp_path / "p.parquet"]
    one = run(inputs, tok_dir, tmp_path / "w1", workers=1)
    two = run(inputs, tok_dir, tmp_path / "w2", workers=2, unit_bytes=3000)  # many units, interleaved
    assert two.stats["units"] > 10
    for suffix in (".bin", ".idx"):
        assert Path(one.prefix + suffix).read_bytes() == Path(two.prefix + suffix).read_bytes()


@pytest.mark.filterwarnings("ignore::UserWarning")  # rank unknown without torch.distributed; pad == eos (as Qwen2.5)
def test_gpt_dataset_builds_training_samples(tmp_path: Path, tok_dir: Path, hf_tok: Any) -> None:
    """Megatron's GPTDataset (as a training run builds it, minus torch.distributed) reads the output, and its
    samples hold whole documents separated by EOD."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
    from megatron.core.tokenizers import MegatronTokenizer

    texts = [d.split(". ")[0] for d in DOCS]  # short documents, so that whole ones fit in a sample
    src = write_jsonl(tmp_path / "c.jsonl", [{"text": t} for t in texts])
    prefix = run([src], tok_dir, tmp_path / "toy").prefix
    tokenizer = MegatronTokenizer.from_pretrained(str(tok_dir), metadata_path={"library": "huggingface"})
    assert tokenizer.eod == hf_tok.eos_token_id
    config = GPTDatasetConfig(random_seed=1, sequence_length=64, blend=([prefix], None), split="90,10,0",
                              path_to_cache=str(tmp_path / "cache"), tokenizer=tokenizer, reset_position_ids=False,
                              reset_attention_mask=False, eod_mask_loss=False)
    train, valid, test = BlendedMegatronDatasetBuilder(GPTDataset, [40, 4, None], lambda: True, config).build()
    assert len(train) >= 40 and len(valid) >= 4 and test is None
    documents = {tuple(d[:-1]) for d in expected(hf_tok, texts)}
    eod, whole = tokenizer.eod, 0
    for i in range(len(train)):
        sample = train[i]
        tokens, labels = sample["tokens"].tolist(), sample["labels"].tolist()
        assert len(tokens) == 64 and tokens[1:] == labels[:-1]
        stream = tokens + labels[-1:]
        ends = [j for j, t in enumerate(stream) if t == eod]
        for a, b in zip(ends, ends[1:]):  # a document wholly inside the sample
            assert tuple(stream[a + 1:b]) in documents
            whole += 1
    assert whole > 0
    assert list((tmp_path / "cache").glob("*-GPTDataset-train-sample_index.npy"))


# --------------------------------------------------------------------------- input formats


def test_gz_zst_parquet_and_folders(tmp_path: Path, tok_dir: Path, hf_tok: Any) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    corpus = tmp_path / "corpus"
    (corpus / "sub").mkdir(parents=True)
    (corpus / ".hidden").mkdir()
    with gzip.open(corpus / "a.jsonl.gz", "wt") as f:
        f.writelines(json.dumps({"text": t}) + "\n" for t in DOCS[:20])
    frames = [zstandard.ZstdCompressor().compress("".join(json.dumps({"text": t}) + "\n" for t in part).encode())
              for part in (DOCS[20:30], DOCS[30:40])]
    (corpus / "sub" / "b.jsonl.zst").write_bytes(b"".join(frames))  # two frames, as parallel compressors write
    pq.write_table(pa.table({"text": DOCS[40:60], "n": list(range(20))}), corpus / "sub" / "c.parquet",
                   row_group_size=6)
    write_jsonl(corpus / ".hidden" / "ignored.jsonl", [{"text": "hidden"}])
    (corpus / "README.md").write_text("not an input")
    result = run([corpus], tok_dir, tmp_path / "toy", workers=2)
    assert read_back(result.prefix) == expected(hf_tok, DOCS)
    assert [i["kind"] for i in result.stats["inputs"]] == ["gz", "zst", "parquet"]
    # the output folder can be the input folder: our own stats file and temporary folder are not inputs
    again = run([corpus], tok_dir, corpus / "again", workers=2)
    assert again.stats["documents"] == len(DOCS)


def test_parquet_nulls_and_missing_column(tmp_path: Path, tok_dir: Path, hf_tok: Any) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": [DOCS[0], None, "", DOCS[1]]}), tmp_path / "a.parquet", row_group_size=2)
    result = run([tmp_path / "a.parquet"], tok_dir, tmp_path / "toy", max_skipped_percent=50)
    assert read_back(result.prefix) == expected(hf_tok, DOCS[:2])
    assert [(e["location"], e["reason"]) for e in result.stats["skipped"]["examples"]] == [
        (f"{tmp_path / 'a.parquet'}:2", "missing_key"), (f"{tmp_path / 'a.parquet'}:3", "empty_document")]
    pq.write_table(pa.table({"content": DOCS[:3], "n": [1, 2, 3]}), tmp_path / "b.parquet")
    with pytest.raises(DataError) as info:
        run([tmp_path / "b.parquet"], tok_dir, tmp_path / "none")
    (problem,) = info.value.problems
    assert problem.key == "text-key" and "--text-key content" in problem.message
    assert_nothing_written(tmp_path, "none")


def test_input_problems_are_reported_together(tmp_path: Path, tok_dir: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(DataError) as info:
        run([tmp_path / "missing.jsonl", tmp_path / "notes.txt", tmp_path / "empty"], tok_dir, tmp_path / "toy")
    messages = [str(p) for p in info.value.problems]
    assert len(messages) == 3
    assert "no such file" in messages[0] and "unsupported file type" in messages[1] and "holds no" in messages[2]
    (tmp_path / "array.json").write_text(json.dumps([{"text": "a"}], indent=1))
    with pytest.raises(DataError, match="JSON array"):
        run([tmp_path / "array.json"], tok_dir, tmp_path / "toy")
    with pytest.raises(DataError, match="tokenizer: is not a directory"):
        run([tmp_path / "array.json"], tmp_path / "no-tokenizer", tmp_path / "toy")
    with pytest.raises(DataError, match="workers: must be >= 1"):
        run([tmp_path / "array.json"], tok_dir, tmp_path / "toy", workers=0)


def test_tokenizer_without_eos(tmp_path: Path, tok_dir: Path, hf_tok: Any) -> None:
    no_eos = shutil.copytree(tok_dir, tmp_path / "tok")
    config = json.loads((no_eos / "tokenizer_config.json").read_text())
    config.pop("eos_token"), config.pop("pad_token")
    (no_eos / "tokenizer_config.json").write_text(json.dumps(config))
    src = write_jsonl(tmp_path / "c.jsonl", [{"text": DOCS[0]}])
    with pytest.raises(DataError, match="no EOS token"):
        run([src], no_eos, tmp_path / "toy")
    assert read_back(run([src], no_eos, tmp_path / "toy", append_eod=False).prefix) == expected(hf_tok, DOCS[:1], False)


# --------------------------------------------------------------------------- the same bytes as megatron.core's builder


def _identity_corpus(tmp_path: Path) -> tuple[bytes, list[str]]:
    """JSONL bytes with the awkward cases (non-ASCII, a CRLF line end, lines longer than a small block, a bad line,
    no line end at the very end) and the texts that should come out of it."""
    texts = DOCS[:30] + ["Grüße, 世界 — ünïcödé\n\ttabs and\u00a0spaces", "crlf line"] + DOCS[30:40]
    lines = [json.dumps({"text": t}, ensure_ascii=i % 2 == 0) for i, t in enumerate(texts)]
    lines[31] += "\r"  # the CRLF line
    lines.insert(5, "{broken")
    return "\n".join(lines).encode(), texts


@pytest.mark.parametrize("form", ["jsonl", "jsonl.gz", "jsonl.zst"])
def test_output_is_byte_identical_to_megatron_builder(tmp_path: Path, tok_dir: Path, hf_tok: Any, form: str) -> None:
    """Whatever the input form, the number of workers or the units: the .bin/.idx megatron.core's builder writes."""
    import zstandard

    data, texts = _identity_corpus(tmp_path)
    if form == "jsonl.gz":
        data = gzip.compress(data)
    elif form == "jsonl.zst":  # two frames, as parallel compressors write
        half = len(data) // 2
        data = zstandard.ZstdCompressor().compress(data[:half]) + zstandard.ZstdCompressor().compress(data[half:])
    src = tmp_path / f"corpus.{form}"
    src.write_bytes(data)
    want_bin, want_idx = megatron_build(tmp_path / "megatron", expected(hf_tok, texts), np.uint16)
    for workers_, unit_bytes in [(1, None), (3, 2000), (2, 64)]:  # 64: lines longer than a block or unit
        result = run([src], tok_dir, tmp_path / f"w{workers_}-{unit_bytes}", workers=workers_, unit_bytes=unit_bytes)
        assert Path(result.bin_path).read_bytes() == want_bin
        assert Path(result.idx_path).read_bytes() == want_idx
        assert read_back(result.prefix) == expected(hf_tok, texts)
        assert [e["location"] for e in result.stats["skipped"]["examples"]] == [f"{src}:6"]
        if unit_bytes:  # a single file, compressed or not, is cut into many units for the workers
            assert result.stats["units"] > 10


@pytest.mark.parametrize("dtype", [np.uint16, np.int32])
def test_index_writer_matches_megatron(tmp_path: Path, dtype: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    lengths = np.random.default_rng(0).integers(1, 5000, size=1000)
    documents = [[7] * int(n) for n in lengths]
    _, want_idx = megatron_build(tmp_path / "megatron", documents, dtype)
    monkeypatch.setattr(indexed, "_CHUNK", 64)  # the offsets and boundaries written in several pieces
    indexed.write_index(tmp_path / "ours.idx", np.dtype(dtype), lengths)
    assert (tmp_path / "ours.idx").read_bytes() == want_idx
    assert indexed.token_dtype(65499) == np.uint16 and indexed.token_dtype(151_669) == np.int32


def test_stats_record_the_tokenizer_and_the_largest_id(tmp_path: Path, tok_dir: Path, hf_tok: Any) -> None:
    src = write_jsonl(tmp_path / "c.jsonl", [{"text": t} for t in DOCS[:8]])
    stats = run([src], tok_dir, tmp_path / "toy").stats
    assert stats["tokenizer"] == {
        "name": tok_dir.name, "path": str(tok_dir.resolve()), "class": "PreTrainedTokenizerFast",
        "vocab_size": len(hf_tok), "eod_token": hf_tok.eos_token, "eod_id": hf_tok.eos_token_id,
        "tokenizer_json_sha256": hashlib.sha256((tok_dir / "tokenizer.json").read_bytes()).hexdigest()}
    assert stats["max_token_id"] == max(max(ids) for ids in expected(hf_tok, DOCS[:8]))
    assert stats["text_bytes"] == src.stat().st_size


# --------------------------------------------------------------------------- refusals: wrong key, existing output


def test_a_wrong_text_key_fails_and_names_the_fields(tmp_path: Path, tok_dir: Path, cli: Any) -> None:
    """13 of 14 records without the text field: exit 2, nothing written, the field that holds the text named."""
    src = write_jsonl(tmp_path / "c.jsonl", [{"text": DOCS[0]}] + [{"id": i, "content": t} for i, t in
                                                                   enumerate(DOCS[1:14])])
    failed = cli("prepare-data", "-i", str(src), "-t", str(tok_dir), "-o", str(tmp_path / "toy"))
    assert failed.exit_code == 2
    assert "input: 13 of 14 records (92.9%) were skipped (missing_key 13): more than --max-skipped-percent 10" \
        in failed.stderr
    assert "text-key: 13 of 14 records have no such field (or it is null); the fields they have: content (13 " \
        "records" in failed.stderr
    assert "--text-key content (got 'text')" in failed.stderr
    assert_nothing_written(tmp_path)
    accepted = cli("prepare-data", "-i", str(src), "-t", str(tok_dir), "-o", str(tmp_path / "toy"),
                   "--max-skipped-percent", "95")
    assert accepted.exit_code == 0, accepted.output
    assert "documents 1," in accepted.stdout


def test_a_text_key_no_record_has_fails_before_any_work(tmp_path: Path, tok_dir: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    src = write_jsonl(tmp_path / "c.jsonl", [{"id": i, "body": t} for i, t in enumerate(DOCS[:20])])
    monkeypatch.setattr(prepare, "run_workers", lambda *args: pytest.fail("workers started"))
    with pytest.raises(DataError) as info:
        run([src], tok_dir, tmp_path / "toy", workers=2)
    (problem,) = info.value.problems
    assert problem.key == "text-key" and problem.value == "text"
    assert problem.message.startswith("the first 20 records of the inputs have no such field")
    assert "body (20 records" in problem.message and problem.message.endswith("--text-key body")
    assert_nothing_written(tmp_path)


def test_an_existing_dataset_is_replaced_only_with_force(tmp_path: Path, tok_dir: Path, hf_tok: Any,
                                                         cli: Any) -> None:
    src = write_jsonl(tmp_path / "c.jsonl", [{"text": t} for t in DOCS[:3]])
    first = run([src], tok_dir, tmp_path / "out" / "toy")
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    write_jsonl(src, [{"text": t} for t in DOCS[3:6]])
    with pytest.raises(DataError) as info:
        run([src], tok_dir, tmp_path / "out" / "toy")
    (problem,) = info.value.problems
    assert problem.key == "output-prefix" and "give --force to replace it" in problem.message
    refused = cli("prepare-data", "-i", str(src), "-t", str(tok_dir), "-o", str(tmp_path / "out" / "toy"))
    assert refused.exit_code == 2 and "its dataset exists" in refused.stderr
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == before
    forced = cli("prepare-data", "-i", str(src), "-t", str(tok_dir), "-o", str(tmp_path / "out" / "toy"), "--force")
    assert forced.exit_code == 0, forced.output
    assert read_back(first.prefix) == expected(hf_tok, DOCS[3:6])


def test_a_failed_run_leaves_no_folder_it_created(tmp_path: Path, tok_dir: Path) -> None:
    src = write_jsonl(tmp_path / "c.jsonl", [{"text": DOCS[0]}, "{broken"])
    with pytest.raises(DataError):
        run([src], tok_dir, tmp_path / "new" / "deeper" / "toy", strict=True)
    assert not (tmp_path / "new").exists()
    (tmp_path / "kept").mkdir()  # a folder that was there before stays
    with pytest.raises(DataError):
        run([src], tok_dir, tmp_path / "kept" / "toy", strict=True)
    assert (tmp_path / "kept").is_dir() and list((tmp_path / "kept").iterdir()) == []


# --------------------------------------------------------------------------- bad records


BAD_LINES: list[Any] = [
    {"text": DOCS[0]},                # 1
    {"text": DOCS[1], "id": 2},       # 2
    '{"text": "cut short',            # 3 malformed_json
    {"text": DOCS[2]},                # 4
    {"content": "no text field"},     # 5 missing_key
    {"text": 42},                     # 6 not_a_string
    {"text": "  \n\t "},              # 7 empty_document
    "",                               # 8 blank_line
    "[1, 2]",                         # 9 not_an_object
    {"text": None},                   # 10 missing_key
    {"text": "lone \ud800 surrogate"},  # 11 invalid_text (valid JSON, not encodable text)
    {"text": DOCS[3]},                # 12
]


@pytest.mark.parametrize("workers,unit_bytes", [(1, None), (2, 64)])
def test_bad_records_are_skipped_with_file_and_line(tmp_path: Path, tok_dir: Path, hf_tok: Any,
                                                     workers: int, unit_bytes: int | None) -> None:
    """unit_bytes=64 puts nearly every line in a unit of its own: line numbers must still be file-wide."""
    src = write_jsonl(tmp_path / "bad.jsonl", BAD_LINES)
    result = run([src], tok_dir, tmp_path / "toy", workers=workers, unit_bytes=unit_bytes, max_skipped_percent=100)
    assert read_back(result.prefix) == expected(hf_tok, DOCS[:4])
    skipped = result.stats["skipped"]
    assert skipped["by_reason"] == {"blank_line": 1, "empty_document": 1, "invalid_text": 1, "malformed_json": 1,
                                    "missing_key": 2, "not_a_string": 1, "not_an_object": 1}
    assert [(e["location"], e["reason"]) for e in skipped["examples"]] == [
        (f"{src}:{line}", reason) for line, reason in [
            (3, "malformed_json"), (5, "missing_key"), (6, "not_a_string"), (7, "empty_document"), (8, "blank_line"),
            (9, "not_an_object"), (10, "missing_key"), (11, "invalid_text")]]
    assert result.stats["rows_read"] == len(BAD_LINES)
    report = format_prepare_report(result)
    assert f"skipped {src}:3: not valid JSON" in report


@pytest.mark.parametrize("line,message", [('{"text": "cut short', "not valid JSON"),
                                          ({"content": "x"}, "has no text field"),
                                          ({"text": 42}, "not a string")])
def test_strict_stops_at_the_first_bad_record(tmp_path: Path, tok_dir: Path, line: Any, message: str) -> None:
    lines = [{"text": t} for t in DOCS[:8]] + [{"text": ""}, line] + [{"text": t} for t in DOCS[8:12]]
    src = write_jsonl(tmp_path / "bad.jsonl", lines)
    with pytest.raises(DataError) as info:
        run([src], tok_dir, tmp_path / "toy", strict=True, workers=2, unit_bytes=500)
    (problem,) = info.value.problems
    assert problem.key == f"{src}:10"  # the empty document on line 9 is skipped, not fatal
    assert message in problem.message and "--strict" in problem.message
    assert_nothing_written(tmp_path)


def test_strict_accepts_empty_documents_and_blank_lines(tmp_path: Path, tok_dir: Path) -> None:
    src = write_jsonl(tmp_path / "c.jsonl", [{"text": DOCS[0]}, {"text": ""}, "", {"text": DOCS[1]}])
    result = run([src], tok_dir, tmp_path / "toy", strict=True)
    assert result.stats["documents"] == 2
    assert result.stats["skipped"]["by_reason"] == {"blank_line": 1, "empty_document": 1}


# --------------------------------------------------------------------------- failures leave nothing behind


def test_corrupt_input_midway_leaves_no_final_files(tmp_path: Path, tok_dir: Path) -> None:
    good = write_jsonl(tmp_path / "good.jsonl", [{"text": t} for t in DOCS])
    payload = gzip.compress("".join(json.dumps({"text": t}) + "\n" for t in DOCS * 3).encode())
    (tmp_path / "cut.jsonl.gz").write_bytes(payload[: len(payload) // 2])  # a download that stopped halfway
    with pytest.raises(DataError) as info:
        run([good, tmp_path / "cut.jsonl.gz"], tok_dir, tmp_path / "toy", workers=2)
    (problem,) = info.value.problems
    assert problem.key == str(tmp_path / "cut.jsonl.gz") and "unreadable after line" in problem.message
    assert_nothing_written(tmp_path)


def test_failed_rerun_keeps_the_previous_output(tmp_path: Path, tok_dir: Path) -> None:
    src = write_jsonl(tmp_path / "c.jsonl", [{"text": t} for t in DOCS[:10]])
    first = run([src], tok_dir, tmp_path / "out" / "toy")
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    write_jsonl(src, [{"text": t} for t in DOCS[:10]] + ["{broken"])
    with pytest.raises(DataError):
        run([src], tok_dir, tmp_path / "out" / "toy", strict=True, force=True)
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == before
    assert Path(first.idx_path).is_file()


def test_interrupt_stops_workers_and_leaves_no_final_files(tmp_path: Path, tok_dir: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    src = write_jsonl(tmp_path / "c.jsonl", [{"text": t} for t in DOCS * 3])

    def ctrl_c(self: workers.Progress, *args: int) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(workers.Progress, "add", ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        run([src], tok_dir, tmp_path / "toy", workers=2, unit_bytes=2000)
    deadline = time.monotonic() + 15  # the workers are stopped; on a loaded machine reaping takes a moment
    while multiprocessing.active_children() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert multiprocessing.active_children() == []
    assert_nothing_written(tmp_path)


def test_a_killed_worker_fails_the_run_cleanly(tmp_path: Path, tok_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = write_jsonl(tmp_path / "c.jsonl", [{"text": t} for t in DOCS])
    # the workers are forked, so they run this patched function
    monkeypatch.setattr(workers, "process_unit", lambda *args: os.kill(os.getpid(), signal.SIGKILL))
    with pytest.raises(WorkerError, match="killed by SIGKILL"):
        run([src], tok_dir, tmp_path / "toy", workers=2)
    assert_nothing_written(tmp_path)


# --------------------------------------------------------------------------- inspect_data


def test_inspect_data(tmp_path: Path, tok_dir: Path, hf_tok: Any) -> None:
    src = write_jsonl(tmp_path / "c.jsonl", [{"text": t} for t in DOCS[:5]])
    result = run([src], tok_dir, tmp_path / "toy")
    summary = inspect_data(tmp_path / "toy", tok_dir, n=2)  # the prepare-data PREFIX is accepted too
    assert summary.prefix == result.prefix and summary.documents == 5 and summary.dtype == "uint16"
    assert summary.tokens == result.stats["tokens"]
    assert [p.ids for p in summary.previews] == expected(hf_tok, DOCS[:2])
    assert summary.previews[0].text == DOCS[0] + "<|endoftext|>"
    assert inspect_data(result.bin_path, n=0).previews == []
    Path(result.bin_path).write_bytes(Path(result.bin_path).read_bytes()[:-2])
    with pytest.raises(DataError, match="truncated"):
        inspect_data(result.prefix)
    with pytest.raises(DataError, match="missing"):
        inspect_data(tmp_path / "nothing")


# --------------------------------------------------------------------------- CLI


def test_cli_prepare_and_inspect(tmp_path: Path, tok_dir: Path, cli: Any) -> None:
    a = write_jsonl(tmp_path / "a.jsonl", [{"text": t} for t in DOCS[:3]])
    b = write_jsonl(tmp_path / "b.jsonl", [{"text": t} for t in DOCS[3:6]] + ["{oops"])
    out = tmp_path / "out" / "toy"
    result = cli("prepare-data", "--tokenizer", str(tok_dir), "--output-prefix", str(out), "--workers", "2",
                 "--max-skipped-percent", "20", "--input", str(a), str(b))  # a shell glob after --input lands in the positional inputs
    assert result.exit_code == 0, result.output
    assert f"wrote {out}_text_document.bin" in result.stdout
    assert "documents 6" in result.stdout and f"skipped {b}:4: not valid JSON" in result.stdout
    assert "docs" in result.stderr and "tokens" in result.stderr  # the progress line
    shown = cli("inspect-data", str(out) + "_text_document", "--tokenizer", str(tok_dir), "--n", "1")
    assert shown.exit_code == 0, shown.output
    assert "documents  6" in shown.stdout and DOCS[0][:200] in shown.stdout


def test_cli_errors_exit_2(tmp_path: Path, tok_dir: Path, cli: Any) -> None:
    src = write_jsonl(tmp_path / "c.jsonl", [{"text": DOCS[0]}, "{oops"])
    strict = cli("prepare-data", "-i", str(src), "-t", str(tok_dir), "-o", str(tmp_path / "toy"), "--strict")
    assert strict.exit_code == 2
    assert "infir2: cannot prepare data (nothing written): 1 problem(s)" in strict.stderr
    assert f"{src}:2: not valid JSON" in strict.stderr
    no_tok = cli("prepare-data", "-i", str(src), "-t", str(tmp_path / "nope"), "-o", str(tmp_path / "toy"))
    assert no_tok.exit_code == 2 and "tokenizer: is not a directory" in no_tok.stderr
    no_input = cli("prepare-data", "-t", str(tok_dir), "-o", str(tmp_path / "toy"))
    assert no_input.exit_code == 2 and "input: give at least one file or folder" in no_input.stderr
    missing = cli("inspect-data", str(tmp_path / "toy"))
    assert missing.exit_code == 2 and "infir2: cannot inspect data" in missing.stderr
    assert_nothing_written(tmp_path)


# --------------------------------------------------------------------------- recipe side and the toy script


def test_validation_hints_at_the_dataset_prefix(tmp_path: Path, tok_dir: Path) -> None:
    from infir2_cpt.layout import ExperimentPaths
    from infir2_cpt.recipe.schema import BlendEntry, Recipe
    from infir2_cpt.launch.preflight import check_files

    prefix = run([write_jsonl(tmp_path / "c.jsonl", [{"text": DOCS[0]}])], tok_dir, tmp_path / "toy").prefix
    recipe = Recipe()
    recipe.data.blend = [BlendEntry(str(tmp_path / "toy")), BlendEntry(prefix + ".bin"), BlendEntry(prefix)]
    found = [str(p) for p in check_files(recipe, ExperimentPaths("x", tmp_path / "exp")).machine
             if p.key.startswith("data.blend")]
    assert len(found) == 2
    assert found[0].startswith("data.blend[0].path: missing") and found[0].count(f"did you mean {prefix}?") == 1
    assert found[1].startswith("data.blend[1].path: missing") and f"did you mean {prefix}?" in found[1]


def test_toy_corpus_is_deterministic(tmp_path: Path) -> None:
    script = toy_corpus_module()
    assert script.main(["--output", str(tmp_path / "a.jsonl"), "--size-mb", "0.2"]) == 0
    script.write_corpus(tmp_path / "b.jsonl", 0.2)
    a = (tmp_path / "a.jsonl").read_bytes()
    assert a == (tmp_path / "b.jsonl").read_bytes() and len(a) >= 200_000
    first = json.loads(a.splitlines()[0])
    assert set(first) == {"id", "text", "source"} and len(first["text"].split()) > 10


def test_workers_start_with_stop_signals_blocked_until_their_own_handlers_are_set(
        tmp_path: Path, tok_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker SIGTERMed right after fork (the parent stops a slow starter once the others finished every
    unit) must simply die, never run the parent's SIGTERM handler inside its copy of the parent's stack."""
    seen: list[set[int]] = []
    start = multiprocessing.get_context("fork").Process.start

    def start_and_record_mask(self) -> None:
        seen.append(signal.pthread_sigmask(signal.SIG_BLOCK, set()))
        start(self)

    monkeypatch.setattr(multiprocessing.get_context("fork").Process, "start", start_and_record_mask)
    src = write_jsonl(tmp_path / "c.jsonl", [{"text": t} for t in DOCS])
    run([src], tok_dir, tmp_path / "toy", workers=2)
    assert seen and all({signal.SIGTERM, signal.SIGINT} <= mask for mask in seen)
    assert signal.SIGTERM not in signal.pthread_sigmask(signal.SIG_BLOCK, set())  # restored in the parent
