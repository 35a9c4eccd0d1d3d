"""Map a MythosModel config and state dict onto open-mythos 0.5.0's `MythosConfig` / `OpenMythos` layout.

The maths is the same with `use_act=True`, `injection="lti"`, the default dense width and norm_eps 1e-6; then the
exported weights give the same logits. Other settings have no open-mythos equivalent and raise, unless
`require_exact=False` (ACT off: the halting head is exported as zeros, and open-mythos will weight the states);
`unexportable` ones raise always.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path
from types import ModuleType

import torch

from mythos_train.config import ModelConfig
from mythos_train.model.rope import rope_angles

_SAME_FIELDS = (
    "vocab_size",
    "dim",
    "n_heads",
    "n_kv_heads",
    "max_seq_len",
    "max_loop_iters",
    "prelude_layers",
    "coda_layers",
    "attn_type",
    "kv_lora_rank",
    "q_lora_rank",
    "qk_rope_head_dim",
    "qk_nope_head_dim",
    "v_head_dim",
    "n_experts",
    "n_shared_experts",
    "n_experts_per_tok",
    "expert_dim",
    "act_threshold",
    "rope_theta",
    "lora_rank",
)


def unexportable(cfg: ModelConfig) -> list[str]:
    """Settings open-mythos has no form for at all: no export, not even an approximate one."""
    problems = []
    if cfg.injection != "lti":
        problems.append(f"model.injection = '{cfg.injection}' (open-mythos has only 'lti')")
    if cfg.initial_state != "prelude":
        problems.append(
            f"model.initial_state = '{cfg.initial_state}' (open-mythos starts the loop at the prelude output)"
        )
    if not cfg.loop_embedding:
        problems.append("model.loop_embedding = false (open-mythos always adds it)")
    if cfg.lora_rank == 0:
        problems.append("model.lora_rank = 0 (open-mythos always has the depth LoRA)")
    return problems


def exactness_problems(cfg: ModelConfig) -> list[str]:
    """Settings under which open-mythos would compute something else (empty = exact export)."""
    problems = unexportable(cfg)
    if not cfg.use_act:
        problems.append("model.use_act = false (open-mythos always weights the loop states by ACT)")
    if cfg.ffn_dim != cfg.dim * 4 // 3:
        problems.append(f"model.dense_ffn_dim = {cfg.dense_ffn_dim} (open-mythos uses dim * 4 // 3)")
    if cfg.norm_eps != 1e-6:
        problems.append(f"model.norm_eps = {cfg.norm_eps} (open-mythos uses 1e-6)")
    return problems


def open_mythos_config_kwargs(cfg: ModelConfig) -> dict:
    """Keyword arguments for open_mythos.main.MythosConfig."""
    return {name: getattr(cfg, name) for name in _SAME_FIELDS} | {"dropout": 0.0}


def _complex_rope(head_dim: int, cfg: ModelConfig) -> torch.Tensor:
    angles = rope_angles(head_dim, torch.arange(cfg.max_seq_len), cfg.rope_theta)
    return torch.polar(torch.ones_like(angles), angles)


def to_open_mythos_state_dict(
    state_dict: dict[str, torch.Tensor], cfg: ModelConfig, require_exact: bool = True
) -> dict:
    """Our (full, unsharded) state dict -> an OpenMythos state dict that loads with strict=True."""
    if problems := exactness_problems(cfg):
        if require_exact or unexportable(cfg):
            raise ValueError("open-mythos export would not reproduce this model: " + "; ".join(problems))
    out: dict[str, torch.Tensor] = {}
    shared_width = cfg.expert_dim * cfg.n_experts_per_tok
    for name, tensor in state_dict.items():
        tensor = tensor.detach()
        if name == "tok_embeddings.weight":
            out["embed.weight"] = out["head.weight"] = tensor
            continue
        name = re.sub(r"\.ffn\.w1\.", ".ffn.gate.", name)
        name = re.sub(r"\.ffn\.w3\.", ".ffn.up.", name)
        name = re.sub(r"\.ffn\.w2\.", ".ffn.down.", name)
        if not name.startswith("recurrent.block.moe."):
            out[name] = tensor
            continue
        rest = name.removeprefix("recurrent.block.moe.")
        prefix = "recurrent.block.ffn."
        if rest == "router.weight":
            out[prefix + "router.weight"] = tensor
        elif rest == "router.expert_bias":
            out[prefix + "router_bias"] = tensor
        elif rest.startswith("experts."):  # stacked [E, in, out] -> per-expert nn.Linear weights [out, in]
            which = {"w1": "gate", "w3": "up", "w2": "down"}[rest.removeprefix("experts.")]
            for e in range(cfg.n_experts):
                out[f"{prefix}routed_experts.{e}.{which}.weight"] = tensor[e].t().contiguous()
        elif rest.startswith("shared."):  # one wide SwiGLU -> n_shared_experts SwiGLUs
            which = {"w1": "gate", "w3": "up", "w2": "down"}[rest.split(".")[1]]
            for i in range(cfg.n_shared_experts):
                rows = slice(i * shared_width, (i + 1) * shared_width)
                part = tensor[:, rows] if which == "down" else tensor[rows]
                out[f"{prefix}shared_experts.{i}.{which}.weight"] = part.contiguous()
        else:
            raise KeyError(f"no open-mythos name for {name}")
    if not cfg.use_act:
        out["recurrent.act.halt.weight"] = torch.zeros(1, cfg.dim)
        out["recurrent.act.halt.bias"] = torch.zeros(1)
    out["freqs_cis"] = _complex_rope(cfg.dim // cfg.n_heads, cfg)
    out["freqs_cis_mla"] = _complex_rope(cfg.qk_rope_head_dim, cfg)
    return out


def load_open_mythos() -> ModuleType | None:
    """open-mythos 0.5.0's `main` module from the installed package (`pip install --no-deps open-mythos==0.5.0`),
    or None when it is not installed: the reference of the parity tests and of `bench`.

    Loaded from the package's own main.py, not imported: the package's __init__ imports `transformers` for a
    tokenizer the model does not need.
    """
    spec = importlib.util.find_spec("open_mythos")
    if spec is None:
        return None
    main = next((Path(p) / "main.py" for p in spec.submodule_search_locations or []), None)
    if main is None or not main.is_file():
        return None
    main_spec = importlib.util.spec_from_file_location("open_mythos_main", main)
    module = importlib.util.module_from_spec(main_spec)
    sys.modules[main_spec.name] = module
    main_spec.loader.exec_module(module)
    return module
