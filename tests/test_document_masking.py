"""Document masking: a packed row of documents gives each document exactly what running it alone gives."""

from __future__ import annotations

import pytest
import torch
from model_testing import tiny_model_config

from mythos_train.model import MythosModel

LENGTHS = (5, 9, 3, 7)  # four documents packed into one row of 24 tokens


def _model(attn_type: str, **overrides) -> MythosModel:
    torch.manual_seed(0)
    return MythosModel(tiny_model_config(attn_type=attn_type, **overrides)).eval()


def _packed(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """tokens [2, 24], doc_starts [2, 24] (row 1 packs the documents in reverse order) and the documents."""
    g = torch.Generator().manual_seed(seed)
    docs = [torch.randint(3, 64, (n,), generator=g) for n in LENGTHS]
    rows, starts = [], []
    for order in (docs, docs[::-1]):
        rows.append(torch.cat(order))
        flags = torch.zeros(sum(LENGTHS), dtype=torch.bool)
        flags[torch.tensor([0, *torch.tensor([len(d) for d in order]).cumsum(0)[:-1].tolist()])] = True
        starts.append(flags)
    return torch.stack(rows), torch.stack(starts), docs


def _alone(model: MythosModel, docs: list[torch.Tensor], **kwargs) -> list[torch.Tensor]:
    with torch.no_grad():
        return [model(d[None], **kwargs)[0] for d in docs]


@pytest.mark.parametrize("attn_type,use_act", [("mla", False), ("gqa", True)])
def test_packed_documents_equal_each_document_alone(attn_type, use_act):
    model = _model(attn_type, use_act=use_act)
    tokens, starts, docs = _packed()
    expected = _alone(model, docs, n_grad=3)
    with torch.no_grad():
        packed = model(tokens, n_grad=3, doc_starts=starts)
        unmasked = model(tokens, n_grad=3)
    torch.testing.assert_close(torch.cat(expected), packed[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.cat(expected[::-1]), packed[1], atol=1e-5, rtol=1e-5)
    # without the mask the later documents see the earlier ones: the test can tell the difference
    assert not torch.allclose(torch.cat(expected)[LENGTHS[0] :], unmasked[0, LENGTHS[0] :], atol=1e-3)


@pytest.mark.parametrize("attn_type", ["mla", "gqa"])
def test_document_masking_with_kv_cache(attn_type):
    """Prefill a packed row in two chunks (the second starts mid-document), then decode one token: each step
    equals the last document run alone without a cache."""
    model = _model(attn_type)
    tokens, starts, docs = _packed(seed=1)
    last = docs[-1]
    cache: dict = {}
    with torch.no_grad():
        first = model(tokens[:1, :12], n_grad=2, kv_cache=cache, doc_starts=starts[:1, :12])
        second = model(tokens[:1, 12:], n_grad=2, kv_cache=cache, doc_starts=starts[:1, 12:])
        step = model(torch.tensor([[7]]), n_grad=2, kv_cache=cache, doc_starts=torch.zeros(1, 1, dtype=torch.bool))
    expected = _alone(model, [*docs[:-1], torch.cat([last, torch.tensor([7])])], n_grad=2)
    torch.testing.assert_close(torch.cat([first, second, step], dim=1)[0], torch.cat(expected), atol=1e-5, rtol=1e-5)


def test_document_masking_gradients_match(monkeypatch):
    """Training path: per-loop activation checkpointing and the loss gradient of the packed row equal the sum of
    the documents' own gradients."""
    from torch.utils.checkpoint import checkpoint

    def wrap(fn, *args):
        return checkpoint(fn, *args, use_reentrant=False)

    model = _model("mla").train()
    tokens, starts, docs = _packed(seed=2)
    model.zero_grad()
    model(tokens[:1], n_nograd=1, n_grad=2, wrap_iteration=wrap, doc_starts=starts[:1]).square().mean().backward()
    packed = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    total = sum(model(d[None], n_nograd=1, n_grad=2).square().sum() for d in docs) / (sum(LENGTHS) * 64)
    total.backward()
    for name, grad in packed.items():
        torch.testing.assert_close(grad, model.get_parameter(name).grad, atol=1e-6, rtol=1e-4, msg=name)
