"""torch.profiler on a wait/warmup/active/repeat schedule, one Chrome trace per rank and cycle, and CUDA
memory snapshots (GPU only) after the profiled steps."""

from __future__ import annotations

import contextlib
import logging
import pickle
from collections.abc import Iterator
from pathlib import Path

import torch

from mythos_train.config import ProfileConfig

logger = logging.getLogger(__name__)


class Profiler:
    """Call `step()` once per optimizer step; a no-op when profiling is off."""

    def __init__(self, cfg: ProfileConfig, run_dir: Path, rank: int, device: torch.device) -> None:
        self.cfg = cfg
        self.folder = Path(run_dir) / "profile"
        self.rank = rank
        self.profiler: torch.profiler.profile | None = None
        self.snapshot = cfg.enabled and cfg.memory_snapshot and device.type == "cuda"
        self.steps = 0
        if not cfg.enabled:
            return
        activities = [torch.profiler.ProfilerActivity.CPU]
        if device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self.profiler = torch.profiler.profile(
            activities=activities,
            schedule=torch.profiler.schedule(wait=cfg.wait, warmup=cfg.warmup, active=cfg.active, repeat=cfg.repeat),
            on_trace_ready=self._write_trace,
            record_shapes=True,
            profile_memory=True,
            with_stack=False,
        )
        if self.snapshot:
            torch.cuda.memory._record_memory_history(max_entries=100_000)

    def _write_trace(self, prof: torch.profiler.profile) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"rank{self.rank}_step{self.steps}.json"
        prof.export_chrome_trace(str(path))
        logger.info("profiler trace written: %s", path)

    def start(self) -> None:
        if self.profiler is not None:
            self.profiler.start()

    def step(self) -> None:
        if self.profiler is None:
            return
        self.steps += 1
        self.profiler.step()
        if self.snapshot and self.steps == self.cfg.wait + self.cfg.warmup + self.cfg.active:
            self._dump_snapshot()

    def _dump_snapshot(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"rank{self.rank}_memory_snapshot_step{self.steps}.pickle"
        with open(path, "wb") as f:
            pickle.dump(torch.cuda.memory._snapshot(), f)
        torch.cuda.memory._record_memory_history(enabled=None)
        self.snapshot = False
        logger.info("CUDA memory snapshot written: %s (open with pytorch.org/memory_viz)", path)

    def stop(self) -> None:
        if self.profiler is not None:
            self.profiler.stop()
            self.profiler = None
        if self.snapshot:
            self._dump_snapshot()


@contextlib.contextmanager
def profiling(cfg: ProfileConfig, run_dir: Path, rank: int, device: torch.device) -> Iterator[Profiler]:
    """Profiler started on entry and stopped (traces flushed) on exit, also on error."""
    profiler = Profiler(cfg, run_dir, rank, device)
    profiler.start()
    try:
        yield profiler
    finally:
        profiler.stop()
