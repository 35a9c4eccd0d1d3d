"""Document masking under FSDP x EP with per-loop activation checkpointing, eager and compiled: the packed rows'
loss and gradients equal a plain single-process model run on every document alone."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from distributed_testing import run_distributed
from test_parallel_fsdp_ep import full, tiny_config

from mythos_train.model import MythosModel
from parallel import build_mesh, parallelize

ROWS = {0: [(5, 7), (3, 9)], 1: [(12,), (4, 4, 4)]}  # document lengths of each rank's two rows of 12 tokens


def documents(rank: int) -> list[list[torch.Tensor]]:
    """Per row, its documents as token tensors of length + 1 (inputs and next-token labels)."""
    g = torch.Generator().manual_seed(rank)
    return [[torch.randint(0, 64, (n + 1,), generator=g) for n in row] for row in ROWS[rank]]


SETUPS = {
    "ep2_ac_loop": {"ep": 2, "activation_checkpoint": "loop"},
    "ep2_ac_loop_compiled": {"ep": 2, "activation_checkpoint": "loop", "compile": True},
}


def packed_job(rank: int, world: int, setup: str) -> dict:
    out = {}
    for name, overrides in [(setup, SETUPS[setup])]:
        cfg = tiny_config(**overrides)
        torch.manual_seed(0)
        ref = MythosModel(cfg.model)
        model = copy.deepcopy(ref)
        wrap = parallelize(model, build_mesh(cfg.parallel, world, "cpu"), cfg)
        rows = documents(rank)
        inputs = torch.stack([torch.cat([d[:-1] for d in row]) for row in rows])  # [2, 12]
        labels = torch.stack([torch.cat([d[1:] for d in row]) for row in rows])
        starts = torch.zeros_like(inputs, dtype=torch.bool)
        for i, row in enumerate(ROWS[rank]):
            starts[i, torch.tensor([0, *torch.tensor(row).cumsum(0)[:-1].tolist()])] = True
        logits = model(inputs, n_nograd=1, n_grad=2, wrap_iteration=wrap, doc_starts=starts)
        loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten())  # local mean; FSDP averages over ranks
        loss.backward()
        ref_sum, ref_tokens = 0.0, 0
        for r in range(world):  # reference: every rank's documents, each alone, on one plain model
            for row in documents(r):
                for d in row:
                    ref_logits = ref(d[None, :-1], n_nograd=1, n_grad=2)
                    ref_sum = ref_sum + F.cross_entropy(ref_logits[0], d[1:], reduction="sum")
                    ref_tokens += len(d) - 1
        ref_loss = ref_sum / ref_tokens
        ref_loss.backward()
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)
        grad_err = max(
            ((full(p.grad) - rp.grad).abs().max() / (rp.grad.abs().max() + 1e-6)).item()
            for p, rp in zip(model.parameters(), ref.parameters(), strict=True)
        )
        out[name] = {"loss": abs(mean_loss.item() / world - ref_loss.item()), "grad": grad_err}
    return out


@pytest.mark.slow
@pytest.mark.parametrize("setup", list(SETUPS))
def test_document_masking_under_fsdp_ep_ac_and_compile(setup):
    results = run_distributed(packed_job, 2, setup, timeout=900)
    for name, err in results[0].items():
        assert err["loss"] < 1e-5 and err["grad"] < 1e-4, (name, err)
