"""Golden test against the seed scripts.

tests/unit/golden/seed_*.txt hold the Megatron arguments of the four seed scripts, written out from the
reference tables. For every flag there, infir2's argument list carries the same value (numbers compared
as numbers: 1e-4 == 0.0001), or the flag is a row of the deviations table in docs/recipes.md. Every flag
infir2 adds must be a row there too. The table is read from the markdown itself.
"""

from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path

import pytest

from infir2_cpt.launch.plan import LaunchRequest, plan_run

REPO = Path(__file__).resolve().parents[2]
GOLDEN = Path(__file__).resolve().parent / "golden"
DOCS = REPO / "docs" / "recipes.md"
ABSENT = {"—", "-", "–", ""}

CASES = {
    # golden file: (request kwargs)
    "seed_7b.txt": dict(recipe="7b"),
    "seed_1.5b.txt": dict(recipe="1.5b"),
    "seed_7b_decay.txt": dict(recipe="7b", decay_load="iter_0035000"),
    "seed_1.5b_decay.txt": dict(recipe="1.5b", decay_load="iter_0035000"),
}


# --------------------------------------------------------------------------- parsing


def split_flags(argv: list[str]) -> list[tuple[str, tuple[str, ...]]]:
    """[--a, 1, --b, --c, x, y] -> [(--a, (1,)), (--b, ()), (--c, (x, y))]."""
    out: list[tuple[str, list[str]]] = []
    for token in argv:
        if token.startswith("--"):
            out.append((token, []))
        else:
            assert out, f"value {token!r} before any flag"
            out[-1][1].append(token)
    return [(flag, tuple(values)) for flag, values in out]


def read_golden(name: str, pwd: Path) -> list[str]:
    argv: list[str] = []
    for line in (GOLDEN / name).read_text().splitlines():
        argv += shlex.split(line.replace("$PWD", str(pwd)), comments=True)
    return argv


def deviation_table() -> list[dict[str, str]]:
    """The rows of the `| seed flag | seed value | infir2 | why |` table in docs/recipes.md."""
    lines = DOCS.read_text().splitlines()
    header = next(i for i, line in enumerate(lines)
                  if re.match(r"^\|\s*seed flag\s*\|\s*seed value\s*\|\s*infir2\s*\|\s*why\s*\|\s*$", line))
    rows = []
    for line in lines[header + 2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
        assert len(cells) == 4, f"deviation row needs 4 cells: {line}"
        flags = re.findall(r"`(--[A-Za-z0-9_-]+)`", cells[0])
        assert len(flags) == 1, f"one seed flag per row: {line}"
        assert cells[3], f"deviation without a reason: {line}"
        rows.append({"flag": flags[0], "seed": cells[1].strip("`"), "infir2": cells[2], "why": cells[3]})
    return rows


def _same(a: str, b: str) -> bool:
    if a == b:
        return True
    try:
        return float(a) == float(b)
    except ValueError:
        return False


def differences(seed: list[str], ours: list[str]) -> dict[str, str]:
    """flag -> how ours differs from the seed (missing, added, value, count)."""
    seed_flags, our_flags = split_flags(seed), split_flags(ours)
    seed_last = {f: v for f, v in seed_flags}  # argparse: the last one wins
    our_last = {f: v for f, v in our_flags}
    diffs: dict[str, str] = {}
    for flag, values in seed_last.items():
        if flag not in our_last:
            diffs[flag] = f"seed passes {flag} {' '.join(values)}".rstrip() + "; infir2 does not"
        elif len(values) != len(our_last[flag]) or not all(map(_same, values, our_last[flag])):
            diffs[flag] = f"seed {flag} {' '.join(values)} != infir2 {' '.join(our_last[flag])}"
        elif not values:
            seed_count = sum(f == flag for f, _ in seed_flags)
            our_count = sum(f == flag for f, _ in our_flags)
            if seed_count != our_count:
                diffs[flag] = f"{flag} passed {seed_count}x by the seed, {our_count}x by infir2"
    for flag, values in our_last.items():
        if flag not in seed_last:
            diffs[flag] = f"infir2 adds {flag} {' '.join(values)}".rstrip()
    return diffs


# --------------------------------------------------------------------------- fixtures


@pytest.fixture
def in_tmp_cwd(tmp_path, monkeypatch) -> Path:
    """The seed's exp/ is relative to where it is run: run both from the same empty directory."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("INFIR2_EXP_ROOT", raising=False)
    return Path.cwd()


def our_args(request_kwargs: dict) -> list[str]:
    return plan_run(LaunchRequest(dry_run=True, **request_kwargs)).megatron_args


# --------------------------------------------------------------------------- tests


def test_deviation_table_parses():
    rows = deviation_table()
    flags = [r["flag"] for r in rows]
    assert len(rows) >= 15
    for flag in ("--use-mcore-models", "--use-dist-ckpt", "--use-flash-attn", "--use-rotary-position-embeddings",
                 "--no-load-optim", "--profile", "--record-memory-history", "--padded-vocab-size"):
        assert flag in flags


@pytest.mark.parametrize("golden", sorted(CASES))
def test_seed_arguments_reproduced_or_documented(golden, in_tmp_cwd):
    seed = read_golden(golden, in_tmp_cwd)
    ours = our_args(CASES[golden])
    documented = {r["flag"] for r in deviation_table()}
    undocumented = {f: why for f, why in differences(seed, ours).items() if f not in documented}
    assert not undocumented, (
        "differences from the seed that are not rows of the deviations table in docs/recipes.md:\n  "
        + "\n  ".join(undocumented.values()))


@pytest.mark.parametrize("golden", sorted(CASES))
def test_seed_flags_not_in_table_match_exactly(golden, in_tmp_cwd):
    """The heart of the golden test, spelled out for a few values a typo would break."""
    ours = dict(split_flags(our_args(CASES[golden])))
    seed = dict(split_flags(read_golden(golden, in_tmp_cwd)))
    for flag in ("--lr", "--min-lr", "--norm-epsilon", "--seq-length", "--global-batch-size",
                 "--tensor-model-parallel-size", "--hidden-size", "--num-query-groups", "--lr-warmup-iters",
                 "--save", "--tensorboard-dir", "--wandb-save-dir", "--fp8-recipe"):
        assert len(ours[flag]) == 1 and _same(ours[flag][0], seed[flag][0]), flag


def test_table_rows_are_real_and_needed(in_tmp_cwd, megatron_options):
    """Every row names a Megatron option; a seed row's flag is in a seed script and an added row's is not."""
    seed_flags: set[str] = set()
    all_diffs: set[str] = set()
    for golden, kwargs in CASES.items():
        seed = read_golden(golden, in_tmp_cwd)
        seed_flags |= {f for f, _ in split_flags(seed)}
        all_diffs |= set(differences(seed, our_args(kwargs)))
    for row in deviation_table():
        flag = row["flag"]
        assert flag in megatron_options, f"{flag} (docs/recipes.md) is not a megatron-core 0.19.2 option"
        if row["seed"] in ABSENT:
            assert flag not in seed_flags, f"{flag} is passed by the seed: give its seed value"
        else:
            assert flag in seed_flags, f"{flag}: the seed scripts never pass it; its seed value must be '—'"
    # the unconditional deviations really are deviations (a stale row would be caught here)
    for flag in ("--use-mcore-models", "--use-flash-attn", "--use-dist-ckpt", "--use-rotary-position-embeddings",
                 "--no-load-optim", "--profile", "--use-pytorch-profiler", "--record-memory-history",
                 "--untie-embeddings-and-output-weights", "--data-cache-path", "--load", "--padded-vocab-size",
                 "--ckpt-format", "--exit-signal-handler", "--log-memory-to-tensorboard", "--ckpt-step",
                 "--exit-on-missing-checkpoint", "--cross-entropy-loss-fusion", "--cross-entropy-fusion-impl"):
        assert flag in all_diffs, f"{flag} is listed as a deviation but infir2 now matches the seed"


@pytest.fixture(scope="module")
def megatron_options() -> set[str]:
    arguments = pytest.importorskip("megatron.training.arguments")
    parser = arguments.add_megatron_arguments(argparse.ArgumentParser(allow_abbrev=False))
    return {opt for action in parser._actions for opt in action.option_strings}


@pytest.mark.parametrize("golden", sorted(CASES))
def test_golden_files_are_megatron_options(golden, megatron_options, tmp_path):
    """The written-out seed arguments are real options of megatron-core 0.19.2 (catches typos in the golden files)."""
    for flag, _ in split_flags(read_golden(golden, tmp_path)):
        assert flag in megatron_options, f"{golden}: {flag}"


def test_optional_flags_are_documented(in_tmp_cwd, tmp_path):
    """Switch on every optional feature: each flag that only then appears must be a row of the table too."""
    pretrained = tmp_path / "base"
    pretrained.mkdir()
    (pretrained / "latest_checkpointed_iteration.txt").write_text("release\n")
    sets = ["logging.profile=true", "checkpoint.async_save=true", "parallel.cross_entropy_fusion=native",
            "model.attention_backend=fused", "schedule.warmup_init_lr=1e-6",
            "launch.exit_duration_minutes=230", "precision.first_last_layers_bf16=true",
            f"checkpoint.pretrained={pretrained}", "parallel.cuda_graph=local", "parallel.cuda_graph_modules=[mlp]",
            "precision.fp8_activation_store=true", "precision.fp8_activation_store_blockwise=false",
            "precision.adam_moments=bf16"]
    ours = our_args(dict(recipe="7b", sets=sets))
    tiny = our_args(dict(recipe="tiny"))
    seed = {f for f, _ in split_flags(read_golden("seed_7b.txt", in_tmp_cwd))}
    documented = {r["flag"] for r in deviation_table()}
    added = {f for f, _ in split_flags(ours) + split_flags(tiny)} - seed
    assert {"--profile-step-start", "--async-save", "--attention-backend", "--pretrained-checkpoint",
            "--lr-warmup-init", "--mock-data"} <= added
    assert added <= documented, f"undocumented flags: {sorted(added - documented)}"


def test_decay_from_other_iteration_moves_train_iters(in_tmp_cwd):
    """The documented --train-iters deviation: a decay ends decay_iters after the loaded iteration."""
    ours = dict(split_flags(our_args(dict(recipe="7b", decay_load="iter_0020000"))))
    assert ours["--train-iters"] == ("25000",)
    assert ours["--ckpt-step"] == ("20000",)
    assert ours["--load"] == (str(in_tmp_cwd / "exp" / "InfiR2_CPT_FP8_7B" / "checkpoints"),)
