"""A damaged newest checkpoint costs only the steps since the one before it (issue 14, point 3).

The COMPLETE marker lists every file of the checkpoint with its size and checksum; resume verifies them and falls
back to the newest checkpoint that verifies, saying so. The reference is the uninterrupted run: after falling
back and training on, the final weights must equal its weights bitwise.
"""

import logging
import shutil

import pytest
import torch
from elastic_testing import checkpoint_state
from trainer_testing import prepare_tiny_data, tiny_config, train_in_process

from mythos_train.config import ConfigError
from mythos_train.preflight import preflight

OVERRIDES = ["--train.steps=3", "--checkpoint.every_steps=1", "--checkpoint.keep_last=3"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    root = tmp_path_factory.mktemp("verify")
    data_dir = prepare_tiny_data(root)
    train_in_process(tiny_config(data_dir, root / "run", OVERRIDES))
    folder = root / "run" / "checkpoints"
    return {"data": data_dir, "folder": folder, "state": checkpoint_state(folder / "step-3", root / "flat")}


def _assert_final_state_is_the_uninterrupted_one(run, uninterrupted, tmp_path):
    state = checkpoint_state(run / "checkpoints" / "step-3", tmp_path / "flat")
    assert state.keys() == uninterrupted["state"].keys()
    for name, value in uninterrupted["state"].items():
        assert torch.equal(state[name], value) if isinstance(value, torch.Tensor) else state[name] == value, name


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _flip_a_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


DAMAGE = {
    "truncated shard": lambda step: _truncate(step / "__0_0.distcp"),
    "missing metadata": lambda step: (step / ".metadata").unlink(),
    "flipped byte in a shard": lambda step: _flip_a_byte(step / "__0_0.distcp"),
    "truncated rank state": lambda step: _truncate(step / "rank" / "rank0.pt"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_resume_falls_back_to_the_newest_checkpoint_that_verifies(uninterrupted, tmp_path, caplog, damage):
    run = tmp_path / "run"
    shutil.copytree(uninterrupted["folder"], run / "checkpoints")
    DAMAGE[damage](run / "checkpoints" / "step-3")
    shutil.rmtree(run / "checkpoints" / "step-2")  # and the one before is gone too: fall back two steps
    with caplog.at_level(logging.INFO):
        trainer = train_in_process(tiny_config(uninterrupted["data"], run, OVERRIDES))
    assert "step-3" in caplog.text and "does not verify" in caplog.text
    assert "resumed from" in caplog.text and "(step 1)" in caplog.text
    assert trainer.step == 3
    _assert_final_state_is_the_uninterrupted_one(run, uninterrupted, tmp_path)


def test_load_step_picks_a_checkpoint_and_refuses_one_that_is_not_there(uninterrupted, tmp_path, caplog):
    run = tmp_path / "run"
    shutil.copytree(uninterrupted["folder"], run / "checkpoints")
    cfg = tiny_config(uninterrupted["data"], run, [*OVERRIDES, "--checkpoint.load_step=1"])
    with caplog.at_level(logging.INFO):
        trainer = train_in_process(cfg)
    assert "(step 1)" in caplog.text and trainer.step == 3
    _assert_final_state_is_the_uninterrupted_one(run, uninterrupted, tmp_path)

    DAMAGE["truncated shard"](run / "checkpoints" / "step-2")
    for step, reason in ((7, "no complete checkpoint"), (2, "does not verify")):
        cfg = tiny_config(uninterrupted["data"], run, [*OVERRIDES, f"--checkpoint.load_step={step}"])
        with pytest.raises(ConfigError, match=rf"checkpoint.load_step = {step}: .*{reason}"):
            train_in_process(cfg)


def test_rolling_back_keeps_the_new_branch_and_sets_the_abandoned_one_aside(uninterrupted, tmp_path, caplog):
    """Resuming from step 1 while step-2 and step-3 exist, keep_last=1: the step-2 written on the new branch is
    the one kept (equal to the uninterrupted run's step-2), and the abandoned branch is renamed, not deleted."""
    run = tmp_path / "run"
    shutil.copytree(uninterrupted["folder"], run / "checkpoints")
    cfg = tiny_config(uninterrupted["data"], run, [*OVERRIDES, "--checkpoint.load_step=1", "--checkpoint.keep_last=1"])
    with caplog.at_level(logging.INFO):
        train_in_process(cfg, stop_after=2)
    folder = run / "checkpoints"
    assert sorted(path.name for path in folder.iterdir()) == ["step-2", "step-2.abandoned", "step-3.abandoned"]
    assert "step-3.abandoned" in caplog.text
    reference = checkpoint_state(uninterrupted["folder"] / "step-2", tmp_path / "reference")
    state = checkpoint_state(folder / "step-2", tmp_path / "flat")
    for name, value in reference.items():
        assert torch.equal(state[name], value) if isinstance(value, torch.Tensor) else state[name] == value, name


def test_a_folder_where_no_checkpoint_verifies_is_refused_not_restarted(uninterrupted, tmp_path):
    """Complete checkpoints that all fail to verify must stop the run with the folder named, not start it from
    step 0 (whose saves retention would then delete): nothing in the folder may change."""
    run = tmp_path / "run"
    shutil.copytree(uninterrupted["folder"], run / "checkpoints")
    for step in (1, 2, 3):
        DAMAGE["truncated shard"](run / "checkpoints" / f"step-{step}")
    before = {path: path.stat().st_size for path in (run / "checkpoints").rglob("*")}
    cfg = tiny_config(uninterrupted["data"], run, OVERRIDES)
    for start in (lambda: preflight(cfg, 1), lambda: train_in_process(cfg)):  # train --validate-only, then train
        with pytest.raises(ConfigError, match=rf"{run / 'checkpoints'}.*no.*verifies.*checkpoint.load_step"):
            start()
    assert {path: path.stat().st_size for path in (run / "checkpoints").rglob("*")} == before
