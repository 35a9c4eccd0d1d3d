"""One run per run_dir: two runs writing the same checkpoints destroy each other's work, and both exit 0.

Global rank 0 creates `<run_dir>/run.lock` (O_EXCL) holding its host, pid and job id, and removes it when the
run ends. A lock left by a run that died is stale and taken over (logged): one of the same job (SLURM_JOB_ID, or
torchrun's TORCHELASTIC_RUN_ID: an earlier attempt of this very run), or one whose process is gone on this host.
A lock of a live process, or of another host and job, refuses the run with a message naming its owner.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from pathlib import Path

from mythos_train.config import ConfigError

logger = logging.getLogger(__name__)

LOCK = "run.lock"


class RunDirInUse(ConfigError):
    """Another live run holds the run_dir."""


def job_id() -> str:
    """The scheduler's job id (SLURM_JOB_ID), else torchrun's run id, else '' (a plain process)."""
    return os.environ.get("SLURM_JOB_ID") or os.environ.get("TORCHELASTIC_RUN_ID") or ""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def stale_reason(owner: dict) -> str | None:
    """Why a lock with this content belongs to no live run (None: it may well be live)."""
    if not owner:
        return "the lock file is empty or unreadable"
    if owner.get("job") and owner["job"] == job_id():
        return f"it is an earlier attempt of this job ({owner['job']})"
    if owner.get("host") == socket.gethostname() and not _alive(int(owner.get("pid", 0))):
        return f"process {owner.get('pid')} on this host is gone"
    return None


def describe(owner: dict) -> str:
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(owner.get("started", 0)))
    return f"host {owner.get('host')}, pid {owner.get('pid')}, job {owner.get('job') or 'none'}, since {started}"


class RunDirLock:
    """The lock file of one run_dir; `acquire` raises RunDirInUse when a live run holds it."""

    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / LOCK
        self.held = False

    def owner(self) -> dict | None:
        """The content of an existing lock (an unreadable one counts as held by nobody known), or None."""
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):  # being written this instant, or left half-written by a crash
            return {} if time.time() - self.path.stat().st_mtime > 10 else None

    def check(self) -> None:
        """Raise RunDirInUse if a live run holds the lock (without taking it: for --validate-only)."""
        owner = self.owner()
        if owner is not None and stale_reason(owner) is None:
            raise RunDirInUse(
                f"{self.path.parent} is in use by another run ({describe(owner)}): wait for it, or give this run "
                f"another train.run_dir. If that run is dead (its host is gone), delete {self.path}."
            )

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self.check()
                owner = self.owner() or {}
                logger.warning(
                    "taking over the stale lock %s (%s): %s", self.path, describe(owner), stale_reason(owner)
                )
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as stream:
                json.dump(
                    {"host": socket.gethostname(), "pid": os.getpid(), "job": job_id(), "started": time.time()}, stream
                )
            self.held = True
            return
        raise RunDirInUse(f"{self.path}: could not take the lock (another run keeps taking it)")

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False
