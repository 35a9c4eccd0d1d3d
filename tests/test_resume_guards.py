"""A poisoned or changed run cannot slip through: non-finite config values, non-finite weights in a checkpoint,
optimizer hyper-parameters changed between runs, and a changed [model] section on resume (issue 14, point 6).

References are independent of the code under test: Python's own float parsing for the config, a freshly built
optimizer and scheduler stepped as an uninterrupted run would be for the resumed hyper-parameters.
"""

import dataclasses
import logging
import math
import typing

import pytest
import torch
from trainer_testing import prepare_tiny_data, tiny_config, train_in_process

from mythos_train.checkpoint import checkpoint_dirs
from mythos_train.config import ConfigError, JobConfig, load_config
from mythos_train.distributed import destroy_distributed, init_distributed
from mythos_train.optim import build_lr_scheduler, build_optimizer
from mythos_train.trainer import Trainer


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return prepare_tiny_data(tmp_path_factory.mktemp("data"))


def _float_fields() -> list[tuple[str, str, bool]]:
    """(section, field, is a list) of every float-valued config field."""
    found = []
    for section in dataclasses.fields(JobConfig):
        hints = typing.get_type_hints(type(getattr(JobConfig(), section.name)))
        for name, tp in hints.items():
            if tp is float or typing.get_args(tp) == (float,):
                found.append((section.name, name, tp is not float))
    return found


@pytest.mark.parametrize("text", ["inf", "-inf", "nan", "1e999"])
def test_non_finite_numbers_are_refused_in_every_float_field(tmp_path, text):
    fields = _float_fields()
    assert ("optim", "lr", False) in fields and len(fields) > 10
    for section, name, is_list in fields:
        value = f"[{text}]" if is_list else text
        with pytest.raises(ConfigError, match=rf"{section}\.{name}.*finite"):
            load_config(None, [f"--{section}.{name}={value}"])
        toml = tmp_path / "job.toml"
        toml_value = {"1e999": "1e999", "nan": "nan", "inf": "inf", "-inf": "-inf"}[text]
        toml.write_text(f"[{section}]\n{name} = {f'[{toml_value}]' if is_list else toml_value}\n")
        assert not math.isfinite(float(text))  # what TOML and Python make of it
        with pytest.raises(ConfigError, match=rf"{section}\.{name}.*finite"):
            load_config(toml)


def test_checkpoint_with_non_finite_weights_is_never_marked_complete(data_dir, tmp_path):
    """A NaN weight makes every step non-finite, so each is skipped, but the periodic saves came on regardless."""
    run = tmp_path / "run"
    cfg = tiny_config(data_dir, run, ["--train.steps=2", "--checkpoint.every_steps=1"])
    trainer = Trainer(cfg, init_distributed(cfg))
    try:
        with torch.no_grad():
            trainer.model.tok_embeddings.weight[0, 0] = float("nan")  # what a step with lr = inf leaves behind
        with pytest.raises(RuntimeError, match=r"step 1: the model weights are not finite"):
            trainer.train()
    finally:
        trainer.close()
        destroy_distributed()
    assert checkpoint_dirs(run / "checkpoints") == []


def test_resume_takes_the_configs_optimizer_hyperparameters_and_logs_the_change(data_dir, tmp_path, caplog):
    run = tmp_path / "run"
    train_in_process(tiny_config(data_dir, run, ["--train.steps=4", "--optim.warmup_steps=0"]), stop_after=2)
    changed = ["--train.steps=4", "--optim.warmup_steps=0", "--optim.lr=3e-3", "--optim.beta2=0.9", "--optim.eps=1e-6"]
    cfg = tiny_config(data_dir, run, changed)
    trainer = Trainer(cfg, init_distributed(cfg))
    try:
        with caplog.at_level(logging.INFO):
            trainer.resume()
        assert trainer.step == 2
        # The uninterrupted run with the new hyper-parameters, after 2 steps: a fresh optimizer and schedule.
        fresh_opt = build_optimizer(trainer.model, cfg.optim, "cpu")
        fresh_sched = build_lr_scheduler(fresh_opt, cfg.optim, cfg.train.steps)
        for _ in range(2):
            fresh_sched.step()
        assert trainer.lr_scheduler.base_lrs == fresh_sched.base_lrs
        for got, want in zip(trainer.optimizer.param_groups, fresh_opt.param_groups, strict=True):
            for key in ("lr", "betas", "eps", "weight_decay", "initial_lr"):
                assert got[key] == want[key], key
    finally:
        trainer.close()
        destroy_distributed()
    assert "lr" in caplog.text and "beta" in caplog.text and "0.003" in caplog.text


def test_resume_refuses_a_changed_model_section_naming_the_fields(data_dir, tmp_path):
    run = tmp_path / "run"
    train_in_process(tiny_config(data_dir, run, ["--train.steps=2", "--checkpoint.every_steps=1"]), stop_after=1)
    changed = ["--model.rope_theta=10000", "--model.norm_eps=1e-5"]  # shapes unchanged
    cfg = tiny_config(data_dir, run, ["--train.steps=2", "--checkpoint.every_steps=1", *changed])
    with pytest.raises(ConfigError, match=r"model.rope_theta = 10000.0 \(checkpoint: 500000.0\), model.norm_eps"):
        train_in_process(cfg)
    assert [step for step, _ in checkpoint_dirs(run / "checkpoints")] == [1]  # nothing written over
    init_only = ["--model.init_std=0.05", "--model.injection_b_init=1.0"]  # the checkpoint's weights replace them
    resumed = train_in_process(
        tiny_config(data_dir, run, ["--train.steps=2", "--checkpoint.every_steps=1", *init_only])
    )
    assert resumed.step == 2
