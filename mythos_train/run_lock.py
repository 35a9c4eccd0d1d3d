"""One run per run_dir: two runs writing the same checkpoints destroy each other's work, and both exit 0.

Global rank 0 creates `<run_dir>/run.lock` (O_EXCL) holding its host, pid, the pid's start time and job id, and
removes it when the run ends. A lock left by a run that died is stale and taken over (logged):
  - on this host, one whose process is gone, whose pid is now another process (another start time), or whose
    pid is our own (a restarted container reuses pids); a live process of this host holds its lock whatever the
    job ids say (plain torchrun sets TORCHELASTIC_RUN_ID=none for every run; srun steps share SLURM_JOB_ID);
  - on another host, one of the same job (SLURM_JOB_ID, or torchrun's TORCHELASTIC_RUN_ID): an earlier attempt.
A lock of a live process, or of another host and job, refuses the run with a message naming its owner. An empty
or unreadable lock younger than WRITING_S is another run writing it: we wait for its content.
A stale lock is taken over under a takeover token (`run.lock.takeover`, O_EXCL: one of several racing runs holds
it): its holder re-reads the lock, and only if it is still stale replaces it with its own in one `os.replace`.
The lock path never stops existing during a takeover, so no racer can create a lock in between (moving the stale
lock aside first let two runs each believe they held it: one's fresh lock moved away while a third created one).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
import uuid
from pathlib import Path

from mythos_train.config import ConfigError

logger = logging.getLogger(__name__)

LOCK = "run.lock"
WRITING_S = 5.0
"Age under which an empty or unreadable lock is taken as being written by another run, not as left by a crash."
TAKEOVER_STALE_S = 60.0
"Age after which a takeover token is taken as left by a run that died mid-takeover (a takeover takes milliseconds)."
_WRITING = {"writing": True}


class RunDirInUse(ConfigError):
    """Another live run holds the run_dir."""


def job_id() -> str:
    """The scheduler's job id (SLURM_JOB_ID), else torchrun's run id, else '' (a plain process). Plain torchrun's
    run id "none" is the same for every run, so it is no id."""
    torchrun = os.environ.get("TORCHELASTIC_RUN_ID", "")
    return os.environ.get("SLURM_JOB_ID") or ("" if torchrun == "none" else torchrun)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def process_start(pid: int) -> int | None:
    """When process `pid` started (clock ticks since boot, /proc/<pid>/stat field 22), or None where unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


def stale_reason(owner: dict) -> str | None:
    """Why a lock with this content belongs to no live run (None: it may well be live)."""
    if owner is _WRITING:
        return None
    if not owner:
        return "the lock file is empty or unreadable"
    pid = int(owner.get("pid", 0))
    if owner.get("host") == socket.gethostname():
        if pid == os.getpid():
            return f"its pid {pid} is this process's own (a restarted container reuses pids)"
        if not _alive(pid):
            return f"process {pid} on this host is gone"
        if owner.get("pid_start") is not None and owner["pid_start"] != process_start(pid):
            return f"pid {pid} on this host is now another process (it started at another time)"
        return None
    if owner.get("job") and owner["job"] == job_id():
        return f"it is an earlier attempt of this job ({owner['job']})"
    return None


def describe(owner: dict) -> str:
    if owner is _WRITING:
        return "being written"
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(owner.get("started", 0)))
    return f"host {owner.get('host')}, pid {owner.get('pid')}, job {owner.get('job') or 'none'}, since {started}"


class RunDirLock:
    """The lock file of one run_dir; `acquire` raises RunDirInUse when a live run holds it."""

    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / LOCK
        self.held = False

    def owner(self) -> dict | None:
        """The content of an existing lock ({}: unreadable and old, _WRITING: unreadable and young), or None."""
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):  # being written this instant, or left half-written by a crash
            try:
                young = time.time() - self.path.stat().st_mtime < WRITING_S
            except FileNotFoundError:
                return None
            return _WRITING if young else {}

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
        deadline = time.monotonic() + 2 * WRITING_S
        while time.monotonic() < deadline:
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                if self.owner() is _WRITING:
                    time.sleep(0.1)
                    continue
                self.check()
                if self._take_over_stale():
                    self.held = True
                    return
                continue
            with os.fdopen(fd, "w") as stream:
                json.dump(self._own_content(), stream)
            self.held = True
            return
        raise RunDirInUse(f"{self.path}: could not take the lock (another run keeps taking it)")

    @staticmethod
    def _own_content() -> dict:
        owner = {"host": socket.gethostname(), "pid": os.getpid(), "pid_start": process_start(os.getpid())}
        return {**owner, "job": job_id(), "started": time.time()}

    def _take_over_stale(self) -> bool:
        """Under the takeover token, replace the lock with ours if it is (still) stale; False: not taken (the token
        is another run's, the lock is gone, or it is live now), to be tried again by `acquire`."""
        token = self.path.with_name(f"{LOCK}.takeover")
        try:
            os.close(os.open(token, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
        except FileExistsError:
            with contextlib.suppress(FileNotFoundError):
                if time.time() - token.stat().st_mtime > TAKEOVER_STALE_S:
                    token.unlink()  # its holder died mid-takeover
            time.sleep(0.05)
            return False
        try:
            owner = self.owner()
            reason = None if owner is None else stale_reason(owner)
            if reason is None:
                return False
            logger.warning("taking over the stale lock %s (%s): %s", self.path, describe(owner), reason)
            partial = self.path.with_name(f"{LOCK}.{uuid.uuid4().hex}.tmp")
            partial.write_text(json.dumps(self._own_content()))
            os.replace(partial, self.path)  # atomic: the lock is the stale one or ours, never absent
            return True
        finally:
            token.unlink(missing_ok=True)

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False
