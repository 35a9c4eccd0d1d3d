"""The trainer under tensor parallelism: a 20-step loss curve equal at tp 1 and tp 2 (same data-parallel size, so
the same tokens), and a checkpoint saved at tp 2 resumed at tp 1 (DCP reshards the DTensors) continuing the data
stream exactly: its losses are the uninterrupted tp 1 run's, and its loader ends where that run's did (and back:
a tp 1 checkpoint resumed at tp 2)."""

from __future__ import annotations

import pytest
from distributed_testing import run_distributed
from trainer_testing import config_file, prepare_tiny_data

from mythos_train.config import load_config

STEPS = 20
COMMON = [
    f"--train.steps={STEPS}",
    "--model.dense_ffn_dim=96",  # the tiny job's default 85 does not split over tp 2
    "--checkpoint.every_steps=10",
    "--metrics.tensorboard=false",
    "--eval.every_steps=0",
    "--eval.sample_tokens=0",
]


def train_job(rank: int, world: int, config: str, overrides: list[str]) -> dict:
    """Train (resuming from the run_dir's checkpoint if asked); each step's loss and the loader's final state."""
    from mythos_train.distributed import init_distributed
    from mythos_train.trainer import Trainer

    cfg = load_config(config, COMMON + overrides)
    trainer = Trainer(cfg, init_distributed(cfg))
    losses, train_step = [], trainer.train_step

    def recording(micro_batches):
        result = train_step(micro_batches)
        losses.append(result.loss)
        return result

    trainer.train_step = recording
    try:
        trainer.train()
        head = trainer.model.tok_embeddings.weight
        return {"losses": losses, "loader": trainer.data_loader.state_dict(), "last_eval": trainer.last_eval,
                "tp": trainer.dims.tp, "embedding": str(getattr(head, "placements", "plain")),
                "telemetry": trainer.loop_telemetry()}  # fmt: skip
    finally:
        trainer.close()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    data_dir = prepare_tiny_data(tmp_path_factory.mktemp("data"))
    runs_dir = tmp_path_factory.mktemp("runs")
    config = str(config_file(data_dir, runs_dir / "job"))
    tp1 = run_distributed(train_job, 1, config, [f"--train.run_dir={runs_dir / 'tp1'}"], timeout=900)[0]
    tp2 = run_distributed(train_job, 2, config, [f"--train.run_dir={runs_dir / 'tp2'}", "--parallel.tp=2"], timeout=900)
    resumed = run_distributed(
        train_job, 1, config, [f"--train.run_dir={runs_dir / 'tp2'}", "--checkpoint.load_step=10"], timeout=900
    )[0]
    back = run_distributed(
        train_job, 2, config, [f"--train.run_dir={runs_dir / 'tp1'}", "--checkpoint.load_step=10", "--parallel.tp=2"]
    )
    return tp1, tp2, resumed, back


@pytest.mark.slow
def test_loss_curve_equal_at_tp1_and_tp2(runs):
    tp1, tp2, *_ = runs
    assert len(tp1["losses"]) == STEPS
    assert [rank["tp"] for rank in tp2] == [2, 2] and "Shard(dim=0)" in tp2[0]["embedding"], tp2[0]
    for rank in tp2:
        assert rank["losses"] == pytest.approx(tp1["losses"], rel=1e-4), (tp1["losses"], rank["losses"])
        assert rank["last_eval"] == pytest.approx(tp1["last_eval"], rel=1e-4)
        assert rank["telemetry"] == pytest.approx(tp1["telemetry"], rel=1e-4)  # the whole sequence's, not a slice's


@pytest.mark.slow
def test_checkpoints_reshard_from_tp2_to_tp1_and_back_with_the_data_stream_continuing(runs):
    tp1, _, resumed, back = runs
    for run in (resumed, *back):
        assert len(run["losses"]) == STEPS - 10
        assert run["losses"] == pytest.approx(tp1["losses"][10:], rel=1e-4), (tp1["losses"], run["losses"])
        assert run["loader"] == tp1["loader"]
    assert resumed["tp"] == 1 and [rank["tp"] for rank in back] == [2, 2]
