"""A small canary dataset made by the canary command's own code path (configs/canary.toml, fewer programs)."""

from __future__ import annotations

from pathlib import Path

from mythos_train.canary import write_canary
from mythos_train.config import JobConfig, load_config

CANARY_TOML = Path(__file__).resolve().parent.parent / "configs" / "canary.toml"


def canary_config(root: Path, *overrides: str) -> JobConfig:
    """configs/canary.toml scaled down to test size, with its files under `root`."""
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
            "--model.max_seq_len=64",
            "--train.micro_batch_size=4",
            "--model.dim=32",
            "--train.device=cpu",
            "--checkpoint.enabled=false",
            *overrides,
        ],
    )


def prepare_canary(root: Path) -> JobConfig:
    cfg = canary_config(root)
    write_canary(cfg)
    return cfg
