# Sourced by every launcher: environment that makes torchrun jobs reliable, on GPUs and on CPUs.
#
# Elastic restarts: torchrun's c10d rendezvous shares its TCPStore with the workers by default; after a
# restart, workers can then read the previous attempt's addresses (pytorch issue 135712: gloo
# "connectFullMesh ... Connection refused", NCCL "Failed to connect", or a hang). A per-attempt store avoids it.
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}
export PYTHONUNBUFFERED=1

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    GPUS_PER_NODE=${GPUS_PER_NODE:-$(nvidia-smi -L | wc -l)}
    # NCCL (documented in NVIDIA's NCCL environment-variable reference):
    #  NCCL_ASYNC_ERROR_HANDLING / TORCH_NCCL_ASYNC_ERROR_HANDLING=1: a failed or hung collective tears the
    #    process down instead of hanging, so torchrun can restart the group.
    export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
    #  Record collective traces for a post-mortem of hangs (dumped on timeout).
    export TORCH_NCCL_TRACE_BUFFER_SIZE=${TORCH_NCCL_TRACE_BUFFER_SIZE:-2000}
    #  Let the caching allocator grow segments instead of fragmenting under variable loop depth.
    export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
    #  Set NCCL_SOCKET_IFNAME / NCCL_IB_HCA to your fabric's interfaces if NCCL picks the wrong one;
    #  NCCL_DEBUG=WARN (or INFO when debugging) prints the chosen transport.
    export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
    OMP_DEFAULT=4
else
    GPUS_PER_NODE=${GPUS_PER_NODE:-2}
    # CPU (gloo): one intra-op thread per process unless there are cores to spare.
    OMP_DEFAULT=$(( $(nproc) / GPUS_PER_NODE > 0 ? $(nproc) / GPUS_PER_NODE : 1 ))
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$OMP_DEFAULT}
export GPUS_PER_NODE
