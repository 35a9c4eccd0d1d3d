"""Model FLOPs per token of a training step, aware of the loop: 2N per gradient-free iteration, 6N per gradient one.

Counts matmuls only (norms and elementwise ops are noise), with the causal half of the attention score/value
products, and the *active* parameters of the looped block (shared + top-k routed experts, not all of them).
"""

from __future__ import annotations

from mythos_train.config import ModelConfig


def attention_params(cfg: ModelConfig) -> int:
    """Weights of one attention layer (MLA or GQA)."""
    if cfg.attn_type == "mla":
        H, nope, rope, v = cfg.n_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        return (
            cfg.dim * cfg.q_lora_rank
            + cfg.q_lora_rank * H * (nope + rope)  # q_down, q_up_nope, q_up_rope
            + cfg.dim * (cfg.kv_lora_rank + rope)
            + cfg.kv_lora_rank * H * (nope + v)  # kv_down, kv_up
            + H * v * cfg.dim  # wo
        )
    head_dim = cfg.dim // cfg.n_heads
    return 2 * cfg.dim * cfg.n_heads * head_dim + 2 * cfg.dim * cfg.n_kv_heads * head_dim


def attention_score_flops(cfg: ModelConfig, seq_len: int) -> float:
    """Forward FLOPs per token of QK^T and PV in one causal layer (query i sees i + 1 keys: (seq_len + 1) / 2 on average)."""
    if cfg.attn_type == "mla":
        qk_dim, v_dim = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim, cfg.v_head_dim
    else:
        qk_dim = v_dim = cfg.dim // cfg.n_heads
    return 2 * cfg.n_heads * (qk_dim + v_dim) * (seq_len + 1) / 2


def looped_active_params(cfg: ModelConfig) -> int:
    """Weights one token touches in one loop iteration: attention, router, shared and top-k routed experts, LoRA, ACT."""
    moe = cfg.dim * cfg.n_experts + 3 * cfg.dim * cfg.expert_dim * cfg.n_experts_per_tok * (1 + cfg.n_shared_experts)
    return attention_params(cfg) + moe + 2 * cfg.dim * cfg.lora_rank + (cfg.dim if cfg.use_act else 0)


def dense_params(cfg: ModelConfig) -> int:
    """Weights used once per token outside the loop: prelude and coda blocks, the tied head, Parcae's B e."""
    block = attention_params(cfg) + 3 * cfg.dim * cfg.ffn_dim
    injection = cfg.dim * cfg.dim if cfg.injection == "parcae" else 0
    return (cfg.prelude_layers + cfg.coda_layers) * block + cfg.dim * cfg.vocab_size + injection


def block_forward_flops_per_token(cfg: ModelConfig, seq_len: int, looped: bool) -> float:
    """Forward FLOPs per token of one block: the looped MoE block (active experts) or one dense prelude/coda block."""
    params = looped_active_params(cfg) if looped else attention_params(cfg) + 3 * cfg.dim * cfg.ffn_dim
    return 2 * params + attention_score_flops(cfg, seq_len)


def training_flops_per_token(cfg: ModelConfig, seq_len: int, n_nograd: int, n_grad: int) -> float:
    """FLOPs per token of one forward + backward with n_nograd gradient-free and n_grad gradient loop iterations."""
    per_iteration = block_forward_flops_per_token(cfg, seq_len, looped=True)  # forward
    dense = 2 * dense_params(cfg) + (cfg.prelude_layers + cfg.coda_layers) * attention_score_flops(cfg, seq_len)
    return n_nograd * per_iteration + 3 * n_grad * per_iteration + 3 * dense
