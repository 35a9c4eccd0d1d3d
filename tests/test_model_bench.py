"""The benchmark runs end to end, and its MFU is tokens/s x FLOPs per token (counted by torch, independently of the
formula it uses) / the peak it measured (the numbers themselves depend on the machine)."""

import pytest
from model_testing import counted_training_flops_per_token, open_mythos_reference

from mythos_train.bench import throughput as bench
from mythos_train.config import ModelConfig


def test_bench_smoke(capsys):
    results = bench.main(
        [
            "--batch",
            "1",
            "--seq",
            "16",
            "--loops",
            "2",
            "--warmup",
            "0",
            "--steps",
            "1",
            "--peak-size",
            "128",
            "--floor",
        ]
    )
    ours = results["mythos_train"]
    assert ours["tokens_per_s"] > 0 and ours["peak_flops"] > 0
    cfg = ModelConfig(**(bench.BENCH_SHAPE | {"max_seq_len": 16, "max_loop_iters": 2}))
    flops = counted_training_flops_per_token(cfg, 1, 16, 0, 2)
    assert ours["mfu"] == pytest.approx(ours["tokens_per_s"] * flops / ours["peak_flops"], rel=0.01)
    assert "MFU" in capsys.readouterr().out
    if "open_mythos" not in results:  # bench found no reference: skip here, fail under CI
        open_mythos_reference()
    assert results["open_mythos_full_depth"]["loops_run"] == 2  # its ACT may leave the loop early, this run may not
    # the floors: each model's recorded kernels (their GEMM FLOPs checked in test_bench_floor.py), timed alone
    assert results["mythos_train_floor"]["gemm_flops"] > 0 and results["open_mythos_full_depth_floor"]["gemm_flops"] > 0
    assert results["speedup_at_floor"] > 0


def test_bench_refuses_to_run_without_the_reference_when_required(monkeypatch, capsys):
    """gpu_check.sh's bench part must fail, not pass on our model alone, when open-mythos did not travel along."""
    monkeypatch.setattr(bench, "load_open_mythos", lambda: None)
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--batch", "1", "--seq", "16", "--loops", "1", "--steps", "1", "--require-reference"])
    assert exit_info.value.code == 2 and "open-mythos 0.5.0 is not importable" in capsys.readouterr().err
