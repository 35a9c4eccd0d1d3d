"""Build on meta (the trainer's path: meta -> shard -> to_empty -> init_weights) and initialise in place."""

import pytest
import torch
from model_testing import DIM32, open_mythos_reference, tiny_model_config

from mythos_train.config import load_config
from mythos_train.model import MythosModel
from mythos_train.model.open_mythos_compat import open_mythos_config_kwargs
from mythos_train.model.rope import rope_angles


def _reference_param_count(kwargs: dict) -> int:
    """open-mythos' own count, from building it on meta (missing reference: skip, or fail under CI)."""
    reference = open_mythos_reference()
    with torch.device("meta"):
        model = reference.OpenMythos(reference.MythosConfig(**kwargs))
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("preset", ["1b", "1t"])
@pytest.mark.parametrize("use_act", [False, True])
def test_presets_build_on_meta(preset, use_act):
    cfg = load_config(f"configs/mythos_{preset}.toml", [f"--model.use_act={str(use_act).lower()}"]).model
    with torch.device("meta"):
        model = MythosModel(cfg)
    assert all(t.is_meta for t in [*model.parameters(), *model.buffers()])
    n_params = sum(p.numel() for p in model.parameters())
    expected = {"1b": (1.0e9, 2.0e9), "1t": (0.9e12, 1.2e12)}[preset]
    assert expected[0] < n_params < expected[1], n_params
    if use_act and preset == "1b":  # same parameters as open-mythos (its tied head counted once)
        assert n_params == _reference_param_count(open_mythos_config_kwargs(cfg))


def test_init_weights_after_to_empty_overwrites_everything():
    cfg = tiny_model_config(**DIM32, n_experts=64, expert_dim=32, use_act=True, injection="parcae")
    with torch.device("meta"):
        model = MythosModel(cfg)
    model.to_empty(device="cpu")
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            t.fill_(float("nan"))
    torch.manual_seed(0)
    model.init_weights()
    state = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    assert all(torch.isfinite(t).all() for t in state.values()), [
        n for n, t in state.items() if not torch.isfinite(t).all()
    ]

    for name in [
        "tok_embeddings.weight",
        "recurrent.block.moe.experts.w1",
        "recurrent.block.moe.experts.w2",
        "recurrent.block.attn.q_down.weight",
        "recurrent.block.moe.router.weight",
        "recurrent.lora.B",
    ]:
        assert abs(state[name].std().item() - 0.02) < 0.003 and abs(state[name].mean().item()) < 0.003, name
    assert all((p == 1).all() for n, p in state.items() if "norm" in n)
    assert torch.equal(state["recurrent.block.moe.router.expert_bias"], torch.zeros(64))
    assert torch.equal(state["recurrent.injection.B"], torch.full((32,), 0.1))
    assert torch.equal(state["recurrent.injection.W"], torch.zeros(32, 32))
    torch.testing.assert_close(
        model.recurrent.injection.get_A(), torch.full((32,), torch.exp(torch.tensor(-1.0)).item())
    )
    angles = rope_angles(4, torch.arange(16), cfg.rope_theta)
    assert torch.equal(state["rope.cos"], angles.cos()) and torch.equal(state["rope.sin"], angles.sin())
    assert (state["recurrent.act.halt.bias"].abs() <= 32**-0.5).all()

    torch.manual_seed(0)
    fresh = MythosModel(cfg)
    torch.manual_seed(0)
    fresh.init_weights()  # same seed, same draws: init does not depend on how the model was built
    for name, t in {**dict(fresh.named_parameters()), **dict(fresh.named_buffers())}.items():
        assert torch.equal(t, state[name]), name
