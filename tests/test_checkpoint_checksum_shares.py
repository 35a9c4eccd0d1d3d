"""Checkpoint checksums are shared out: at save each rank reads only the files it wrote (rank 0 alone reading a
0.6-12 TB checkpoint would outlast the process-group timeout), at resume each rank verifies a disjoint share.
The reference is a plain zlib CRC-32 of every file of the folder, computed here."""

import json
import zlib
from pathlib import Path

import pytest
from trainer_testing import StoppingTrainer, prepare_tiny_data, tiny_config

import mythos_train.checkpoint_safety as checkpoint_safety
from mythos_train.checkpoint import MARKER
from mythos_train.distributed import init_distributed


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return prepare_tiny_data(tmp_path_factory.mktemp("data"))


def _train_recording_reads(rank, world_size, cfg, stop_after):
    """Train, and return the checkpoint files this rank read for checksums, by phase (resume / save)."""
    read, crc32 = {"resume": [], "save": []}, checkpoint_safety._crc32
    phase = ["save"]

    def recording(file):
        read[phase[0]].append(str(file))
        return crc32(file)

    checkpoint_safety._crc32 = recording
    trainer = StoppingTrainer(cfg, init_distributed(cfg), stop_after)
    resume = trainer.resume

    def recording_resume():
        phase[0] = "resume"
        resume()
        phase[0] = "save"

    trainer.resume = recording_resume
    try:
        trainer.train()
    finally:
        trainer.close()
    return read


def _relative(names, folder):
    return sorted(str(Path(name).relative_to(folder)) for name in names)


@pytest.mark.slow
def test_each_rank_checksums_its_own_files_and_verifies_a_share(data_dir, tmp_path):
    from distributed_testing import run_distributed

    cfg = tiny_config(data_dir, tmp_path / "run", ["--train.steps=2", "--checkpoint.every_steps=1"])
    saved = run_distributed(_train_recording_reads, 2, cfg, 1, timeout=240)
    step = tmp_path / "run" / "checkpoints" / "step-1"
    files = {
        str(f.relative_to(step)): [f.stat().st_size, zlib.crc32(f.read_bytes())]
        for f in sorted(step.rglob("*"))
        if f.is_file() and f.name != MARKER and not f.name.startswith("checksums")
    }
    assert json.loads((step / MARKER).read_text())["files"] == files
    reads = [_relative(r["save"], step) for r in saved]
    assert reads[1] == sorted(n for n in files if n.startswith("__1_") or n == "rank/rank1.pt"), reads
    assert sorted(reads[0] + reads[1]) == sorted(files), reads  # each file read once, by the rank that wrote it

    resumed = run_distributed(_train_recording_reads, 2, cfg, None, timeout=240)
    shares = [_relative(r["resume"], step) for r in resumed]
    assert all(shares) and sorted(shares[0] + shares[1]) == sorted(files), shares  # disjoint, together all
