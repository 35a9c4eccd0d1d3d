"""Helpers for the elastic-restart tests: torchrun runs of the tiny job, with what every step did recorded.

Run as a script (`torchrun ... tests/elastic_testing.py train --config ...`), this file is the trainer's CLI plus a
recorder: each rank appends one JSON line per optimizer step to `$MYTHOS_TEST_RECORD/rank<r>-pid<p>.jsonl`
(step, loss, world size, torchrun restart count, and the ids of the windows the step consumed), flushed at once
so a SIGKILL loses nothing already done. With `MYTHOS_TEST_HOLD_FILE` set, a rank waits before any step past the
number written in that file (and records that it waits), so a test can change the membership at a known step. The fault itself is injected
by the trainer (MYTHOS_FAULT_KILL_AT_STEP, distributed.py).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECORD_ENV = "MYTHOS_TEST_RECORD"
HOLD_ENV = "MYTHOS_TEST_HOLD_FILE"


# --------------------------------------------------------------------------- launching


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def torchrun(nproc: int, *, max_restarts: int, rdzv: tuple[str, str] | None = None) -> list[str]:
    """torchrun as the launchers call it: standalone, or c10d rendezvous (endpoint, run id) with 1 to 2 nodes."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--max-restarts={max_restarts}"]
    if rdzv is None:
        return [*cmd, "--standalone"]
    endpoint, run_id = rdzv
    return [
        *cmd,
        "--nnodes=1:2",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint={endpoint}",
        f"--rdzv-id={run_id}",
        "--rdzv-conf=last_call_timeout=1,join_timeout=120,keep_alive_interval=1,keep_alive_max_attempt=3",
    ]


def train_command(launcher: list[str], config: Path, *overrides: str) -> list[str]:
    return [*launcher, str(Path(__file__).resolve()), "train", "--config", str(config), *overrides]


def run_env(record_dir: Path, **extra: str) -> dict[str, str]:
    """Environment of a recorded run: the repo importable, one thread per process, torchrun's own store defaults."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MYTHOS_", "TORCHELASTIC_", "TORCH_DISABLE_SHARE"))}
    env.update(
        PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **{RECORD_ENV: str(record_dir)}, **extra
    )
    return env


def run(cmd: list[str], env: dict[str, str], log: Path, timeout: float = 240) -> str:
    """Run to the end; fail with the log's tail unless it exits 0."""
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass  # killed below; the assertion shows the log
        finally:
            kill_tree(proc)
    text = log.read_text()
    assert proc.returncode == 0, f"{' '.join(cmd)} exited {proc.returncode}:\n{text[-6000:]}"
    return text


def children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a launched torchrun and its workers (they run in sessions of their own, so a group kill misses them)."""
    if proc.poll() is None:
        pids = [proc.pid]
        while pids:
            pid = pids.pop()
            pids.extend(children(pid))
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait()


# --------------------------------------------------------------------------- reading a run back


def read_records(record_dir: Path, event: str = "step") -> list[dict]:
    """Every recorded step (or, with event="hold", every wait at the hold) of every rank and attempt, in time order."""
    records = []
    for file in sorted(Path(record_dir).glob("rank*.jsonl")):
        records += [json.loads(line) for line in file.read_text().splitlines() if line.endswith("}")]
    return sorted((r for r in records if r["event"] == event), key=lambda r: r["time"])


def final_timeline(records: list[dict]) -> dict[int, list[dict]]:
    """step -> the records of its last execution, one per rank in rank order.

    Attempts follow each other in time (torchrun stops every worker before the next rendezvous), so the last
    `world_size` records of a step are those of the attempt whose result the run kept.
    """
    by_step: dict[int, list[dict]] = {}
    for record in records:
        by_step.setdefault(record["step"], []).append(record)
    timeline = {}
    for step, recs in sorted(by_step.items()):
        last = recs[-recs[-1]["world_size"] :]
        assert sorted(r["rank"] for r in last) == list(range(len(last))), (
            f"step {step}: ranks {[r['rank'] for r in last]}"
        )
        timeline[step] = sorted(last, key=lambda r: r["rank"])
    return timeline


def consumed_windows(timeline: dict[int, list[dict]]) -> list[int]:
    """Window ids in stream order: step by step, rank by rank (windows.py: rank r reads positions p0 + r*B + [0, B))."""
    return [w for step in sorted(timeline) for record in timeline[step] for w in record["windows"]]


def stream_windows(config: Path, count: int) -> list[int]:
    """The first `count` window ids of the training stream, read by one rank in one batch (world-size free)."""
    from data_pipeline import build_loader
    from mythos_train.config import load_config

    cfg = load_config(config, ["--data.return_window_ids=true"])
    loader = build_loader(
        cfg.data,
        split="train",
        seq_len=cfg.train.seq_len,
        micro_batch_size=count,
        grad_accum_steps=1,
        dp_rank=0,
        dp_world_size=1,
    )
    return next(iter(loader))["window_ids"].tolist()


def checkpoint_state(path: Path, tmp: Path) -> dict:
    """Everything in a DCP checkpoint (model and AdamW state, sharded or not) as one flat dict of tensors/values."""
    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    tmp.mkdir(parents=True, exist_ok=True)
    out = tmp / f"{path.parent.parent.name}-{path.name}.pt"
    dcp_to_torch_save(path, out)
    flat = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                walk(f"{prefix}/{key}", item)
        elif isinstance(value, (list, tuple)) and any(isinstance(v, (dict, list, tuple)) for v in value):
            for i, item in enumerate(value):
                walk(f"{prefix}/{i}", item)
        else:
            flat[prefix] = value

    walk("", torch.load(out, weights_only=False))
    return flat


# --------------------------------------------------------------------------- the recorder (script mode)


class _RecordingLoader:
    """Wraps the train loader and keeps the window ids of the micro-batches drawn since the last `take()`."""

    def __init__(self, inner):
        self.inner, self.window_ids = inner, []

    def __iter__(self):
        iter(self.inner)
        return self

    def __next__(self):
        batch = next(self.inner)
        self.window_ids += batch["window_ids"].tolist()
        return batch

    def take(self) -> list[int]:
        ids, self.window_ids = self.window_ids, []
        return ids

    def __getattr__(self, name):
        return getattr(self.inner, name)


def _install_recorder(record_dir: Path) -> None:
    import mythos_train.trainer as trainer_module

    build_loader, train_step = trainer_module.build_loader, trainer_module.Trainer.train_step
    trainer_module.build_loader = lambda *a, **k: _RecordingLoader(build_loader(*a, **k))
    rank = os.environ.get("RANK", "0")
    file = open(Path(record_dir) / f"rank{rank}-pid{os.getpid()}.jsonl", "a", buffering=1)
    hold = Path(os.environ[HOLD_ENV]) if HOLD_ENV in os.environ else None

    def write(event: str, trainer, **values) -> None:
        record = {
            "event": event,
            "step": trainer.step + 1,
            "rank": trainer.dist.rank,
            "world_size": trainer.dist.world_size,
            "restart": int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")),
            "time": time.time(),
            **values,
        }
        file.write(json.dumps(record) + "\n")

    def recording_step(self, micro_batches):
        if hold is not None and self.step + 1 > int(hold.read_text()):
            write("hold", self)
            while self.step + 1 > int(hold.read_text()):
                time.sleep(0.05)
        result = train_step(self, micro_batches)
        write("step", self, loss=result.loss, windows=self.data_loader.take())
        return result

    trainer_module.Trainer.train_step = recording_step


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    _install_recorder(Path(os.environ[RECORD_ENV]))
    from mythos_train.__main__ import main

    sys.exit(main(sys.argv[1:]))
