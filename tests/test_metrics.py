"""TensorBoard events readable by tensorboard itself, with every tag the trainer promises; loop-aware MFU; profiler
traces; the GPU peak table."""

import json

import pytest
from model_testing import counted_training_flops_per_token
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from trainer_testing import prepare_tiny_data, tiny_config

from mythos_train.distributed import destroy_distributed, init_distributed
from mythos_train.metrics import console_line, gpu_peak_flops
from mythos_train.trainer import Trainer

EXPECTED_SCALARS = [
    "loss/train",
    "optim/lr",
    "optim/grad_norm",
    "train/tokens_seen",
    "train/skipped_steps_total",
    "throughput/tokens_per_s",
    "throughput/tokens_per_s_per_device",
    "throughput/tflops_per_device",
    "throughput/mfu",
    "depth/n_nograd",
    "depth/n_grad",
    "time/step_ms",
    "time/data_wait_ms",
    "time/forward_backward_ms",
    "time/optimizer_ms",
    "memory/rss_gib",
    "data/epoch",
    "data/skipped_records",
    "loop/spectral_radius",
    "loop/h_norm/iter_00",
    "loop/halting_depth_mean",
    "loop/halting_depth_max",
    "experts/max_over_mean/iter_00",
    "experts/max_tokens/iter_00",
    "eval/loss/loops_001",
    "eval/loss/loops_002",
]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return prepare_tiny_data(tmp_path_factory.mktemp("data"))


def test_event_files_plot_and_profiler_trace(data_dir, tmp_path):
    run = tmp_path / "run"
    overrides = [
        "--train.steps=2",
        "--model.use_act=true",
        "--checkpoint.enabled=false",
        "--profile.enabled=true",
        "--profile.wait=0",
        "--profile.warmup=1",
        "--profile.active=1",
    ]
    cfg = tiny_config(data_dir, run, overrides)
    trainer = Trainer(cfg, init_distributed(cfg))
    losses = {}
    step = trainer.train_step

    def recording(micro_batches):
        result = step(micro_batches)
        losses[trainer.step + 1] = result
        return result

    trainer.train_step = recording
    try:
        trainer.train()
    finally:
        trainer.close()
        destroy_distributed()

    events = EventAccumulator(str(run / "tb"), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    tags = events.Tags()
    missing = [t for t in EXPECTED_SCALARS if t not in tags["scalars"]]
    assert not missing, f"missing scalar tags {missing}; have {sorted(tags['scalars'])}"
    assert any(t.startswith("eval/sample") for t in tags["tensors"]), tags["tensors"]

    def scalar(tag, step):
        return next(e.value for e in events.Scalars(tag) if e.step == step)

    for step, result in losses.items():
        assert scalar("loss/train", step) == pytest.approx(result.loss, rel=1e-6)
        assert scalar("depth/n_grad", step) == result.n_grad
        # MFU = tokens/s x FLOPs per token of the depth this step ran / peak, FLOPs counted by torch on a plain
        # model (log_every = 1: a one-step interval)
        flops = counted_training_flops_per_token(cfg.model, 2, cfg.train.seq_len, result.n_nograd, result.n_grad)
        tokens_per_s = scalar("throughput/tokens_per_s_per_device", step)
        assert tokens_per_s == pytest.approx(2 * 32 / (scalar("time/step_ms", step) / 1e3), rel=1e-4)
        assert scalar("throughput/tflops_per_device", step) == pytest.approx(tokens_per_s * flops / 1e12, rel=0.01)
        assert scalar("throughput/mfu", step) == pytest.approx(tokens_per_s * flops / 0.1e12, rel=0.01)
    assert scalar("optim/lr", 1) == pytest.approx(cfg.optim.lr)  # warmup of 1 step: the peak at step 1
    assert 0 < scalar("loop/spectral_radius", 2) < 1
    assert 1 <= scalar("loop/halting_depth_mean", 2) <= scalar("loop/halting_depth_max", 2)

    assert (run / "eval" / "loss_vs_loops.png").stat().st_size > 1000
    history = [json.loads(line) for line in (run / "eval" / "history.jsonl").read_text().splitlines()]
    assert history[-1]["step"] == 2 and set(history[-1]["loss"]) == {"1", "2"}
    traces = list((run / "profile").glob("rank0_*.json"))
    assert traces and json.loads(traces[0].read_text())["traceEvents"]


def test_gpu_peak_table_and_console_line():
    # the vendors' dense figures (half the sparse ones datasheets print first)
    assert gpu_peak_flops("NVIDIA H100 80GB HBM3") == pytest.approx(989.4e12)
    assert gpu_peak_flops("NVIDIA H100 PCIe") == 756e12
    assert gpu_peak_flops("NVIDIA H200") == pytest.approx(989.4e12)
    assert gpu_peak_flops("NVIDIA B200") == 2250e12
    assert gpu_peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert gpu_peak_flops("AMD Instinct MI300X") == pytest.approx(1307.4e12)
    assert gpu_peak_flops("NVIDIA GeForce GTX 1080") is None
    line = console_line(7, 100, {"loss/train": 2.5, "throughput/mfu": 0.41, "train/skipped_steps_total": 1})
    assert line == "step   7/100 | loss 2.5000 | mfu 41.0% | skipped 1"
