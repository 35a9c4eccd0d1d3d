"""The README's main command, `make train`: configs/debug.toml under torchrun on 2 processes (FSDP + EP 2, loop
checkpointing, sampled depth, evaluation at loop counts above model.max_loop_iters), at reduced size.

Reduced: the tiny prepared corpus (512 pieces) instead of the stdlib one, fewer steps, shorter windows, one
validation batch. Everything else is the shipped file. Each step's loss is recorded by elastic_testing's recorder.
"""

import re
from pathlib import Path

import pytest
from elastic_testing import REPO, read_records, run, run_env, torchrun, train_command
from trainer_testing import VOCAB, prepare_tiny_data

from mythos_train.config import load_config

STEPS = 16
REDUCED = [
    f"--train.steps={STEPS}",
    "--train.seq_len=32",
    "--train.micro_batch_size=4",
    "--train.log_every=4",
    "--optim.warmup_steps=3",
    "--checkpoint.every_steps=8",
    "--eval.every_steps=8",
    "--eval.batches=1",
    f"--model.vocab_size={VOCAB}",
    f"--data.vocab_size={VOCAB}",
    "--data.return_window_ids=true",  # for the recorder
]


@pytest.mark.slow
def test_debug_config_trains_on_two_processes_and_the_summary_names_what_exists(tmp_path):
    config = REPO / "configs" / "debug.toml"
    shipped = load_config(config)
    assert max(shipped.eval.loop_counts) > shipped.model.max_loop_iters  # evaluated deeper than trained
    run_dir, record = tmp_path / "run", tmp_path / "record"
    record.mkdir()
    overrides = [*REDUCED, f"--data.prepared_dir={prepare_tiny_data(tmp_path / 'data')}", f"--train.run_dir={run_dir}"]
    log = run(train_command(torchrun(2, max_restarts=0), config, *overrides), run_env(record),
              tmp_path / "train.log", timeout=600)  # fmt: skip

    steps = [r for r in read_records(record) if r["rank"] == 0]
    assert [r["step"] for r in steps] == list(range(1, STEPS + 1))
    assert len({(r["world_size"], r["restart"]) for r in steps}) == 1 and steps[0]["world_size"] == 2
    losses = [r["loss"] for r in steps]
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < first - 0.5, f"loss did not fall: {losses}"

    summary = log[log.index("done: ") :]
    assert f"done: {STEPS} steps; train loss {losses[0]:.4f} -> {losses[-1]:.4f}" in summary, summary
    evaluated = dict(re.findall(r"(\d+): (\d+\.\d+)", summary.splitlines()[1]))
    assert [int(n) for n in evaluated] == shipped.eval.loop_counts, summary
    tensorboard = Path(re.search(r"tensorboard --logdir (\S+)", summary).group(1))
    plot = Path(re.search(r"loss vs loops (\S+)", summary).group(1))
    checkpoints = Path(re.search(r"checkpoints +(\S+)", summary).group(1))
    assert list(tensorboard.glob("events.out.tfevents.*")), f"no event file in {tensorboard}"
    assert plot.is_file() and plot.stat().st_size > 1000, f"{plot} missing or empty"
    assert sorted(p.name for p in checkpoints.iterdir() if (p / "COMPLETE").is_file()) == ["step-16", "step-8"]
