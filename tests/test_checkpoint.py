"""Checkpoints: complete-marker semantics, retention, safe loading, and resume equality (also across world sizes).

The reference is always an uninterrupted run: a resumed run must reproduce its losses and final weights (bitwise
on the same mesh, to fp32 reduction-order noise on another world size).
"""

import os
import pickle
import shutil

import pytest
import torch
from trainer_testing import (
    StoppingTrainer,
    consolidated_model_state,
    prepare_tiny_data,
    tiny_config,
    train_in_process,
)

from mythos_train.checkpoint import MARKER, checkpoint_dirs, find_latest
from mythos_train.checkpoint_safety import SafeFileSystemReader
from mythos_train.distributed import init_distributed


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return prepare_tiny_data(tmp_path_factory.mktemp("data"))


def test_partial_checkpoint_is_ignored_and_replaced(data_dir, tmp_path):
    run = tmp_path / "run"
    train_in_process(tiny_config(data_dir, run, ["--train.steps=4"]), stop_after=2)
    folder = run / "checkpoints"
    assert find_latest(folder) == folder / "step-2"

    partial = folder / "step-4"  # a save killed half-way: no marker, a truncated shard
    shutil.copytree(folder / "step-2", partial)
    (partial / MARKER).unlink()
    (partial / "__0_0.distcp").write_bytes(b"truncated")
    assert find_latest(folder) == folder / "step-2"
    assert [step for step, _ in checkpoint_dirs(folder, complete_only=False)] == [2, 4]

    trainer = train_in_process(tiny_config(data_dir, run, ["--train.steps=4"]))
    assert trainer.step == 4
    assert find_latest(folder) == partial and (partial / MARKER).is_file()
    assert (partial / "__0_0.distcp").stat().st_size > 100  # rewritten, not the truncated leftover


def test_keeps_the_last_k_complete_checkpoints(data_dir, tmp_path):
    run = tmp_path / "run"
    train_in_process(
        tiny_config(data_dir, run, ["--train.steps=3", "--checkpoint.every_steps=1", "--checkpoint.keep_last=2"])
    )
    assert [step for step, _ in checkpoint_dirs(run / "checkpoints", complete_only=False)] == [2, 3]


class _Exploit:
    def __reduce__(self):
        return (os.system, ("echo unpickled > /dev/null",))


def test_metadata_loading_refuses_arbitrary_globals(data_dir, tmp_path):
    run = tmp_path / "run"
    train_in_process(tiny_config(data_dir, run, ["--train.steps=1", "--checkpoint.every_steps=1"]))
    good = run / "checkpoints" / "step-1"
    assert SafeFileSystemReader(good).read_metadata().state_dict_metadata  # a real checkpoint loads
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / ".metadata").write_bytes(pickle.dumps(_Exploit()))
    with pytest.raises(pickle.UnpicklingError, match="posix.system|os.system"):
        SafeFileSystemReader(bad).read_metadata()


# --------------------------------------------------------------------------- multi-process resume


def _train_worker(rank, world_size, cfg, stop_after):
    trainer = StoppingTrainer(cfg, init_distributed(cfg), stop_after)
    losses = {}
    step = trainer.train_step

    def recording(micro_batches):
        result = step(micro_batches)
        losses[trainer.step + 1] = result.loss
        return result

    trainer.train_step = recording
    try:
        trainer.train()
    finally:
        trainer.close()
    state = consolidated_model_state(trainer.model)  # collective: every rank
    return {"losses": losses, "state": state if rank == 0 else None, "step": trainer.step}


@pytest.mark.slow
def test_resume_equals_uninterrupted_run_and_reshards_to_one_rank(data_dir, tmp_path):
    from distributed_testing import run_distributed

    def cfg(name, *extra):
        return tiny_config(data_dir, tmp_path / name, ["--train.steps=4", "--parallel.ep=2", *extra])

    straight = run_distributed(_train_worker, 2, cfg("straight"), None, timeout=240)[0]
    first = run_distributed(_train_worker, 2, cfg("resumed", "--checkpoint.async_save=true"), 2, timeout=240)[0]
    assert first["step"] == 2 and find_latest(tmp_path / "resumed" / "checkpoints").name == "step-2"
    shutil.copytree(tmp_path / "resumed" / "checkpoints", tmp_path / "one_rank" / "checkpoints")
    second = run_distributed(_train_worker, 2, cfg("resumed", "--checkpoint.async_save=true"), None, timeout=240)[0]

    assert sorted(first["losses"]) == [1, 2] and sorted(second["losses"]) == [3, 4]
    assert first["losses"] | second["losses"] == straight["losses"]  # bitwise
    for name, tensor in straight["state"].items():
        assert torch.equal(tensor, second["state"][name]), name

    # Same global batch on one rank (micro-batch 2 x 2 ranks = 4 x 1 rank): DCP reshards weights and AdamW state,
    # the loader's stream position carries over, the experts go from ep=2 to one rank.
    one = run_distributed(
        _train_worker, 1, cfg("one_rank", "--train.micro_batch_size=4", "--parallel.ep=1"), None, timeout=240
    )[0]
    assert sorted(one["losses"]) == [3, 4]
    for step in (3, 4):
        assert one["losses"][step] == pytest.approx(straight["losses"][step], rel=1e-5)
    for name, tensor in straight["state"].items():
        # The router's gradient comes through the gate renormalisation, and AdamW turns its rounding (one rank's
        # sums vs two ranks') into the largest differences: 1.1e-6 with autograd's cross-entropy, 2.7e-6 with the
        # loss's own gradient (mythos_train/loss.py); every other tensor stays within 1.3e-7.
        atol = 1e-5 if name.endswith("router.weight") else 1e-6
        torch.testing.assert_close(one["state"][name], tensor, rtol=1e-4, atol=atol, msg=name)
