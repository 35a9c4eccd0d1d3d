"""Activation memory of one micro-batch, from the model config: what autograd saves, per token, per block.

Each count below is one tensor autograd keeps for backward in mythos_train/model as written (listed with
`torch.autograd.graph.saved_tensors_hooks` and checked by tests/test_plan_activations.py, which fails when the
model changes under this formula). Units are elements per token, at the activation dtype `a` (`act_bytes` in the
code: the FSDP param_dtype) unless marked fp32 (`F`) or int64 (`I`). Weights are never counted: FSDP frees the gathered
copies that autograd references, and recomputes nothing to get them back.

RMSNorm: the fused CUDA kernel saves its input and the fp32 rstd; the CPU composite also saves x * rstd
(`cpu` picks the CPU kernels' behaviour, here and in one SDPA layout case). Flash/efficient SDPA saves q, k, v,
the output and the fp32 log-sum-exp, never the S x S scores, so everything here is linear in sequence length.

    dense block   input D, attention (below), x + attn D, ffn_norm, its output D, SwiGLU 4 * ffn_dim
    attention     attn_norm and its output D;
                  MLA: q_down out q_lora, q_norm, c_q q_lora, kv_down out kv_lora + rope, kv_norm, its output
                       kv_lora; q, k, out H * P (P = max(nope + rope, v), the narrower side zero-padded);
                       v H * (nope + v) (a view of kv_up's output) or H * P when padded; wo input H * v when
                       the output had to be sliced (v < nope + rope; on CPU also v > nope + rope); lse F * H
                  GQA: q H * hd, k Hkv * hd, v Hkv * hd (view of wv's output), out H * hd, lse F * H
    loop step     s = h + loop_emb + e F * D, norm (of an fp32 input), x D, attention, x + attn D, ffn_norm, its output D,
                  MoE: scores F * E, top-k ids I * k, gates F * (2k + 1) (+ a * k if a != fp32), two sort
                       indices I * 3k (order, token of each slot, inverse order), routed rows 2 * k * D
                       (sorted input, combined rows; 3 * k * D and I * 2k more under EP: the all-to-all's
                       output and the received-order index and its inverse), SwiGLU of the routed rows 4 * k * expert_dim,
                       shared SwiGLU 4 * shared_expert_dim (none when tiled, parallel.shared_expert_chunks = C > 1: its
                       backward then holds one chunk's 4 + 2 gradient, 6 * shared_expert_dim / C, at the 'loop' peak, plus
                       two fresh weight gradients dim x shared_expert_dim, per chunk, on their way into the accumulated ones),
                  block output F * D (LoRA input) and LoRA F * 2 * lora_rank (neither with lora_rank 0), and the
                  step's input h F * D (injection A*h); the loop dynamics and the carried h are fp32 whatever `a` (mythos_train/model/recurrent.py)
    head          final norm input D and norm, its output D, logits a * V (held by the caller for the loss),
                  log-softmax output F * V

Policies (k = iterations with gradients): 'none' keeps k full loop steps and every dense block; 'loop' keeps
only each gradient step's input h (plus the loop-invariant B*e), both fp32; 'full' also keeps only each prelude/coda
block's input. Under expert parallelism a checkpointed step also keeps its two all-to-all outputs (2 k D):
parallel/activation_checkpoint.py saves them so the recompute does not communicate (`keep_all_to_all`; not
with reshard_per_iteration, which recomputes them). The peak of a micro-batch is the largest of a few
candidate moments of its backward (see `micro_batch_activations`).

Tensor parallelism (tp > 1, planner/tensor_parallel.py) divides everything above by tp (sequence-parallel
regions hold seq_len / tp tokens; heads, FFN hidden, vocabulary and routed slots are split) except what each
rank holds whole (`gathered_*_bytes`): the all-gathered inputs of attention, FFN/MoE and head (D each), MLA's
replicated down-projection chain, and the router, which runs on the gathered MoE input.
"""

from __future__ import annotations

from dataclasses import dataclass

from mythos_train.config import ModelConfig

FP32, INT64 = 4, 8


def _norm(width: int, act_bytes: int, cpu: bool) -> int:
    """Bytes RMSNorm itself saves (its input and output are counted where they are made)."""
    return FP32 + (width * act_bytes if cpu else 0)


def attention_bytes(m: ModelConfig, act_bytes: int, cpu: bool) -> int:
    """Per-token bytes saved by attn_norm + attention (the block input itself not included)."""
    total = _norm(m.dim, act_bytes, cpu) + m.dim * act_bytes  # attn_norm, its output
    heads = m.n_heads
    if m.attn_type == "mla":
        qk_head_dim, v_head_dim = m.qk_nope_head_dim + m.qk_rope_head_dim, m.v_head_dim
        padded_head_dim = max(qk_head_dim, v_head_dim)
        # q_down out, q_norm, c_q; kv_down out (kv_lora + rope), kv_norm, its output
        total += 2 * m.q_lora_rank * act_bytes + _norm(m.q_lora_rank, act_bytes, cpu)
        total += (2 * m.kv_lora_rank + m.qk_rope_head_dim) * act_bytes + _norm(m.kv_lora_rank, act_bytes, cpu)
        total += 3 * heads * padded_head_dim * act_bytes  # q, k, out
        # v: kv_up's output viewed, or padded
        v_width = heads * (m.qk_nope_head_dim + v_head_dim) if v_head_dim >= qk_head_dim else heads * padded_head_dim
        # wo's input is a copy when the output was sliced, or (CPU flash kernel) laid out from padded q
        sliced = v_head_dim < padded_head_dim or (cpu and v_head_dim > qk_head_dim)
        wo_input_width = heads * v_head_dim if sliced else 0
        total += (v_width + wo_input_width) * act_bytes + heads * FP32  # v, wo's input; log-sum-exp
    else:
        head_dim = m.dim // heads
        q_out_k_v = 2 * heads * head_dim + 2 * m.n_kv_heads * head_dim
        total += q_out_k_v * act_bytes + heads * FP32  # q, out, k, v; log-sum-exp
    return total


def dense_block_bytes(m: ModelConfig, act_bytes: int, cpu: bool) -> int:
    """Per-token bytes one prelude/coda block saves, including its input."""
    ffn = m.dim * act_bytes + attention_bytes(m, act_bytes, cpu) + m.dim * act_bytes  # input, attention, x + attn
    # ffn_norm, its output, SwiGLU
    return ffn + _norm(m.dim, act_bytes, cpu) + m.dim * act_bytes + 4 * m.ffn_dim * act_bytes


def moe_bytes(m: ModelConfig, act_bytes: int, ep: int, shared_chunks: int = 1) -> int:
    """Per-token bytes the MoE saves (router, sort indices, routed and shared SwiGLUs); routing assumed balanced."""
    top_k = m.n_experts_per_tok
    router = FP32 * (m.n_experts + 2 * top_k + 1) + INT64 * top_k + (top_k * act_bytes if act_bytes != FP32 else 0)
    routed_rows = (3 if ep > 1 else 2) * top_k * m.dim * act_bytes + (INT64 * 2 * top_k if ep > 1 else 0)
    shared = 4 * m.shared_expert_dim * act_bytes if shared_chunks == 1 else 0
    return router + INT64 * 3 * top_k + routed_rows + 4 * top_k * m.expert_dim * act_bytes + shared


def loop_step_bytes(m: ModelConfig, act_bytes: int, cpu: bool, ep: int, shared_chunks: int = 1) -> int:
    """Per-token bytes one gradient loop iteration saves without checkpointing, including its input h."""
    step = m.dim * FP32 + _norm(m.dim, FP32, cpu) + m.dim * act_bytes  # h + loop_emb + e, loop norm (fp32), x
    step += attention_bytes(m, act_bytes, cpu) + m.dim * act_bytes  # attention, x + attn
    # ffn_norm, its output, MoE
    step += _norm(m.dim, act_bytes, cpu) + m.dim * act_bytes + moe_bytes(m, act_bytes, ep, shared_chunks)
    step += (m.dim * FP32 + 2 * m.lora_rank * FP32 if m.lora_rank else 0) + m.dim * FP32  # LoRA in + mid, h: fp32
    if m.use_act:
        step += 4 * FP32  # halting probability, its weight and the running masks (small)
    return step


def gathered_attention_bytes(m: ModelConfig, act_bytes: int, cpu: bool) -> int:
    """Per-token bytes of attn_norm + attention that every tp rank holds whole: the gathered input, MLA's down chain."""
    total = m.dim * act_bytes
    if m.attn_type == "mla":
        total += 2 * m.q_lora_rank * act_bytes + _norm(m.q_lora_rank, act_bytes, cpu)  # q_down out, q_norm, c_q
        # kv_down out, kv_norm, its output
        total += (2 * m.kv_lora_rank + m.qk_rope_head_dim) * act_bytes + _norm(m.kv_lora_rank, act_bytes, cpu)
    return total


def gathered_step_bytes(m: ModelConfig, act_bytes: int, cpu: bool) -> tuple[int, int]:
    """(loop step, dense block) per-token bytes held whole under TP: attention's, the FFN/MoE input D, the router."""
    ffn = gathered_attention_bytes(m, act_bytes, cpu) + m.dim * act_bytes
    top_k = m.n_experts_per_tok
    router = FP32 * (m.n_experts + 2 * top_k + 1) + INT64 * top_k + (top_k * act_bytes if act_bytes != FP32 else 0)
    return ffn + router, ffn


def head_bytes(m: ModelConfig, act_bytes: int, cpu: bool) -> int:
    """Per-token bytes of the final norm, the tied head's logits (kept by the caller) and the log-softmax."""
    norm_input_output_logits = (2 * m.dim + m.vocab_size) * act_bytes
    return norm_input_output_logits + _norm(m.dim, act_bytes, cpu) + m.vocab_size * FP32


@dataclass
class ActivationMemory:
    """Activation bytes of one micro-batch: saved at the end of forward, and live at each backward peak moment."""

    saved: int
    "Everything autograd holds when the loss is computed."
    phases: dict[str, int]
    "Live activation + activation-gradient bytes at the backward's candidate peaks: 'head', 'head_grad', 'loop', 'dense'."
    loop_step: int
    "Bytes of one full loop step (what 'loop' recomputes)."


def micro_batch_activations(
    m: ModelConfig,
    tokens: int,
    n_grad: int,
    n_nograd: int,
    policy: str,
    act_bytes: int,
    cpu: bool,
    ep: int = 1,
    keep_all_to_all: bool = True,
    shared_chunks: int = 1,
    tp: int = 1,
) -> ActivationMemory:
    """Activation bytes of `tokens` tokens (micro_batch_size * seq_len) at backprop depth `n_grad`.

    Candidate peaks of the backward (the caller adds the FSDP buffers live at each and takes the largest):
      head   everything saved; the loss (mythos_train/loss.py) makes its gradient over the saved log-softmax
             output; logits narrower than fp32 add the fp32 copy its forward takes (F * V, more than the backward's
             a * V gradient)
      head_grad  then the fp32 gradient buffer is freed and the logits' gradient (a * V) meets the head's
             weight gradient (added by the caller)
      loop   prelude + the loop inputs + logits (the caller holds them) + the step being differentiated
             (recomputed under 'loop'/'full', else already saved) + its gradient working set: the gradients
             of the routed SwiGLU's hidden rows and of the routed rows (2 k * expert_dim + k * D), and with
             tiled shared experts the one chunk being differentiated
      dense  prelude inputs + logits + one prelude block (recomputed under 'full') + its SwiGLU gradients
      loop_reduce  prelude + logits once the loop's backward is done (its unit's reduce-scatter copy-in)
    Under tp each moment is (all of it + (tp - 1) x its gathered part) / tp: the gathered part is held whole.
    """
    step, dense, head = (
        loop_step_bytes(m, act_bytes, cpu, ep, shared_chunks),
        dense_block_bytes(m, act_bytes, cpu),
        head_bytes(m, act_bytes, cpu),
    )
    top_k = m.n_experts_per_tok
    step_grads = (2 * top_k * m.expert_dim + top_k * m.dim) * act_bytes + (
        6 * m.shared_expert_dim * act_bytes // shared_chunks if shared_chunks > 1 else 0
    )
    dense_grads = 2 * m.ffn_dim * act_bytes
    if policy == "none":
        loop_saved, pre_saved, coda_saved = n_grad * step, m.prelude_layers * dense, m.coda_layers * dense
    elif policy == "loop":
        loop_saved, pre_saved, coda_saved = (n_grad + 1) * m.dim * FP32, m.prelude_layers * dense, m.coda_layers * dense
    elif policy == "full":
        block_input = m.dim * act_bytes
        loop_saved, pre_saved, coda_saved = (
            (n_grad + 1) * m.dim * FP32,
            m.prelude_layers * block_input,
            m.coda_layers * block_input,
        )
    else:
        raise ValueError(f"parallel.activation_checkpoint: unknown policy {policy!r}")
    if ep > 1 and policy != "none" and keep_all_to_all:
        loop_saved += n_grad * 2 * top_k * m.dim * act_bytes  # the step's two all-to-all outputs (module doc)
    if n_nograd > 0 or m.initial_state != "prelude":
        loop_saved += m.dim * act_bytes  # e (the loop's injection) is not the first gradient step's input h
    if m.use_act:
        loop_saved += m.dim * FP32  # the fp32 halting-weighted output accumulator
    saved = pre_saved + loop_saved + coda_saved + head
    logits = m.vocab_size * act_bytes
    recompute = policy != "none"
    phases = {
        "head": saved + (FP32 * m.vocab_size if act_bytes != FP32 else 0),
        "head_grad": saved - FP32 * m.vocab_size + logits,
        "loop": pre_saved + loop_saved + logits + (step if recompute else 0) + step_grads,
        "dense": pre_saved + logits + (dense if policy == "full" else 0) + dense_grads if m.prelude_layers else 0,
        "loop_reduce": pre_saved + logits,
    }
    phases = {phase: held * tokens for phase, held in phases.items()}
    if shared_chunks > 1:  # not per token: each chunk's backward makes whole weight gradients (module docstring)
        phases["loop"] += 2 * m.dim * m.shared_expert_dim * act_bytes
    if tp == 1:
        return ActivationMemory(saved * tokens, phases, step * tokens)
    # torch's loss_parallel builds the logits' gradient as (zeros with -1 scattered + exp(log-softmax)) * grad:
    # three [tokens, V] fp32 at once besides the saved log-softmax (before the split)
    phases["head"] = (saved + 3 * FP32 * m.vocab_size) * tokens
    g_step, g_dense = gathered_step_bytes(m, act_bytes, cpu)
    g_pre, g_coda = (m.prelude_layers * g_dense, m.coda_layers * g_dense) if policy != "full" else (0, 0)
    g_loop = n_grad * g_step if policy == "none" else 0
    g_saved = g_pre + g_loop + g_coda + m.dim * act_bytes  # the head's gathered input
    gathered = {
        "head": g_saved,
        "head_grad": g_saved,
        "loop": g_pre + g_loop + (g_step if recompute else 0),
        "dense": g_pre + (g_dense if policy == "full" else 0) if m.prelude_layers else 0,
        "loop_reduce": g_pre,
    }

    def per_rank(total: int, held_whole: int) -> int:
        return (total + (tp - 1) * held_whole * tokens) // tp

    return ActivationMemory(
        per_rank(saved * tokens, g_saved),
        {phase: per_rank(held, gathered[phase]) for phase, held in phases.items()},
        per_rank(step * tokens, g_step),
    )
