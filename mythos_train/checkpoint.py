"""Sharded checkpoints with torch.distributed.checkpoint (DCP): save, keep the last K, resume, reshard.

Layout of one checkpoint, `<folder>/step-<N>/`:
    .metadata, __<rank>_0.distcp   DCP: {"model": model state (router biases are buffers in it), "optim": AdamW}
    train_state.json               rank 0: step, tokens, skip counters, LR scheduler, model config
    rank/rank<r>.pt                each rank's data-loader state and torch CPU (and CUDA) generator states
    rank/checksums<r>.json         size and CRC-32 of the files rank r wrote (rank 0: also .metadata, train state)
    COMPLETE                       written last by rank 0, once every rank's data is on disk

A checkpoint counts only with its COMPLETE marker, so a run killed mid-save resumes from the previous one.
Resuming from an older checkpoint than the newest (checkpoint.load_step, or a fallback) renames the newer ones to
`step-N.abandoned`, and retention (keep_last) counts only steps up to the one just saved. The
marker lists every other file with its size and CRC-32: each rank checksums the files it wrote into
rank/checksums<r>.json and rank 0 merges them, so no rank reads more than its own share (a multi-TB checkpoint read
by rank 0 alone would outlast the process-group timeout); resume verifies them, each rank a share, and falls back to the newest checkpoint that verifies, so a truncated shard or a lost .metadata
costs the steps since the previous checkpoint, not the run.
Nothing is ever unpickled freely (checkpoint_safety.py: the .metadata unpickler, `weights_only` loads; the
per-rank files are read with weights_only too, the rest is JSON). DCP reshards model and optimizer onto any mesh. The pre-tokenized loader's
state is one stream position, the same on every rank, so a rank without a file of its own (the run grew)
takes rank 0's and a run may resume on any number of ranks; the text loader's state is per rank and its
load_state_dict refuses another layout with a clear error.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import logging
import re
import shutil
import time
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)
from torch.distributed.tensor import DTensor

from mythos_train.checkpoint_safety import MARKER, checkpoint_keys, checksum_file, dcp_load, file_checksums, verify
from mythos_train.config import CheckpointConfig, ConfigError, ModelConfig
from mythos_train.distributed import fault_point

logger = logging.getLogger(__name__)

TRAIN_STATE = "train_state.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")
_CHECKSUMS_TIMEOUT_S = 600.0


# --------------------------------------------------------------------------- folder scanning


def checkpoint_dirs(folder: Path, complete_only: bool = True) -> list[tuple[int, Path]]:
    """(step, path) of the `step-N` directories in `folder`, oldest first; by default only complete ones."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        match = _STEP_DIR.match(path.name)
        if match and path.is_dir() and (not complete_only or (path / MARKER).is_file()):
            found.append((int(match.group(1)), path))
    return sorted(found)


def find_verified(folder: Path, step: int = -1) -> Path:
    """The newest complete checkpoint in `folder` that verifies (logging each one skipped), or exactly `step`'s.

    Raises FileNotFoundError when there is none, `step`'s is missing or damaged, or none verifies (starting
    from step 0 there would let retention delete them)."""
    complete = checkpoint_dirs(folder)
    if step >= 0:
        path = dict(complete).get(step)
        if path is None:
            raise FileNotFoundError(f"no complete checkpoint of step {step} in {folder}")
        if problem := verify(path):
            raise FileNotFoundError(f"{path} does not verify: {problem}")
        return path
    problems = []
    for _, path in reversed(complete):
        problem = verify(path)
        if problem is None:
            return path
        logger.warning("checkpoint %s does not verify (%s): falling back to an older one", path, problem)
        problems.append(f"{path.name}: {problem}")
    if problems:
        raise FileNotFoundError(_no_verified_message(folder, problems))
    raise FileNotFoundError(
        f"{folder}: no complete checkpoint that verifies (a step-N directory with a {MARKER} marker)"
    )


def _no_verified_message(folder: Path, problems: list[str]) -> str:
    return (
        f"{folder}: no complete checkpoint verifies ({'; '.join(problems)}). Restore the damaged files "
        f"(checkpoint.load_step resumes only one that verifies), or move the folder away to start a new run"
    )


def abandon_newer(folder: Path, step: int) -> None:
    """Rename every `step-N` directory with N > `step` to `step-N.abandoned`: a run rolled back to `step` starts a
    new branch, whose saves the old branch's newer steps must neither count against (retention) nor mix with."""
    for newer_step, path in checkpoint_dirs(folder, complete_only=False):
        if newer_step > step:
            target, copy = path.with_name(f"{path.name}.abandoned"), 1
            while target.exists():
                target, copy = path.with_name(f"{path.name}.abandoned.{copy}"), copy + 1
            path.rename(target)
            logger.warning("resuming from step %d: set the newer checkpoint %s aside as %s", step, path, target)


def find_latest(folder: Path) -> Path | None:
    """The newest complete checkpoint in `folder`, or None."""
    complete = checkpoint_dirs(folder)
    return complete[-1][1] if complete else None


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory itself, or the newest complete one inside a checkpoints folder."""
    path = Path(path)
    if (path / MARKER).is_file():
        if problem := verify(path):
            raise FileNotFoundError(f"{path} does not verify: {problem}")
        return path
    return find_verified(path)


def read_train_state(path: Path) -> dict:
    return json.loads((Path(path) / TRAIN_STATE).read_text())


INIT_ONLY = ("init_std", "injection_b_init")
"[model] fields that only set the initial weights."


def check_model_config(path: Path, model: ModelConfig, allowed: tuple[str, ...] | list[str] = ()) -> None:
    """Refuse a checkpoint trained with another [model] section, naming the fields: even a field that keeps every
    tensor shape (rope_theta, norm_eps) changes what the weights compute. `allowed` fields may differ, and so may
    the ones that only set the initial weights (the checkpoint's replace them). A field the checkpoint does not
    record is newer than it, so it was trained with that field's default."""
    recorded = read_train_state(path).get("model_config")
    if not recorded:
        return
    defaults = dataclasses.asdict(ModelConfig())
    changed = [
        f"{name} = {value!r} (checkpoint: {recorded.get(name, defaults[name])!r})"
        for name, value in dataclasses.asdict(model).items()
        if recorded.get(name, defaults[name]) != value and name not in (*allowed, *INIT_ONLY)
    ]
    if changed:
        raise ConfigError(
            f"{path} was trained with a different [model] section than the config given: model."
            + ", model.".join(changed)
            + "; use the checkpoint's values, or another checkpoint.folder / train.run_dir for a new model"
        )


def load_model_weights(model: nn.Module, path: Path, partial: bool = False) -> dict:
    """Load only the model state of checkpoint `path` into `model` (sharded or not); returns its train state.

    partial: parameters the checkpoint lacks keep their values and the checkpoint's others are ignored; both lists
    are logged (a curriculum stage that switches a recipe choice, checkpoint.init_from_changes)."""
    model_state = get_model_state_dict(model)
    if partial:
        stored = {key.removeprefix("model.") for key in checkpoint_keys(path) if key.startswith("model.")}
        for what, names in (("kept their init", model_state.keys() - stored), ("dropped", stored - model_state.keys())):
            if names:
                logger.info("init_from %s: parameters %s: %s", path, what, ", ".join(sorted(names)))
    state = {"model": model_state}
    dcp_load(state, path, allow_partial_load=partial)
    set_model_state_dict(model, state["model"])
    return read_train_state(path)


def init_source(cfg: CheckpointConfig, model: ModelConfig) -> Path:
    """checkpoint.init_from's verified checkpoint, trained with the same [model] section but for the fields in
    checkpoint.init_from_changes (ConfigError otherwise)."""
    try:
        path = resolve_checkpoint(cfg.init_from)
        check_model_config(path, model, cfg.init_from_changes)
    except (FileNotFoundError, ConfigError) as err:
        raise ConfigError(f"checkpoint.init_from = {cfg.init_from}: {err}") from None
    return path


# --------------------------------------------------------------------------- manager


class NonFiniteWeightsError(RuntimeError):
    """The model's weights hold NaN or inf: such a state is never saved as a complete checkpoint."""


def weights_finite(model: nn.Module) -> bool:
    """Whether every weight and buffer of every rank is finite (collective: call on every rank)."""
    bad = torch.zeros((), dtype=torch.float32, device=next(iter(model.state_dict().values())).device)
    for tensor in model.state_dict().values():
        local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
        if local.is_floating_point():
            bad = bad + (~torch.isfinite(local)).sum().float()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(bad)
    return bool(bad.item() == 0)


class CheckpointSpaceError(RuntimeError):
    """A save ran out of disk space; the newest complete checkpoint is untouched."""


def _out_of_space(err: BaseException) -> bool:
    """Whether a failed save ran out of space: ENOSPC or EDQUOT anywhere in the error chain (DCP wraps each rank's
    error in its CheckpointException text), or the "unexpected pos" torch's zip writer reports for a short write."""
    pending = [err]
    while pending:
        error = pending.pop()
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(text in str(error) for text in ("No space left on device", "Disk quota exceeded", "unexpected pos")):
            return True
        pending += [e for e in (error.__cause__, error.__context__) if e is not None]
    return False


class CheckpointManager:
    """Saves and restores everything a resumed run needs to continue bit-for-bit."""

    def __init__(
        self,
        cfg: CheckpointConfig,
        folder: Path,
        *,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        lr_scheduler: Any,
        data_loader: Any,
        model_config: ModelConfig,
    ) -> None:
        self.cfg = cfg
        self.model_config = model_config
        self.folder = Path(folder)
        self.model, self.optimizer, self.lr_scheduler, self.data_loader = model, optimizer, lr_scheduler, data_loader
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        # dcp.async_save on the default gloo group aborts (size mismatch), so it gets a group of its own.
        self.async_group = (
            dist.new_group(backend="gloo") if cfg.enabled and cfg.async_save and dist.is_initialized() else None
        )
        self.pending: tuple[Future, Path] | None = None

    # ----------------------------------------------------------------- save

    def should_save(self, step: int, last: bool) -> bool:
        return self.cfg.enabled and (last or step % self.cfg.every_steps == 0)

    def save(self, step: int, train_state: dict, *, last: bool = False) -> bool:
        """Checkpoint after optimizer step `step` if due; `train_state` is JSON-able (step, tokens, ...)."""
        if not self.should_save(step, last):
            return False
        self.wait()  # one save in flight at a time
        if not weights_finite(self.model):
            latest = find_latest(self.folder)
            raise NonFiniteWeightsError(
                f"step {step}: the model weights are not finite (NaN or inf), so no checkpoint was saved; the "
                f"newest complete one is {latest or 'none'}. Lower optim.lr or check the data, then resume."
            )
        path = self.folder / f"step-{step}"
        if self.rank == 0:
            if path.exists():  # a partial save of a killed run; never mix its shards with ours
                shutil.rmtree(path)
            path.mkdir(parents=True)
        _barrier()

        model_state, optim_state = get_state_dict(self.model, self.optimizer)
        state = {"model": model_state, "optim": optim_state}
        with self._space_errors(path):
            with self._failure_on_any_rank(path):  # else the others would wait in dcp.save until the timeout
                self._save_rank_state(path)
                if self.rank == 0:
                    full_state = dict(train_state, lr_scheduler=self.lr_scheduler.state_dict())
                    (path / TRAIN_STATE).write_text(json.dumps(full_state, indent=1))
            if self.async_group is None:
                dcp.save(state, checkpoint_id=path)
                with self._failure_on_any_rank(path):  # rank 0's marker
                    self._complete(path)
        if self.async_group is not None:
            self.pending = (dcp.async_save(state, checkpoint_id=path, process_group=self.async_group), path)
            if last:
                self.wait()
        return True

    @contextlib.contextmanager
    def _space_errors(self, path: Path) -> Iterator[None]:
        """Say "no space left" when a save fails for space, instead of DCP's or the zip writer's raw error."""
        try:
            yield
        except (Exception, CheckpointException) as err:
            if not _out_of_space(err):
                raise
            latest = find_latest(self.folder)
            intact = f"step {latest.name.removeprefix('step-')} ({latest})" if latest else "none (there is none)"
            raise CheckpointSpaceError(
                f"no space left on {self.folder}; last complete checkpoint {intact} is intact, {path.name} is not "
                f"complete. Free space (or lower checkpoint.keep_last) and resume."
            ) from err

    @contextlib.contextmanager
    def _failure_on_any_rank(self, path: Path) -> Iterator[None]:
        """Run rank-local writes, then agree (one all-reduce) on whether any rank failed, and raise on every rank
        if so: ENOSPC on one rank becomes the space error everywhere (through _space_errors), another error is
        re-raised where it happened and named on the other ranks."""
        error = None
        try:
            yield
        except Exception as err:  # re-raised below, after the other ranks learn of it
            error = err
        space = error is not None and _out_of_space(error)
        failed = [float(space), float(error is not None and not space)]
        if dist.is_initialized() and dist.get_world_size() > 1:
            flags = torch.tensor(failed, device=_device(self.model))
            dist.all_reduce(flags)
            failed = flags.tolist()
        if error is not None:
            raise error
        if failed[0]:
            raise OSError(errno.ENOSPC, f"No space left on device (another rank, writing {path})")
        if failed[1]:
            raise RuntimeError(f"{path}: {int(failed[1])} other rank(s) failed to write their checkpoint files")

    def poll(self) -> None:
        """Finish a background save whose data is all written (cheap; call every step): each rank checksums its
        files when its part is done; rank 0 marks the checkpoint complete once every rank's checksums are there."""
        if self.pending is not None and self.pending[0].done():
            future, path = self.pending
            with self._space_errors(path):
                future.result()
                if self._complete(path, block=False):
                    self.pending = None

    def wait(self) -> None:
        """Block until the background save (if any) is on disk, then mark it complete."""
        if self.pending is None:
            return
        future, path = self.pending
        self.pending = None
        with self._space_errors(path):
            future.result()
            self._complete(path, block=True)

    def _complete(self, path: Path, block: bool = True) -> bool:
        """Checksum this rank's files into its checksum file; rank 0 then writes the marker from every rank's (or,
        unless `block`, returns False while one is missing). Each rank reads only what it wrote: rank 0 alone
        reading a multi-TB checkpoint would outlast the process-group timeout."""
        # DCP's coordinator writes .metadata only after every rank's shards are written, and the save (or
        # its future) ends after that, so rank 0 may mark the checkpoint complete here.
        fault_point("save", int(path.name.removeprefix("step-")))  # test-only: MYTHOS_FAULT_KILL_AT_STEP=r:s:save
        own = path / checksum_file(self.rank)
        if not own.is_file():
            partial = own.with_name(f"{own.name}.tmp")
            partial.write_text(json.dumps(file_checksums(path, self.rank)))
            partial.rename(own)
        if self.rank != 0:
            return True
        world_size = dist.get_world_size() if dist.is_initialized() else 1
        checksums = [path / checksum_file(rank) for rank in range(world_size)]
        deadline = time.monotonic() + _CHECKSUMS_TIMEOUT_S
        while not all(file.is_file() for file in checksums):
            if not block:
                return False
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{path}: not every rank wrote its {checksum_file(0)} within {_CHECKSUMS_TIMEOUT_S} s"
                )
            time.sleep(0.05)
        files = dict(sorted(item for file in checksums for item in json.loads(file.read_text()).items()))
        marker = path / f"{MARKER}.tmp"
        marker.write_text(json.dumps({"files": files}, indent=0))
        marker.rename(path / MARKER)  # atomic: a marker is whole or absent
        logger.info("checkpoint saved: %s", path)
        step = int(path.name.removeprefix("step-"))
        older = [old for old_step, old in checkpoint_dirs(self.folder) if old_step <= step]
        for old in older[: -self.cfg.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        return True

    def _save_rank_state(self, path: Path) -> None:
        state = {"data_loader": self.data_loader.state_dict(), "rng_cpu": torch.get_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["rng_cuda"] = torch.cuda.get_rng_state()
        (path / "rank").mkdir(exist_ok=True)
        torch.save(state, path / "rank" / f"rank{self.rank}.pt")

    # ----------------------------------------------------------------- load

    def load(self) -> dict | None:
        """Restore the newest complete checkpoint; returns its train state, or None when there is none (or resume is off)."""
        if not (self.cfg.enabled and self.cfg.resume):
            return None
        step = self._pick_verified()
        if step < 0:
            return None
        path = self.folder / f"step-{step}"
        check_model_config(path, self.model_config)
        configured = _hyperparameters(self.optimizer, self.lr_scheduler)
        model_state, optim_state = get_state_dict(self.model, self.optimizer)
        state = {"model": model_state, "optim": optim_state}
        dcp_load(state, path)
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])

        train_state = read_train_state(path)
        self.lr_scheduler.load_state_dict(train_state.pop("lr_scheduler"))
        _restore_hyperparameters(self.optimizer, self.lr_scheduler, configured)
        self._load_rank_state(path)
        logger.info("resumed from %s (step %d)", path, train_state["step"])
        return train_state

    def init_from(self) -> None:
        """A new run's start from checkpoint.init_from's model weights (a curriculum stage), if set."""
        if self.cfg.init_from:
            path = init_source(self.cfg, self.model_config)
            step = load_model_weights(self.model, path, partial=bool(self.cfg.init_from_changes))["step"]
            logger.info("initialised the model from %s (its step %d); optimizer and step start fresh", path, step)

    def _pick_verified(self) -> int:
        """The step to resume (-1: none): rank 0 lists the candidates (on a shared file system other ranks could
        list the folder differently), newest first or load_step's; every rank verifies its share of each
        candidate's files and one all-reduce says whether all passed. Newer checkpoints than the one resumed are
        set aside (a rollback starts a new branch). ConfigError, naming why, when the one asked for by
        load_step, or every complete one, does not verify."""
        load_step, world_size = self.cfg.load_step, dist.get_world_size() if dist.is_initialized() else 1
        candidates = []
        if self.rank == 0:
            complete = dict(checkpoint_dirs(self.folder))
            candidates = sorted(complete, reverse=True) if load_step < 0 else [s for s in complete if s == load_step]
        asked = f"checkpoint.load_step = {load_step}: " if load_step >= 0 else ""
        problems = []
        for i in range(_broadcast_int(len(candidates), self.model)):
            step = _broadcast_int(candidates[i] if self.rank == 0 else 0, self.model)
            path = self.folder / f"step-{step}"
            problem = verify(path, self.rank, world_size)
            if problem:
                logger.warning("checkpoint %s does not verify (%s): falling back to an older one", path, problem)
            bad = torch.tensor([float(problem is not None)], device=_device(self.model))
            if dist.is_initialized() and world_size > 1:
                dist.all_reduce(bad)
            if not bad.item():
                if self.rank == 0:
                    abandon_newer(self.folder, step)
                return step
            problems.append(f"{path.name}: {problem or 'a file of another rank does not verify (its log says which)'}")
        if load_step >= 0 and not problems:
            raise ConfigError(f"{asked}no complete checkpoint of step {load_step} in {self.folder}")
        if load_step >= 0:
            raise ConfigError(f"{asked}{self.folder / f'step-{load_step}'} does not verify: {problems[0]}")
        if problems:
            raise ConfigError(_no_verified_message(self.folder, problems))
        return -1

    def _load_rank_state(self, path: Path) -> None:
        file = path / "rank" / f"rank{self.rank}.pt"
        state = torch.load(file if file.is_file() else path / "rank" / "rank0.pt", weights_only=True)
        self.data_loader.load_state_dict(state["data_loader"])
        torch.set_rng_state(state["rng_cpu"])
        if "rng_cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["rng_cuda"])

    def close(self) -> None:
        self.wait()
        if self.async_group is not None:
            dist.destroy_process_group(self.async_group)
            self.async_group = None


def _hyperparameters(optimizer: torch.optim.Optimizer, lr_scheduler: Any) -> dict:
    """The optimizer's per-group settings and the schedule's base LRs, as the config built them."""
    groups = [{k: v for k, v in group.items() if k not in ("params", "lr")} for group in optimizer.param_groups]
    return {"groups": groups, "base_lrs": list(lr_scheduler.base_lrs)}


def _restore_hyperparameters(optimizer: torch.optim.Optimizer, lr_scheduler: Any, configured: dict) -> None:
    """After a resume the config's hyper-parameters win over the checkpoint's (a run saved with a bad LR can be
    rescued by changing the config); each change is logged. The schedule's position stays the checkpoint's."""
    saved = _hyperparameters(optimizer, lr_scheduler)
    if saved == configured:
        return
    changes = [
        f"group {i} {key}: {saved_group.get(key)!r} -> {value!r}"
        for i, (saved_group, group) in enumerate(zip(saved["groups"], configured["groups"], strict=True))
        for key, value in group.items()
        if saved_group.get(key) != value and key not in ("fused", "foreach")  # kernel choice, not a setting
    ]
    if saved["base_lrs"] != configured["base_lrs"]:
        changes.append(f"base lr: {saved['base_lrs']} -> {configured['base_lrs']}")
    for group, settings in zip(optimizer.param_groups, configured["groups"], strict=True):
        group.update(settings)
    lr_scheduler.base_lrs = configured["base_lrs"]
    for group, base_lr, factor in zip(
        optimizer.param_groups, lr_scheduler.base_lrs, lr_scheduler.lr_lambdas, strict=True
    ):
        group["lr"] = base_lr * factor(lr_scheduler.last_epoch)
    lr_scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
    if changes:
        logger.info("resumed with the config's optimizer settings instead of the checkpoint's: %s", "; ".join(changes))


def _broadcast_int(value: int, model: nn.Module) -> int:
    """Rank 0's `value` on every rank (on the model's device, which NCCL needs)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return value
    t = torch.tensor([value], dtype=torch.int64, device=_device(model))
    dist.broadcast(t, src=0)
    return int(t.item())


def _device(model: nn.Module) -> torch.device:
    """The model's device: collectives on the default group need it (NCCL takes no CPU tensors)."""
    param = next(model.parameters())
    return param.to_local().device if isinstance(param, DTensor) else param.device


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
