"""The looped part of the model: one MoE transformer block applied n times with input injection.

One iteration (open-mythos `RecurrentBlock`):  x = norm(h + loop_emb(t) + e);  y = block(x);  y = y + lora(y, t);
h' = A h + B e + y;  and, with ACT, a halting probability p(h'). A is diagonal with entries in [0, 1) for any
parameter value, so the linear part of the update is contractive by construction (Parcae). h_0 is e, zeros or
noise (model.initial_state); the loop embedding and the LoRA can be switched off (the canary's recipe study).

Training never exits early (every rank must run the same number of collectives under FSDP): the first n_nograd
iterations run without autograd, the last n_grad with it (truncated backprop through depth).

Precision: the carried state h and the loop dynamics (norm, LoRA, injection, ACT) are fp32 whatever the parameter
dtype; only the block runs in the prelude's dtype (bf16 under FSDP's param_dtype). Measured at backprop depth 8
(tests/test_gpu_precision.py), this lowers the loop parameters' gradient error against fp32 from 1.2% to 0.8%. The
gradients of every parameter used by all iterations (those, plus the router gate) are summed over the k iterations
in fp32 and rounded once.

Routing under activation checkpointing: each forward records the experts every iteration chose, and a recompute
routes to those (`Router.forward`), so backward runs on the forward's routing even where rounding, ties or a
changed bias would make a fresh top-k choose others.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from torch.autograd.profiler import record_function
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from mythos_train.config import ModelConfig
from mythos_train.model.attention import Rope


def cache_slot(kv_cache: dict | None, name: str) -> dict | None:
    """The KV-cache slot of one layer or loop step (created on first use), or None when not caching."""
    return None if kv_cache is None else kv_cache.setdefault(name, {})


def loop_index_embedding(
    loop_t: int, dim: int, loop_dim: int, device: torch.device, theta: float = 10000.0
) -> torch.Tensor:
    """[dim] vector: sin/cos of loop_t * freqs in the first loop_dim channels, zeros after (open-mythos, fp32)."""
    freqs = 1.0 / (theta ** (torch.arange(0, loop_dim, 2, device=device, dtype=torch.float32) / loop_dim))
    angles = loop_t * freqs  # [loop_dim / 2]
    return nn.functional.pad(torch.cat([angles.sin(), angles.cos()]), (0, dim - loop_dim))


class DepthLoRA(nn.Module):
    """Depth-wise LoRA on the block output: delta = (down(x) * scale[t]) @ B, one rank-sized scale per loop step.

    Steps past max_loop_iters reuse the last scale, so inference can loop deeper than training.
    """

    def __init__(self, dim: int, rank: int, max_loops: int):
        super().__init__()
        self.down = nn.Linear(dim, rank, bias=False)
        self.B = nn.Parameter(torch.empty(rank, dim))
        self.scale = nn.Embedding(max_loops, rank)

    def init_weights(self, init_std: float) -> None:
        nn.init.normal_(self.B, std=init_std)  # down and scale are a Linear and an Embedding, initialised as such

    def forward(self, x: torch.Tensor, loop_t: int) -> torch.Tensor:
        scale = self.scale.weight[min(loop_t, self.scale.num_embeddings - 1)]  # [rank]
        return (self.down(x) * scale) @ self.B


class LTIInjection(nn.Module):
    """open-mythos: h' = A h + B e + y with A = exp(-exp(log_dt + log_A)) in (0, 1) and a diagonal B."""

    def __init__(self, dim: int, b_init: float = 0.1):
        super().__init__()
        self.b_init = b_init
        self.log_A = nn.Parameter(torch.empty(dim))
        self.log_dt = nn.Parameter(torch.empty(1))
        self.B = nn.Parameter(torch.empty(dim))

    def init_weights(self, init_std: float) -> None:
        nn.init.zeros_(self.log_A)
        nn.init.zeros_(self.log_dt)
        nn.init.constant_(self.B, self.b_init)

    def get_A(self) -> torch.Tensor:
        """Diagonal of A [dim] in fp32, in [0, 1) for any parameter value.

        open-mythos' formula; its clamp keeps exp finite, but below log_dt + log_A ~ -16.6 the result rounds to
        exactly 1.0 in fp32, so A is also capped at the largest fp32 below 1 (a no-op everywhere else).
        """
        A = torch.exp(-torch.exp((self.log_dt.float() + self.log_A.float()).clamp(-20, 20)))
        return A.clamp(max=1.0 - 2.0**-24)

    def spectral_radius(self) -> torch.Tensor:
        return self.get_A().detach().max()

    def input_term(self, e: torch.Tensor) -> torch.Tensor:
        """B e: the same every iteration, so it is computed once per forward."""
        return self.B * e

    def forward(self, h: torch.Tensor, input_term: torch.Tensor, block_out: torch.Tensor) -> torch.Tensor:
        """A h + B e + block_out, summed in fp32 and rounded once to h's dtype: A cast to bf16 would be exactly 1
        wherever A > 1 - 2^-9."""
        return (self.get_A() * h + input_term + block_out).to(h.dtype)


class ParcaeInjection(LTIInjection):
    """Parcae: h' = exp(-dt A) h + dt (B e) + y, zero-order-hold discretised with a per-channel step dt and a full B.

    B = diag(B_diag) + W, with B_diag = b_init and W = 0 at init: exactly the LTI update at its start (and an init
    made of fills only, which works on sharded parameters where eye_ does not). Weight decay pulls W towards 0.
    """

    def __init__(self, dim: int, b_init: float = 0.1):
        nn.Module.__init__(self)
        self.b_init = b_init
        self.log_A = nn.Parameter(torch.empty(dim))
        self.log_dt = nn.Parameter(torch.empty(dim))
        self.B = nn.Parameter(torch.empty(dim))
        self.W = nn.Parameter(torch.empty(dim, dim))

    def init_weights(self, init_std: float) -> None:
        super().init_weights(init_std)
        nn.init.zeros_(self.W)

    def input_term(self, e: torch.Tensor) -> torch.Tensor:
        return self.log_dt.clamp(-20, 20).exp() * (self.B * e + nn.functional.linear(e, self.W))


class ACTHalting(nn.Module):
    """Per-position halting probability sigmoid(w h + b) (Graves 2016; open-mythos `ACTHalting`)."""

    def __init__(self, dim: int):
        super().__init__()
        self.halt = nn.Linear(dim, 1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.halt(h)).squeeze(-1)  # [B, T]


@dataclass
class LoopStats:
    """Telemetry of the last forward, all detached tensors on the model's device (no host sync)."""

    h_norm: torch.Tensor
    "[n_iters] mean L2 norm of the hidden state after each iteration."
    h_delta: torch.Tensor
    "[n_iters] mean L2 norm of h_t - h_{t-1}, the change each iteration made (from h_0, model.initial_state): convergence."
    tokens_per_expert: torch.Tensor
    "[n_iters, E] float32 routed (token, choice) slots per expert, counted once per real forward (never by AC recompute)."
    halting_depth_mean: torch.Tensor
    "[] mean over positions of the iteration at which ACT halted them (n_iters if never / ACT off)."
    halting_depth_max: torch.Tensor
    "[] max of the same."


WrapIteration = Callable[..., tuple]

LOOP_DYNAMICS = ("injection", "lora", "norm", "act", "block.moe.router")
"Submodules used by every iteration, so their gradients sum over all k of them."


@contextmanager
def swapped_parameters(module: nn.Module, tensors: dict[str, torch.Tensor]) -> Iterator[None]:
    """Let `module`'s parameters named in `tensors` read as those tensors inside the block, then put them back."""
    owners = {name: module.get_submodule(name.rpartition(".")[0]) for name in tensors}
    saved = {name: owners[name]._parameters[name.rpartition(".")[2]] for name in tensors}
    try:
        for name, t in tensors.items():
            owners[name]._parameters[name.rpartition(".")[2]] = t
        yield
    finally:
        for name, p in saved.items():
            owners[name]._parameters[name.rpartition(".")[2]] = p


class RecurrentBlock(nn.Module):
    """Loop driver around `block` (a MoE TransformerBlock returning (out, (tokens_per_expert, selected)))."""

    def __init__(self, cfg: ModelConfig, block: nn.Module):
        super().__init__()
        self.max_loop_iters, self.act_threshold = cfg.max_loop_iters, cfg.act_threshold
        self.loop_dim = cfg.dim // 8 if cfg.loop_embedding else 0
        self.initial_state = cfg.initial_state
        self.block = block
        injection = ParcaeInjection if cfg.injection == "parcae" else LTIInjection
        self.injection = injection(cfg.dim, cfg.injection_b_init)
        self.act = ACTHalting(cfg.dim) if cfg.use_act else None
        self.lora = DepthLoRA(cfg.dim, cfg.lora_rank, cfg.max_loop_iters) if cfg.lora_rank else None
        self.norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.last_stats: LoopStats | None = None

    def start_state(self, e: torch.Tensor, n_slices: int = 1, slice_rank: int = 0) -> torch.Tensor:
        """h_0 [B, T, dim] for the prelude output e (model.initial_state); e is slice `slice_rank` of n_slices of the
        sequence under sequence parallelism. Noise is drawn for the whole sequence, so every layout draws the same
        h_0, from the default generator: checkpoints keep its state, so a resumed run draws what the uninterrupted
        one did (evaluation forks it). Data-parallel replicas draw the same noise for their own batches."""
        if self.initial_state == "prelude":
            return e
        if self.initial_state == "zero":
            return torch.zeros_like(e)
        std = (2 / (5 * e.shape[-1])) ** 0.5  # Huginn's state init (Geiping et al. 2025)
        noise = torch.empty((e.shape[0], e.shape[1] * n_slices, e.shape[2]), dtype=torch.float32, device=e.device)
        nn.init.trunc_normal_(noise, std=std, a=-3 * std, b=3 * std)
        return noise[:, slice_rank * e.shape[1] : (slice_rank + 1) * e.shape[1]].to(e.dtype)

    def loop_dynamics_fp32(self) -> dict[str, torch.Tensor]:
        """fp32 views of the LOOP_DYNAMICS parameters, made once per forward.

        Every iteration uses the same views, so autograd sums their k gradients in fp32 and rounds once into the
        parameter's gradient; used directly, bf16 parameters (FSDP's param_dtype) would sum them in bf16. A
        parameter still sharded here (a tensor subclass: the router under FSDP's reshard_per_iteration, gathered by
        the block's own unit each iteration, which also reduces each iteration's gradient in fp32) is left alone.
        """
        views = {}
        for prefix in LOOP_DYNAMICS:
            owner, _, leaf = prefix.rpartition(".")
            module = getattr(self.get_submodule(owner), leaf)
            for name, p in module.named_parameters() if module is not None else ():
                if not is_traceable_wrapper_subclass(p):
                    views[f"{prefix}.{name}"] = p.float()
        return views

    def iteration(
        self,
        h: torch.Tensor,
        e: torch.Tensor,
        input_term: torch.Tensor,
        loop_t: int,
        rope: Rope,
        kv_cache: dict | None = None,
        dynamics: dict[str, torch.Tensor] | None = None,
        routing: dict[int, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """One loop step -> (h_next [B, T, dim], tokens_per_expert [E], halting prob [B, T] or None).

        The loop dynamics (norm, LoRA, injection, ACT) run in fp32 on `dynamics` (`loop_dynamics_fp32`, passed in
        so that an activation-checkpoint recompute uses the forward's views); the block runs in e's dtype.
        `routing` (one dict per forward, loop_t -> selected experts [B * T, k]): a checkpointed iteration records
        its experts there, and its recompute, finding them, routes to the same ones.
        Telemetry is returned, never stored, so activation checkpointing may rerun this freely. The named range
        (`mythos:loop<t>:grad|nograd`) is what `profile` reads; a rerun inside backward is its recompute.
        """
        phase = f"mythos:loop{loop_t}:{'grad' if torch.is_grad_enabled() else 'nograd'}"
        with record_function(phase), swapped_parameters(self, dynamics or {}):
            x = h.float() + e.float()
            if self.loop_dim:
                x = x + loop_index_embedding(loop_t, h.shape[-1], self.loop_dim, h.device)  # [dim] fp32
            x = self.norm(x).to(e.dtype)  # the block runs in the prelude's dtype
            recorded = None if routing is None else routing.get(loop_t)  # recompute: the forward's choice
            if routing is not None and recorded is None:  # forward: all -1, the router chooses
                recorded = torch.full((x.shape[:-1].numel(), self.block.moe.top_k), -1, device=x.device)
            y, (tokens_per_expert, selected) = self.block(x, rope, cache_slot(kv_cache, f"loop_{loop_t}"), recorded)
            if routing is not None:
                routing.setdefault(loop_t, selected)
            y = y.float() if self.lora is None else y.float() + self.lora(y.float(), loop_t)
            h_next = self.injection(h, input_term, y)
            return h_next, tokens_per_expert, (self.act(h_next.float()) if self.act is not None else None)

    def forward(
        self,
        h: torch.Tensor,
        e: torch.Tensor,
        rope: Rope,
        n_nograd: int = 0,
        n_grad: int | None = None,
        wrap_iteration: WrapIteration | None = None,
        kv_cache: dict | None = None,
        token_weight: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run n_nograd iterations without autograd, then n_grad with it; h, e [B, T, dim] -> [B, T, dim].

        token_weight [T]: weights of the telemetry's means over positions (0 on padding, see MythosModel.forward).

        With ACT the output is the halting-weighted sum of the states (remainder trick), else the last state.
        Positions keep being computed after they halt (their weight is 0), so every call does the same work.
        """
        n_grad = self.max_loop_iters if n_grad is None else n_grad
        n_iters = n_nograd + n_grad
        if n_nograd < 0 or n_grad < 0 or n_iters < 1:
            raise ValueError(f"need n_nograd >= 0, n_grad >= 0 and at least one iteration, got {n_nograd=}, {n_grad=}")
        block_dtype, h = h.dtype, h.float()  # h is carried in fp32 between iterations (issue 13.2's measurement)
        dynamics = self.loop_dynamics_fp32()
        routing: dict[int, torch.Tensor] = {}  # loop_t -> experts its forward chose, for its recompute
        with swapped_parameters(self, dynamics):
            input_term = self.injection.input_term(e.float())  # [B, T, dim] fp32: its k gradients sum in fp32 too
        if self.act is not None:
            h_out = torch.zeros(h.shape, dtype=torch.float32, device=h.device)
            cumulative_p = torch.zeros(h.shape[:-1], dtype=torch.float32, device=h.device)
            running = torch.ones(h.shape[:-1], dtype=torch.float32, device=h.device)  # 1 until a position halts
            halting_depth = torch.zeros_like(cumulative_p)
        h_norms, h_deltas, loads = [], [], []
        for t in range(n_iters):
            h_prev = h.detach()
            if t < n_nograd:
                with torch.no_grad():
                    h, tokens_per_expert, p = self.iteration(h, e, input_term, t, rope, kv_cache, dynamics)
            elif wrap_iteration is not None:
                h, tokens_per_expert, p = wrap_iteration(
                    self.iteration, h, e, input_term, t, rope, kv_cache, dynamics, routing
                )
            else:
                h, tokens_per_expert, p = self.iteration(h, e, input_term, t, rope, kv_cache, dynamics)
            if self.act is not None:
                p = p.float()
                remainder = (1.0 - cumulative_p).clamp(min=0)
                weight = torch.where(cumulative_p + p >= self.act_threshold, remainder, p) * running
                h_out = h_out + weight.unsqueeze(-1) * h
                cumulative_p = cumulative_p + p * running
                halting_depth = halting_depth + running
                running = running * (cumulative_p < self.act_threshold)
            h_norms.append(_mean(torch.linalg.vector_norm(h.detach(), dim=-1, dtype=torch.float32), token_weight))
            delta = torch.linalg.vector_norm(h.detach() - h_prev, dim=-1, dtype=torch.float32)
            h_deltas.append(_mean(delta, token_weight))
            loads.append(tokens_per_expert.detach())
        if self.act is not None:
            real = halting_depth if token_weight is None else halting_depth * (token_weight > 0)
            depth_mean, depth_max = _mean(halting_depth, token_weight), real.max()
        else:
            depth_mean = depth_max = torch.full((), float(n_iters), device=h.device)
        self.last_stats = LoopStats(
            torch.stack(h_norms), torch.stack(h_deltas), torch.stack(loads), depth_mean, depth_max
        )
        return (h_out if self.act is not None else h).to(block_dtype)


def _mean(x: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """x [B, T] -> its mean over positions weighted by weight [T] (plain mean without)."""
    return x.mean() if weight is None else (x * weight).mean()
