"""Parallelism applied from outside the model: mesh, expert parallelism, activation checkpointing, compile, FSDP2."""

from parallel.clip_grad import clip_grad_norm_
from parallel.mesh import ParallelDims, build_mesh
from parallel.parallelize import parallelize
from parallel.router_bias import RouterBiasBalancer

__all__ = ["ParallelDims", "RouterBiasBalancer", "build_mesh", "clip_grad_norm_", "parallelize"]
