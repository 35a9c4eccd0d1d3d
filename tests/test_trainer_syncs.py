"""The trainer's "one host sync per step", counted over the whole `train_step` in one process (the multi-rank
count, where expert parallelism adds its split sizes, is in test_trainer_ranks.py)."""

from trainer_testing import prepare_tiny_data, step_host_syncs, tiny_config

from mythos_train.distributed import destroy_distributed, init_distributed
from mythos_train.trainer import Trainer


def test_one_host_sync_per_train_step(tmp_path):
    cfg = tiny_config(prepare_tiny_data(tmp_path / "data"), tmp_path / "run", ["--checkpoint.enabled=false"])
    trainer = Trainer(cfg, init_distributed(cfg))
    try:
        trainer.train_step(trainer.next_micro_batches())  # first step: lazy FSDP and AdamW state set-up
        trainer.step += 1
        syncs = step_host_syncs(trainer, trainer.next_micro_batches())
    finally:
        trainer.close()
        destroy_distributed()
    assert syncs == {"tolist": 1}, syncs  # the loss and gradient norm, read together for the finite check
