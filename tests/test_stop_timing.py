"""When a stop signal takes effect (issue 14 review): a signal during an eval stops the run after that step (not
after the eval plus another whole step), and a stop with checkpoints disabled does not ask to be requeued, since
a requeued run would start again from step 0, forever."""

import os
import signal

import pytest
from trainer_testing import prepare_tiny_data, tiny_config, train_in_process

from mythos_train.__main__ import run_train
from mythos_train.checkpoint import checkpoint_dirs
from mythos_train.evaluate import Evaluator
from mythos_train.stop_signals import STOPPED_EXIT
from mythos_train.trainer import Trainer


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return prepare_tiny_data(tmp_path_factory.mktemp("data"))


def test_a_signal_during_eval_stops_after_that_step_with_its_checkpoint(data_dir, tmp_path, monkeypatch):
    run_eval = Evaluator.run

    def signalled_during_eval(self, step):
        result = run_eval(self, step)
        if step == 2:
            os.kill(os.getpid(), signal.SIGUSR1)  # arrives while the eval of step 2 runs
        return result

    monkeypatch.setattr(Evaluator, "run", signalled_during_eval)
    overrides = ["--train.steps=6", "--eval.every_steps=2", "--checkpoint.every_steps=100"]
    trainer = train_in_process(tiny_config(data_dir, tmp_path / "run", overrides))
    assert (trainer.stopped_by, trainer.step) == ("SIGUSR1", 2)
    assert [step for step, _ in checkpoint_dirs(tmp_path / "run" / "checkpoints")] == [2]


def test_a_stop_without_checkpoints_is_not_a_requeue_status(data_dir, tmp_path, monkeypatch):
    train_step = Trainer.train_step

    def signalled_at_step_2(self, micro_batches):
        if self.step == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return train_step(self, micro_batches)

    monkeypatch.setattr(Trainer, "train_step", signalled_at_step_2)
    status_file = tmp_path / "status"  # the launcher's: torchrun does not pass a worker's status on
    monkeypatch.setenv("MYTHOS_STOP_STATUS_FILE", str(status_file))
    cfg = tiny_config(data_dir, tmp_path / "run", ["--train.steps=6", "--checkpoint.enabled=false"])
    status = run_train(cfg)
    assert status not in (0, STOPPED_EXIT) and status_file.read_text() == str(status)
