"""The trainer's mixture hooks: realised shares reach the logged data stats, and the evaluator's validation loss
of each source equals the loss computed on that source's data alone (an evaluator configured without mixture)."""

import pytest
from trainer_testing import prepare_tiny_data, tiny_config

from mythos_train.distributed import destroy_distributed, init_distributed
from mythos_train.evaluate import Evaluator
from mythos_train.trainer import Trainer


@pytest.fixture(scope="module")
def two_datasets(tmp_path_factory):
    """The tiny dataset and a second one (other text) prepared with its tokenizer."""
    root = tmp_path_factory.mktemp("mix")
    first = prepare_tiny_data(root)
    other = ("random", "dataclasses", "argparse", "ast")
    tokenizer = str(first / "tokenizer.model")
    second = prepare_tiny_data(root, other, text="other", out="second", tokenizer_path=tokenizer, val_fraction=0.5)
    return first, second


def test_per_source_validation_loss_and_logged_shares(two_datasets, tmp_path):
    first, second = two_datasets
    mixture = f"--data.mixture=[a=0.75:{first},b=0.25:{second}]"
    cfg = tiny_config(first, tmp_path / "run", [mixture, "--checkpoint.enabled=false", "--data.mixture_block=4"])
    trainer = Trainer(cfg, init_distributed(cfg))
    try:
        for _ in range(2):
            trainer.train_step(trainer.next_micro_batches())
        stats = trainer.data_stats()
        assert stats["data/share/a"] == 0.75 and stats["data/share/b"] == 0.25  # 8 windows = 2 blocks of 4
        by_source = trainer.evaluator.source_losses()
        loops = max(cfg.eval.loop_counts)
        for name, directory in (("a", first), ("b", second)):
            alone = tiny_config(directory, tmp_path / f"alone_{name}", ["--checkpoint.enabled=false"])
            evaluator = Evaluator(alone, trainer.model, trainer.dims, trainer.device, trainer.metrics, tmp_path)
            assert by_source[name] == pytest.approx(evaluator.losses(loop_counts=[loops])[loops], rel=1e-6)
        assert by_source["a"] != pytest.approx(by_source["b"], rel=1e-3)
    finally:
        trainer.close()
        destroy_distributed()
