"""Config errors name the field, before any process group exists; every shipped TOML loads and validates."""

import dataclasses
from pathlib import Path

import pytest

from mythos_train.config import ConfigError, JobConfig, field_docs, load_config, mesh_sizes, validate

CONFIGS = sorted(Path(__file__).parent.parent.joinpath("configs").glob("*.toml"))


def _write(tmp_path, text):
    path = tmp_path / "job.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_shipped_configs_validate(path):
    cfg = load_config(path)
    world = cfg.parallel.ep * cfg.parallel.dp_replicate
    validate(cfg, world_size=world)
    assert cfg.model.vocab_size == cfg.data.vocab_size


def test_every_field_has_a_docstring():
    for section in dataclasses.fields(JobConfig):
        cls = type(getattr(JobConfig(), section.name))
        docs = field_docs(cls)
        missing = [f.name for f in dataclasses.fields(cls) if not docs.get(f.name)]
        assert not missing, f"[{section.name}] fields without a docstring: {missing}"


def test_unknown_key_suggests_closest(tmp_path):
    with pytest.raises(ConfigError, match=r"job.toml: model: unknown key 'n_head'.*n_heads"):
        load_config(_write(tmp_path, "[model]\nn_head = 4\n"))
    with pytest.raises(ConfigError, match=r"unknown section '\[modle\]'.*model"):
        load_config(_write(tmp_path, "[modle]\ndim = 4\n"))


def test_wrong_type_names_field(tmp_path):
    with pytest.raises(ConfigError, match=r"model.dim: expected int, got 'big'"):
        load_config(_write(tmp_path, '[model]\ndim = "big"\n'))
    with pytest.raises(ConfigError, match=r"model.dim: expected int, got 1.5"):
        load_config(overrides=["--model.dim=1.5"])
    with pytest.raises(ConfigError, match=r"parallel.activation_checkpoint: 'some' is not one of"):
        load_config(overrides=["--parallel.activation_checkpoint=some"])
    with pytest.raises(ConfigError, match=r"invalid TOML"):
        load_config(_write(tmp_path, "[model\n"))


def test_cli_overrides_typed():
    cfg = load_config(
        overrides=[
            "--model.dim=64",
            "--train.mean_depth",
            "3",
            "--eval.loop_counts=[1,2,3]",
            "--metrics.tensorboard=false",
        ]
    )
    assert cfg.model.dim == 64 and cfg.train.mean_depth == 3.0 and isinstance(cfg.train.mean_depth, float)
    assert cfg.eval.loop_counts == [1, 2, 3] and cfg.metrics.tensorboard is False
    with pytest.raises(ConfigError, match="expected --section.field=value"):
        load_config(overrides=["--dim=3"])


@pytest.mark.parametrize(
    "overrides, world, message",
    [
        (["--model.dim=100", "--model.n_heads=8"], 1, r"model.dim \(100\) must be divisible by model.n_heads \(8\)"),
        (["--model.expert_dim=100"], 1, r"model.expert_dim \(100\) must be a multiple of 8"),
        (
            ["--model.n_experts=6", "--parallel.ep=4"],
            4,
            r"model.n_experts \(6\) must be divisible by parallel.ep \(4\)",
        ),
        (["--parallel.dp_shard=3"], 4, r"dp_replicate\(1\) x dp_shard\(3\) = 3 != world size 4"),
        (["--parallel.dp_replicate=2", "--parallel.ep=4"], 4, r"parallel.ep \(4\) must divide parallel.dp_shard \(2\)"),
        (
            ["--train.backprop_depth=20", "--train.max_depth=16"],
            1,
            r"train.backprop_depth \(20\) must be in \[1, train.max_depth",
        ),
        (["--train.mean_depth=40"], 1, r"train.mean_depth \(40.0\) must lie in"),
        (
            ["--train.seq_len=4096", "--model.max_seq_len=1024"],
            1,
            r"train.seq_len \(4096\) must be <= model.max_seq_len",
        ),
        (
            [
                "--parallel.tp=2",
                "--model.dense_ffn_dim=344",
                "--parallel.compile=true",
                "--parallel.activation_checkpoint=full",
            ],
            2,
            r"parallel.activation_checkpoint = 'full' with parallel.compile and parallel.tp > 1",
        ),
    ],
)
def test_semantic_conflicts(overrides, world, message):
    cfg = load_config(overrides=overrides)
    with pytest.raises(ConfigError, match=message):
        validate(cfg, world_size=world)


def test_mesh_sizes_hsdp_and_ep():
    cfg = load_config(overrides=["--parallel.dp_replicate=2", "--parallel.ep=2"])
    assert mesh_sizes(cfg.parallel, 8) == {"dp_replicate": 2, "dp_shard": 4, "ep": 2, "efsdp": 2, "tp": 1}
    cfg = load_config(overrides=["--parallel.dp_replicate=2", "--parallel.ep=2", "--parallel.tp=2"])
    assert mesh_sizes(cfg.parallel, 16) == {"dp_replicate": 2, "dp_shard": 4, "ep": 2, "efsdp": 2, "tp": 2}
