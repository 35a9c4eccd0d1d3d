"""Exported weights give open-mythos 0.5.0's OpenMythos the same logits as our model (use_act=True, injection="lti").

The reference is loaded straight from its main.py (CI: `pip install open-mythos==0.5.0 --no-deps`); skipped if absent.
"""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from model_testing import tiny_model_config

from mythos_train.config import ModelConfig
from mythos_train.model import MythosModel
from mythos_train.model.open_mythos_compat import open_mythos_config_kwargs, to_open_mythos_state_dict


def _reference_main_path() -> Path | None:
    spec = importlib.util.find_spec("open_mythos")
    candidates = [Path(p) / "main.py" for p in (spec.submodule_search_locations or [])] if spec else []
    candidates.append(Path("/tmp/om/x/open_mythos/main.py"))
    return next((p for p in candidates if p.is_file()), None)


@pytest.fixture(scope="module")
def reference():
    path = _reference_main_path()
    if path is None:
        pytest.skip("open-mythos 0.5.0 not installed (pip install open-mythos==0.5.0 --no-deps)")
    spec = importlib.util.spec_from_file_location("open_mythos_reference_main", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look the module up while the class body runs
    spec.loader.exec_module(module)
    return module


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
