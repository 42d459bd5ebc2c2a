"""Data against the model before launch (launch/vocabulary.py): datasets really made by prepare-data with Qwen's
tokenizer (../shared/data/qwen-tokenizer) or the test's toy BPE, planned through the real launcher."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from infir2_cpt.data.prepare import prepare_data
from infir2_cpt.errors import LaunchError
from infir2_cpt.launch.plan import LaunchEnv, LaunchRequest, plan_run
from toy_tokenizer import build_toy_tokenizer, toy_documents

QWEN = Path(__file__).resolve().parents[3] / "shared" / "data" / "qwen-tokenizer"
needs_qwen = pytest.mark.skipif(not (QWEN / "tokenizer.json").is_file(), reason="no ../shared/data/qwen-tokenizer")


@pytest.fixture(scope="module")
def toy_tok(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_toy_tokenizer(tmp_path_factory.mktemp("toy-tokenizer"))


def make_dataset(tmp_path: Path, tokenizer: Path, name: str) -> str:
    corpus = tmp_path / f"{name}.jsonl"
    corpus.write_text("".join(f'{{"text": {text!r}}}\n'.replace("'", '"') for text in toy_documents(20)))
    prepare_data([corpus], tokenizer, tmp_path / name, progress=False)
    return str(tmp_path / f"{name}_text_document")


def plan(prefix: str, *sets: str, dry_run: bool = False):
    return plan_run(LaunchRequest(recipe="tiny", dry_run=dry_run, sets=[
        "data.mock=false", f"data.blend=[{{path: {prefix}, weight: 1.0}}]", "data.split=98,2,0", *sets]),
        LaunchEnv.read({**os.environ, "INFIR2_GPU_CHECK": "0"}))


def problems(prefix: str, *sets: str) -> list[str]:
    with pytest.raises(LaunchError) as info:
        plan(prefix, *sets)
    return [str(p) for p in info.value.problems]


@needs_qwen
def test_qwen_data_in_a_32k_row_model_is_refused_before_launch(exp_root, tmp_path):
    prefix = make_dataset(tmp_path, QWEN, "qwen")
    (problem,) = [p for p in problems(prefix) if p.startswith("data.blend[0].path")]
    assert "token ids go up to" in problem and "its stats file" in problem
    assert "but the model's embedding has 32,768 rows" in problem
    warned = plan(prefix, dry_run=True)  # a dry run warns, as for a missing file
    assert any("embedding has 32,768 rows" in str(p) for p in warned.findings.machine)


@needs_qwen
def test_with_the_hugging_face_tokenizer_vocab_size_follows_it_and_the_data_fits(exp_root, tmp_path):
    prefix = make_dataset(tmp_path, QWEN, "qwen")
    plan_ = plan(prefix, "tokenizer.type=HuggingFaceTokenizer", f"tokenizer.model={QWEN}")
    args = plan_.megatron_args
    assert args[args.index("--vocab-size") + 1] == "151669"
    assert plan_.recipe.model.vocab_size == 151669  # the size estimate too
    assert any("tokenizer.model has 151,669 tokens" in n for n in plan_.notes)


@needs_qwen
def test_data_made_with_another_tokenizer_is_refused(exp_root, tmp_path, toy_tok):
    prefix = make_dataset(tmp_path, toy_tok, "toy")
    found = problems(prefix, "tokenizer.type=HuggingFaceTokenizer", f"tokenizer.model={QWEN}")
    (problem,) = [p for p in found if p.startswith("data.blend[0].path")]
    assert f"was made with the tokenizer {toy_tok}" in problem and f"not with tokenizer.model {QWEN}" in problem


def test_without_a_stats_file_the_bin_is_sampled(exp_root, tmp_path, toy_tok):
    prefix = make_dataset(tmp_path, toy_tok, "toy")
    Path(prefix + ".stats.json").unlink()
    assert plan(prefix, "model.vocab_size=4000").findings.machine == []  # the toy BPE's ids fit 4,096 rows
    (problem,) = [p for p in problems(prefix, "model.vocab_size=64") if p.startswith("data.blend[0].path")]
    assert "(a sample of its .bin: ids up to" in problem and "has 128 rows" in problem


def test_data_that_fits_passes(exp_root, tmp_path, toy_tok):
    prefix = make_dataset(tmp_path, toy_tok, "toy")
    assert plan(prefix, "tokenizer.type=HuggingFaceTokenizer", f"tokenizer.model={toy_tok}").findings.machine == []
