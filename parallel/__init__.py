"""Parallelism applied from outside the model: mesh, expert parallelism, activation checkpointing, compile, FSDP2."""

from parallel.clip_grad import clip_grad_norm_
from parallel.mesh import ParallelDims, all_ranks_agree, build_mesh
from parallel.parallelize import parallelize
from parallel.router_bias import RouterBiasBalancer
from parallel.tensor_parallel import full_logits, loss_context

__all__ = ["ParallelDims", "RouterBiasBalancer", "all_ranks_agree", "build_mesh", "clip_grad_norm_", "full_logits",
           "loss_context",
           "parallelize"]  # fmt: skip
