"""Parallelism applied from outside the model: mesh, expert parallelism, activation checkpointing, compile, FSDP2.

Names load on first use: mythos_train/config.py imports parallel.config, and the modules below import
mythos_train.config, so importing them here would close an import cycle.
"""

import importlib

_EXPORTS = {
    "ParallelDims": "parallel.mesh",
    "build_mesh": "parallel.mesh",
    "clip_grad_norm_": "parallel.clip_grad",
    "full_logits": "parallel.tensor_parallel",
    "loss_context": "parallel.tensor_parallel",
    "parallelize": "parallel.parallelize",
    "reduce_sequence_parallel_grads": "parallel.tensor_parallel",
    "whole_sequence_stats": "parallel.tensor_parallel",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'parallel' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # replaces the submodule of the same name that the import bound (`parallelize`)
    return value
