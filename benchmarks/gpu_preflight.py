"""Correctness of the GPU fast path where CPU CI cannot look; gpu_check.sh runs it first (well under a minute).

1. `grouped_mm` in bf16 (the routed experts' kernel) against a per-expert fp32 loop, forward and backward, with
   empty, ragged and non-multiple-of-8 groups: the CUDA kernel has alignment rules the CPU fallback does not.
2. No host sync inside a training forward + backward at ep 1: CUDA's sync debug mode turns any into an error.
3. Blocks compiled whole (bf16) against eager, and no recompiles when the sampled depth changes.
   Run last: its cold compile is most of the preflight's time.

Each check prints PASS or FAIL with its numbers and the run goes on. On CPU (`--dry-run`) check 2 is skipped:
    python benchmarks/gpu_preflight.py [--dry-run]
"""

from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F

from mythos_train.config import load_config, validate
from mythos_train.distributed import destroy_distributed, init_distributed
from mythos_train.loss import cross_entropy_sum
from mythos_train.model.moe import grouped_swiglu
from mythos_train.trainer import build_model
from parallel import build_mesh

TOKENS_PER_EXPERT = [0, 7, 1, 13, 0, 11, 64, 3]  # empty, odd and aligned groups; 99 rows
DEPTHS = [(1, 2), (5, 2), (0, 1), (3, 3)]


def check_grouped_mm(device: torch.device) -> str:
    """bf16 grouped SwiGLU vs the same experts one by one in fp32: outputs and all four gradients."""
    g = torch.Generator().manual_seed(0)
    E, dim, hidden = len(TOKENS_PER_EXPERT), 64, 40
    x = torch.randn(sum(TOKENS_PER_EXPERT), dim, generator=g)
    ws = [torch.randn(E, dim, hidden, generator=g) / dim**0.5, torch.randn(E, hidden, dim, generator=g) / hidden**0.5,
          torch.randn(E, dim, hidden, generator=g) / dim**0.5]  # fmt: skip
    grad_out = torch.randn(x.shape[0], dim, generator=g)
    leaves = [t.to(device, torch.bfloat16).requires_grad_() for t in (x, *ws)]
    offsets = torch.cumsum(torch.tensor(TOKENS_PER_EXPERT, device=device), 0, dtype=torch.int32)
    out = grouped_swiglu(leaves[0], offsets, *leaves[1:])
    out.backward(grad_out.to(device, torch.bfloat16))
    ref_leaves = [t.detach().float().cpu().requires_grad_() for t in leaves]  # same bf16-rounded inputs
    rx, rw1, rw2, rw3 = ref_leaves
    rows, start = [], 0
    for e, n in enumerate(TOKENS_PER_EXPERT):
        xe = rx[start : start + n]
        rows.append((F.silu(xe @ rw1[e]) * (xe @ rw3[e])) @ rw2[e])
        start += n
    ref = torch.cat(rows)
    ref.backward(grad_out)
    errors = {"out": _rel(out, ref)} | {
        name: _rel(t.grad, r.grad) for name, t, r in zip(("x", "w1", "w2", "w3"), leaves, ref_leaves)
    }
    worst = max(errors.values())
    assert worst < 2e-2, f"relative errors {errors}"
    return f"worst relative error {worst:.1e} over out and 4 gradients; groups {TOKENS_PER_EXPERT}"


def _rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.float().cpu() - ref).norm() / ref.norm()).item()


def _model_config(compile: bool, device: torch.device):
    cfg = load_config("configs/debug.toml", [
        "--parallel.ep=1", "--parallel.dp_shard=-1", "--parallel.param_dtype=bfloat16", f"--parallel.compile={str(compile).lower()}",
        "--train.seq_len=64", "--train.micro_batch_size=2", f"--train.device={device.type}", "--train.max_depth=8",
    ])  # fmt: skip
    validate(cfg, 1)
    return cfg


def _loss(model, wrap, tokens, depth) -> torch.Tensor:
    logits = model(tokens[:, :-1], n_nograd=depth[0], n_grad=depth[1], wrap_iteration=wrap)
    return cross_entropy_sum(logits, tokens[:, 1:]) / tokens[:, 1:].numel()


def check_no_host_sync(device: torch.device) -> str:
    """Forward + backward under torch.cuda.set_sync_debug_mode('error') at several depths."""
    cfg = _model_config(False, device)
    model, wrap = build_model(cfg, build_mesh(cfg.parallel, 1, device.type), device)
    tokens = torch.randint(0, cfg.model.vocab_size, (2, 65), device=device)
    _loss(model, wrap, tokens, DEPTHS[0]).backward()  # lazy FSDP init outside the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for depth in DEPTHS:
            _loss(model, wrap, tokens, depth).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return f"forward + backward at depths {DEPTHS} ran with sync debug mode 'error'"


def check_compile(device: torch.device) -> str:
    """Compiled vs eager (same weights), then new depths: no new graphs, no graph breaks."""
    from torch._dynamo.utils import counters

    models = {}
    for compile in (False, True):
        cfg = _model_config(compile, device)
        models[compile] = build_model(cfg, build_mesh(cfg.parallel, 1, device.type), device)
    models[True][0].load_state_dict(models[False][0].state_dict())
    tokens = torch.randint(0, cfg.model.vocab_size, (2, 65), device=device)
    losses = {c: _loss(m, w, tokens, DEPTHS[0]).item() for c, (m, w) in models.items()}
    _loss(*models[True], tokens, DEPTHS[0]).backward()
    graphs = counters["stats"]["unique_graphs"]
    for depth in DEPTHS[1:]:
        _loss(*models[True], tokens, depth).backward()
    new_graphs, breaks = counters["stats"]["unique_graphs"] - graphs, sum(counters["graph_break"].values())
    rel = abs(losses[True] - losses[False]) / losses[False]
    assert rel < 1e-2 and new_graphs == 0 and breaks == 0, (
        f"loss rel diff {rel:.1e}, new graphs {new_graphs}, graph breaks {breaks}"
    )
    return f"loss compiled {losses[True]:.4f} vs eager {losses[False]:.4f}; {graphs} graphs, none new at depths {DEPTHS[1:]}, no breaks"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU: checks the script (sync check skipped)")
    args = parser.parse_args(argv)
    device = torch.device("cpu") if args.dry_run else torch.device("cuda", 0)
    cfg = _model_config(False, device)
    init_distributed(cfg)  # a world of one (NCCL on CUDA), as the trainer would start it
    # cheapest first: a timeout during the compile check must not cost the others their PASS/FAIL line
    checks = [check_grouped_mm] + ([check_no_host_sync] if device.type == "cuda" else []) + [check_compile]
    failed = 0
    try:
        for check in checks:
            try:
                print(f"PASS {check.__name__}: {check(device)}", flush=True)
            except Exception as e:  # report and go on: the benchmark after this still runs
                failed += 1
                print(f"FAIL {check.__name__}: {type(e).__name__}: {e}", flush=True)
                traceback.print_exc(limit=3)
    finally:
        destroy_distributed()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
