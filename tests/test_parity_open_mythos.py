"""Exported weights give open-mythos 0.5.0's OpenMythos the same logits as our model (use_act=True, injection="lti").

The reference is loaded straight from its main.py (`pip install --no-deps open-mythos==0.5.0`); when absent the
tests skip, except under CI (`CI=true`), where they fail.
"""

import importlib.util
from pathlib import Path

import model_testing
import pytest
import torch
from model_testing import open_mythos_reference, tiny_model_config

from mythos_train.config import ModelConfig
from mythos_train.model import MythosModel
from mythos_train.model.open_mythos_compat import load_open_mythos, open_mythos_config_kwargs, to_open_mythos_state_dict


@pytest.fixture(scope="module")
def reference():
    return open_mythos_reference()


def test_missing_reference_skips_locally_and_fails_under_ci(monkeypatch):
    monkeypatch.setattr(model_testing, "load_open_mythos", lambda: None)
    for ci, outcome in ((None, pytest.skip.Exception), ("true", pytest.fail.Exception)):
        if ci is None:
            monkeypatch.delenv("CI", raising=False)
        else:
            monkeypatch.setenv("CI", ci)
        with pytest.raises(BaseException) as raised:  # a skip must not pass for a failure, nor the other way
            open_mythos_reference()
        assert raised.type is outcome, f"CI={ci}: {raised.type.__name__} {raised.value}"


def test_reference_comes_from_the_installed_package_only(monkeypatch):
    """No fallback to a copy elsewhere: with no package installed there is no reference, even were every path a file."""
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None)
    monkeypatch.setattr(Path, "is_file", lambda self: True)
    assert load_open_mythos() is None


def _cfg(attn_type: str, **overrides) -> ModelConfig:
    base = dict(vocab_size=97, prelude_layers=2, n_shared_experts=2, attn_type=attn_type, use_act=True, injection="lti")
    return tiny_model_config(**(base | overrides))


def _build_pair(reference, cfg: ModelConfig, seed: int):
    torch.manual_seed(seed)
    ours = MythosModel(cfg)
    with torch.no_grad():  # perturb what init leaves constant, so every parameter matters to the comparison
        for name, p in ours.named_parameters():
            if "norm" in name or "injection" in name:
                p.add_(0.3 * torch.randn_like(p))
        ours.recurrent.block.moe.router.expert_bias.normal_(0, 0.02)
    theirs = reference.OpenMythos(reference.MythosConfig(**open_mythos_config_kwargs(cfg)))
    theirs.load_state_dict(to_open_mythos_state_dict(ours.state_dict(), cfg), strict=True)
    return ours.eval(), theirs.eval()


@pytest.mark.parametrize("attn_type", ["mla", "gqa"])
@pytest.mark.parametrize("n_loops", [1, 2, 5])
def test_logits_match(reference, attn_type, n_loops):
    cfg = _cfg(attn_type)
    ours, theirs = _build_pair(reference, cfg, seed=n_loops)
    tokens = torch.randint(0, cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        expected = theirs(tokens, n_loops=n_loops)
        got = ours(tokens, n_grad=n_loops)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_logits_match_when_all_positions_halt(reference):
    """A low threshold makes every position halt early: open-mythos exits the loop, we keep running with weight 0."""
    cfg = _cfg("mla", act_threshold=0.3)
    ours, theirs = _build_pair(reference, cfg, seed=3)
    tokens = torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = theirs(tokens, n_loops=6)
        got = ours(tokens, n_grad=6)
    assert ours.recurrent.last_stats.halting_depth_max.item() < 6  # the early-exit path really was taken
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_export_refuses_inexact_settings():
    with pytest.raises(ValueError, match="use_act"):
        to_open_mythos_state_dict({}, _cfg("mla", use_act=False))
    for switch, name in [
        (dict(initial_state="zero"), "initial_state"),
        (dict(loop_embedding=False), "loop_embedding"),
        (dict(lora_rank=0), "lora_rank"),
    ]:  # no form in open-mythos: refused even when an inexact export is allowed
        with pytest.raises(ValueError, match=name):
            to_open_mythos_state_dict({}, _cfg("mla", **switch), require_exact=False)
