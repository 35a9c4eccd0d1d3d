"""Answer accuracy of the depth canary by hop count x inference loops, and its plots (heat map and curves).

A program counts as answered when the greedy prediction at every answer position, given the program and the
answer tokens before it, is the answer token (teacher forcing: the same as greedy decoding the answer exactly).
Each rank takes an equal share of every hop count's programs (FSDP and the expert all-to-all are collective: all
ranks run the same forwards) and the counts are summed over ranks. The change of the loop state per iteration,
||h_t - h_{t-1}|| over the programs' positions, is recorded at the largest loop count (does the state converge?).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from mythos_train.canary import Program
from mythos_train.distributed import all_reduce_sum


@dataclass
class Encoded:
    """Programs of one hop count as one right-padded batch."""

    tokens: torch.Tensor
    "[N, L] token ids (prompt, answer, padding)."
    answer: torch.Tensor
    "[N, L] bool, True at the answer tokens."


def encode_programs(programs: list[Program], sp, answer_id: int, pad_id: int) -> Encoded:
    """Tokenize whole programs; the answer is what follows the last answer marker."""
    rows = [sp.encode(p.text) for p in programs]
    length = max(len(r) for r in rows)
    tokens = torch.full((len(rows), length), pad_id, dtype=torch.long)
    answer = torch.zeros(len(rows), length, dtype=torch.bool)
    for i, row in enumerate(rows):
        marker = len(row) - 1 - row[::-1].index(answer_id)
        tokens[i, : len(row)] = torch.tensor(row)
        answer[i, marker + 1 : len(row)] = True
    return Encoded(tokens, answer)


def answered(logits: torch.Tensor, batch: Encoded) -> torch.Tensor:
    """logits [N, L-1, V] of inputs tokens[:, :-1] -> [N] bool: every answer token is the argmax prediction."""
    targets, is_answer = batch.tokens[:, 1:], batch.answer[:, 1:]  # position t predicts token t + 1
    right = (logits.argmax(dim=-1) == targets) | ~is_answer
    return right.all(dim=1)


@torch.no_grad()
def answer_accuracy(
    model: torch.nn.Module,
    by_hops: dict[int, Encoded],
    loop_counts: list[int],
    device: torch.device,
) -> tuple[dict[int, dict[int, float]], list[float]]:
    """-> ({hops: {loops: accuracy}}, per-iteration mean ||h_t - h_{t-1}|| at the largest loop count), summed
    over all ranks (collective: every rank calls it with the same hop counts and batch sizes)."""
    counts = torch.zeros(len(by_hops), len(loop_counts), 2, dtype=torch.float64, device=device)  # [correct, total]
    deepest = max(loop_counts)
    delta = torch.zeros(deepest + 1, dtype=torch.float64, device=device)  # [sum per iteration..., forwards]
    for i, batch in enumerate(by_hops.values()):
        inputs = batch.tokens[:, :-1].to(device)
        for j, loops in enumerate(loop_counts):
            logits = model(inputs, n_nograd=0, n_grad=loops)
            counts[i, j, 0] += answered(logits.cpu(), batch).sum()
            counts[i, j, 1] += len(inputs)
            if loops == deepest:
                delta[:-1] += model.recurrent.last_stats.h_delta.to(delta)
                delta[-1] += 1
    all_reduce_sum(counts)
    all_reduce_sum(delta)
    accuracy = {
        hops: {loops: float(counts[i, j, 0] / counts[i, j, 1]) for j, loops in enumerate(loop_counts)}
        for i, hops in enumerate(by_hops)
    }
    return accuracy, (delta[:-1] / delta[-1]).tolist()


def rank_share(programs: list[Program], rank: int, world: int) -> dict[int, list[Program]]:
    """This rank's programs by hop count: the same number on every rank (the remainder is left out)."""
    by_hops: dict[int, list[Program]] = {}
    for p in programs:
        by_hops.setdefault(p.hops, []).append(p)
    share = {}
    for hops, group in sorted(by_hops.items()):
        per_rank = len(group) // world
        if per_rank == 0:
            raise ValueError(f"canary: {len(group)} programs with {hops} hops cannot be shared by {world} ranks")
        share[hops] = group[rank * per_rank : (rank + 1) * per_rank]
    return share


def save_accuracy(record: dict, folder: Path, train_hops: int, mean_depth: float) -> None:
    """canary_accuracy.json (this evaluation), canary_history.jsonl (all) and the two PNGs."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "canary_accuracy.json").write_text(json.dumps(record, indent=1))
    with open(folder / "canary_history.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    plot_accuracy(record, folder, train_hops, mean_depth)


def plot_accuracy(record: dict, folder: Path, train_hops: int, mean_depth: float, title: str = "") -> None:
    """accuracy_heatmap.png (hops x loops) and accuracy_vs_loops.png (one curve per hop count)."""
    import matplotlib  # optional, heavy

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    hops = sorted(int(h) for h in record["accuracy"])
    loops = sorted(int(n) for n in record["accuracy"][str(hops[0])])
    grid = [[record["accuracy"][str(h)][str(n)] for n in loops] for h in hops]
    title = title or f"step {record['step']}"

    fig, ax = plt.subplots(figsize=(5, 4), dpi=80)
    image = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", origin="lower", aspect="auto")
    for i, row in enumerate(grid):
        for j, value in enumerate(row):
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7, color="w" if value < 0.6 else "k")
    ax.set_xticks(range(len(loops)), [str(n) for n in loops])
    ax.set_yticks(range(len(hops)), [str(h) for h in hops])
    ax.axhline(train_hops - 0.5 - hops[0] + 1, color="r", linewidth=1)  # above: hop counts never trained on
    ax.set_xlabel("inference loops")
    ax.set_ylabel("hops d (red line: trained d <= below)")
    ax.set_title(f"answer accuracy, {title}", fontsize=9)
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(folder / "accuracy_heatmap.png")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 4), dpi=80)
    cmap = plt.get_cmap("plasma")
    for i, h in enumerate(hops):
        style = "-" if h <= train_hops else "--"
        ax.plot(loops, grid[i], style, marker="o", color=cmap(i / max(len(hops) - 1, 1)), label=f"d={h}")
    ax.axvline(mean_depth, color="gray", linestyle=":", linewidth=1, label="mean train depth")
    ax.axhline(0.1, color="gray", linewidth=0.5)  # chance: one of ten digits
    ax.set_xscale("log", base=2)
    ax.set_xticks(loops)
    ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("inference loops")
    ax.set_ylabel("answer accuracy (dashed: d beyond training)")
    ax.set_title(f"accuracy vs loops, {title}", fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(folder / "accuracy_vs_loops.png")
    plt.close(fig)
