"""Tables, straggler view and picture of `profile`'s per-rank readings (mythos_train/profile_run.py).

Times are per optimizer step (summed over the profiled steps, divided by their number). MFU per phase is
loop-aware: the matmul FLOPs that phase ran (model/flops.py per block, times how often its range ran: every
iteration of the loop counts, a recompute counts as one more forward) over its time and the rank's peak.
"""

from __future__ import annotations

import re
import statistics
from pathlib import Path

from mythos_train.config import JobConfig
from mythos_train.model.flops import block_forward_flops_per_token, training_flops_per_token
from mythos_train.profile_trace import COMM_KINDS

PARTS = ("data", "prelude", "loop", "coda", "head", "loss", "other", "clip_grad", "optimizer", "router_bias", "idle")
COLUMNS = ("fwd", "recompute", "bwd")


def split_phase(phase: str) -> tuple[str, str]:
    """'loop3 bwd' -> ('loop3', 'bwd'); 'loop3 nograd' and 'coda' are forward ('fwd')."""
    part, _, kind = phase.partition(" ")
    return part, {"": "fwd", "nograd": "fwd"}.get(kind, kind)


def forward_flops(cfg: JobConfig, part: str) -> float:
    """Matmul FLOPs of one run of a forward range on one micro-batch."""
    m, t = cfg.model, cfg.train
    tokens = t.micro_batch_size * t.seq_len
    if part.startswith("loop"):
        return tokens * block_forward_flops_per_token(m, t.seq_len, looped=True)
    block = block_forward_flops_per_token(m, t.seq_len, looped=False)
    per_token = {"prelude": m.prelude_layers * block, "coda": m.coda_layers * block, "head": 2 * m.dim * m.vocab_size}
    return tokens * per_token.get(part, 0.0)


def part_table(report: dict, cfg: JobConfig) -> dict[str, dict[str, float]]:
    """Part ('loop3', 'prelude', ...) -> {'fwd', 'recompute', 'bwd', 'comm', 'flops'} per step (ms, FLOPs)."""
    steps, occurrences = report["steps"], report["occurrences"]
    table: dict[str, dict[str, float]] = {}
    for phase, times in report["phases"].items():
        part, column = split_phase(phase)
        row = table.setdefault(part, dict.fromkeys([*COLUMNS, "comm", "flops"], 0.0))
        row[column] += sum(times.values()) / steps
        row["comm"] += sum(v for k, v in times.items() if k != "compute") / steps
    for part, row in table.items():
        once = forward_flops(cfg, part)
        grad_runs = occurrences.get(part, 0)
        runs = grad_runs + occurrences.get(f"{part} nograd", 0) + occurrences.get(f"{part} recompute", 0)
        row["flops"] = once * (runs + 2 * grad_runs) / steps
    return table


def _mfu(flops: float, ms: float, peak: float | None) -> str:
    return f"{100 * flops / (ms / 1e3) / peak:5.1f}%" if peak and ms > 0 and flops else "    -"


def _row(name: str, row: dict[str, float], step_ms: float, peak: float | None) -> str:
    total = sum(row[c] for c in COLUMNS)
    cells = "".join(f"{row[c]:10.1f}" for c in COLUMNS)
    return f"  {name:<12}{cells}{total:10.1f}{100 * total / step_ms:7.1f}%{row['comm']:10.1f}  {_mfu(row['flops'], total, peak)}"


def _loop_key(part: str) -> int:
    return int(part[4:]) if re.fullmatch(r"loop\d+", part) else -1


def rank_tables(report: dict, cfg: JobConfig) -> str:
    """One rank's phase table, loop-iteration table, communication and memory lines."""
    steps, peak = report["steps"], report["peak_flops"]
    table = part_table(report, cfg)
    step_ms = sum(report["step_ms"]) / steps
    header = f"  {'':<12}{'fwd ms':>10}{'recomp ms':>10}{'bwd ms':>10}{'total ms':>10}{'share':>8}{'comm ms':>10}  MFU"
    loops = sorted((p for p in table if _loop_key(p) >= 0), key=_loop_key)
    grouped = {part: table[part] for part in PARTS if part in table}
    whole_loop = table.get("loop", {})  # FSDP's gathers / reductions of the looped block (not one iteration's)
    grouped["loop"] = {k: sum(table[p][k] for p in loops) + whole_loop.get(k, 0.0) for k in (*COLUMNS, "comm", "flops")}
    model_flops = (
        sum(training_flops_per_token(cfg.model, cfg.train.seq_len, n, k) for n, k in report["depths"])
        * cfg.train.micro_batch_size
        * cfg.train.seq_len
        * cfg.train.grad_accum_steps
        / steps
    )
    lines = [
        f"rank {report['rank']}: step {step_ms:.1f} ms in the trace (perf_counter: median "
        f"{statistics.median(report['measured_step_ms']):.1f} ms), depths (n_nograd, n_grad) {report['depths']}, "
        f"model MFU {_mfu(model_flops, step_ms, peak).strip()} ({report['reading']} reading; comm = exposed)",
        header,
        *(_row(part, row, step_ms, peak) for part, row in ((p, grouped[p]) for p in PARTS if p in grouped)),
        "  loop iterations (one row per iteration run; 'comm' = exposed communication inside it)",
        header.replace("            ", "  iteration ", 1),
        *(
            _row(f"{p} " + ("grad" if report["occurrences"].get(p) else "nograd"), table[p], step_ms, peak)
            for p in loops
        ),
    ]
    kinds = {k: 0.0 for k in COMM_KINDS}
    for times in report["phases"].values():
        for k, v in times.items():
            if k != "compute":
                kinds[k] += v / steps
    share = report["overlapped_ms"] / report["in_flight_ms"] if report["in_flight_ms"] else 0.0
    lines.append(
        f"  communication per step: in flight {report['in_flight_ms'] / steps:.1f} ms, exposed "
        f"{report['exposed_ms'] / steps:.1f} ms ("
        + ", ".join(f"{k} {v:.1f}" for k, v in kinds.items() if v)
        + f"), overlapped {report['overlapped_ms'] / steps:.1f} ms ({100 * share:.0f}% hidden)"
    )
    peak_bytes = report["static_bytes"] + report["memory_peak_rise"]
    lines.append(
        f"  memory peak {peak_bytes / 2**20:.1f} MiB = {report['static_bytes'] / 2**20:.1f} MiB between steps + "
        f"{report['memory_peak_rise'] / 2**20:.1f} MiB during '{report['memory_peak_phase']}'"
    )
    return "\n".join(lines)


def prediction_lines(reports: list[dict]) -> str:
    """Planner vs measured, one line per rank: step time, exposed communication, peak memory."""
    lines = ["planner (mythos_train/planner) vs measured, per step:"]
    for r in reports:
        p, steps = r["prediction"], r["steps"]
        if "error" in p:
            lines.append(f"  rank {r['rank']}: {p['error']}")
            continue
        measured_peak = r["static_bytes"] + r["memory_peak_rise"]
        lines.append(
            f"  rank {r['rank']} on {p['accelerator']}: step {p['step_ms']:.1f} predicted / "
            f"{statistics.median(r['measured_step_ms']):.1f} ms measured; exposed comm {p['exposed_comm_ms']:.1f} / "
            f"{r['exposed_ms'] / steps:.1f} ms; peak memory {p['peak_bytes'] / 2**20:.1f} MiB ('{p['peak_phase']}') / "
            f"{measured_peak / 2**20:.1f} MiB ('{r['memory_peak_phase']}')"
        )
    return "\n".join(lines)


def straggler_line(reports: list[dict], cfg: JobConfig) -> str:
    """The slowest rank and the part where ranks differ most."""
    means = {r["rank"]: sum(r["step_ms"]) / r["steps"] for r in reports}
    slow, fast = max(means, key=means.get), min(means, key=means.get)
    tables = {r["rank"]: part_table(r, cfg) for r in reports}
    spread = {}
    for part in {p for t in tables.values() for p in t}:
        times = {rank: sum(t.get(part, {}).get(c, 0.0) for c in COLUMNS) for rank, t in tables.items()}
        spread[part] = (max(times.values()) - min(times.values()), max(times, key=times.get))
    part, (gap, rank) = max(spread.items(), key=lambda kv: kv[1][0])
    return (
        f"stragglers: slowest rank {slow} ({means[slow]:.1f} ms, +{100 * (means[slow] / means[fast] - 1):.1f}% over "
        f"rank {fast}); largest gap between ranks: '{part}', rank {rank} {gap:.1f} ms above the fastest"
    )


def render(reports: list[dict], cfg: JobConfig) -> str:
    parts = [rank_tables(r, cfg) for r in reports]
    return "\n\n".join([*parts, prediction_lines(reports), straggler_line(reports, cfg)])


def write_png(reports: list[dict], path: Path) -> Path:
    """Stacked bars per rank: compute per part and kind (fwd / recompute / bwd), exposed communication hatched."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    segments: dict[str, list[float]] = {}
    for i, r in enumerate(reports):
        for phase, times in r["phases"].items():
            part, column = split_phase(phase)
            group = "loop" if _loop_key(part) >= 0 else part
            label = group if column == "fwd" else f"{group} {column}"
            segments.setdefault(label, [0.0] * len(reports))[i] += times.get("compute", 0.0) / r["steps"]
            segments.setdefault("exposed comm", [0.0] * len(reports))[i] += (
                sum(times.values()) - times.get("compute", 0.0)
            ) / r["steps"]
    fig, ax = plt.subplots(figsize=(9, 1.2 + 0.6 * len(reports)))
    left = [0.0] * len(reports)
    ranks = [f"rank {r['rank']}" for r in reports]
    colors = plt.get_cmap("tab20").colors

    def order(label: str) -> tuple[int, str]:  # the step's order: forward parts, their backward, comm last
        group, _, column = label.partition(" ")
        return (
            len(PARTS) + 1 if label == "exposed comm" else PARTS.index(group) if group in PARTS else len(PARTS)
        ), column

    for i, (label, widths) in enumerate(sorted(segments.items(), key=lambda kv: order(kv[0]))):
        hatch = "//" if label == "exposed comm" else None
        ax.barh(ranks, widths, left=left, label=label, color=colors[i % len(colors)], hatch=hatch)
        left = [a + b for a, b in zip(left, widths)]
    ax.set_xlabel("ms per step")
    ax.invert_yaxis()
    ax.legend(fontsize=7, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.35 - 0.05 * len(reports)))
    fig.savefig(path, bbox_inches="tight", dpi=100)
    plt.close(fig)
    return path
