"""Parallelism settings (the `[parallel]` section of a job config) and the mesh axis sizes they resolve to.

Beside the code that reads them, as data_pipeline/config.py is for `[data]`; mythos_train/config.py imports both.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from mythos_train.errors import ConfigError


@dataclass
class ParallelConfig:
    """Device mesh and parallelism. Axes: dp_replicate (HSDP, across nodes) x dp_shard (FSDP); ep borrows from dp_shard."""

    dp_replicate: int = 1
    "HSDP replica groups (usually the node count); 1 = plain FSDP."
    dp_shard: int = -1
    "FSDP shard group size; -1 = world_size // dp_replicate."
    ep: int = 1
    "Expert-parallel degree: experts split over this many ranks of each dp_shard group (must divide dp_shard)."
    tp: int = 1
    "Tensor-parallel degree (innermost mesh axis, inside a node): attention heads, dense/shared-expert FFN widths and the vocabulary split over this many ranks that see the same tokens; 1 = off."
    activation_checkpoint: Literal["none", "loop", "full"] = "loop"
    "'loop' recomputes each gradient loop iteration in backward; 'full' also each prelude/coda block."
    reshard_per_iteration: bool = False
    "Re-shard the looped block after every iteration (one all-gather per iteration): only for blocks too big to keep unsharded across the loop."
    shared_expert_chunks: int = 1
    "Run the looped block's shared-expert SwiGLU over this many token chunks, each recomputed in its own backward (tiled MLP): a gradient iteration then keeps none of its hidden activations and its backward holds one chunk's, for one more shared-expert forward per iteration. For long sequences with the presets' wide shared experts; 1 = off."
    compile: bool = False
    "torch.compile each block (the loop stays eager, so sampled depths never recompile)."
    param_dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    "Compute dtype of gathered parameters; 'auto' = bfloat16 on CUDA, float32 on CPU (master weights stay fp32)."
    reduce_dtype: Literal["float32", "bfloat16"] = "float32"
    "Gradient reduce-scatter / all-reduce dtype."
    allow_slow_experts: bool = False
    "Run on a GPU without the fused grouped GEMM for the routed experts (it needs bfloat16 on sm90/sm100): torch then loops over the experts and waits for the host on every call. Off: such a run stops at start-up."
    backend: Literal["auto", "nccl", "gloo"] = "auto"
    "Process-group backend; 'auto' = nccl with CUDA, else gloo."
    timeout_s: float = 600.0
    "Process-group timeout in seconds: a collective that waits longer (a frozen or dead peer) fails, so torchrun restarts the group instead of hanging. Must cover the slowest collective, including a synchronous checkpoint save."


def mesh_sizes(parallel: ParallelConfig, world_size: int) -> dict[str, int]:
    """Resolved mesh axis sizes: dp_replicate, dp_shard, ep, efsdp (the experts' own shard axis) and tp."""
    if parallel.tp < 1:
        raise ConfigError(f"parallel.tp ({parallel.tp}) must be >= 1")
    data_world = world_size // parallel.tp
    dp_shard = parallel.dp_shard if parallel.dp_shard != -1 else data_world // max(parallel.dp_replicate, 1)
    if parallel.dp_replicate < 1 or dp_shard < 1:
        raise ConfigError("parallel.dp_replicate and parallel.dp_shard must be >= 1 (dp_shard may be -1 = auto)")
    if parallel.dp_replicate * dp_shard * parallel.tp != world_size:
        raise ConfigError(
            f"parallel: mesh dp_replicate({parallel.dp_replicate}) x dp_shard({dp_shard})"
            + (f" x tp({parallel.tp})" if parallel.tp > 1 else "")
            + f" = {parallel.dp_replicate * dp_shard * parallel.tp} != world size {world_size}"
        )
    if parallel.ep < 1 or dp_shard % parallel.ep:
        raise ConfigError(f"parallel.ep ({parallel.ep}) must divide parallel.dp_shard ({dp_shard})")
    return {
        "dp_replicate": parallel.dp_replicate,
        "dp_shard": dp_shard,
        "ep": parallel.ep,
        "efsdp": dp_shard // parallel.ep,
        "tp": parallel.tp,
    }
