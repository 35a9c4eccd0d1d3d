"""checkpoint.init_from starts a new run from another run's weights (a curriculum stage: copy first, then hops):
the model equals the source run's final model, read back from its training process's memory (not from the
checkpoint this code loads); optimizer, schedule and step start fresh; a missing or damaged source is a
ConfigError naming the field; the run's own checkpoint, once it has one, wins (a restarted stage continues)."""

import shutil

import pytest
import torch
from trainer_testing import consolidated_model_state, prepare_tiny_data, tiny_config, train_in_process

from mythos_train.checkpoint import checkpoint_dirs
from mythos_train.config import ConfigError
from mythos_train.distributed import destroy_distributed, init_distributed
from mythos_train.preflight import preflight
from mythos_train.trainer import Trainer


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A 2-step run's checkpoints folder and its final weights as its process held them."""
    root = tmp_path_factory.mktemp("init_from")
    data_dir = prepare_tiny_data(root / "data")
    run = root / "source"
    trainer = train_in_process(tiny_config(data_dir, run, ["--train.steps=2", "--checkpoint.every_steps=2"]))
    return data_dir, run / "checkpoints", consolidated_model_state(trainer.model)


def _resumed(cfg):
    trainer = Trainer(cfg, init_distributed(cfg))
    trainer.resume()
    return trainer


def test_init_from_loads_the_weights_only(source, tmp_path):
    data_dir, folder, weights = source
    cfg = tiny_config(data_dir, tmp_path / "run", [f"--checkpoint.init_from={folder}"])
    assert "initialised from" in preflight(cfg, 1)
    trainer = _resumed(cfg)
    try:
        got = consolidated_model_state(trainer.model)
        assert got.keys() == weights.keys()
        for name, tensor in weights.items():
            torch.testing.assert_close(got[name], tensor, rtol=0, atol=0, msg=name)
        assert trainer.step == 0
        assert trainer.optimizer.state_dict()["state"] == {}
        assert trainer.lr_scheduler.last_epoch == 0
    finally:
        trainer.close()
        destroy_distributed()


def test_the_runs_own_checkpoint_wins_over_init_from(source, tmp_path):
    data_dir, folder, weights = source
    run = tmp_path / "run"
    train_in_process(tiny_config(data_dir, run, ["--train.steps=1", "--checkpoint.every_steps=1"]))
    cfg = tiny_config(data_dir, run, ["--train.steps=2", f"--checkpoint.init_from={folder}"])
    trainer = _resumed(cfg)
    try:
        assert trainer.step == 1
        embeddings = consolidated_model_state(trainer.model)["tok_embeddings.weight"]
        assert not torch.equal(embeddings, weights["tok_embeddings.weight"])
    finally:
        trainer.close()
        destroy_distributed()


def test_a_missing_or_damaged_source_names_the_field(source, tmp_path):
    data_dir, folder, _ = source
    missing = tiny_config(data_dir, tmp_path / "a", [f"--checkpoint.init_from={tmp_path / 'nothing'}"])
    with pytest.raises(ConfigError, match=r"checkpoint.init_from = .*nothing"):
        preflight(missing, 1)
    with pytest.raises(ConfigError, match=r"checkpoint.init_from = .*nothing"):
        train_in_process(missing)
    damaged = tmp_path / "damaged"
    step_dir = checkpoint_dirs(folder)[-1][1]
    shutil.copytree(step_dir, damaged / step_dir.name)
    shard = next(p for p in (damaged / step_dir.name).iterdir() if p.suffix == ".distcp")
    shard.write_bytes(shard.read_bytes()[:-8])
    cfg = tiny_config(data_dir, tmp_path / "b", [f"--checkpoint.init_from={damaged}"])
    with pytest.raises(ConfigError, match=r"checkpoint.init_from = .*damaged.*verif"):
        train_in_process(cfg)
    assert not (tmp_path / "b" / "checkpoints").exists() or checkpoint_dirs(tmp_path / "b" / "checkpoints") == []


def test_init_from_changes_switches_a_recipe_choice(source, tmp_path):
    """A stage that turns ACT on and the depth LoRA off: refused without checkpoint.init_from_changes, naming the
    fields; with it, every shared parameter is the source's, the halting head is what a fresh run initialises, and
    the LoRA is gone."""
    data_dir, folder, weights = source
    switch = ["--model.use_act=true", "--model.lora_rank=0"]
    start = [f"--checkpoint.init_from={folder}"]
    with pytest.raises(ConfigError, match=r"model.use_act = True \(checkpoint: False\), model.lora_rank = 0"):
        preflight(tiny_config(data_dir, tmp_path / "refused", switch + start), 1)
    cfg = tiny_config(
        data_dir, tmp_path / "run", switch + start + ["--checkpoint.init_from_changes=['use_act', 'lora_rank']"]
    )
    fresh_trainer = _resumed(tiny_config(data_dir, tmp_path / "fresh", switch))
    fresh = consolidated_model_state(fresh_trainer.model)
    fresh_trainer.close()
    destroy_distributed()
    trainer = _resumed(cfg)
    try:
        got = consolidated_model_state(trainer.model)
        assert {name for name in weights if name not in got} == {n for n in weights if n.startswith("recurrent.lora.")}
        assert {name for name in got if name not in weights} == {"recurrent.act.halt.weight", "recurrent.act.halt.bias"}
        for name, tensor in got.items():
            expected = weights.get(name, fresh[name])
            torch.testing.assert_close(tensor, expected, rtol=0, atol=0, msg=name)
    finally:
        trainer.close()
        destroy_distributed()
