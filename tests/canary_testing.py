"""A small canary dataset made by the canary command's own code path (configs/canary.toml, fewer programs)."""

from __future__ import annotations

from pathlib import Path

from model_testing import DIM32, tiny_model_flags

from mythos_train.canary import write_canary
from mythos_train.config import JobConfig, load_config

CANARY_TOML = Path(__file__).resolve().parent.parent / "configs" / "canary.toml"


def canary_config(root: Path, *overrides: str) -> JobConfig:
    """configs/canary.toml scaled down to test size (the tiny test model at dim 32 with the canary's vocabulary, seq 64
    and depths up to 8), with its files under `root`."""
    vocab = load_config(CANARY_TOML).data.vocab_size  # the canary tokenizer's
    model = tiny_model_flags(**(DIM32 | dict(vocab_size=vocab, max_seq_len=64, max_loop_iters=8)))
    return load_config(
        CANARY_TOML,
        [
            f"--canary.dir={root / 'text'}",
            f"--data.prepared_dir={root / 'prepared'}",
            f"--train.run_dir={root / 'run'}",
            "--canary.programs=3000",
            "--canary.eval_programs=8",
            "--data.val_fraction=0.1",
            "--train.seq_len=64",
            "--train.micro_batch_size=4",
            *model,
            "--train.device=cpu",
            "--checkpoint.enabled=false",
            *overrides,
        ],
    )


def prepare_canary(root: Path, *overrides: str) -> JobConfig:
    cfg = canary_config(root, *overrides)
    write_canary(cfg)
    return cfg
