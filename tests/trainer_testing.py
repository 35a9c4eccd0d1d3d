"""Shared helpers for the trainer/checkpoint/metrics/export/CLI tests: a tiny prepared dataset and a tiny job.

The corpus is the source of a few stdlib modules (deterministic, no download), prepared by data_pipeline's own
`prepare` with a 512-piece tokenizer; the model is model_testing's tiny one with 4 wider experts, seq 32, fp32 on CPU.
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
from pathlib import Path

import torch
from model_testing import TINY_MODEL
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from data_pipeline import DataConfig, prepare
from mythos_train.config import JobConfig, load_config
from mythos_train.trainer import Trainer

VOCAB = 512
MODULES = (
    "textwrap",
    "json.decoder",
    "json.encoder",
    "string",
    "shlex",
    "fnmatch",
    "glob",
    "csv",
    "heapq",
    "bisect",
    "colorsys",
    "keyword",
    "numbers",
    "pprint",
    "queue",
    "sched",
    "stat",
    "calendar",
    "difflib",
    "base64",
)


def write_module_sources(directory: Path, modules: tuple[str, ...] = MODULES) -> Path:
    """One text file per stdlib module, its source (a deterministic corpus, no download); returns `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    for name in modules:
        (directory / f"{name}.txt").write_text(inspect.getsource(importlib.import_module(name)))
    return directory


def prepare_tiny_data(
    root: Path, modules: tuple[str, ...] = MODULES, text: str = "text", out: str = "prepared", **data
) -> Path:
    """Write the modules' sources to root/text and prepare them into root/out (a VOCAB-piece tokenizer trained
    on them unless `data` names one); `data` overrides DataConfig fields. Returns the prepared directory."""
    src = write_module_sources(root / text, modules)
    fields = dict(vocab_size=VOCAB, val_fraction=0.2, num_workers=0, prepare_workers=1) | data
    prepare(DataConfig(sources=[str(src)], prepared_dir=str(root / out), **fields), progress=False)
    return root / out


# The model tests' tiny model with this corpus's vocabulary, a longer sequence and fewer, wider experts.
TRAINER_MODEL = TINY_MODEL | dict(
    vocab_size=VOCAB, max_seq_len=64, max_loop_iters=4, v_head_dim=16, n_experts=4, expert_dim=32
)

TINY_TOML = """
[model]
{model}

[parallel]
activation_checkpoint = "loop"

[train]
run_dir = "{run_dir}"
steps = 4
seq_len = 32
micro_batch_size = 2
grad_accum_steps = 1
device = "cpu"
depth_distribution = "uniform"
mean_depth = 2.0
min_depth = 1
max_depth = 3
backprop_depth = 2
log_every = 1

[optim]
lr = 1e-2
warmup_steps = 1

[checkpoint]
every_steps = 2
keep_last = 2

[metrics]
cpu_peak_tflops = 0.1

[eval]
every_steps = 0
loop_counts = [1, 2]
batches = 1
sample_prompt = "def main("
sample_tokens = 4
sample_loops = 2

[data]
prepared_dir = "{data_dir}"
vocab_size = {vocab}
num_workers = 0
"""


def tiny_config(data_dir: Path, run_dir: Path, overrides: list[str] | None = None) -> JobConfig:
    """The tiny job as a TOML file in run_dir's parent (so the CLI tests can use the same file)."""
    path = Path(run_dir).parent / f"{Path(run_dir).name}.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    model = "\n".join(f"{key} = {json.dumps(value)}" for key, value in TRAINER_MODEL.items())
    # Atomic: spawned ranks each write the same file, and one must never read another's half-written one (it
    # would load the defaults: data/stdlib).
    partial = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    partial.write_text(TINY_TOML.format(model=model, vocab=VOCAB, run_dir=run_dir, data_dir=data_dir))
    os.replace(partial, path)
    return load_config(path, overrides)


def config_file(data_dir: Path, run_dir: Path) -> Path:
    tiny_config(data_dir, run_dir)
    return Path(run_dir).parent / f"{Path(run_dir).name}.toml"


def step_host_syncs(trainer, micro_batches: list[dict]) -> dict[str, int]:
    """Device-to-host syncs of one whole `Trainer.train_step` (forward, backward, clipping, router-bias hook, AdamW,
    scheduler), by op. AdamW is fused on CPU as on CUDA, so it reads none of its step counters."""
    from collections import Counter

    from distributed_testing import CollectiveCounter, HostReadCounter

    with CollectiveCounter() as dispatched, HostReadCounter() as python:
        trainer.train_step(micro_batches)
    return dict(Counter(dispatched.host_syncs) + python.counts)


class _Stopped(Exception):
    pass


class StoppingTrainer(Trainer):
    """A Trainer whose `train` ends after step `stop_after` (None: never), as a run killed there would (tests of
    resume): after that step's log, checkpoint and eval, before the next step reads a batch."""

    def __init__(self, cfg: JobConfig, dist_info, stop_after: int | None = None) -> None:
        super().__init__(cfg, dist_info)
        self.stop_after = stop_after

    def next_micro_batches(self):
        if self.step == self.stop_after:
            raise _Stopped
        return super().next_micro_batches()

    def train(self) -> None:
        try:
            super().train()
        except _Stopped:
            pass


def train_in_process(cfg: JobConfig, stop_after: int | None = None) -> Trainer:
    """Train `cfg` in this process (a world-size-1 group), as a run stopped after step `stop_after` would;
    the trainer is closed and the group destroyed whatever happens. Returns the Trainer."""
    from mythos_train.distributed import destroy_distributed, init_distributed

    trainer = None
    try:
        trainer = StoppingTrainer(cfg, init_distributed(cfg), stop_after)
        trainer.train()
    finally:
        if trainer is not None:
            trainer.close()
        destroy_distributed()
    return trainer


def consolidated_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Full, unsharded model state dict on CPU (collective under FSDP: call on every rank)."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
