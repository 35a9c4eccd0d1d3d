"""Failures found late throw work away: check what can be checked at start-up, and say "no space left" when a
save fails for space (issue 14, point 7)."""

import errno
import json
import shutil

import pytest
import torch
import torch.distributed.checkpoint.filesystem as dcp_filesystem
from trainer_testing import prepare_tiny_data, tiny_config, train_in_process

from data_pipeline.config import DataError
from mythos_train.checkpoint import checkpoint_dirs, find_verified
from mythos_train.config import ConfigError
from mythos_train.trainer import Trainer


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return prepare_tiny_data(tmp_path_factory.mktemp("data"))


def _no_step(self, micro_batches):
    raise AssertionError("a training step ran: the problem was not found at start-up")


def test_an_empty_validation_split_stops_the_run_before_its_first_step(data_dir, tmp_path, monkeypatch):
    no_val = tmp_path / "prepared"
    shutil.copytree(data_dir, no_val)
    manifest = json.loads((no_val / "manifest.json").read_text())
    manifest["val"] = []
    (no_val / "manifest.json").write_text(json.dumps(manifest))
    monkeypatch.setattr(Trainer, "train_step", _no_step)
    with pytest.raises(DataError, match=r"\(val\)"):  # before: every step trained, then the final eval crashed
        train_in_process(tiny_config(no_val, tmp_path / "run", ["--train.steps=3"]))


@pytest.mark.parametrize("where", ["the folder", "a parent"])
def test_a_checkpoint_folder_that_is_a_file_is_refused_at_start_up(data_dir, tmp_path, monkeypatch, where):
    file = tmp_path / "not_a_folder"
    file.write_text("precious")
    folder = file if where == "the folder" else file / "checkpoints"
    monkeypatch.setattr(Trainer, "train_step", _no_step)
    with pytest.raises(ConfigError, match=rf"checkpoint.folder = {folder}: {file} is a file"):
        train_in_process(tiny_config(data_dir, tmp_path / "run", ["--train.steps=2", f"--checkpoint.folder={folder}"]))
    assert file.read_text() == "precious"


def _enospc_in_dcp(monkeypatch):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(dcp_filesystem, "_write_item", full)


def _short_write_in_torch_save(monkeypatch):
    def full(*args, **kwargs):  # what torch's zip writer says when the disk fills up under it
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4096 vs 4031")

    monkeypatch.setattr(torch, "save", full)


@pytest.mark.parametrize("fill", [_enospc_in_dcp, _short_write_in_torch_save], ids=["dcp shard", "rank state"])
def test_a_save_that_runs_out_of_space_says_so_and_keeps_the_last_checkpoint(data_dir, tmp_path, monkeypatch, fill):
    run = tmp_path / "run"
    train_in_process(tiny_config(data_dir, run, ["--train.steps=1", "--checkpoint.every_steps=1"]))
    fill(monkeypatch)
    folder = run / "checkpoints"
    message = rf"no space left on {folder}; last complete checkpoint step 1 \({folder / 'step-1'}\) is intact"
    with pytest.raises(RuntimeError, match=message):
        train_in_process(tiny_config(data_dir, run, ["--train.steps=2", "--checkpoint.every_steps=1"]))
    monkeypatch.undo()
    assert find_verified(folder) == folder / "step-1"
    assert [step for step, _ in checkpoint_dirs(folder)] == [1]
