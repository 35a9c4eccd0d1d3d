# Sourced by every launcher: the environment that makes torchrun jobs run, and restart, reliably on GPUs and CPUs.
# Sets PYTHON (the repository's .venv if there is one), NPROC_PER_NODE (GPUs, or 2 gloo processes without
# CUDA) and the function threads_per_process N; every value already in the environment is kept.

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"  # `-m mythos_train` from any working directory
if [[ -z ${PYTHON:-} ]]; then
    if [[ -x $repo/.venv/bin/python ]]; then PYTHON=$repo/.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONUNBUFFERED=1

# Elastic restarts. torchrun's c10d rendezvous shares its TCPStore with the workers by default, and in torch 2.13
# that store outlives a restart: the next attempt's workers can read the previous attempt's addresses (pytorch
# issue 135712: gloo "connectFullMesh ... Connection refused", NCCL "Failed to connect", or a hang), and when a
# node joins a running job the agents wait on each other until the join timeout (measured here). With 1, the
# agents publish a fresh store address every rendezvous round. (The trainer also guards itself when it is not
# set: mythos_train/distributed.py.)
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}

if [[ -n ${CUDA_VISIBLE_DEVICES+set} ]]; then  # set, even empty: CUDA sees exactly these devices
    gpus=$(tr ',' '\n' <<<"$CUDA_VISIBLE_DEVICES" | grep -c . || true)
elif command -v nvidia-smi >/dev/null 2>&1; then
    gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
else
    gpus=0
fi
if (( gpus > 0 )); then
    NPROC_PER_NODE=${NPROC_PER_NODE:-$gpus}
    # PyTorch's "ProcessGroupNCCL Environment Variables" page:
    #  TORCH_NCCL_ASYNC_ERROR_HANDLING=1: on a failed or timed-out collective, abort the communicator and tear the
    #    process down (the default, 3, does not abort it), so torchrun sees a dead worker and restarts the group
    #    instead of the job hanging. torchrun sets 1 for its workers too unless told otherwise.
    export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
    #  TORCH_NCCL_TRACE_BUFFER_SIZE > 0 with TORCH_NCCL_DUMP_ON_TIMEOUT=1: keep the last collectives of each
    #    rank (flight recorder) and dump them when the watchdog times out, to find the rank that hung.
    export TORCH_NCCL_TRACE_BUFFER_SIZE=${TORCH_NCCL_TRACE_BUFFER_SIZE:-2000}
    export TORCH_NCCL_DUMP_ON_TIMEOUT=${TORCH_NCCL_DUMP_ON_TIMEOUT:-1}
    # PyTorch "CUDA semantics", memory management: expandable segments let the caching allocator grow a segment
    # instead of fragmenting when allocation sizes change from step to step (the sampled loop depth does that).
    export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
    # NCCL's environment-variable reference: NCCL_DEBUG=WARN prints only problems (INFO shows the chosen
    # transports when debugging). If NCCL picks the wrong network, set NCCL_SOCKET_IFNAME / NCCL_IB_HCA to this
    # cluster's interfaces; they are site-specific, so nothing is set here.
    export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
else
    NPROC_PER_NODE=${NPROC_PER_NODE:-2}
fi

# The asynchronous checkpoint's process group is gloo (mythos_train/checkpoint.py), and gloo picks the address
# the hostname resolves to unless told: where NCCL_SOCKET_IFNAME names the interfaces, gloo gets the same ones.
# Gloo takes a plain comma-separated list, so NCCL's exact-match prefix '=' is dropped, and an exclusion list
# ('^docker0,lo') cannot be translated: set GLOO_SOCKET_IFNAME yourself then.
if [[ -n ${NCCL_SOCKET_IFNAME:-} && -z ${GLOO_SOCKET_IFNAME:-} && ${NCCL_SOCKET_IFNAME} != ^* ]]; then
    export GLOO_SOCKET_IFNAME=${NCCL_SOCKET_IFNAME#=}
fi

# Intra-op threads: the cores this process may use (nproc honours the CPU affinity SLURM gives the task), split
# between the processes of the node, at least 1. torchrun would otherwise force 1 thread per process.
threads_per_process() {
    local cores
    cores=$(nproc)
    echo $(( cores / $1 > 0 ? cores / $1 : 1 ))
}

# Stop signals: torchrun runs in the background so that this shell can pass SIGTERM (SLURM, Kubernetes), SIGINT
# (Ctrl-C) and SIGUSR1 (SLURM's --signal) on to it; torchrun hands them to every worker (--signals_to_handle)
# and waits SHUTDOWN_TIMEOUT seconds for them; the trainer finishes its step on every rank, saves a checkpoint
# and exits 75. torchrun itself then fails with the signal, so the launcher returns STOPPED_EXIT=75 whenever it
# was stopped by one: start the same command again (SLURM: requeue) to resume from that checkpoint. A run with
# checkpoint.enabled = false has nothing to resume: its workers write 76 to MYTHOS_STOP_STATUS_FILE (torchrun
# does not pass their status on), and the launcher exits 76, which nothing requeues on.
STOPPED_EXIT=75
run_torchrun() {
    local stopped="" status=0 pid sig workers="" worker status_file
    status_file=$(mktemp)
    MYTHOS_STOP_STATUS_FILE=$status_file "$PYTHON" -m torch.distributed.run \
        --signals_to_handle=SIGTERM,SIGINT,SIGUSR1 --shutdown_timeout="${SHUTDOWN_TIMEOUT:-600}" "$@" &
    pid=$!
    for sig in TERM INT USR1; do
        # shellcheck disable=SC2064  # $pid and $sig now, at trap time
        trap "stopped=$sig; workers=\$(cat /proc/$pid/task/$pid/children 2>/dev/null); kill -s $sig $pid 2>/dev/null || true" "$sig"
    done
    while kill -0 "$pid" 2>/dev/null; do  # a trapped signal ends `wait` early: wait again for torchrun to finish
        wait "$pid" || true
    done
    wait "$pid" && status=0 || status=$?  # bash keeps an ended child's status: its own, not a signal's 128+n
    # A second signal (SLURM signals every process of the step, and this forwards it too) can make torchrun exit
    # before its workers: they still finish their save, so wait for them.
    for worker in $workers; do
        while kill -0 "$worker" 2>/dev/null; do sleep 1; done
    done
    local workers_status
    workers_status=$(cat "$status_file" 2>/dev/null)
    rm -f "$status_file"
    if [[ -n $stopped && $workers_status == 76 ]]; then
        echo "launcher: stopped by SIG$stopped without a checkpoint (checkpoint.enabled = false); exit status 76" >&2
        return 76
    fi
    if [[ -n $stopped ]]; then
        echo "launcher: stopped by SIG$stopped; exit status $STOPPED_EXIT (start the same command again to resume)" >&2
        return "$STOPPED_EXIT"
    fi
    return "$status"
}
