"""Start-up checks: what can fail a run later is checked before it trains, and `train --validate-only` runs
them all once, before torchrun, so an error is reported once instead of by every worker of every restart."""

from __future__ import annotations

import os
from pathlib import Path

from mythos_train.checkpoint import check_model_config, checkpoint_dirs, find_verified, init_source
from mythos_train.config import ConfigError, JobConfig, validate
from mythos_train.run_lock import RunDirLock


def check_paths(cfg: JobConfig) -> None:
    """train.run_dir and the checkpoint folder must be (or be creatable as) writable directories: found at
    start-up, not at the first save."""
    folders = {"train.run_dir": cfg.train.run_dir}
    folders["checkpoint.folder" if cfg.checkpoint.folder else "train.run_dir (checkpoints)"] = checkpoint_folder(cfg)
    for field, folder in folders.items():
        existing = Path(folder).absolute()
        while not existing.exists():
            existing = existing.parent
        if not existing.is_dir():
            raise ConfigError(f"{field} = {folder}: {existing} is a file, not a directory")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise ConfigError(f"{field} = {folder}: {existing} is not writable")


def preflight(cfg: JobConfig, world_size: int) -> str:
    """Every check that needs no process group, for `train --validate-only` (the launchers run it once before
    torchrun, so a bad config is reported once instead of on every restart). Returns what the run would do."""
    from mythos_train.trainer import check_vocab  # trainer imports this module

    validate(cfg, world_size)
    check_vocab(cfg)
    check_paths(cfg)
    RunDirLock(cfg.train.run_dir).check()
    folder = checkpoint_folder(cfg)
    resume = cfg.checkpoint.enabled and cfg.checkpoint.resume and checkpoint_dirs(folder)
    if not resume:
        start = f", initialised from {init_source(cfg.checkpoint, cfg.model)}" if cfg.checkpoint.init_from else ""
        return f"config ok for {world_size} ranks: a new run in {cfg.train.run_dir}{start}"
    try:
        path = find_verified(folder, cfg.checkpoint.load_step)
    except FileNotFoundError as err:  # complete checkpoints exist, so none verifying is an error too
        asked = f"checkpoint.load_step = {cfg.checkpoint.load_step}: " if cfg.checkpoint.load_step >= 0 else ""
        raise ConfigError(f"{asked}{err}") from None
    check_model_config(path, cfg.model)
    return f"config ok for {world_size} ranks: resumes from {path}"


def checkpoint_folder(cfg: JobConfig) -> Path:
    return Path(cfg.checkpoint.folder) if cfg.checkpoint.folder else Path(cfg.train.run_dir) / "checkpoints"
