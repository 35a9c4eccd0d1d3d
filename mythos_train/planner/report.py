"""The planner's output: a table for people (`render`) and a dict for machines (`to_json`)."""

from __future__ import annotations

import dataclasses

from mythos_train.config import JobConfig
from mythos_train.dtypes import DTYPE_BYTES
from mythos_train.planner.comm import axis_span
from mythos_train.planner.hardware import MATMUL_EFFICIENCY, USABLE_MEMORY_FRACTION
from mythos_train.planner.memory import model_plan
from mythos_train.planner.plan import GIB, Plan
from mythos_train.planner.tensor_parallel import routed_expert_options
from parallel.fsdp import prefetch_chain


def _gib(n: float) -> str:
    return f"{n / GIB:8.2f}"


def checkpoint_save(plan: Plan, cfg: JobConfig, write_gbps: float) -> tuple[int, float, bool]:
    """(bytes one rank writes, seconds at `write_gbps` GB/s, whether parallel.timeout_s covers it).

    A save writes each rank's fp32 parameter and AdamW shards (unpadded) and its buffers; the other ranks wait in
    the next collective meanwhile, so a synchronous save must finish within the process-group timeout."""
    st = plan.memory.static
    nbytes = 3 * st.param_numel * 4 + st.buffers
    seconds = nbytes / (write_gbps * 1e9)
    return nbytes, seconds, seconds < cfg.parallel.timeout_s


def _order(pairs: list[tuple[str, str]]) -> list[str]:
    """[(a, b), (b, c)] -> [a, b, c]."""
    return [pairs[0][0], *(b for _, b in pairs)]


def render(
    plan: Plan, cfg: JobConfig, config_name: str, alts: list[tuple[str, Plan]] | None, write_gbps: float = 1.0
) -> str:
    m, t, p, mem = cfg.model, cfg.train, cfg.parallel, plan.memory
    s, st, act = plan.sizes, mem.static, mem.activations
    tp = s.get("tp", 1)
    lines = [
        f"plan: {config_name} on {plan.nodes} x {plan.gpus_per_node} {plan.gpu.name} ({plan.world_size} GPUs)",
        f"model    {plan.params['total'] / 1e9:.2f}B parameters ({plan.params['experts'] / 1e9:.2f}B in {m.n_experts} experts), "
        f"{plan.params['active'] / 1e9:.2f}B active per token per pass",
        f"mesh     dp_replicate {s['dp_replicate']} x dp_shard {s['dp_shard']}"
        + (f" x tp {tp}; experts: ep {s['ep'] // tp} x tp {tp} = {s['ep']}" if tp > 1 else f"; experts: ep {s['ep']}")
        + f" x efsdp {s['efsdp']}; "
        f"AC '{p.activation_checkpoint}'; reshard_per_iteration {str(p.reshard_per_iteration).lower()}; "
        f"shared_expert_chunks {p.shared_expert_chunks}; "
        f"param {mem.param_dtype}, reduce {p.reduce_dtype}",
        f"batch    {t.micro_batch_size} x {t.seq_len} tokens x {t.grad_accum_steps} micro-batches x {plan.world_size // tp} "
        + ("data ranks (of tp ranks each) " if tp > 1 else "ranks ")
        + f"= {plan.tokens_per_step / 1e6:.2f}M tokens/step",
        f"depth    {t.depth_distribution}: mean n {plan.depth.mean_nograd:.2f} gradient-free + k {plan.depth.mean_grad:.2f} "
        f"with gradients; memory at k = {mem.n_grad} (largest drawn: {plan.depth.max_grad})",
        "",
        "memory per GPU (rank 0)                          GiB",
        f"  parameters (fp32 shards, padded)         {_gib(st.params)}",
        f"  gradients (fp32 shards)                  {_gib(st.grads)}",
        f"  optimizer (AdamW exp_avg, exp_avg_sq)    {_gib(st.optimizer)}",
        f"  buffers (RoPE tables, expert bias)       {_gib(st.buffers)}",
        f"  activations saved at end of forward      {_gib(act.saved)}",
        f"  working set at the peak ('{mem.peak_phase}')".ljust(43) + f"{_gib(mem.working[mem.peak_phase])}",
        f"    of which activations                   {_gib(act.phases[mem.peak_phase])}",
        f"    of which gathered weights + grads      {_gib(mem.working[mem.peak_phase] - act.phases[mem.peak_phase])}",
        "      looped block gathered: "
        + ", ".join(f"{part} {n / GIB:.2f}" for part, n in plan.loop_parts.items())
        + " GiB"
        + (" (+ as much in gradients during its backward)" if p.activation_checkpoint != "none" else ""),
        f"  peak                                     {_gib(mem.peak)}",
        f"  usable {USABLE_MEMORY_FRACTION:.0%} of {plan.gpu.memory_gib:.1f} GiB".ljust(43)
        + f"{_gib(plan.capacity)}   "
        + ("FITS" if plan.fits else f"DOES NOT FIT (over by {(mem.peak - plan.capacity) / GIB:.1f} GiB)"),
        "",
        "communication per step per GPU",
        "  collective      axis           calls    GB sent  link     seconds",
    ]
    for c in plan.collectives:
        lines.append(
            f"  {c.name:<15} {c.axis:<13} {c.calls:6d} {c.sent / 1e9:10.2f}  {axis_span(c.axis, s, plan.gpus_per_node):<6} {c.seconds:9.3f}"
            + ("" if c.overlapped else "  (not overlapped)")
        )
    flops = plan.depth.model_flops_per_token
    lines += [
        "",
        f"compute  {flops / 1e9:.2f} GFLOP/token (mean depth) + {plan.depth.recompute_flops_per_token / 1e9:.2f} recomputed; "
        f"{plan.gpu.peak_bf16_tflops:.0f} TFLOP/s peak at {MATMUL_EFFICIENCY:.0%}",
        f"step     {plan.step_s:.2f} s = compute {plan.compute_s:.2f} + all-to-all {plan.all_to_all_s:.2f} "
        f"+ exposed FSDP {plan.exposed_fsdp_s:.2f} + exposed looped-unit gather {plan.exposed_loop_gather_s:.2f}"
        + (f" + tp {plan.tp_s:.2f}" if tp > 1 else ""),
        f"speed    {plan.tokens_per_s_per_gpu:,.0f} tokens/s/GPU, MFU {plan.mfu:.1%} (model FLOPs / peak)",
    ]
    if tp > 1:
        lines.append(f"routed experts under tp {tp} (per rank; per dispatch all-to-all; per gradient iteration):")
        for option in routed_expert_options(cfg, s, DTYPE_BYTES[mem.param_dtype]):
            lines.append(
                f"  {option.name:<24} weights {option.expert_bytes / GIB:6.2f} GiB  all-to-all "
                f"{option.all_to_all_bytes / 1e9:6.3f} GB  routed activations {option.routed_activation_bytes / GIB:6.2f} GiB  "
                f"GEMM width {option.expert_hidden}  FLOPs x{option.flops_share * tp:g}/tp"
                + ("  (modelled)" if option.name == "folded into EP" else "")
            )
    if s["ep"] > 1:
        chain = prefetch_chain(model_plan(m).fsdp_units)
        lines.append("prefetch " + "; ".join(f"{phase} {' -> '.join(_order(pairs))}" for phase, pairs in chain.items()))
    nbytes, seconds, covered = checkpoint_save(plan, cfg, write_gbps)
    lines.append(
        f"save     {nbytes / 1e9:.2f} GB per rank at {write_gbps:g} GB/s (--write-gbps) = {seconds:.0f} s: "
        + (f"within parallel.timeout_s = {cfg.parallel.timeout_s:g} s" if covered else
           f"OVER parallel.timeout_s = {cfg.parallel.timeout_s:g} s: a synchronous save would time the group out; "
           f"raise it above {seconds * 1.5:.0f}")
    )  # fmt: skip
    if alts is not None:
        lines += [
            "",
            "alternatives that fit (per node count, fastest first):"
            if alts
            else "no nearby alternative fits: shrink the model or use more/larger GPUs",
        ]
        for desc, alt in alts:
            lines.append(
                f"  {alt.memory.peak / GIB:6.1f} GiB  {alt.tokens_per_s_per_gpu:9,.0f} tok/s/GPU  MFU {alt.mfu:5.1%}  {desc}"
            )
    return "\n".join(lines)


def to_json(plan: Plan, cfg: JobConfig, alts: list[tuple[str, Plan]] | None) -> dict:
    def summary(p: Plan) -> dict:
        return {
            "nodes": p.nodes, "gpus_per_node": p.gpus_per_node, "gpu": dataclasses.asdict(p.gpu), "mesh": p.sizes,
            "parameters": p.params, "fits": p.fits, "capacity_bytes": p.capacity,
            "memory": {
                "static": dataclasses.asdict(p.memory.static), "activations_saved": p.memory.activations.saved,
                "activation_phases": p.memory.activations.phases, "working_phases": p.memory.working,
                "peak_phase": p.memory.peak_phase, "peak_bytes": p.memory.peak, "param_dtype": p.memory.param_dtype,
                "backprop_depth": p.memory.n_grad,
            },
            "depth": dataclasses.asdict(p.depth),
            "collectives": [dataclasses.asdict(c) for c in p.collectives],
            "tokens_per_step": p.tokens_per_step, "step_seconds": p.step_s, "compute_seconds": p.compute_s,
            "all_to_all_seconds": p.all_to_all_s, "exposed_fsdp_seconds": p.exposed_fsdp_s,
            "exposed_loop_gather_seconds": p.exposed_loop_gather_s,
            "prefetch": prefetch_chain(model_plan(cfg.model).fsdp_units) if p.sizes["ep"] > 1 else None,
            "tokens_per_s_per_gpu": p.tokens_per_s_per_gpu, "mfu": p.mfu, "loop_block_gathered_bytes": p.loop_parts,
            **({"tp_seconds": p.tp_s} if p.sizes.get("tp", 1) > 1 else {}),  # tp 1 reads as before TP
        }  # fmt: skip

    out = summary(plan)
    if alts is not None:
        out["alternatives"] = [{"change": desc, **summary(alt)} for desc, alt in alts]
    return out
