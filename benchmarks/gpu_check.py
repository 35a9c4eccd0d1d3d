"""One-GPU check: tokens/s/GPU, MFU and peak memory of real training steps, next to what `plan` predicts.

Runs the `small` config and the 1B preset (one GPU: ep 1, experts kept whole) with activation checkpointing
none / loop at a fixed total loop depth of 4 / 8 / 16 (k = train.backprop_depth of those gradient, the rest
gradient-free), bf16 FSDP2 on a world of one, synthetic tokens, eager unless `--compile` (blocks compiled whole;
the cold compile falls in the warm-up steps). Each run times `--steps` optimizer steps after
`--warmup`; the medians are printed as a table, with the planner's predicted peak memory and MFU beside the
measured ones (so a GPU run validates the bf16/fused-kernel side of the memory model, which CPU tests cannot).

    python benchmarks/gpu_check.py [--steps 20] [--warmup 3] [--out DIR] [--compile --models 1b --depths 8]
    python benchmarks/gpu_check.py --dry-run      # CPU, tiny model, 2 steps per run: checks the script itself
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from mythos_train.bench.sweep import build_train_step
from mythos_train.config import JobConfig, load_config, validate
from mythos_train.distributed import destroy_distributed
from mythos_train.metrics import gpu_peak_flops, measure_cpu_peak_flops
from mythos_train.model.flops import training_flops_per_token
from mythos_train.planner.plan import memory_plan

GIB = 2**30
RUN = ["--parallel.ep=1", "--parallel.dp_replicate=1", "--parallel.dp_shard=-1"]
"One GPU: no expert parallelism."
MODELS = {
    "small": ("configs/small.toml", []),
    "1b": ("configs/mythos_1b.toml", ["--train.micro_batch_size=1", "--train.grad_accum_steps=1"]),
}
DRY_RUN = (
    "configs/debug.toml",
    [
        "--train.seq_len=32",
        "--train.micro_batch_size=2",
        "--model.dim=64",
        "--model.vocab_size=512",
        "--model.n_experts=4",
        "--train.device=cpu",
    ],
)


def run_config(path: str, overrides: list[str], policy: str, depth: int, compile: bool) -> JobConfig:
    """The config at a fixed total depth: k = min(backprop_depth, depth) with gradients, the rest without."""
    cfg = load_config(path, RUN + overrides + [f"--parallel.compile={str(compile).lower()}"])
    t = cfg.train
    cfg.parallel.activation_checkpoint = policy
    t.depth_distribution, t.mean_depth, t.min_depth, t.max_depth = "fixed", float(depth), 1, depth
    t.backprop_depth = min(t.backprop_depth, depth)
    cfg.checkpoint.enabled = False
    validate(cfg, 1)
    return cfg


def measure(cfg, device: torch.device, warmup: int, steps: int) -> dict:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    step = build_train_step(cfg, 1, device)
    for i in range(warmup):
        step(i)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, depth = [], None
    for i in range(steps):
        seconds, n, k = step(warmup + i)
        times.append(seconds)
        depth = (n, k)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    del step
    gc.collect()
    t = cfg.train
    tokens = t.micro_batch_size * t.seq_len * t.grad_accum_steps
    seconds = statistics.median(times)
    return {"tokens_per_s": tokens / seconds, "step_s": seconds, "peak_bytes": peak, "n_nograd": depth[0], "n_grad": depth[1],
            "flops_per_token": training_flops_per_token(cfg.model, t.seq_len, *depth)}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--models", default="small,1b")
    parser.add_argument("--depths", default="4,8,16")
    parser.add_argument("--policies", default="none,loop")
    parser.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the blocks (eager by default: each config's cold compile costs about a minute)",
    )
    parser.add_argument("--out", default=None, help="write gpu_check[_compiled].json here too")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny model, 2 steps per run")
    args = parser.parse_args(argv)
    if args.dry_run:
        device, models, args.steps, args.warmup = torch.device("cpu"), {"tiny": DRY_RUN}, 2, 1
        peak_flops = measure_cpu_peak_flops()
    else:
        if not torch.cuda.is_available():
            print("no CUDA device: run with --dry-run to check the script on CPU", file=sys.stderr)
            return 2
        device = torch.device("cuda", 0)
        torch.cuda.set_device(device)
        models = {name: MODELS[name] for name in args.models.split(",")}
        peak_flops = gpu_peak_flops(torch.cuda.get_device_name(device)) or 0.0
    print(f"device {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}; peak {peak_flops / 1e12:.2f} TFLOP/s; "
          f"{args.warmup} warm-up + {args.steps} timed steps per run; {'compiled' if args.compile else 'eager'}")  # fmt: skip
    print(
        f"{'model':<6} {'AC':<5} {'depth':>5} {'n+k':>6} {'tok/s/GPU':>10} {'MFU':>6} {'peak GiB':>9} {'plan GiB':>9} {'plan/meas':>9} {'s/step':>7}"
    )
    results, started = [], time.perf_counter()
    for name, (path, overrides) in models.items():
        for policy in args.policies.split(","):
            for depth in (int(d) for d in args.depths.split(",")):
                cfg = run_config(path, overrides, policy, depth, args.compile)
                try:
                    r = measure(cfg, device, args.warmup, args.steps)
                except Exception as e:  # out of memory, or a kernel that fails here: report it, go on to the next run
                    oom = isinstance(e, torch.OutOfMemoryError)
                    print(
                        f"{name:<6} {policy:<5} {depth:>5}  {'out of memory' if oom else f'FAILED: {type(e).__name__}: {e}'}",
                        flush=True,
                    )
                    results.append(
                        {"model": name, "policy": policy, "depth": depth, "oom": oom, "error": None if oom else repr(e)}
                    )
                    gc.collect()
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                    continue
                plan = memory_plan(cfg, 1, device=device.type, n_grad=r["n_grad"], n_nograd=r["n_nograd"])
                mfu = r["flops_per_token"] * r["tokens_per_s"] / peak_flops if peak_flops else float("nan")
                ratio = plan.peak / r["peak_bytes"] if r["peak_bytes"] else float("nan")
                print(f"{name:<6} {policy:<5} {depth:>5} {r['n_nograd']:>2}+{r['n_grad']:<3} {r['tokens_per_s']:>10,.0f} {mfu:>6.1%} "
                      f"{r['peak_bytes'] / GIB:>9.2f} {plan.peak / GIB:>9.2f} {ratio:>9.2f} {r['step_s']:>7.3f}", flush=True)  # fmt: skip
                results.append(
                    {
                        "model": name,
                        "policy": policy,
                        "depth": depth,
                        "mfu": mfu,
                        "plan_peak_bytes": plan.peak,
                        "plan_phase": plan.peak_phase,
                        **r,
                    }
                )
                if args.out:  # after every row: a timeout keeps what was measured
                    Path(args.out).mkdir(parents=True, exist_ok=True)
                    (Path(args.out) / f"gpu_check{'_compiled' if args.compile else ''}.json").write_text(
                        json.dumps(results, indent=1)
                    )
    print(f"total {time.perf_counter() - started:.0f} s")
    destroy_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
