"""A tiny ModelConfig for the model tests: one base of small sizes, each test overriding only what it varies."""

from __future__ import annotations

from mythos_train.config import ModelConfig

TINY_MODEL = dict(
    vocab_size=64,
    dim=64,
    n_heads=4,
    n_kv_heads=2,
    max_seq_len=32,
    max_loop_iters=3,
    prelude_layers=1,
    coda_layers=1,
    kv_lora_rank=16,
    q_lora_rank=24,
    qk_rope_head_dim=8,
    qk_nope_head_dim=8,
    v_head_dim=12,
    n_experts=8,
    n_shared_experts=1,
    n_experts_per_tok=2,
    expert_dim=16,
    lora_rank=4,
)

# dim 32 with the attention sizes and sequence scaled down with it (head dim 8, MLA head dims 4)
DIM32 = dict(
    dim=32, max_seq_len=16, kv_lora_rank=8, q_lora_rank=16, qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=4
)


def tiny_model_config(**overrides) -> ModelConfig:
    """TINY_MODEL with the given fields replaced (fields not named keep ModelConfig's defaults)."""
    return ModelConfig(**(TINY_MODEL | overrides))
