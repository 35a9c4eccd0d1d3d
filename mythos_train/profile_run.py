"""`python -m mythos_train profile --config job.toml`: a few warm training steps under torch.profiler, read back.

Runs the trainer's own step (same model, sharding, data and depth sampler as `train`, under any launcher and
world size), then profiles `--steps` more, each inside a `mythos:step` range. Every rank writes its Chrome trace
(`<run_dir>/profile/rank<N>.json`, open in Perfetto or chrome://tracing) and reads it back
(mythos_train/profile_trace.py); rank 0 gathers the readings, asks the planner (mythos_train/planner) about the same
config and prints the per-rank tables, the straggler view and the planner's prediction next to the measurement,
and writes `phases.png` beside the traces. Nothing is checkpointed, evaluated or logged to TensorBoard.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.autograd.profiler import record_function

from mythos_train.config import ConfigError, JobConfig, validate
from mythos_train.distributed import DistInfo, destroy_distributed, env_world_size, init_distributed
from mythos_train.dtypes import resolve_param_dtype
from mythos_train.profile_report import render, write_png
from mythos_train.profile_trace import STEP_RANGE, read_trace

logger = logging.getLogger(__name__)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def static_bytes(trainer) -> int:
    """Bytes this rank holds between steps: local parameter shards, buffers and optimizer state."""
    local = [getattr(t, "_local_tensor", t) for t in [*trainer.model.parameters(), *trainer.model.buffers()]]
    for state in trainer.optimizer.state.values():
        local += [getattr(t, "_local_tensor", t) for t in state.values() if isinstance(t, torch.Tensor)]
    return sum(t.numel() * t.element_size() for t in local)


def link_bytes_per_s(device: torch.device, size: int = 1 << 22, repeats: int = 3) -> float | None:
    """All-reduce bus bandwidth between the ranks (median of `repeats` of `size` bytes); None on one rank."""
    world = dist.get_world_size()
    if world == 1:
        return None
    buffer = torch.ones(size // 4, device=device)
    dist.all_reduce(buffer)
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        dist.all_reduce(buffer)
        _sync(device)
        times.append(time.perf_counter() - start)
    return 2 * (world - 1) / world * size / statistics.median(times)


def profiled_steps(trainer, steps: int, folder: Path) -> tuple[dict, list[float], list[tuple[int, int]]]:
    """Run `steps` training steps under the profiler; returns (trace reading, perf_counter ms per step, depths)."""
    device = trainer.device
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    measured, depths = [], []
    with torch.profiler.profile(activities=activities, profile_memory=True) as prof:
        for _ in range(steps):
            depths.append(trainer.depth.sample(trainer.step))
            _sync(device)
            start = time.perf_counter()
            with record_function(STEP_RANGE):
                with record_function("mythos:data"):
                    micro_batches = trainer.next_micro_batches()
                trainer.train_step(micro_batches)
                _sync(device)
            measured.append((time.perf_counter() - start) * 1e3)
            trainer.step += 1
    path = folder / f"rank{trainer.dist.rank}.json"
    prof.export_chrome_trace(str(path))
    return read_trace(path, trainer.model.parallel_plan()).to_dict() | {"trace": str(path)}, measured, depths


def planner_prediction(cfg: JobConfig, trainer, depths: list[tuple[int, int]], gpu: str | None) -> dict:
    """The planner's step time, exposed communication and peak memory for this config, world and device.

    On CPU it prices the job with this machine's measured numbers: the trainer's matmul peak and the all-reduce
    bandwidth between the ranks (divided by the planner's collective efficiency, which it applies again).
    """
    from mythos_train.planner.comm import COLLECTIVE_EFFICIENCY
    from mythos_train.planner.hardware import ACCELERATORS, Accelerator, get_accelerator
    from mythos_train.planner.plan import build_plan, depth_stats, memory_plan

    device, world = trainer.device, trainer.dist.world_size
    link = link_bytes_per_s(device)  # a collective: every rank calls this function
    cfg = copy.deepcopy(cfg)
    cfg.parallel.param_dtype = resolve_param_dtype(cfg.parallel.param_dtype, device.type)
    if gpu:
        hw = get_accelerator(gpu)
    elif device.type == "cuda":
        name = torch.cuda.get_device_name(device).lower()
        hw = next((a for key, a in ACCELERATORS.items() if key in name), None)
        if hw is None:
            return {"error": f"no planner accelerator matches {name!r}: pass --gpu"}
    else:
        gbps = (link or 1e9) / COLLECTIVE_EFFICIENCY / 1e9
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
        peak = (trainer.peak_flops or 0) / 1e12
        hw = Accelerator("this CPU (measured)", peak, ram, gbps, gbps, "matmul peak and all-reduce measured now")
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    plan = build_plan(cfg, world // local, local, hw, depth=depth_stats(cfg, depths))
    memory = memory_plan(
        cfg, world, trainer.dist.rank, device.type, max(k for _, k in depths), int(any(n for n, _ in depths))
    )
    return {
        "accelerator": hw.name,
        "step_ms": plan.step_s * 1e3,
        "exposed_comm_ms": (plan.exposed_fsdp_s + plan.all_to_all_s) * 1e3,
        "peak_bytes": memory.peak,
        "peak_phase": memory.peak_phase,
        "link_gbps": link / 1e9 if link else None,
    }


def profile_job(cfg: JobConfig, info: DistInfo, warm_steps: int, steps: int, gpu: str | None = None) -> list[dict]:
    """Profile on every rank of an existing process group; returns all ranks' reports (printed on rank 0)."""
    from mythos_train.trainer import Trainer

    folder = Path(cfg.train.run_dir) / "profile"
    folder.mkdir(parents=True, exist_ok=True)
    trainer = Trainer(cfg, info)
    try:
        trainer.model.train()
        for _ in range(warm_steps):
            trainer.train_step(trainer.next_micro_batches())
            trainer.step += 1
        static = static_bytes(trainer)
        reading, measured, depths = profiled_steps(trainer, steps, folder)
        prediction = planner_prediction(cfg, trainer, depths, gpu)
    finally:
        trainer.close()
    report = reading | {
        "rank": info.rank,
        "measured_step_ms": measured,
        "depths": depths,
        "static_bytes": static,
        "peak_flops": trainer.peak_flops,
        "prediction": prediction,
    }
    reports: list = [None] * info.world_size
    dist.all_gather_object(reports, report)
    if info.is_main:
        (folder / "profile.json").write_text(json.dumps(reports, indent=1))
        png = write_png(reports, folder / "phases.png")
        print(render(reports, cfg) + f"\n\ntraces: {folder}/rank*.json  picture: {png}", flush=True)
    return reports


def run_profile(cfg: JobConfig, warm_steps: int, steps: int, gpu: str | None) -> int:
    """The `profile` command: process group (torchrun or one process) -> profile_job -> teardown."""
    from mythos_train.trainer import check_vocab

    if steps < 1 or warm_steps < 0:
        raise ConfigError(f"profile: --steps must be >= 1 and --warm-steps >= 0 (got {steps} and {warm_steps})")
    validate(cfg, env_world_size())
    check_vocab(cfg)
    info = init_distributed(cfg)
    try:
        profile_job(cfg, info, warm_steps, steps, gpu)
    finally:
        destroy_distributed()
    return 0
