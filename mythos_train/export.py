"""Export a training checkpoint as consolidated single-file weights for inference.

    <out>/model.safetensors        our MythosModel state dict (full tensors; the tied head is the embedding)
    <out>/open_mythos.safetensors  the same weights in open-mythos 0.5.0's OpenMythos layout (when exact)
    <out>/config.json              model config, open-mythos MythosConfig kwargs, source checkpoint and step

Both files load with `model.load_state_dict(safetensors.torch.load_file(path), strict=True)`; tensors that
share storage (the tied embedding/head of OpenMythos) are written as separate copies, as safetensors requires.
The checkpoint's sharded DCP files are read by a single process, whatever mesh wrote them.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from mythos_train.checkpoint import load_model_weights, read_train_state, resolve_checkpoint
from mythos_train.config import ModelConfig
from mythos_train.dtypes import torch_dtype
from mythos_train.model import MythosModel
from mythos_train.model.open_mythos_compat import (
    exactness_problems,
    open_mythos_config_kwargs,
    to_open_mythos_state_dict,
)

logger = logging.getLogger(__name__)


def build_cpu_model(cfg: ModelConfig) -> MythosModel:
    """An unsharded model on CPU with its buffers (RoPE tables) computed; weights are about to be overwritten."""
    with torch.device("meta"):
        model = MythosModel(cfg)
    model.to_empty(device="cpu")
    model.init_weights()
    return model


def checkpoint_model_config(path: Path, fallback: ModelConfig) -> ModelConfig:
    """The model config a checkpoint was trained with (recorded in its train_state.json), else `fallback`."""
    recorded = read_train_state(path).get("model_config")
    return ModelConfig(**recorded) if recorded else fallback


def _separate_storage(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Copies for tensors that alias an earlier one (safetensors refuses shared storage)."""
    seen: set[int] = set()
    out = {}
    for name, tensor in state.items():
        tensor = tensor.detach().contiguous()
        ptr = tensor.untyped_storage().data_ptr()
        out[name] = tensor.clone() if ptr in seen else tensor
        seen.add(ptr)
    return out


def _cast(state: dict[str, torch.Tensor], dtype: torch.dtype, keep_fp32: set[str]) -> dict[str, torch.Tensor]:
    return {k: v.to(dtype) if v.is_floating_point() and k not in keep_fp32 else v for k, v in state.items()}


def export_checkpoint(
    checkpoint: str | Path, out_dir: str | Path, model_cfg: ModelConfig, dtype: str = "float32"
) -> dict[str, Path]:
    """Write the export files for checkpoint `checkpoint` (a step-N dir or a checkpoints folder); returns their paths."""
    path = resolve_checkpoint(checkpoint)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model_cfg = checkpoint_model_config(path, model_cfg)
    model = build_cpu_model(model_cfg)
    step = load_model_weights(model, path)["step"]

    state = model.state_dict()
    buffers = {name for name, _ in model.named_buffers()}  # router biases stay fp32 (selection is bias-sensitive)
    meta = {"format": "mythos_train", "step": str(step), "model_config": json.dumps(dataclasses.asdict(model_cfg))}
    files = {"model": out_dir / "model.safetensors"}
    save_file(_separate_storage(_cast(state, torch_dtype(dtype), buffers)), files["model"], metadata=meta)

    config = {"model": dataclasses.asdict(model_cfg), "checkpoint": str(path), "step": step, "dtype": dtype}
    if problems := exactness_problems(model_cfg):
        logger.warning("no open-mythos export: %s", "; ".join(problems))
        config["open_mythos"] = {"skipped": problems}
    else:
        om_state = to_open_mythos_state_dict(state, model_cfg)
        om_buffers = {k for k in om_state if k.startswith("freqs_cis") or k.endswith("router_bias")}
        files["open_mythos"] = out_dir / "open_mythos.safetensors"
        save_file(
            _separate_storage(_cast(om_state, torch_dtype(dtype), om_buffers)),
            files["open_mythos"],
            metadata={"format": "open_mythos-0.5.0", "step": str(step)},
        )
        config["open_mythos"] = {"config_kwargs": open_mythos_config_kwargs(model_cfg)}
    files["config"] = out_dir / "config.json"
    files["config"].write_text(json.dumps(config, indent=1))
    logger.info("exported step %d of %s to %s", step, path, out_dir)
    return files


def load_exported(path: str | Path) -> MythosModel:
    """A CPU MythosModel from an exported model.safetensors (the config travels in the file's metadata)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        model_cfg = ModelConfig(**json.loads(f.metadata()["model_config"]))
    model = build_cpu_model(model_cfg)
    model.load_state_dict(load_file(str(path)), strict=True)
    return model
