"""Training metrics: TensorBoard scalars/text on rank 0 and one concise console line per log step.

MFU is loop-aware: the FLOPs of a step depend on the loop depth sampled for it, so the trainer passes
`training_flops_per_token(cfg.model, seq_len, n_nograd, n_grad)` of that step and this module divides by the
device's peak. GPU peaks come from the dense bf16 table in planner/hardware.py (the planner prices jobs with the same
numbers); on CPU the peak is an fp32 matmul measured once at startup (or `metrics.cpu_peak_tflops`).
"""

from __future__ import annotations

import logging
import os
import resource
import sys
import time
from pathlib import Path

import torch

from mythos_train.config import MetricsConfig
from mythos_train.planner.hardware import gpu_peak_tflops

logger = logging.getLogger(__name__)


def gpu_peak_flops(device_name: str) -> float | None:
    """Peak dense bf16 FLOP/s of a GPU named `device_name`, or None when it is not in the planner's table."""
    tflops = gpu_peak_tflops(device_name)
    return None if tflops is None else tflops * 1e12


def measure_cpu_peak_flops(size: int = 1024, repeats: int = 5) -> float:
    """Best-of-`repeats` fp32 matmul FLOP/s on this process's CPU threads (about 0.1 s)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)  # warm up the BLAS
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2.0 * size**3 / best


def peak_flops(device: torch.device, cfg: MetricsConfig) -> float | None:
    """Peak FLOP/s used as the MFU denominator for one device; None = unknown (MFU not logged)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = gpu_peak_flops(name)
        if peak is None:
            logger.warning("no peak FLOP/s known for GPU %r: MFU will not be logged", name)
        return peak
    if cfg.cpu_peak_tflops > 0:
        return cfg.cpu_peak_tflops * 1e12
    return measure_cpu_peak_flops()


def memory_gib(device: torch.device) -> dict[str, float]:
    """CUDA peak allocated/reserved memory since the last reset, or the CPU process's resident set size."""
    if device.type == "cuda":
        return {
            "memory/max_allocated_gib": torch.cuda.max_memory_allocated(device) / 2**30,
            "memory/max_reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30,
        }
    try:
        with open("/proc/self/statm") as f:
            rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # not Linux: the peak RSS (kilobytes on Linux, bytes on macOS)
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    return {"memory/rss_gib": rss / 2**30}


def loop_scalars(
    h_norm: torch.Tensor,
    tokens_per_expert: torch.Tensor,
    halting_mean: float,
    halting_max: float,
    spectral_radius: float,
) -> dict[str, float]:
    """Per-iteration loop telemetry as scalars: ||h_t||, expert load imbalance (max/mean), ACT halting depth, rho(A)."""
    out = {
        "loop/spectral_radius": spectral_radius,
        "loop/halting_depth_mean": halting_mean,
        "loop/halting_depth_max": halting_max,
    }
    for t, value in enumerate(h_norm.tolist()):
        out[f"loop/h_norm/iter_{t:02d}"] = value
    load = tokens_per_expert.float()  # [n_iters, E]
    imbalance = load.max(dim=1).values / load.mean(dim=1).clamp_min(1e-9)
    for t, (value, top) in enumerate(zip(imbalance.tolist(), load.max(dim=1).values.tolist())):
        out[f"experts/max_over_mean/iter_{t:02d}"] = value
        out[f"experts/max_tokens/iter_{t:02d}"] = top
    return out


def console_line(step: int, total_steps: int, m: dict[str, float]) -> str:
    """One human-readable line from the step's scalars (missing ones are left out)."""
    parts = [f"step {step:>{len(str(total_steps))}}/{total_steps}"]

    def add(fmt: str, *keys: str) -> None:
        if all(k in m for k in keys):
            parts.append(fmt.format(*(m[k] for k in keys)))

    add("loss {:.4f}", "loss/train")
    add("lr {:.2e}", "optim/lr")
    add("gnorm {:.3f}", "optim/grad_norm")
    add("tok/s {:,.0f} ({:,.0f}/dev)", "throughput/tokens_per_s", "throughput/tokens_per_s_per_device")
    add("TFLOP/s {:.3g}", "throughput/tflops_per_device")
    add("mfu {:.1%}", "throughput/mfu")
    add("depth {:.0f}+{:.0f}", "depth/n_nograd", "depth/n_grad")
    add(
        "time data {:.0f}ms fb {:.0f}ms opt {:.0f}ms",
        "time/data_wait_ms",
        "time/forward_backward_ms",
        "time/optimizer_ms",
    )
    add("mem {:.2f}GiB", "memory/max_allocated_gib")
    add("rss {:.2f}GiB", "memory/rss_gib")
    if m.get("train/skipped_steps_total", 0) > 0:
        parts.append(f"skipped {m['train/skipped_steps_total']:.0f}")
    return " | ".join(parts)


class MetricsLogger:
    """TensorBoard writer and console printer; only the main rank writes, the others ignore every call."""

    def __init__(self, cfg: MetricsConfig, run_dir: Path, enabled: bool) -> None:
        self.enabled = enabled
        self.writer = None
        if enabled and cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # imports tensorboard

            self.writer = SummaryWriter(log_dir=str(Path(run_dir) / "tb"))

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self.writer is not None:
            for tag, value in values.items():
                self.writer.add_scalar(tag, value, step)

    def text(self, step: int, tag: str, text: str) -> None:
        if self.writer is not None:
            self.writer.add_text(tag, text, step)

    def console(self, line: str) -> None:
        if self.enabled:
            print(line, flush=True)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
