"""Parallel training costs on 2 local processes (gloo on CPU, nccl on GPUs if torchrun'd there): prints, no asserts.

1. step time and memory vs total loop depth (n + k in {2, 8, 32}, k fixed) with activation checkpointing none / loop;
2. expert parallelism 2 vs 1 (same model, same global batch);
3. collectives per step, by op.

Memory: bytes autograd holds for backward at the end of forward (what activation checkpointing trades away),
and peak RSS over the steps minus the RSS before the first one (each configuration runs in fresh processes).

    python benchmarks/bench_parallel.py [--dim 128] [--seq 64] [--micro 4] [--steps 3]
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F

from mythos_train.config import JobConfig
from mythos_train.model import MythosModel
from parallel import build_mesh, parallelize
from parallel.testing import CollectiveCounter, run_distributed

WORLD = 2


def bench_config(args, **parallel) -> JobConfig:
    cfg = JobConfig()
    model = dict(vocab_size=4096, dim=args.dim, n_heads=4, n_kv_heads=2, max_seq_len=args.seq, max_loop_iters=32,
                 prelude_layers=1, coda_layers=1, kv_lora_rank=32, q_lora_rank=64, qk_rope_head_dim=16,
                 qk_nope_head_dim=16, v_head_dim=32, n_experts=16, n_shared_experts=1, n_experts_per_tok=2,
                 expert_dim=64, lora_rank=8)  # fmt: skip
    for key, value in model.items():
        setattr(cfg.model, key, value)
    for key, value in parallel.items():
        setattr(cfg.parallel, key, value)
    return cfg


class SavedBytes:
    """Bytes of distinct storages autograd saves for backward while active (checkpointed regions save inputs only)."""

    def __init__(self):
        self.storages: dict[int, int] = {}

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        self.storages[storage.data_ptr()] = storage.nbytes()
        return t

    @property
    def total(self) -> int:
        return sum(self.storages.values())


def _current_rss_kib() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() // 1024


def step_job(rank: int, world: int, args, parallel: dict, n_nograd: int, n_grad: int) -> dict:
    cfg = bench_config(args, **parallel)
    torch.manual_seed(0)
    model = MythosModel(cfg.model)
    dims = build_mesh(cfg.parallel, world, "cpu")
    wrap = parallelize(model, dims, cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(rank)
    tokens = torch.randint(0, cfg.model.vocab_size, (args.micro, args.seq + 1), generator=g)

    def step(saved: SavedBytes | None = None) -> None:
        if saved is None:
            logits = model(tokens[:, :-1], n_nograd=n_nograd, n_grad=n_grad, wrap_iteration=wrap)
        else:
            with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t):
                logits = model(tokens[:, :-1], n_nograd=n_nograd, n_grad=n_grad, wrap_iteration=wrap)
        F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).backward()
        opt.step()
        opt.zero_grad()

    rss_before = _current_rss_kib()
    saved = SavedBytes()
    step(saved)  # warm-up (FSDP lazy init), and the saved-activation measurement
    with CollectiveCounter() as counter:
        step()
    times = []
    for _ in range(args.steps):
        torch.distributed.barrier()
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    rss_growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before  # peak over the steps, KiB
    return {
        "step_s": statistics.median(times),
        "saved_mib": saved.total / 2**20,
        "rss_growth_mib": rss_growth / 1024,
        "collectives": dict(counter.counts),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--micro", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--backprop-depth", type=int, default=2)
    args = parser.parse_args()
    k = args.backprop_depth
    print(
        f"model dim {args.dim}, 16 experts top-2, seq {args.seq}, micro-batch {args.micro}/rank, {WORLD} procs, k = {k}"
    )

    print("\n1. depth x activation checkpointing (FSDP over 2 ranks, ep 1)")
    print(f"{'n+k':>4} {'AC':>5} {'step s':>8} {'saved MiB':>10} {'RSS growth MiB':>15}  FSDP collectives")
    for total in (2, 8, 32):
        for ac in ("none", "loop"):
            r = run_distributed(step_job, WORLD, args, {"activation_checkpoint": ac}, total - k, k, timeout=1800)[0]
            fsdp = {op: c for op, c in r["collectives"].items() if "gather" in op or "reduce_scatter" in op}
            print(
                f"{total:>4} {ac:>5} {r['step_s']:>8.3f} {r['saved_mib']:>10.1f} {r['rss_growth_mib']:>15.1f}  {fsdp}"
            )

    print("\n2. expert parallelism (n+k = 8, AC loop)")
    for ep in (1, 2):
        r = run_distributed(step_job, WORLD, args, {"ep": ep}, 8 - k, k, timeout=1800)[0]
        print(f"ep {ep}: step {r['step_s']:.3f} s, collectives/step {r['collectives']}")


if __name__ == "__main__":
    main()
