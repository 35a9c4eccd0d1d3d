"""`profile` (issue 18): the trace reading against a hand-timed trace, and real runs on 1 and 2 gloo processes.

The hand-timed trace's expected phases are computed here by hand from its event times, not by the reader. The
real runs check the phases against the step time perf_counter measured around each step, the loop rows against
the depth sampler's draws, and the communication column against what FSDP + EP 2 must issue.
"""

from __future__ import annotations

import json
import re

import pytest
import torch

from mythos_train.__main__ import main
from mythos_train.depth import DepthSampler
from mythos_train.model import MythosModel
from mythos_train.model.flops import training_flops_per_token
from mythos_train.model.parallel_plan import ParallelPlan
from mythos_train.profile_report import part_table
from mythos_train.profile_trace import read_trace
from tests.model_testing import tiny_model_config
from tests.trainer_testing import config_file, prepare_tiny_data, tiny_config

with torch.device("meta"):
    PLAN = MythosModel(tiny_model_config()).parallel_plan()

STEP_TOLERANCE = (0.05, 2.0)
"Phases vs perf_counter step time: within 5% or 2 ms (the profiler's own range bookkeeping and a clock read)."


def _x(name, ts, dur, tid=1, cat="cpu_op", **args):
    return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "tid": tid, "pid": 1, "args": args}


def _memory(ts, total):
    return {"ph": "i", "name": "[memory]", "ts": ts, "tid": 1, "args": {"Total Allocated": total, "Device Type": 0}}


def hand_timed_trace() -> dict:
    """One 1000 us step; every phase's expected time is in `EXPECTED_MS`."""
    ann = "user_annotation"
    return {
        "traceEvents": [
            _x("mythos:step", 0, 1000, cat=ann),
            _x("mythos:data", 0, 50, cat=ann),
            _x("mythos:prelude", 100, 90, cat=ann),
            _x("aten::mm", 110, 70, **{"Sequence number": 1}),
            _x("PythonDispatchMode", 195, 11),  # starts before the loop range and ends inside it (as checkpoint's)
            _x("mythos:loop0:grad", 200, 200, cat=ann),
            _x("aten::mm", 210, 90, **{"Sequence number": 2}),
            _x("c10d::alltoall_base_", 300, 50),
            _x("mythos:backward", 500, 400, cat=ann),
            _x("autograd::engine::evaluate_function: MmBackward0", 500, 300, **{"Sequence number": 2}),
            _x("mythos:loop0:grad", 520, 80, cat=ann),  # the recompute
            _x("autograd::engine::evaluate_function: MmBackward0", 800, 80, **{"Sequence number": 1}),
            _x("mythos:optimizer", 900, 80, cat=ann),
            _x("gloo:all_to_all", 290, 110, tid=2),
            _memory(10, 100),
            _memory(550, 400),
            _memory(850, 250),
        ]
    }


EXPECTED_MS = {
    "data": {"compute": 0.050},
    "other": {"compute": 0.050 + 0.005 + 0.005 + 0.100 + 0.020},  # gaps; the dispatch-mode event cut at 200 us
    "prelude": {"compute": 0.090},
    "loop0": {"compute": 0.150, "all_to_all": 0.050},
    "loop0 recompute": {"compute": 0.080},
    "loop0 bwd": {"compute": 0.220},
    "prelude bwd": {"compute": 0.080},
    "other bwd": {"compute": 0.020},
    "optimizer": {"compute": 0.080},
}


def test_reading_of_a_hand_timed_trace():
    reading = read_trace(hand_timed_trace(), PLAN)
    phases = {p: {k: round(v, 6) for k, v in times.items()} for p, times in reading.phases.items()}
    assert phases == {p: {k: round(v, 6) for k, v in t.items()} for p, t in EXPECTED_MS.items()}
    assert reading.step_ms == [1.0]
    assert reading.occurrences == {"data": 1, "prelude": 1, "loop0": 1, "loop0 recompute": 1, "optimizer": 1}
    # gloo ran 290-400 us, the training thread waited 300-350 us: 110 in flight, 50 exposed, 60 hidden
    assert (reading.in_flight_ms, reading.exposed_ms) == pytest.approx((0.110, 0.050))
    assert reading.overlapped_ms == pytest.approx(0.060)
    assert (reading.memory_peak_rise, reading.memory_peak_phase) == (300, "loop0 recompute")


def test_device_reading_of_a_hand_timed_gpu_trace():
    """Kernels take the phase of the host op that launched them; NCCL time under a compute kernel is hidden."""

    def launch(ts, corr):
        return _x("cudaLaunchKernel", ts, 5, cat="cuda_runtime", correlation=corr)

    def kernel(name, ts, dur, corr):
        return _x(name, ts, dur, tid=7, cat="kernel", correlation=corr)

    trace = {
        "traceEvents": [
            _x("mythos:step", 0, 1000, cat="user_annotation"),
            _x("mythos:loop0:grad", 10, 100, cat="user_annotation"),
            launch(20, 1),
            launch(30, 2),
            _x("mythos:optimizer", 200, 50, cat="user_annotation"),
            launch(210, 3),
            kernel("void gemm_kernel", 100, 300, 1),
            kernel("ncclDevKernel_AllGather_RING_LL", 350, 150, 2),  # 350-400 under the gemm: 50 hidden
            kernel("multi_tensor_apply_kernel", 600, 100, 3),
        ]
    }
    reading = read_trace(trace, PLAN)
    assert reading.reading == "device"
    assert reading.phases == {
        "loop0": {"compute": 0.3, "all_gather": 0.1},
        "optimizer": {"compute": 0.1},
        "idle": {"compute": pytest.approx(1.0 - 0.5)},
    }
    assert (reading.in_flight_ms, reading.exposed_ms, reading.overlapped_ms) == pytest.approx((0.15, 0.1, 0.05))


def test_fsdp_ranges_count_for_the_units_the_plan_names():
    """FSDP2 names its hooks' ranges after the unit; the reader maps units to phases from the plan it is given (here
    a model whose modules have none of MythosModel's names), not from names it knows."""
    plan = ParallelPlan(
        fsdp_units=("stem.0", "trunk", "tail.0"),
        loop="trunk",
        loop_block="trunk.cell",
        experts="trunk.cell.moe.experts",
        router="trunk.cell.moe.router",
        shared_experts=None,
        loop_parts={},
    )
    ann = "user_annotation"
    trace = {
        "traceEvents": [
            _x("mythos:step", 0, 1000, cat=ann),
            _x("FSDP::pre_forward (stem.0)", 0, 100),  # -> stem, all_gather
            _x("FSDP::pre_forward (trunk)", 100, 100),  # -> loop
            _x("FSDP::pre_forward (trunk.cell)", 200, 100),  # the loop block (reshard per iteration) -> loop
            _x("FSDP::pre_forward ()", 300, 100),  # the root: no unit of the plan -> the phase around it
            _x("FSDP::pre_forward (prelude.0)", 400, 100),  # not a unit of this plan
            _x("mythos:backward", 500, 500, cat=ann),
            _x("FSDP::post_backward_reduce (tail.0)", 500, 100),  # -> tail bwd, reduce_scatter
            _x("FSDP::post_backward_reduce (trunk)", 600, 100),  # -> loop bwd
        ]
    }
    phases = {p: {k: round(v, 6) for k, v in times.items()} for p, times in read_trace(trace, plan).phases.items()}
    assert phases == {
        "stem": {"all_gather": 0.1},
        "loop": {"all_gather": 0.2},
        "other": {"all_gather": 0.2},
        "tail bwd": {"reduce_scatter": 0.1},
        "loop bwd": {"reduce_scatter": 0.1},
        "other bwd": {"compute": 0.3},
    }


def test_phase_flops_add_up_to_the_step_model_flops(tmp_path):
    """Per-phase FLOPs (profile_report, from each range's run count) sum to model/flops.py's whole-step count."""
    cfg = tiny_config(tmp_path / "data", tmp_path / "run")
    ranges = ["prelude", "loop0 nograd", "loop1", "loop2", "coda", "head"]
    report = {
        "steps": 1,
        "occurrences": dict.fromkeys(ranges, 1),
        "phases": {p: {"compute": 1.0} for p in [*ranges, "loop1 bwd", "loop2 bwd", "coda bwd", "prelude bwd"]},
    }
    tokens = cfg.train.micro_batch_size * cfg.train.seq_len
    total = sum(row["flops"] for row in part_table(report, cfg).values())
    assert total == pytest.approx(training_flops_per_token(cfg.model, cfg.train.seq_len, 1, 2) * tokens)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return prepare_tiny_data(tmp_path_factory.mktemp("profile_data"))


def _expected_iterations(cfg, warm_steps: int, steps: int) -> list[int]:
    sampler = DepthSampler(cfg.train)
    return [sum(sampler.sample(step)) for step in range(warm_steps, warm_steps + steps)]


def test_profile_command_one_process(data_dir, tmp_path, capsys):
    config = config_file(data_dir, tmp_path / "run")
    assert main(["profile", "--config", str(config), "--warm-steps", "1", "--steps", "3"]) == 0
    out = capsys.readouterr().out
    (report,) = json.loads((tmp_path / "run" / "profile" / "profile.json").read_text())
    # the phases add up to each step's perf_counter time (steps in the trace are the same steps, in order)
    phase_sum = sum(sum(t.values()) for t in report["phases"].values())
    measured = sum(report["measured_step_ms"])
    assert abs(phase_sum - measured) <= max(STEP_TOLERANCE[0] * measured, STEP_TOLERANCE[1] * report["steps"])
    # one row per loop iteration run, and each iteration's range counted once per step that ran it
    iterations = _expected_iterations(tiny_config(data_dir, tmp_path / "run"), 1, 3)
    rows = re.findall(r"^  loop(\d+) (?:grad|nograd) ", out, flags=re.M)
    assert rows == [str(t) for t in range(max(iterations))]
    for t in range(max(iterations)):
        runs = sum(v for p, v in report["occurrences"].items() if re.fullmatch(rf"loop{t}( nograd)?", p))
        assert runs == sum(n > t for n in iterations)
    assert "planner (mythos_train/planner) vs measured" in out and "stragglers: slowest rank 0" in out
    png = (tmp_path / "run" / "profile" / "phases.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 2000


def test_profile_command_rejects_bad_step_counts(capsys):
    assert main(["profile", "--steps", "0"]) == 2
    assert "--steps must be >= 1" in capsys.readouterr().err


def _profile_two_ranks(rank, world_size, data_dir, run_dir):
    from mythos_train.distributed import DistInfo
    from mythos_train.profile_run import profile_job

    cfg = tiny_config(data_dir, run_dir, ["--parallel.ep=2"])
    return profile_job(cfg, DistInfo(rank, world_size, rank, torch.device("cpu")), 1, 2)


@pytest.mark.slow
def test_two_gloo_ranks_ep2_report_every_collective_kind(data_dir, tmp_path):
    from distributed_testing import run_distributed

    reports = run_distributed(_profile_two_ranks, 2, data_dir, tmp_path / "run", threads=1)[0]
    assert [r["rank"] for r in reports] == [0, 1]
    for report in reports:
        kinds = {k for times in report["phases"].values() for k, v in times.items() if k != "compute" and v > 0}
        assert {"all_to_all", "all_gather", "reduce_scatter", "all_reduce"} <= kinds
        loop_kinds = {k for p, times in report["phases"].items() if p.startswith("loop") for k in times}
        assert "all_to_all" in loop_kinds  # the expert dispatch lands in the loop iterations
        assert report["in_flight_ms"] >= report["exposed_ms"] > 0
        assert (tmp_path / "run" / "profile" / f"rank{report['rank']}.json").is_file()
    assert (tmp_path / "run" / "profile" / "phases.png").is_file()
