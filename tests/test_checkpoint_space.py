"""A disk that fills up under one rank's checkpoint files: every rank stops with the same "no space left" error
naming the intact checkpoint, instead of the others waiting in the next collective until the group times out."""

import errno

import pytest
from trainer_testing import prepare_tiny_data, tiny_config

from mythos_train.checkpoint import CheckpointManager, CheckpointSpaceError, find_verified
from mythos_train.distributed import init_distributed
from mythos_train.trainer import Trainer


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return prepare_tiny_data(tmp_path_factory.mktemp("data"))


def _rank_1_runs_out_of_space_at_step_2(rank, world_size, cfg):
    if rank == 1:
        save_rank_state = CheckpointManager._save_rank_state

        def full(self, path):
            if path.name == "step-2":
                raise OSError(errno.ENOSPC, "No space left on device", str(path / "rank"))
            save_rank_state(self, path)

        CheckpointManager._save_rank_state = full
    trainer = Trainer(cfg, init_distributed(cfg))
    try:
        trainer.train()
    except CheckpointSpaceError as err:
        return str(err)
    except Exception as err:  # what the other rank saw instead, for the assertion message
        return f"{type(err).__name__}: {err}"
    finally:
        trainer.close()
    return "no error"


@pytest.mark.slow
def test_out_of_space_on_one_rank_stops_every_rank_with_the_space_error(data_dir, tmp_path):
    from parallel.testing import run_distributed

    overrides = ["--train.steps=3", "--checkpoint.every_steps=1", "--parallel.timeout_s=60"]
    cfg = tiny_config(data_dir, tmp_path / "run", overrides)
    errors = run_distributed(_rank_1_runs_out_of_space_at_step_2, 2, cfg, timeout=180)
    folder = tmp_path / "run" / "checkpoints"
    for rank, error in enumerate(errors):
        assert error.startswith(f"no space left on {folder}; last complete checkpoint step 1 "), (rank, error)
    assert find_verified(folder) == folder / "step-1"
