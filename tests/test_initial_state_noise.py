"""model.initial_state = 'noise' keeps the system's guarantees: a run killed after an evaluation and resumed ends
bitwise equal to the uninterrupted run (evaluation draws its noise from a forked, seeded generator, so it neither
consumes training's draws nor changes between evaluations), and a sequence split under tensor parallelism draws
the same h_0 as one process."""

import torch
from model_testing import DIM32, tiny_model_config
from trainer_testing import consolidated_model_state, prepare_tiny_data, tiny_config, train_in_process

from mythos_train.model import MythosModel

NOISE = ["--model.initial_state=noise", "--train.steps=4", "--eval.every_steps=2", "--eval.sample_tokens=0"]


def test_resume_after_an_evaluation_equals_the_uninterrupted_run(tmp_path):
    data_dir = prepare_tiny_data(tmp_path / "data")
    whole = train_in_process(tiny_config(data_dir, tmp_path / "whole", NOISE))
    train_in_process(tiny_config(data_dir, tmp_path / "resumed", NOISE), stop_after=2)
    resumed = train_in_process(tiny_config(data_dir, tmp_path / "resumed", NOISE))
    assert resumed.step == whole.step == 4
    expected, got = consolidated_model_state(whole.model), consolidated_model_state(resumed.model)
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), name
    assert resumed.last_eval == whole.last_eval  # the same noise at every evaluation


def test_noise_is_the_same_on_any_sequence_split():
    torch.manual_seed(0)
    recurrent = MythosModel(tiny_model_config(**DIM32, initial_state="noise")).recurrent
    e = torch.randn(2, 12, 32)
    torch.manual_seed(5)
    whole = recurrent.start_state(e)
    for rank in range(3):
        torch.manual_seed(5)
        part = recurrent.start_state(e[:, 4 * rank : 4 * (rank + 1)], 3, rank)
        assert torch.equal(part, whole[:, 4 * rank : 4 * (rank + 1)])
