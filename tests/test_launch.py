"""The launchers in launch/: they parse, set the environment they document, train on CPU (restarting after a
killed worker), and the SLURM script composes one torchrun per node and requeues itself on its warning signal
(checked with stand-ins for srun and scontrol, so no SLURM is needed)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from elastic_testing import free_port
from trainer_testing import config_file, prepare_tiny_data

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MYTHOS_", "TORCH_", "OMP_", "NPROC_", "SLURM_"))}
    env.update(PYTHON=sys.executable, CUDA_VISIBLE_DEVICES="", **extra)
    return env


def _launch(args: list[str], env: dict[str, str], timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", *map(str, args)], env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO)


def test_scripts_parse():
    for script in LAUNCH.iterdir():
        subprocess.run(["bash", "-n", str(script)], check=True)


def test_environment_on_a_cpu_machine():
    script = f"source {LAUNCH / 'env.sh'}; echo $PYTHON $NPROC_PER_NODE $TORCH_DISABLE_SHARE_RDZV_TCP_STORE $(threads_per_process 2) $PYTHONPATH"
    out = subprocess.run(["bash", "-c", script], env=_env(), capture_output=True, text=True, check=True).stdout.split()
    assert out[:3] == [sys.executable, "2", "1"]
    assert int(out[3]) == max(len(os.sched_getaffinity(0)) // 2, 1)  # the cores this process may use, per process
    assert out[4].split(":")[0] == str(REPO)


def test_multi_node_needs_its_rendezvous():
    proc = _launch([LAUNCH / "multi_node.sh", "--nnodes", "2", "--config", "x.toml"], _env())
    assert proc.returncode == 2 and "--rdzv-endpoint and --run-id are required" in proc.stderr


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    root = tmp_path_factory.mktemp("launch")
    return config_file(prepare_tiny_data(root), root / "run")


def test_a_config_error_is_reported_once_before_torchrun(config):
    proc = _launch(
        [LAUNCH / "single_node.sh", "--nproc", "2", "--max-restarts", "1", "--config", config, "--optim.lr=-1"],
        _env(),
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-3000:]
    assert out.count("optim.lr must be > 0") == 1, out[-3000:]  # before: once per worker and torchrun attempt
    assert "torch.distributed" not in out  # torchrun never started


def test_validate_only_checks_a_good_config_and_writes_nothing(config):
    run = config.parent / "validate_only"
    env = {**_env(), "PYTHONPATH": str(REPO)}
    args = [sys.executable, "-m", "mythos_train", "train", "--validate-only", "--config", config]
    proc = subprocess.run([*map(str, args), f"--train.run_dir={run}"], env=env, capture_output=True, text=True)
    assert proc.returncode == 0 and "config ok for 1 ranks: a new run" in proc.stdout, proc.stderr
    assert not run.exists()


@pytest.mark.slow
def test_single_node_restarts_a_killed_worker_and_finishes(config):
    run = config.parent / "single"
    proc = _launch(
        [
            LAUNCH / "single_node.sh",
            "--nproc",
            "2",
            "--max-restarts",
            "1",
            "--config",
            config,
            f"--train.run_dir={run}",
            "--train.steps=4",
            "--checkpoint.every_steps=2",
            "--parallel.ep=2",
        ],
        _env(MYTHOS_FAULT_KILL_AT_STEP="1:3"),
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-5000:]
    assert (
        "SIGKILL rank 1 at step 3" in out and "restart 1 of at most 1" in out and "(step 2)" in out
    )  # resumed from step 2
    assert (
        "store: torchrun's, fresh per attempt" in out
    )  # env.sh's TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 reached torchrun
    assert "step 4/4" in out


@pytest.mark.slow
def test_multi_node_trains_through_the_c10d_rendezvous(config):
    run = config.parent / "multi"
    proc = _launch(
        [
            LAUNCH / "multi_node.sh",
            "--nnodes",
            "1:2",
            "--nproc",
            "2",
            "--rdzv-endpoint",
            f"localhost:{free_port()}",
            "--run-id",
            "launch-test",
            "--config",
            config,
            f"--train.run_dir={run}",
            "--train.steps=2",
        ],
        _env(),
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-5000:]
    assert "2 ranks on cpu" in out and "step 2/2" in out


FAKE_SCONTROL = """#!/usr/bin/env bash
if [[ "$1 $2" == "show hostnames" ]]; then printf 'gpu-a17\\ngpu-a18\\n'; else echo "scontrol $*" >> "$CALLS"; fi
"""
FAKE_SRUN = """#!/usr/bin/env bash
trap 'echo "srun got USR1" >> "$CALLS"; kill $!; exit 75' USR1
echo "srun $*" >> "$CALLS"
sleep 60 &
wait
"""


def test_slurm_script_starts_one_torchrun_per_node_and_requeues_on_usr1(tmp_path):
    """USR1 is passed on to srun; its tasks exit 75 (stopped with a checkpoint, as the launchers do), so requeue."""
    bin_dir, calls = tmp_path / "bin", tmp_path / "calls"
    bin_dir.mkdir()
    for name, text in (("scontrol", FAKE_SCONTROL), ("srun", FAKE_SRUN)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = _env(
        PATH=f"{bin_dir}:{os.environ['PATH']}",
        CALLS=str(calls),
        SLURM_JOB_ID="4242",
        SLURM_JOB_NUM_NODES="2",
        SLURM_JOB_NODELIST="gpu-a[17-18]",
        SLURM_CPUS_PER_TASK="64",
        SLURM_SUBMIT_DIR=str(REPO),
    )
    log = tmp_path / "job.out"
    with open(log, "w") as out:
        batch = subprocess.Popen(
            ["bash", str(LAUNCH / "slurm.sbatch"), "--config", "configs/mythos_10b.toml"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 30
        while not (calls.is_file() and "srun" in calls.read_text()):
            assert time.monotonic() < deadline and batch.poll() is None, log.read_text()
            time.sleep(0.1)
        batch.send_signal(signal.SIGUSR1)  # SLURM's --signal=B:USR1 goes to the batch shell only
        batch.wait(timeout=30)  # the trap runs at once, not after the step ends
    finally:
        try:
            os.killpg(batch.pid, signal.SIGKILL)  # the stand-in srun, still sleeping
        except ProcessLookupError:
            pass
    srun, forwarded, requeue = calls.read_text().splitlines()
    assert forwarded == "srun got USR1"
    assert srun == (
        "srun --ntasks-per-node=1 --cpus-per-task=64 --kill-on-bad-exit=0 bash launch/multi_node.sh --nnodes 2:2 "
        "--rdzv-endpoint gpu-a17:29500 --run-id mythos-4242 --config configs/mythos_10b.toml"
    )
    assert requeue == "scontrol requeue 4242"
    assert "requeueing job 4242" in log.read_text()
    assert batch.returncode == 75


FAKE_TORCHRUN = """#!/usr/bin/env bash
[[ $2 == mythos_train ]] && exit 0  # the launcher's train --validate-only: the config is fine
trap 'echo "got TERM" >> "$CALLS"; [[ -z $WORKERS_STATUS ]] || echo "$WORKERS_STATUS" > "$MYTHOS_STOP_STATUS_FILE"
      kill $!; exit 1' TERM
echo "$*" >> "$CALLS"
sleep 60 &
wait
"""


@pytest.mark.parametrize(("workers_status", "expected"), [("", 75), ("76", 76)], ids=["saved", "checkpoints off"])
def test_launcher_passes_a_stop_signal_to_torchrun_and_exits_75(tmp_path, workers_status, expected):
    """SIGTERM to the launcher reaches torchrun (which hands it to the workers); torchrun then fails, the launcher
    exits 75, the status the SLURM script requeues on, or 76 (not requeued) when the workers had no checkpoint to
    save and said so in MYTHOS_STOP_STATUS_FILE."""
    python, calls = tmp_path / "python", tmp_path / "calls"
    python.write_text(FAKE_TORCHRUN)
    python.chmod(0o755)
    launcher = subprocess.Popen(
        ["bash", str(LAUNCH / "single_node.sh"), "--config", "x.toml"],
        env={**_env(CALLS=str(calls), WORKERS_STATUS=workers_status), "PYTHON": str(python)},
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 30
        while not (calls.is_file() and calls.read_text()):
            assert time.monotonic() < deadline and launcher.poll() is None
            time.sleep(0.1)
        launcher.send_signal(signal.SIGTERM)
        _, stderr = launcher.communicate(timeout=30)
    finally:
        try:
            os.killpg(launcher.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    args, received = calls.read_text().splitlines()
    assert args.startswith("-m torch.distributed.run --signals_to_handle=SIGTERM,SIGINT,SIGUSR1 ")
    assert received == "got TERM"
    assert launcher.returncode == expected, stderr
    assert "stopped by SIGTERM" in stderr


@pytest.mark.parametrize(
    "nccl, gloo, expected",
    [("ib0", None, "ib0"), ("=eth1,eth2", None, "eth1,eth2"), ("^docker0,lo", None, ""), ("ib0", "eth0", "eth0"),
     (None, None, "")],
)  # fmt: skip
def test_gloo_uses_the_interface_named_for_nccl(nccl, gloo, expected):
    """The async checkpoint group is gloo: it must use the interface the user named for NCCL (issue 13.7)."""
    extra = {k: v for k, v in (("NCCL_SOCKET_IFNAME", nccl), ("GLOO_SOCKET_IFNAME", gloo)) if v is not None}
    env = {k: v for k, v in _env(**extra).items() if k.endswith("SOCKET_IFNAME") is False or k in extra}
    script = f'source {LAUNCH / "env.sh"}; echo "[$GLOO_SOCKET_IFNAME]"'
    out = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == f"[{expected}]"
