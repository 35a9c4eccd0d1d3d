"""Export: a checkpoint written by 2 ranks (FSDP + expert parallel) -> one safetensors file whose weights are the
trained ones, and an open-mythos 0.5.0 file that gives OpenMythos the same logits as our model."""

import json

import pytest
import torch
from model_testing import open_mythos_reference
from safetensors import safe_open
from safetensors.torch import load_file
from trainer_testing import consolidated_model_state, prepare_tiny_data, tiny_config

from mythos_train.distributed import init_distributed
from mythos_train.export import export_checkpoint, load_exported
from mythos_train.model.open_mythos_compat import open_mythos_config_kwargs
from mythos_train.trainer import Trainer


def _train_worker(rank, world_size, cfg):
    trainer = Trainer(cfg, init_distributed(cfg))
    try:
        trainer.train()
    finally:
        trainer.close()
    state = consolidated_model_state(trainer.model)
    return state if rank == 0 else None


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(config, final full state, run dir) of a 2-rank ep=2 run with ACT and LTI (open-mythos-compatible)."""
    from distributed_testing import run_distributed

    root = tmp_path_factory.mktemp("export")
    cfg = tiny_config(
        prepare_tiny_data(root / "data"),
        root / "run",
        ["--train.steps=2", "--model.use_act=true", "--model.injection=lti", "--parallel.ep=2", "--eval.every_steps=0"],
    )
    state = run_distributed(_train_worker, 2, cfg, timeout=240)[0]
    return cfg, state, root / "run"


@pytest.mark.slow
def test_export_round_trip(trained, tmp_path):
    cfg, state, run = trained
    files = export_checkpoint(run / "checkpoints", tmp_path / "out", cfg.model)
    exported = load_file(files["model"])
    assert exported.keys() == state.keys()
    for name, tensor in state.items():
        assert torch.equal(exported[name], tensor), name
    model = load_exported(files["model"])
    tokens = torch.randint(0, cfg.model.vocab_size, (2, 16))
    assert torch.isfinite(model(tokens, n_grad=2)).all()
    with safe_open(str(files["model"]), framework="pt") as f:
        assert f.metadata()["step"] == "2"
    config = json.loads(files["config"].read_text())
    assert config["step"] == 2 and config["model"]["use_act"] is True

    bf16 = load_file(
        export_checkpoint(run / "checkpoints" / "step-2", tmp_path / "bf16", cfg.model, dtype="bfloat16")["model"]
    )
    assert bf16["tok_embeddings.weight"].dtype == torch.bfloat16
    assert bf16["recurrent.block.moe.router.expert_bias"].dtype == torch.float32  # selection-sensitive: kept exact


@pytest.mark.slow
def test_open_mythos_gives_the_same_logits(trained, tmp_path):
    reference = open_mythos_reference()
    cfg, _, run = trained
    files = export_checkpoint(run / "checkpoints", tmp_path / "out", cfg.model)
    kwargs = json.loads(files["config"].read_text())["open_mythos"]["config_kwargs"]
    assert kwargs == open_mythos_config_kwargs(cfg.model)
    theirs = reference.OpenMythos(reference.MythosConfig(**kwargs)).eval()
    theirs.load_state_dict(load_file(files["open_mythos"]), strict=True)
    ours = load_exported(files["model"]).eval()
    tokens = torch.randint(0, cfg.model.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for loops in (1, cfg.model.max_loop_iters):
            torch.testing.assert_close(theirs(tokens, n_loops=loops), ours(tokens, n_grad=loops), rtol=1e-4, atol=1e-4)
