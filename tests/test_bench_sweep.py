"""`bench --sweep` on a tiny config: one row per (policy, micro-batch, depth), the depth really pinned, and the
measured peak memory responding to gradient depth and checkpointing the way the saved activations say it must.
"""

import pytest
import torch
from model_testing import DIM32, TINY_MODEL, tiny_model_flags

from mythos_train.bench import throughput as bench
from mythos_train.bench.sweep import TimedStep
from mythos_train.config import load_config
from mythos_train.distributed import destroy_distributed, init_distributed

# the tiny test model at dim 32 with 4 experts over configs/debug.toml's [model] (MLA, depths up to 8)
MODEL = TINY_MODEL | DIM32 | dict(n_experts=4, max_loop_iters=8)
TINY = [*tiny_model_flags(**MODEL), f"--data.vocab_size={MODEL['vocab_size']}", f"--train.seq_len={MODEL['max_seq_len']}",
        "--parallel.compile=false", "--train.device=cpu"]  # fmt: skip


def test_sweep_table(capsys):
    rows = bench.main(["--sweep", "--config", "configs/debug.toml", "--depths", "1,3", "--backprop", "2",
                       "--batches", "2", "--ac", "none,loop", "--steps", "1", "--metrics.cpu_peak_tflops=0.1", *TINY])  # fmt: skip
    out = capsys.readouterr().out
    assert [(r["ac"], r["batch"], r["n_nograd"], r["n_grad"]) for r in rows] == [
        (ac, 2, *d) for ac in ("none", "loop") for d in ((0, 1), (1, 2))
    ]
    assert sum(line.startswith(("none ", "loop ")) for line in out.splitlines()) == 4
    assert all(r["tokens_per_s"] > 0 and r["mfu"] > 0 for r in rows)
    by = {(r["ac"], r["batch"], r["n_nograd"] + r["n_grad"]): r for r in rows}
    assert by["none", 2, 3]["flops_per_token"] > by["none", 2, 1]["flops_per_token"]
    assert by["none", 2, 3]["peak_bytes"] > by["none", 2, 1]["peak_bytes"]  # a second gradient iteration's activations
    assert by["none", 2, 3]["peak_bytes"] > by["loop", 2, 3]["peak_bytes"]  # checkpointing saves 2 loop iterations


def test_pinned_depth_runs_that_many_iterations():
    cfg = load_config("configs/debug.toml", [*TINY, "--parallel.ep=1", "--parallel.activation_checkpoint=none"])
    info = init_distributed(cfg)
    try:
        step = TimedStep(cfg, info.world_size, info.device)
        grad_enabled = []
        step.model.recurrent.block.register_forward_hook(lambda *_: grad_enabled.append(torch.is_grad_enabled()))
        assert step(0, (3, 2))[1:] == (3, 2)
        assert grad_enabled == [False] * 3 + [True] * 2
    finally:
        destroy_distributed()


def test_bad_policy_is_an_error():
    with pytest.raises(SystemExit):
        bench.main(["--sweep", "--config", "configs/debug.toml", "--ac", "some", *TINY])
