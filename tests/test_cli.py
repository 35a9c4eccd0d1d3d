"""`python -m mythos_train ...`: help texts, config errors, delegation, and prepare -> train -> eval -> export end to end
(one process, and two under torchrun)."""

import importlib
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
from safetensors.torch import load_file
from trainer_testing import VOCAB, config_file, write_module_sources

from mythos_train.__main__ import main
from mythos_train.checkpoint import find_latest

REPO = Path(__file__).resolve().parents[1]


def test_help_lists_fields_with_docs(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--model.dim  int = 256" in out and "Hidden size of every block." in out
    assert "--train.max_skipped_steps" in out and "--checkpoint.async_save" in out and "--data.prepared_dir" in out
    with pytest.raises(SystemExit):
        main(["prepare", "--help"])
    out = capsys.readouterr().out
    assert "--data.vocab_size" in out and "--model.dim" not in out
    assert (
        main([]) == 2
        and "usage: mythos-train {train,prepare,canary,eval,export,profile,bench,plan}" in capsys.readouterr().out
    )


def test_config_errors_name_the_field(tmp_path, capsys):
    assert main(["train", "--model.dimm=3"]) == 2
    assert "unknown key 'dimm'" in capsys.readouterr().err
    assert main(["train", "--train.seq_len=4096"]) == 2
    assert "train.seq_len (4096) must be <= model.max_seq_len" in capsys.readouterr().err
    assert main(["eval", "--config", str(tmp_path / "missing.toml")]) == 2
    assert "config file not found" in capsys.readouterr().err


def test_bench_and_plan_get_their_own_arguments(monkeypatch):
    calls = []
    for name, package, module in (("bench", "bench", "throughput"), ("plan", "planner", "cli")):
        fake = types.ModuleType(f"mythos_train.{package}.{module}")
        fake.main = lambda argv, name=name: calls.append((name, argv))
        monkeypatch.setitem(sys.modules, f"mythos_train.{package}.{module}", fake)
        importlib.import_module(f"mythos_train.{package}")
        monkeypatch.setattr(sys.modules[f"mythos_train.{package}"], module, fake, raising=False)
    assert main(["bench", "--steps", "3"]) == 0 and main(["plan", "--gpu", "h100"]) == 0
    assert calls == [("bench", ["--steps", "3"]), ("plan", ["--gpu", "h100"])]


def _run(args: list[str], cwd: Path, timeout: float = 300) -> str:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """Prepare through the CLI from a few text files."""
    root = tmp_path_factory.mktemp("cli")
    write_module_sources(root / "text")
    _run(
        [
            sys.executable,
            "-m",
            "mythos_train",
            "prepare",
            f"--data.sources={root / 'text'}",
            f"--data.prepared_dir={root / 'data'}",
            f"--data.vocab_size={VOCAB}",
            "--data.val_fraction=0.2",
        ],
        cwd=root,
    )
    assert (root / "data" / "manifest.json").is_file()
    return root


@pytest.mark.slow
def test_train_eval_export_one_process(prepared):
    config = config_file(prepared / "data", prepared / "run1")
    out = _run(
        [sys.executable, "-m", "mythos_train", "train", "--config", str(config), "--train.steps=2"], cwd=prepared
    )
    assert "step 2/2 | loss" in out and "eval step 2" in out
    assert find_latest(prepared / "run1" / "checkpoints").name == "step-2"
    out = _run(
        [sys.executable, "-m", "mythos_train", "eval", "--config", str(config), "--eval.loop_counts=[1,3]"],
        cwd=prepared,
    )
    assert "loops 3:" in out
    out = _run(
        [sys.executable, "-m", "mythos_train", "export", "--config", str(config), "--out", str(prepared / "export")],
        cwd=prepared,
    )
    assert "model: " in out and "tok_embeddings.weight" in load_file(prepared / "export" / "model.safetensors")


@pytest.mark.slow
def test_train_under_torchrun_two_processes(prepared):
    config = config_file(prepared / "data", prepared / "run2")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    out = _run(
        [*torchrun, "-m", "mythos_train", "train", "--config", str(config), "--train.steps=2", "--parallel.ep=2"],
        cwd=prepared,
    )
    assert "step 2/2 | loss" in out
    assert (prepared / "run2" / "checkpoints" / "step-2" / "__1_0.distcp").is_file()  # both ranks wrote shards
