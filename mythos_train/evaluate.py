"""Validation loss vs inference loop count (the signature curve of a recurrent-depth model) and a greedy sample.

Every rank runs the same loop counts on the same number of its own validation windows (FSDP and the expert
all-to-all are collective: no rank may exit early); the losses are token-weighted means over all ranks. The
windows are read once and reused, so every loop count and every evaluation sees the same tokens.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
from pathlib import Path

import torch
from torch.distributed.fsdp import FSDPModule

import parallel
from data_pipeline import DataError, build_loader, source_config
from data_pipeline.tokenizer import load_tokenizer, tokenizer_path
from mythos_train.canary import ANSWER_MARKER, EVAL_FILE, read_eval_programs
from mythos_train.canary_eval import Encoded, answer_accuracy, encode_programs, rank_share, save_accuracy
from mythos_train.config import JobConfig
from mythos_train.distributed import all_reduce_sum
from mythos_train.loss import batch_keys, cross_entropy_sum, loss_labels, token_count
from mythos_train.metrics import MetricsLogger

logger = logging.getLogger(__name__)


def plot_loss_vs_loops(history: list[dict], path: Path, train_depth: tuple[float, int] | None = None) -> None:
    """One line per evaluation (later ones darker): validation loss against loop count, log2 x axis."""
    import matplotlib  # optional, heavy

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    cmap = plt.get_cmap("viridis")
    for i, record in enumerate(history):
        loops = sorted(int(n) for n in record["loss"])
        ax.plot(
            loops,
            [record["loss"][str(n)] for n in loops],
            marker="o",
            color=cmap(i / max(len(history) - 1, 1)),
            label=f"step {record['step']}",
        )
    if train_depth is not None:
        ax.axvline(train_depth[0], color="gray", linestyle="--", linewidth=1, label="mean train depth")
        ax.axvline(train_depth[1], color="gray", linestyle=":", linewidth=1, label="max train depth")
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted({int(n) for record in history for n in record["loss"]}))
    ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("loop iterations at inference")
    ax.set_ylabel("validation loss")
    ax.set_title("Validation loss vs loop count")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def reshard(model: torch.nn.Module) -> None:
    """Give FSDP back its sharded parameters after no_grad forwards: the root (reshard_after_forward=False)
    otherwise keeps unsharded ones registered until a backward, which the optimizer and DCP do not expect."""
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


class Evaluator:
    """Runs `eval.loop_counts` on fixed validation windows, plots, and logs a greedy sample (collective)."""

    def __init__(
        self,
        cfg: JobConfig,
        model: torch.nn.Module,
        dims: parallel.ParallelDims,
        device: torch.device,
        metrics: MetricsLogger,
        run_dir: Path,
    ) -> None:
        self.cfg, self.model, self.dims, self.device, self.metrics = cfg, model, dims, device, metrics
        self.folder = Path(run_dir) / "eval"
        self.is_main = dims.dp_rank == 0
        self._batches: dict[str, list[dict[str, torch.Tensor]]] = {}  # by data.mixture source ("" = all data)
        self._canary: dict[int, Encoded] | None = None
        self.last_canary: dict | None = None
        "The last canary accuracy record (canary.accuracy), else None."

    def validation_batches(self, source: str = "") -> list[dict[str, torch.Tensor]]:
        """`eval.batches` micro-batches of this rank's validation share (of data.mixture `source` when given),
        read once (CPU tensors)."""
        if source not in self._batches:
            t = self.cfg.train
            loader = build_loader(
                source_config(self.cfg.data, source) if source else self.cfg.data,
                split="val",
                seq_len=t.seq_len,
                micro_batch_size=t.micro_batch_size,
                grad_accum_steps=1,
                dp_rank=self.dims.dp_rank,
                dp_world_size=self.dims.dp_size,
            )
            # The val loader restarts at its first window and cycles: every rank gets exactly eval.batches.
            keys = batch_keys(self.cfg.train.document_masking)
            batches = [{k: b[k] for k in keys if k in b} for b in itertools.islice(loader, self.cfg.eval.batches)]
            loader.close()
            self._batches[source] = batches
        return self._batches[source]

    @torch.no_grad()
    def losses(self, source: str = "", loop_counts: list[int] | None = None) -> dict[int, float]:
        """Token-weighted validation loss at each loop count (of data.mixture `source`), identical on every rank."""
        batches = self.validation_batches(source)
        results = {}
        for loops in loop_counts or self.cfg.eval.loop_counts:
            total = torch.zeros(2, device=self.device, dtype=torch.float64)  # [loss sum, tokens]
            for cpu_batch in batches:
                batch = {k: v.to(self.device) for k, v in cpu_batch.items()}
                labels = loss_labels(batch)
                with parallel.loss_context(self.dims):  # vocabulary-parallel logits under TP
                    logits = self.model(
                        batch["input_ids"], n_nograd=0, n_grad=loops, doc_starts=batch.get("doc_starts")
                    )
                    total[0] += cross_entropy_sum(logits, labels)
                total[1] += token_count(labels)
            all_reduce_sum(total)
            results[loops] = float(total[0] / total[1].clamp(min=1))
        return results

    @torch.no_grad()
    def sample(self) -> str | None:
        """Greedy continuation of `eval.sample_prompt` (None when the data has no tokenizer), run eagerly."""
        path = tokenizer_path(self.cfg.data)
        if not os.path.isfile(path):
            return None
        tokenizer = load_tokenizer(path)
        e = self.cfg.eval
        prompt_ids = tokenizer.encode(e.sample_prompt)[-self.cfg.model.max_seq_len // 2 :] or [tokenizer.bos_id()]
        new_tokens = min(e.sample_tokens, self.cfg.model.max_seq_len - len(prompt_ids))
        prompt = torch.tensor([prompt_ids], dtype=torch.long, device=self.device)
        # Eager even when the blocks are compiled: every decode step changes the cache shapes the blocks (all one
        # code object) guard on, so a few tokens would exceed dynamo's recompile limit, a hard error under fullgraph.
        with torch.compiler.set_stance("force_eager"), parallel.full_logits(self.model):
            out = self.model.generate(prompt, max_new_tokens=new_tokens, n_loops=e.sample_loops, greedy=True)
        return e.sample_prompt + tokenizer.decode(out[0, len(prompt_ids) :].tolist())

    def canary_batches(self) -> dict[int, Encoded]:
        """This rank's share of the canary's evaluation programs by hop count, tokenized once (CPU tensors)."""
        if self._canary is None:
            sp = load_tokenizer(tokenizer_path(self.cfg.data))
            programs = read_eval_programs(os.path.join(self.cfg.canary.dir, EVAL_FILE))
            answer_id = sp.piece_to_id(ANSWER_MARKER)
            if sp.is_unknown(answer_id):
                raise DataError(
                    f"tokenizer {tokenizer_path(self.cfg.data)} has no piece {ANSWER_MARKER!r}: prepare the canary "
                    f"with data.answer_marker = {ANSWER_MARKER!r} (configs/canary.toml)"
                )
            share = rank_share(programs, self.dims.dp_rank, self.dims.dp_size)
            self._canary = {h: encode_programs(p, sp, answer_id, sp.eos_id()) for h, p in share.items()}
        return self._canary

    def canary_accuracy(self, step: int) -> dict:
        """Answer accuracy by hops x loops (collective), logged and saved on the main rank."""
        with parallel.full_logits(self.model):
            accuracy, delta = answer_accuracy(self.model, self.canary_batches(), self.cfg.eval.loop_counts, self.device)
        record = {
            "step": step,
            "accuracy": {str(h): {str(n): a for n, a in row.items()} for h, row in accuracy.items()},
            "state_delta": delta,
            "train_hops": self.cfg.canary.train_hops,
            "mean_depth": self.cfg.train.mean_depth,
        }
        if self.is_main:
            scalars = {
                f"canary/accuracy/hops_{h:02d}/loops_{n:03d}": a for h, row in accuracy.items() for n, a in row.items()
            }
            scalars.update({f"canary/state_delta/iter_{t:02d}": v for t, v in enumerate(delta)})
            self.metrics.scalars(step, scalars)
            save_accuracy(record, self.folder, self.cfg.canary.train_hops, self.cfg.train.mean_depth)
            self.metrics.console(
                f"canary step {step} | accuracy by hops at loops "
                + "/".join(str(n) for n in self.cfg.eval.loop_counts)
                + ": "
                + " | ".join(f"d={h}: " + "/".join(f"{a:.2f}" for a in row.values()) for h, row in accuracy.items())
            )
        return record

    def run(self, step: int) -> dict[int, float]:
        was_training = self.model.training
        self.model.eval()
        # Forked generator, seeded: a noise initial state (model.initial_state) draws the same at every evaluation,
        # and training's stream is untouched, so a run resumed after an evaluation stays exact.
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(self.cfg.train.seed)
            try:
                losses = self.losses()
                by_source = self.source_losses()
                text = self.sample() if self.cfg.eval.sample_tokens > 0 else None
                self.last_canary = self.canary_accuracy(step) if self.cfg.canary.accuracy else None
            finally:
                self.model.train(was_training)
                reshard(self.model)
        if self.is_main:
            self.metrics.scalars(step, {f"eval/loss/loops_{n:03d}": v for n, v in losses.items()})
            self.metrics.scalars(step, {f"eval/loss_by_source/{name}": v for name, v in by_source.items()})
            if text is not None:
                self.metrics.text(step, "eval/sample", text)
            self._save(step, losses)
            parts = [f"loops {n}: {v:.4f}" for n, v in losses.items()] + [f"{k}: {v:.4f}" for k, v in by_source.items()]
            self.metrics.console(f"eval step {step} | " + " | ".join(parts))
        return losses

    def source_losses(self) -> dict[str, float]:
        """Validation loss of each data.mixture source at the largest eval loop count ({} without a mixture)."""
        loops = max(self.cfg.eval.loop_counts)
        return {name: self.losses(name, [loops])[loops] for name, _, _ in self.cfg.data.mixture_sources()}

    def _save(self, step: int, losses: dict[int, float]) -> None:
        """Append to eval/history.jsonl and redraw eval/loss_vs_loops.png from the whole history."""
        self.folder.mkdir(parents=True, exist_ok=True)
        history_file = self.folder / "history.jsonl"
        with open(history_file, "a") as f:
            f.write(json.dumps({"step": step, "loss": {str(n): v for n, v in losses.items()}}) + "\n")
        by_step = {}  # a resumed run may evaluate a step again: keep the latest record of each step
        for line in history_file.read_text().splitlines():
            record = json.loads(line)
            by_step[record["step"]] = record
        history = [by_step[s] for s in sorted(by_step)]
        t = self.cfg.train
        plot_loss_vs_loops(history, self.folder / "loss_vs_loops.png", (t.mean_depth, t.max_depth))
