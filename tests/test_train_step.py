"""The library's one optimizer step around another model's forward (as `bench` runs open-mythos), no process group:
loss, clipping and AdamW update against torch's own mean cross-entropy, clip_grad_norm_ and AdamW on a copy."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mythos_train.train_step import TrainStep

VOCAB, DIM = 11, 8


def _batches() -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    batches = []
    for rows in (2, 3):  # micro-batches of different sizes: the loss is a token mean, not a mean of means
        tokens = torch.randint(0, VOCAB, (rows, 7), generator=g)
        batches.append({"input_ids": tokens[:, :-1], "labels": tokens[:, 1:].clone()})
    batches[1]["labels"][0, :4] = -100
    batches[0]["loss_mask"] = torch.ones(2, 6, dtype=torch.bool)
    batches[0]["loss_mask"][1, 2:] = False
    return batches


def test_step_matches_mean_cross_entropy_clip_and_adamw():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(VOCAB, DIM), nn.Linear(DIM, VOCAB))
    reference = copy.deepcopy(model)
    calls = []

    def forward(batch, n_nograd, n_grad):  # a foreign model: the depth is its own business
        calls.append((n_nograd, n_grad))
        return model(batch["input_ids"])

    step = TrainStep(model, torch.optim.AdamW(model.parameters(), lr=0.1), forward, max_grad_norm=0.01)
    result = step(_batches(), 1, 2)

    inputs = torch.cat([b["input_ids"] for b in _batches()])  # [5, 6]
    labels = [b["labels"].masked_fill(~b["loss_mask"], -100) if "loss_mask" in b else b["labels"] for b in _batches()]
    loss = F.cross_entropy(reference(inputs).flatten(0, 1), torch.cat(labels).flatten(), ignore_index=-100)
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.01)
    torch.optim.AdamW(reference.parameters(), lr=0.1).step()

    assert calls == [(1, 2), (1, 2)]
    assert not result.skipped and (result.n_nograd, result.n_grad, result.lr) == (1, 2, 0.1)
    assert result.loss == pytest.approx(loss.item(), rel=1e-6)
    assert result.grad_norm == pytest.approx(norm.item(), rel=1e-5)
    assert result.loss_tokens == sum(int((lab != -100).sum()) for lab in labels)
    for got, want in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(got, want)
    assert all(p.grad is None for p in model.parameters())


def test_non_finite_step_changes_nothing():
    model = nn.Sequential(nn.Embedding(VOCAB, DIM), nn.Linear(DIM, VOCAB))
    before = copy.deepcopy(model.state_dict())
    step = TrainStep(model, torch.optim.AdamW(model.parameters(), lr=0.1), lambda b, *_: model(b["input_ids"]) * float("nan"), 1.0)  # fmt: skip
    assert step(_batches(), 0, 1).skipped
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name
