"""Master weights on a first launch from a base model (masters.py): the restart guard, the comparison and
the model-free reading of a torch_dist checkpoint written by megatron-core's own dist_checkpointing (CPU, gloo).
Which flags a launch gets is tested with the launch plans (test_decay / test_checkpoints); the comparison
against real FP8 master shards runs on the GPU (benchmarks/)."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch

from infir2_cpt.runtime.masters import (FIRST_LOAD_FLAGS, MastersReport, ParamDiff, checkpoint_folder,
                                drop_first_load_flags_on_restart, read_model_tensors, shard_difference,
                                unstack_checkpoint_layers)

ARGV = ["--bf16", "--load", "/exp/run/checkpoints", *FIRST_LOAD_FLAGS, "--pretrained-checkpoint", "/base"]


def test_first_load_flags_stay_while_the_run_has_no_checkpoint() -> None:
    seen: list[Path] = []
    argv, notes = drop_first_load_flags_on_restart(ARGV, lambda p: seen.append(p) or False)
    assert argv == ARGV and notes == [] and seen == [Path("/exp/run/checkpoints")]


@pytest.mark.parametrize("load", [["--load", "/exp/run/checkpoints"], ["--load=/exp/run/checkpoints"]])
def test_a_restart_after_the_first_save_resumes_with_its_optimizer(load: list[str]) -> None:
    argv = ["--bf16", *load, *FIRST_LOAD_FLAGS, "--pretrained-checkpoint", "/base"]
    kept, notes = drop_first_load_flags_on_restart(argv, lambda p: p == Path("/exp/run/checkpoints"))
    assert kept == ["--bf16", *load, "--pretrained-checkpoint", "/base"]
    assert "already holds a checkpoint of this run" in notes[0]


def test_without_the_flags_nothing_is_looked_at() -> None:
    argv = ["--load", "/x"]
    assert drop_first_load_flags_on_restart(argv, lambda p: pytest.fail("looked")) == (argv, [])


def test_shard_difference_compares_the_owned_slice() -> None:
    reference = torch.arange(12, dtype=torch.bfloat16).view(3, 4)
    shard = reference.reshape(-1)[4:9].float().clone()
    assert shard_difference(shard, reference, 4, 9) == 0.0
    shard[2] += 0.5
    assert shard_difference(shard, reference, 4, 9) == 0.5
    with pytest.raises(ValueError, match="shard of 5 elements against a reference slice of 4"):
        shard_difference(shard, reference, 4, 8)


def test_unstack_and_the_tracker_folder(tmp_path: Path) -> None:
    stacked = {"decoder.layers.mlp.linear_fc2.weight": torch.ones(2, 3, 4), "output_layer.weight": torch.zeros(5, 4)}
    state = unstack_checkpoint_layers(stacked, 2)
    assert sorted(state) == ["decoder.layers.0.mlp.linear_fc2.weight", "decoder.layers.1.mlp.linear_fc2.weight",
                             "output_layer.weight"]
    assert checkpoint_folder(tmp_path) == tmp_path
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("release\n")
    assert checkpoint_folder(tmp_path) == tmp_path / "release"
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("120\n")
    assert checkpoint_folder(tmp_path) == tmp_path / "iter_0000120"


def test_report_summary_separates_fp8_and_other_parameters() -> None:
    report = MastersReport("ckpt", [ParamDiff("a", True, 10, 0.25, 0.0), ParamDiff("b", False, 4, 0.0, None),
                                    ParamDiff("c", True, 10, 0.5, 0.0)])
    summary = report.summary()
    assert summary["max_abs_master_vs_checkpoint"] == {"fp8_params": 0.5, "other_params": 0.0}
    assert summary["fp8_params"] == 2 and summary["worst_vs_checkpoint"][0]["name"] == "c"


@pytest.fixture
def gloo_group():
    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


def test_model_tensors_are_read_from_a_torch_dist_checkpoint_without_the_optimizer(tmp_path: Path, gloo_group,
                                                                                    monkeypatch) -> None:
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing import ShardedTensor

    layers = torch.randn(2, 8, 4, dtype=torch.bfloat16)
    head = torch.randn(6, 4, dtype=torch.bfloat16)
    state = {
        "decoder.layers.self_attention.linear_qkv.weight":
            ShardedTensor.from_rank_offsets("decoder.layers.self_attention.linear_qkv.weight", layers),
        "output_layer.weight": ShardedTensor.from_rank_offsets("output_layer.weight", head),
        "optimizer.state.exp_avg.output_layer.weight":
            ShardedTensor.from_rank_offsets("optimizer.state.exp_avg.output_layer.weight", torch.zeros(6, 4)),
    }
    folder = tmp_path / "iter_0000010"
    folder.mkdir()
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)  # the save syncs and places a flag
    monkeypatch.setattr(torch.cuda, "current_device", lambda: "cpu")  # on the device; there is none here
    dist_checkpointing.save(state, str(folder))
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("10\n")

    names = ["decoder.layers.1.self_attention.linear_qkv.weight", "output_layer.weight", "embedding.missing"]
    import torch.distributed as dist

    dist.destroy_process_group()  # read without one, as in a plain script
    read = read_model_tensors(checkpoint_folder(tmp_path), names, num_layers=2)
    assert sorted(read) == names[:2]
    assert torch.equal(read["decoder.layers.1.self_attention.linear_qkv.weight"], layers[1])
    assert torch.equal(read["output_layer.weight"], head)
