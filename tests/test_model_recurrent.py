"""The loop: stability of A, truncated backprop through depth, checkpointing, deeper-than-trained inference."""

import itertools

import pytest
import torch
import torch.nn.functional as F
from model_testing import DIM32, tiny_model_config
from torch.utils.checkpoint import checkpoint

from mythos_train.model import MythosModel


def _model(seed: int = 0, **overrides) -> MythosModel:
    torch.manual_seed(seed)
    model = MythosModel(tiny_model_config(**DIM32, vocab_size=50, n_experts=4, expert_dim=8, init_std=0.1, **overrides))
    with torch.no_grad():  # make the injection and ACT parameters non-trivial
        for name, p in model.recurrent.named_parameters():
            if not name.startswith("block."):
                p.add_(0.2 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("injection", ["lti", "parcae"])
def test_spectral_radius_below_one_at_extreme_parameters(injection):
    injection_module = _model(injection=injection).recurrent.injection
    for log_A, log_dt in itertools.product([-1e4, 0.0, 1e4], repeat=2):
        with torch.no_grad():
            injection_module.log_A.fill_(log_A)
            injection_module.log_dt.fill_(log_dt)
        A = injection_module.get_A()
        assert torch.isfinite(A).all() and (A >= 0).all() and (A < 1).all(), (log_A, log_dt)
        assert 0 <= injection_module.spectral_radius().item() < 1


@pytest.mark.parametrize("injection", ["lti", "parcae"])
def test_bf16_update_is_rounded_once(injection):
    """In bf16 the update A h + B e + y must be the exact value rounded once (within half a bf16 step), not the sum
    of bf16 terms with A itself rounded to bf16 (which makes A = 1 wherever A > 1 - 2^-9)."""
    module = _model(injection=injection).recurrent.injection
    with torch.no_grad():
        module.log_A.fill_(-7.0)  # A = exp(-exp(-7 + log_dt)) ~ 0.999
    torch.manual_seed(1)
    h, input_term, block_out = (scale * torch.randn(4096, module.log_A.numel()) for scale in (1.0, 0.1, 0.1))
    h, input_term, block_out = (t.bfloat16() for t in (h, input_term, block_out))
    out = module(h, input_term, block_out)
    exact = module.get_A().double() * h.double() + input_term.double() + block_out.double()
    half_step = torch.exp2(torch.floor(torch.log2(exact.abs().clamp(min=1e-30))) - 8)  # bf16: 8 significant bits
    fp32_sum_error = 3 * 2.0**-24 * (h.double().abs() + input_term.double().abs() + block_out.double().abs())
    assert out.dtype == torch.bfloat16 and ((out.double() - exact).abs() <= half_step + fp32_sum_error).all()


def _manual_forward(
    model: MythosModel, tokens: torch.Tensor, n_nograd: int, n_grad: int, noise: torch.Tensor | None = None
) -> torch.Tensor:
    """The model written out as open-mythos states it, with the first n_nograd states detached instead of no_grad,
    and the recipe switches (initial state: `noise` for 'noise', loop embedding, LoRA) as the config says."""
    cfg, rec = model.cfg, model.recurrent
    rope = model.rope(0, tokens.shape[1])
    h = model.tok_embeddings(tokens)
    for layer in model.prelude:
        h, _ = layer(h, rope)
    e = h
    h = {"prelude": e, "zero": torch.zeros_like(e), "noise": noise}[cfg.initial_state]
    inj = rec.injection
    A = torch.exp(-torch.exp((inj.log_dt + inj.log_A).clamp(-20, 20)))
    Be = inj.B * e if cfg.injection == "lti" else torch.exp(inj.log_dt) * (e @ (torch.diag(inj.B) + inj.W).T)
    h_out = torch.zeros_like(h)
    cumulative = torch.zeros(h.shape[:-1])
    halted = torch.zeros(h.shape[:-1], dtype=torch.bool)
    loop_dim = cfg.dim // 8
    for t in range(n_nograd + n_grad):
        freqs = 1.0 / (10000.0 ** (torch.arange(0, loop_dim, 2).float() / loop_dim))
        emb = torch.zeros(cfg.dim)
        emb[:loop_dim] = torch.cat([(t * freqs).sin(), (t * freqs).cos()])
        x = h + emb * cfg.loop_embedding + e
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + cfg.norm_eps) * rec.norm.weight
        y, _ = rec.block(x, rope)
        if cfg.lora_rank:
            scale = rec.lora.scale.weight[min(t, cfg.max_loop_iters - 1)]
            y = y + ((y @ rec.lora.down.weight.T) * scale) @ rec.lora.B
        h = A * h + Be + y
        if t < n_nograd:
            h = h.detach()
        if cfg.use_act:
            p = torch.sigmoid(h @ rec.act.halt.weight.T + rec.act.halt.bias).squeeze(-1)
            p = p.detach() if t < n_nograd else p
            still = (~halted).float()
            weight = torch.where(cumulative + p >= cfg.act_threshold, (1 - cumulative).clamp(min=0), p) * still
            h_out = h_out + weight.unsqueeze(-1) * h
            cumulative = cumulative + p * still
            halted = halted | (cumulative >= cfg.act_threshold)
    h = h_out if cfg.use_act else h
    for layer in model.coda:
        h, _ = layer(h, rope)
    return F.linear(model.norm(h), model.tok_embeddings.weight)


def _grads(model: MythosModel, logits: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad()
    F.cross_entropy(logits.flatten(0, 1), targets.flatten()).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize(
    ("injection", "use_act", "n_nograd", "n_grad"),
    [
        ("lti", False, 2, 2),
        ("lti", True, 2, 3),
        ("parcae", False, 1, 2),
        ("parcae", True, 0, 3),
        ("lti", True, 3, 1),
    ],
)
def test_truncated_loop_gradients_equal_autograd_with_detached_prefix(injection, use_act, n_nograd, n_grad):
    model = _model(injection=injection, use_act=use_act, act_threshold=0.9)
    tokens, targets = torch.randint(0, 50, (2, 2, 12), generator=torch.Generator().manual_seed(1))
    got = _grads(model, model(tokens, n_nograd=n_nograd, n_grad=n_grad), targets)
    expected = _grads(model, _manual_forward(model, tokens, n_nograd, n_grad), targets)
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-6, rtol=1e-4, msg=name)
    if n_nograd:  # the gradient-free prefix must really be cut: full backprop gives other gradients
        full = _grads(model, model(tokens, n_grad=n_nograd + n_grad), targets)
        assert not torch.allclose(full["recurrent.injection.log_A"], got["recurrent.injection.log_A"])


@pytest.mark.parametrize(
    "recipe",
    [dict(initial_state="zero"), dict(loop_embedding=False), dict(lora_rank=0), dict(initial_state="noise")],
    ids=["zero-state", "no-loop-embedding", "no-lora", "noise-state"],
)
def test_recipe_switches_equal_the_written_out_loop(recipe):
    """The canary study's switches (docs/science.md) compute what the written-out loop says, gradients included;
    the noise state is Huginn's truncated normal, redrawn every forward from the default generator."""
    model = _model(**recipe)
    tokens, targets = torch.randint(0, 50, (2, 2, 12), generator=torch.Generator().manual_seed(3))
    torch.manual_seed(7)
    got = _grads(model, model(tokens, n_nograd=1, n_grad=2), targets)
    noise = None
    if recipe.get("initial_state") == "noise":
        std = (2 / (5 * model.cfg.dim)) ** 0.5
        torch.manual_seed(7)
        noise = torch.empty(2, 12, model.cfg.dim)
        torch.nn.init.trunc_normal_(noise, std=std, a=-3 * std, b=3 * std)
        assert noise.abs().max() <= 3 * std and abs(noise.std().item() / std - 0.987) < 0.05  # 3-sigma truncation
        assert not torch.equal(model(tokens), model(tokens))
    expected = _grads(model, _manual_forward(model, tokens, 1, 2, noise), targets)
    assert got.keys() == expected.keys()
    assert ("recurrent.lora.B" in got) == (model.cfg.lora_rank > 0)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-6, rtol=1e-4, msg=name)


def test_injection_b_init_sets_the_diagonal():
    for injection in ("lti", "parcae"):
        torch.manual_seed(0)
        model = MythosModel(tiny_model_config(**DIM32, injection=injection, injection_b_init=0.5))
        assert torch.equal(model.recurrent.injection.B, torch.full((model.cfg.dim,), 0.5))


def test_checkpointed_iterations_give_same_grads_and_count_load_once():
    model = _model(use_act=True)
    tokens, targets = torch.randint(0, 50, (2, 2, 12), generator=torch.Generator().manual_seed(2))
    calls = []

    def wrap(fn, *args):
        calls.append(args[3])
        return checkpoint(fn, *args, use_reentrant=False)

    expected = _grads(model, model(tokens, n_nograd=1, n_grad=3), targets)
    stats = model.recurrent.last_stats
    got = _grads(model, model(tokens, n_nograd=1, n_grad=3, wrap_iteration=wrap), targets)
    assert calls == [1, 2, 3]  # only the gradient iterations are wrapped
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=0, rtol=0, msg=name)
    counted = model.recurrent.last_stats.tokens_per_expert
    assert counted.shape == (4, 4) and (counted.sum(-1) == 2 * 12 * 2).all()  # once per real forward, not per recompute
    assert torch.equal(counted, stats.tokens_per_expert)


def test_more_loops_than_trained_at_inference():
    model = _model(use_act=True, act_threshold=1.0).eval()
    tokens = torch.randint(0, 50, (1, 10), generator=torch.Generator().manual_seed(3))
    n = model.cfg.max_loop_iters + 4
    with torch.no_grad():
        got = model(tokens, n_grad=n)
        expected = _manual_forward(model, tokens, 0, n)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-4)
    stats = model.recurrent.last_stats
    assert stats.h_norm.shape == (n,) and stats.tokens_per_expert.shape == (n, 4)
    assert stats.halting_depth_max.item() <= n and torch.isfinite(stats.h_norm).all()


def test_loop_stats_without_act():
    model = _model()
    model(torch.zeros(2, 5, dtype=torch.long), n_nograd=2, n_grad=1)
    stats = model.recurrent.last_stats
    assert stats.h_norm.shape == (3,) and not stats.h_norm.requires_grad
    assert stats.halting_depth_mean.item() == stats.halting_depth_max.item() == 3


def test_bad_depth_raises():
    with pytest.raises(ValueError, match="n_grad"):
        _model()(torch.zeros(1, 4, dtype=torch.long), n_nograd=0, n_grad=0)
