"""Attention and KV cache through the whole model: causality, cached generation == recomputation."""

import pytest
import torch
from model_testing import tiny_model_config

from mythos_train.model import MythosModel


def _model(attn_type: str, seed: int = 0, **overrides) -> MythosModel:
    torch.manual_seed(seed)
    cfg = tiny_model_config(max_seq_len=48, attn_type=attn_type, init_std=0.1, **overrides)
    return MythosModel(cfg).eval()


@pytest.mark.parametrize("attn_type", ["mla", "gqa"])
@pytest.mark.parametrize("use_act", [False, True])
def test_changing_a_future_token_never_changes_past_logits(attn_type, use_act):
    model = _model(attn_type, use_act=use_act)
    tokens = torch.randint(0, 64, (2, 20), generator=torch.Generator().manual_seed(0))
    changed = tokens.clone()
    changed[:, 12:] = (changed[:, 12:] + 1 + torch.arange(8)) % 64
    with torch.no_grad():
        a, b = model(tokens, n_grad=3), model(changed, n_grad=3)
    torch.testing.assert_close(a[:, :12], b[:, :12], atol=1e-5, rtol=0)  # kernels may block rows differently
    assert (a[:, 12:] - b[:, 12:]).abs().max() > 1e-3  # the change is visible where it may be


def _greedy_without_cache(model: MythosModel, prompt: torch.Tensor, new_tokens: int, n_loops: int) -> torch.Tensor:
    tokens = prompt
    for _ in range(new_tokens):
        with torch.no_grad():
            logits = model(tokens, n_grad=n_loops)
        tokens = torch.cat([tokens, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return tokens


@pytest.mark.parametrize("attn_type", ["mla", "gqa"])
@pytest.mark.parametrize("n_loops", [1, 3, 5])
def test_greedy_generate_with_cache_equals_recompute(attn_type, n_loops):
    model = _model(attn_type, seed=n_loops, use_act=n_loops == 3)
    prompt = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(n_loops))
    expected = _greedy_without_cache(model, prompt, 10, n_loops)
    got = model.generate(prompt, max_new_tokens=10, n_loops=n_loops)
    assert torch.equal(got, expected)
    assert len(set(got[:, 7:].flatten().tolist())) > 1  # not a degenerate repeat of one token


@pytest.mark.parametrize("attn_type", ["mla", "gqa"])
def test_chunked_prefill_with_cache_equals_one_pass(attn_type):
    """A multi-token chunk after a filled cache needs the bottom-right-aligned causal mask."""
    model = _model(attn_type)
    tokens = torch.randint(0, 64, (2, 18), generator=torch.Generator().manual_seed(2))
    cache: dict = {}
    with torch.no_grad():
        full = model(tokens, n_grad=2)
        first = model(tokens[:, :10], n_grad=2, kv_cache=cache)
        second = model(tokens[:, 10:], n_grad=2, kv_cache=cache, start_pos=10)
    torch.testing.assert_close(torch.cat([first, second], dim=1), full, atol=1e-5, rtol=1e-5)


def test_mla_cache_holds_the_latent():
    model = _model("mla")
    cache: dict = {}
    with torch.no_grad():
        model(torch.zeros(1, 5, dtype=torch.long), n_grad=2, kv_cache=cache)
    assert sorted(cache) == ["coda_0", "loop_0", "loop_1", "prelude_0"]
    assert cache["loop_1"]["c_kv"].shape == (1, 5, 16) and cache["loop_1"]["k_rope"].shape == (1, 5, 1, 8)


def test_positions_past_max_seq_len_raise():
    with pytest.raises(ValueError, match="max_seq_len"):
        _model("gqa")(torch.zeros(1, 49, dtype=torch.long))


@pytest.mark.parametrize("attn_type", ["mla", "gqa"])
def test_padded_decode_reaches_max_seq_len(attn_type):
    """Sequence parallelism pads each forward to a multiple of tp (`sequence_multiple`); the pads take valid
    positions, so generation fills all max_seq_len positions as unpadded (failed before: a ValueError at position 45 of 48),
    also with document masking through the cache."""
    model = _model(attn_type)
    prompt = torch.randint(0, 64, (1, 5), generator=torch.Generator().manual_seed(3))
    starts = torch.zeros(1, 5, dtype=torch.bool)
    expected = model.generate(prompt, 43, n_loops=2)
    with torch.no_grad():
        docs = [model(prompt, n_grad=2, kv_cache=(cache := {}), doc_starts=starts)]
        docs += [
            model(expected[:, t : t + 1], n_grad=2, kv_cache=cache, doc_starts=starts[:, :1]) for t in range(5, 48)
        ]
    model.sequence_multiple = 4
    assert torch.equal(model.generate(prompt, 43, n_loops=2), expected)
    with torch.no_grad():
        padded = [model(prompt, n_grad=2, kv_cache=(cache := {}), doc_starts=starts)]
        padded += [
            model(expected[:, t : t + 1], n_grad=2, kv_cache=cache, doc_starts=starts[:, :1]) for t in range(5, 48)
        ]
    torch.testing.assert_close(torch.cat(padded, dim=1), torch.cat(docs, dim=1), atol=1e-5, rtol=1e-5)


def test_padded_forward_loop_telemetry_counts_real_tokens_only():
    """Loop telemetry (h norms / deltas, ACT halting depth) of a padded forward equals the unpadded one's (failed
    before: the means included the pad positions)."""
    model = _model("gqa", use_act=True)
    tokens = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(4))
    stats = []
    for multiple in (1, 4):
        model.sequence_multiple = multiple
        with torch.no_grad():
            model(tokens, n_grad=3)
        stats.append(model.recurrent.last_stats)
    for field in ("h_norm", "h_delta", "halting_depth_mean", "halting_depth_max"):
        torch.testing.assert_close(getattr(stats[1], field), getattr(stats[0], field), rtol=1e-6, atol=0)
