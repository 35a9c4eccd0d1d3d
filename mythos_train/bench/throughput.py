"""Single-process training-step benchmark: tokens/s and MFU against this machine's measured fp32 matmul peak.

`python -m mythos_train bench` times the trainer's step (forward + backward + clipping + AdamW, train_step.py) on the
bench shape (dim 256, MLA, 64 experts top-4, 2+2 dense blocks, 8 gradient loops, seq 256, batch 8, fp32) and, when
importable, the same step around open-mythos 0.5.0's forward on the same shape, round robin (each round: one timed
square fp32 matmul, the peak, then one step of each model), and prints our same-depth speed-up as the median of the
rounds' ratios. `--clock cpu` times CPU work instead of wall time; `--profile FILE` adds the phase table of
`python -m mythos_train profile` for one of our steps; `--compile` adds both models with their transformer blocks
compiled (as `parallel.compile` does ours; the loops stay eager) to the same rounds; `--floor` adds each model's kernel
floor (its GEMMs and attention kernels replayed alone, bench/floor.py) to the same rounds.
`bench --sweep --config job.toml` instead times the trainer's real step over checkpointing policy x micro-batch x
loop depth (mythos_train/bench/sweep.py; `bench --sweep --help`).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.autograd.profiler import record_function

from mythos_train.bench.floor import gemm_flops, kernel_kind, record_kernels, replay
from mythos_train.config import ModelConfig, OptimConfig, TrainConfig
from mythos_train.model import MythosModel
from mythos_train.model.flops import training_flops_per_token
from mythos_train.model.open_mythos_compat import load_open_mythos, open_mythos_config_kwargs
from mythos_train.optim import build_optimizer
from mythos_train.train_step import Forward, TrainStep, model_forward

BENCH_SHAPE = dict(
    vocab_size=8192,
    dim=256,
    n_heads=8,
    max_seq_len=256,
    max_loop_iters=8,
    prelude_layers=2,
    coda_layers=2,
    attn_type="mla",
    q_lora_rank=128,
    kv_lora_rank=64,
    qk_rope_head_dim=16,
    qk_nope_head_dim=32,
    v_head_dim=32,
    n_experts=64,
    n_experts_per_tok=4,
    expert_dim=64,
    n_shared_experts=2,
)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
"bench --clock: wall time, or the process's CPU time (see --help)."


def matmul_flops_per_s(device: torch.device, n: int, clock=time.perf_counter) -> float:
    """FLOP/s of one timed n x n fp32 matmul."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    _sync(device)
    start = clock()
    a @ b
    _sync(device)
    return 2 * n**3 / (clock() - start)


def seconds(fn: Callable[[], None], device: torch.device, clock=time.perf_counter) -> float:
    """Time of one call of fn, the device's queued work included."""
    _sync(device)
    start = clock()
    fn()
    _sync(device)
    return clock() - start


def time_steps(
    steps: dict[str, Callable[[], None]],
    device: torch.device,
    warmup: int,
    n: int,
    peak_size: int,
    clock=time.perf_counter,
) -> tuple[dict[str, list[float]], list[float]]:
    """Round robin: each round times one matmul (the peak), then one step of each entry in turn, so the models and
    the peak are measured under the same load when other processes share the machine. Returns (seconds of each
    timed step, by name; each round's matmul FLOP/s).
    """
    for _ in range(warmup):
        for step in steps.values():
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    peaks = []
    for _ in range(n):
        peaks.append(matmul_flops_per_s(device, peak_size, clock))
        for name, step in steps.items():
            times[name].append(seconds(step, device, clock))
    return times, peaks


def _train_step(model: torch.nn.Module, forward: Forward, tokens: torch.Tensor, loops: int) -> Callable[[], None]:
    """The trainer's optimizer step (mythos_train/train_step.py) of `model` with the trainer's AdamW (weight-decay
    groups, fused kernel), on tokens [B, S + 1], all `loops` iterations with gradients."""
    optimizer = build_optimizer(model, OptimConfig(lr=1e-4), tokens.device.type)
    step = TrainStep(model, optimizer, forward, TrainConfig().max_grad_norm)
    batch = {"input_ids": tokens[:, :-1], "labels": tokens[:, 1:]}  # [B, S] each
    return lambda: step([batch], 0, loops)


def _report(name: str, times: list[float], peaks: list[float], step_flops: float, n_tokens: int) -> dict:
    """Median-based numbers, plus best-case ones (fastest step / highest peak) that show what an idle machine gives."""
    step_s, peak = statistics.median(times), statistics.median(peaks)
    mfu, best_mfu = step_flops / step_s / peak, step_flops / min(times) / max(peaks)
    print(
        f"{name:<54s} step {step_s * 1e3:7.1f} ms  {n_tokens / step_s:6.0f} tok/s  {step_flops / 1e9:5.1f} GFLOP  "
        f"peak {peak / 1e9:5.1f} GFLOP/s  MFU {100 * mfu:4.1f}%  (best: step {min(times) * 1e3:.1f} ms, "
        f"peak {max(peaks) / 1e9:.1f}, MFU {100 * best_mfu:.1f}%)"
    )
    return {"step_s": step_s, "tokens_per_s": n_tokens / step_s, "peak_flops": peak, "mfu": mfu, "best_mfu": best_mfu}


def _bench_ours(
    cfg: ModelConfig, args, tokens: torch.Tensor, device: torch.device, compiled: bool = False
) -> tuple[Callable, Callable]:
    """(our training step, report(times, peaks) -> result row)."""
    torch.manual_seed(0)
    model = MythosModel(cfg).to(device)
    if compiled:  # as the trainer's parallel.compile: torch 2.13 traces the routed experts in bf16 only (fp32 here)
        from parallel.compile import apply_compile

        apply_compile(model, compile_experts=False)
    step = _train_step(model, model_forward(model), tokens, args.loops)
    flops = training_flops_per_token(cfg, args.seq, 0, args.loops) * tokens[:, 1:].numel()

    def report(times: list[float], peaks: list[float]) -> dict:
        row = _report(f"mythos_train{' (compiled)' if compiled else ''}", times, peaks, flops, tokens[:, 1:].numel())
        if args.profile and not compiled:
            _profile_step(step, model, cfg, args, device)
        return row

    return step, report


def _profile_step(step, model: torch.nn.Module, cfg: ModelConfig, args, device: torch.device) -> None:
    """One more step under the profiler: its op table to args.profile, its Chrome trace beside it, and the phase
    table of `python -m mythos_train profile` printed. The trace is in wall time, so MFU per phase is against the
    wall-clock matmul peak (median of three, around the step) whatever --clock says."""
    from torch.profiler import ProfilerActivity, profile

    from mythos_train.config import JobConfig
    from mythos_train.profile_report import rank_tables
    from mythos_train.profile_trace import STEP_RANGE, read_trace

    peaks = [matmul_flops_per_s(device, args.peak_size) for _ in range(2)]
    with profile(
        activities=[ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if device.type == "cuda" else [])],
        profile_memory=True,
    ) as prof:
        _sync(device)
        start = time.perf_counter()
        with record_function(STEP_RANGE):
            step()
            _sync(device)
        measured = (time.perf_counter() - start) * 1e3
    Path(args.profile).write_text(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40))
    trace = f"{args.profile}.trace.json"
    prof.export_chrome_trace(trace)
    job = JobConfig(model=cfg, train=TrainConfig(seq_len=args.seq, micro_batch_size=args.batch, grad_accum_steps=1))
    report = read_trace(trace, model.parallel_plan()).to_dict() | {
        "rank": 0,
        "measured_step_ms": [measured],
        "depths": [(0, args.loops)],
        "static_bytes": 3 * sum(p.numel() * p.element_size() for p in model.parameters()),  # + AdamW's 2 moments
        "peak_flops": statistics.median([*peaks, matmul_flops_per_s(device, args.peak_size)]),
    }
    print(rank_tables(report, job) + f"\n  (op table: {args.profile}, trace: {trace})")


def _report_floor(name: str, calls: list, times: list[float], row: dict, device: torch.device, clock) -> dict:
    """The kernel floor beside its model's row: its share of the step, the MFU a step at the floor would have, and
    (each kind replayed alone, median of 3, after the rounds) its split into attention and GEMMs with their speed."""
    floor_s = statistics.median(times)
    gemm_gflop = sum(map(gemm_flops, calls)) / 1e9
    share, mfu = floor_s / row["step_s"], row["mfu"] * row["step_s"] / floor_s
    print(
        f"{name} kernel floor: its {len(calls)} GEMM and attention calls ({gemm_gflop:.1f} GFLOP of GEMMs) replayed "
        f"alone take {floor_s * 1e3:.1f} ms = {share:.0%} of its step; MFU at the floor {mfu:.1%}"
    )
    kinds = {}
    for kind in sorted({kernel_kind(call) for call in calls}):
        subset = [call for call in calls if kernel_kind(call) == kind]
        run = replay(subset)
        run()  # warm-up
        kind_s = statistics.median(seconds(run, device, clock) for _ in range(3))
        flops = sum(map(gemm_flops, subset))
        speed = f", {flops / 1e9:.2f} GFLOP at {flops / kind_s / row['peak_flops']:.0%} of the peak" if flops else ""
        print(f"  {kind}: {len(subset)} calls, {kind_s * 1e3:.1f} ms{speed}")
        kinds[kind] = {"calls": len(subset), "seconds": kind_s, "flops": flops}
    return {"step_s": floor_s, "share_of_step": share, "mfu": mfu, "gemm_flops": gemm_gflop * 1e9, "kinds": kinds}


def _bench_reference(
    reference,
    cfg: ModelConfig,
    args,
    tokens: torch.Tensor,
    device: torch.device,
    full_depth: bool,
    compiled: bool = False,
) -> tuple[Callable, Callable]:
    """(open-mythos' training step, report). Its ACT leaves the loop once every position halted (after ~3 iterations
    at init), so FLOPs count the iterations it really ran; full_depth raises its halting threshold out of reach.
    """
    torch.manual_seed(0)
    kwargs = open_mythos_config_kwargs(cfg) | ({"act_threshold": float("inf")} if full_depth else {})
    model = reference.OpenMythos(reference.MythosConfig(**kwargs)).to(device)
    if compiled:  # its blocks, as ours: the MoE's per-expert loop breaks the graph, so not fullgraph
        for block in (*model.prelude, model.recurrent.block, *model.coda):
            block.compile()
    iterations, steps_run = [], []
    model.recurrent.block.register_forward_hook(lambda *_: iterations.append(1))
    train = _train_step(model, lambda batch, n_nograd, n_grad: model(batch["input_ids"], n_loops=n_nograd + n_grad), tokens, args.loops)  # fmt: skip

    def step() -> None:
        steps_run.append(1)
        train()

    def report(times: list[float], peaks: list[float]) -> dict:
        loops_run = len(iterations) / len(steps_run)
        ref_cfg = dataclasses.replace(cfg, use_act=True)
        one, two = (training_flops_per_token(ref_cfg, args.seq, 0, n) for n in (1, 2))
        flops = (one + (loops_run - 1) * (two - one)) * tokens[:, 1:].numel()
        exit_rule = "no early exit" if full_depth else "ACT exit"
        name = f"open-mythos 0.5.0 ({exit_rule}, {loops_run:.1f} loops{', compiled' if compiled else ''})"
        return _report(name, times, peaks, flops, tokens[:, 1:].numel()) | {"loops_run": loops_run}

    return step, report


def main(argv: list[str] | None = None) -> dict | list[dict]:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--sweep" in argv:
        from mythos_train.bench import sweep

        return sweep.main([a for a in argv if a != "--sweep"])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--loops", type=int, default=8, help="loop iterations, all with gradients")
    parser.add_argument("--attn", choices=["mla", "gqa"], default="mla")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=7)
    parser.add_argument("--peak-size", type=int, default=4096, help="side of the square matmul that measures the peak")
    parser.add_argument(
        "--clock",
        choices=list(CLOCKS),
        default="wall",
        help="wall time, or this process's CPU time (CPU only; with one thread on a shared machine it leaves out the "
        "time spent waiting for a core, so medians move less)",
    )
    parser.add_argument("--no-reference", action="store_true", help="skip timing open-mythos")
    parser.add_argument(
        "--require-reference",
        action="store_true",
        help="fail when open-mythos 0.5.0 is not importable, instead of timing our model alone (gpu_check.sh)",
    )
    parser.add_argument(
        "--compile", action="store_true", help="also time both models with torch.compile'd transformer blocks"
    )
    parser.add_argument(
        "--floor",
        action="store_true",
        help="also time each model's kernel floor: the GEMM and attention kernels of one of its steps replayed alone",
    )
    parser.add_argument("--profile", default="", help="write a torch.profiler table of one of our steps to this file")
    parser.add_argument(
        "--sweep",
        action="store_true",
        help="sweep AC policy x micro-batch x depth of a job config instead (bench --sweep --help)",
    )
    args = parser.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.clock == "cpu" and device.type == "cuda":
        parser.error("--clock cpu times CPU work only: use it on CPU")
    cfg = ModelConfig(**(BENCH_SHAPE | {"max_seq_len": args.seq, "max_loop_iters": args.loops, "attn_type": args.attn}))
    tokens = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1), device=device)
    print(
        f"device {device.type}, {torch.get_num_threads()} threads, batch {args.batch} x seq {args.seq}, "
        f"{args.loops} loops; medians of {args.steps} rounds, each one {args.peak_size}^2 fp32 matmul then one step of "
        f"each model ({args.clock} clock)"
    )
    candidates = {"mythos_train": _bench_ours(cfg, args, tokens, device)}
    if args.compile:
        candidates["mythos_train_compiled"] = _bench_ours(cfg, args, tokens, device, compiled=True)
    reference = None if args.no_reference else load_open_mythos()
    if reference is None and args.require_reference:
        parser.error(
            "--require-reference: open-mythos 0.5.0 is not importable (pip install --no-deps open-mythos==0.5.0)"
        )
    if reference is not None:
        candidates["open_mythos"] = _bench_reference(reference, cfg, args, tokens, device, full_depth=False)
        candidates["open_mythos_full_depth"] = _bench_reference(reference, cfg, args, tokens, device, full_depth=True)
        if args.compile:
            candidates["open_mythos_full_depth_compiled"] = _bench_reference(
                reference, cfg, args, tokens, device, full_depth=True, compiled=True
            )
    steps = {name: step for name, (step, _) in candidates.items()}
    kernels = {name: record_kernels(steps[name]) for name in ("mythos_train", "open_mythos_full_depth") if args.floor and name in steps}  # fmt: skip
    steps |= {f"{name}_floor": replay(calls) for name, calls in kernels.items()}
    times, peaks = time_steps(steps, device, args.warmup, args.steps, args.peak_size, CLOCKS[args.clock])
    results = {name: report(times[name], peaks) for name, (_, report) in candidates.items()}
    for name, calls in kernels.items():
        results[f"{name}_floor"] = _report_floor(
            name, calls, times[f"{name}_floor"], results[name], device, CLOCKS[args.clock]
        )
    pairs = {  # result key: (ours, open-mythos at the same depth)
        "speedup_same_depth": ("mythos_train", "open_mythos_full_depth"),
        "speedup_at_floor": ("mythos_train_floor", "open_mythos_full_depth"),
        "speedup_same_depth_compiled": ("mythos_train_compiled", "open_mythos_full_depth_compiled"),
        "speedup_compiled_vs_eager_reference": ("mythos_train_compiled", "open_mythos_full_depth"),
    }
    for key, (ours, theirs) in pairs.items():
        if ours in times and theirs in times:
            results[key] = statistics.median(r / o for r, o in zip(times[theirs], times[ours]))
            print(f"{ours} vs {theirs}: {results[key]:.2f}x (median of the rounds' ratios)")
    return results


if __name__ == "__main__":
    main()
