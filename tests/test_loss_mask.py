"""The per-token loss mask: built by the loader from the answer marker, honoured by the trainer's loss, its
normalisation and token counts, and by evaluation; each compared with an independent computation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from canary_testing import prepare_canary

from data_pipeline import build_loader
from data_pipeline.windows import answer_mask
from mythos_train.distributed import destroy_distributed, init_distributed
from mythos_train.evaluate import Evaluator
from mythos_train.trainer import Trainer

EOS, MARK, END = 2, 9, 8


def _reference_mask(row: list[int]) -> list[bool]:
    return _reference_mask_for(row, EOS, MARK)


def _reference_mask_for(row: list[int], eos: int, mark: int, end: int | None = None) -> list[bool]:
    """Label j counts iff tokens[j+1] is an answer token or the eos (or end piece) closing it, in a document that
    started inside the window (an eos was seen before its marker). A plain state machine over the window."""
    mask, seen_eos, in_answer = [], False, False
    for token in row[:-1]:
        if token == eos:
            seen_eos, in_answer = True, False
        elif token == end:
            in_answer = False
        elif token == mark and seen_eos:
            in_answer = True
        mask.append(in_answer)
    return mask


def test_answer_mask_matches_a_state_machine():
    g = torch.Generator().manual_seed(0)
    # tokens 3..8 are text; ~1 in 8 is an eos, ~1 in 8 a marker (several markers per document included)
    tokens = torch.randint(3, 9, (64, 40), generator=g)
    tokens[torch.rand(tokens.shape, generator=g) < 0.125] = EOS
    tokens[torch.rand(tokens.shape, generator=g) < 0.125] = MARK
    expected = torch.tensor([_reference_mask(row) for row in tokens.tolist()])
    got = answer_mask(tokens, EOS, MARK)
    assert got.shape == (64, 39) and 0 < expected.sum() < expected.numel() / 2
    assert torch.equal(got, expected)


def test_answer_end_piece_closes_each_answer_like_a_state_machine():
    """data.answer_end: several prompts and answers in one document, each answer closed by the end piece."""
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(3, 8, (64, 40), generator=g)  # 3..7 text; 8 (END) only where drawn below
    tokens[torch.rand(tokens.shape, generator=g) < 0.05] = EOS
    tokens[torch.rand(tokens.shape, generator=g) < 0.15] = MARK
    tokens[torch.rand(tokens.shape, generator=g) < 0.15] = END
    expected = torch.tensor([_reference_mask_for(row, EOS, MARK, END) for row in tokens.tolist()])
    got = answer_mask(tokens, EOS, MARK, END)
    assert 0 < expected.sum() < torch.tensor([_reference_mask(row) for row in tokens.tolist()]).sum()
    assert torch.equal(got, expected)


@pytest.fixture(scope="module")
def canary(tmp_path_factory):
    """One query per program, answers closed by the eos only."""
    return prepare_canary(tmp_path_factory.mktemp("canary"), "--canary.queries=1", "--data.answer_end=")


def test_loader_masks_all_but_the_answer_and_its_eos(canary):
    loader = build_loader(
        canary.data, split="train", seq_len=64, micro_batch_size=4, grad_accum_steps=1, dp_rank=0, dp_world_size=1
    )
    batch = next(iter(loader))
    from data_pipeline.tokenizer import load_tokenizer, tokenizer_path

    sp = load_tokenizer(tokenizer_path(canary.data))
    labels, mask = batch["labels"], batch["loss_mask"]
    assert mask.any() and mask.float().mean() < 0.2
    for row in range(labels.shape[0]):
        counted = sp.id_to_piece(labels[row][mask[row]].tolist())
        # every counted label is a digit (the answer) or the eos after it, and they alternate
        assert counted[0::2] == [p for p in counted[0::2] if p.isdigit()] and set(counted[1::2]) <= {"</s>"}
    loader.close()


def test_loader_with_several_queries_counts_every_answer_and_its_end(tmp_path):
    """canary.queries = 3 with data.answer_end = ';': every whole program gives three answers, each followed by
    the end piece or (the last) the eos; nothing of the queries' prompts counts."""
    cfg = prepare_canary(tmp_path, "--canary.queries=3", "--data.answer_end=;")
    loader = build_loader(
        cfg.data, split="train", seq_len=64, micro_batch_size=8, grad_accum_steps=1, dp_rank=0, dp_world_size=1
    )
    batch = next(iter(loader))
    from data_pipeline.tokenizer import load_tokenizer, tokenizer_path

    sp = load_tokenizer(tokenizer_path(cfg.data))
    for row in range(batch["labels"].shape[0]):
        counted = sp.id_to_piece(batch["labels"][row][batch["loss_mask"][row]].tolist())
        pieces = sp.id_to_piece(batch["input_ids"][row].tolist())
        labels = sp.id_to_piece(batch["labels"][row].tolist())
        first_eos = pieces.index("</s>") if "</s>" in pieces else len(pieces)  # whole programs start after it
        expected = [labels[i] for i, p in enumerate(pieces) if p == "#>" and i > first_eos]
        assert counted[0::2] == expected and all(p.isdigit() for p in expected)
        assert set(counted[1::2]) <= {";", "</s>"} and counted[1::2].count("</s>") <= counted[1::2].count(";")
    loader.close()


def test_trainer_and_evaluator_losses_are_the_masked_cross_entropy(canary, tmp_path):
    cfg = canary
    cfg.train.run_dir = str(tmp_path / "run")
    cfg.train.depth_distribution, cfg.train.mean_depth, cfg.train.backprop_depth = "fixed", 2.0, 2
    try:
        trainer = Trainer(cfg, init_distributed(cfg))
        micro = trainer.next_micro_batches()
        mb = micro[0]
        assert "loss_mask" in mb and "doc_starts" in mb
        with torch.no_grad():  # independent reference: F.cross_entropy over the unmasked labels only
            logits = trainer.model(mb["input_ids"], n_grad=2, doc_starts=mb["doc_starts"])
            keep = mb["loss_mask"]
            reference = F.cross_entropy(logits[keep], mb["labels"][keep]).item()
            whole = F.cross_entropy(logits.flatten(0, 1), mb["labels"].flatten()).item()
        evaluator = Evaluator(cfg, trainer.model, trainer.dims, trainer.device, trainer.metrics, tmp_path)
        evaluator._batches = {"": [{k: v for k, v in mb.items()}]}
        assert evaluator.losses()[2] == pytest.approx(reference, rel=1e-5)
        result = trainer.train_step(micro)
        assert result.loss == pytest.approx(reference, rel=1e-5)
        assert whole != pytest.approx(reference, rel=1e-3)  # ignoring the mask would fail the checks above
        assert result.loss_tokens == int(keep.sum())
        trainer.close()
    finally:
        destroy_distributed()


def test_mixture_batches_carry_the_answer_mask(canary):
    """data.mixture + loss_mask = 'answers' masks like the plain loader: each window's mask equals the state
    machine's over its tokens (a mixture of the canary data with itself, so every window has answers)."""
    from dataclasses import replace

    from data_pipeline.loader import answer_ids
    from data_pipeline.tokenizer import load_tokenizer, tokenizer_path

    prepared = canary.data.prepared_dir
    mixture = replace(canary.data, mixture=[f"a=1:{prepared}", f"b=1:{prepared}"], mixture_block=8)
    eos, marker = (
        load_tokenizer(tokenizer_path(canary.data)).eos_id(),
        answer_ids(canary.data, tokenizer_path(mixture))[0],
    )
    loader = build_loader(
        mixture, split="train", seq_len=64, micro_batch_size=4, grad_accum_steps=1, dp_rank=0, dp_world_size=1
    )
    for batch in (next(iter(loader)) for _ in range(3)):
        assert "loss_mask" in batch, "a mixture batch trains on every token"
        windows = torch.cat([batch["input_ids"], batch["labels"][:, -1:]], dim=1)  # [B, seq_len + 1]
        expected = torch.tensor([_reference_mask_for(row, eos, marker) for row in windows.tolist()])
        assert expected.any() and torch.equal(batch["loss_mask"], expected)
    loader.close()
