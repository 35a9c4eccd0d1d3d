"""Answer accuracy by hops x loops on hand-made cases: a toy tokenizer and a model whose answers are known."""

from __future__ import annotations

import json
from types import SimpleNamespace

import torch

from mythos_train.canary import ANSWER_MARKER, Program
from mythos_train.canary_eval import answer_accuracy, answered, encode_programs, rank_share, save_accuracy

PAD, MARK = 0, 1


class CharTokenizer:
    """One id per character, ord(c) % 100 (the marker is one piece), enough to write expected tensors by hand."""

    def encode(self, text: str) -> list[int]:
        head, _, answer = text.rpartition(ANSWER_MARKER)
        return [ord(c) % 100 for c in head] + [MARK] + [ord(c) % 100 for c in answer]


def test_encode_marks_the_tokens_after_the_last_marker():
    batch = encode_programs([Program("ab#>", "7", 1), Program("a#>", "42", 2)], CharTokenizer(), MARK, PAD)
    assert batch.tokens.tolist() == [[97, 98, MARK, 55], [97, MARK, 52, 50]]
    assert batch.answer.tolist() == [[False, False, False, True], [False, False, True, True]]


def test_answered_needs_every_answer_token_and_ignores_the_rest():
    tokens = torch.tensor([[5, MARK, 6, 7], [5, MARK, 6, 7], [5, MARK, 6, 7]])
    answer = torch.tensor([[False, False, True, True]] * 3)
    logits = torch.zeros(3, 3, 10)
    logits[:, torch.arange(3), tokens[0, 1:]] = 1.0  # every position predicts the right next token
    logits[1, 2, 7], logits[1, 2, 3] = 0.0, 2.0  # row 1: the second answer token is wrong
    logits[2, 0, MARK], logits[2, 0, 4] = 0.0, 2.0  # row 2: wrong before the answer only
    assert answered(logits, SimpleNamespace(tokens=tokens, answer=answer)).tolist() == [True, False, True]


class OracleByLoops(torch.nn.Module):
    """Predicts the right next token when run with at least `hops` loops (read from the row's first token), else
    token 0; records a state change that halves every iteration."""

    def __init__(self, rows: dict[tuple, int]):
        super().__init__()
        self.rows = rows
        self.recurrent = SimpleNamespace(last_stats=None)

    def forward(self, inputs, n_nograd=0, n_grad=1):
        logits = torch.zeros(*inputs.shape, 100)
        for i, row in enumerate(inputs.tolist()):
            full, hops = self.rows[tuple(row)]
            if n_grad >= hops:
                logits[i, torch.arange(len(row)), torch.tensor(full[1:])] = 1.0
        self.recurrent.last_stats = SimpleNamespace(h_delta=0.5 ** torch.arange(n_nograd + n_grad, dtype=torch.float))
        return logits


def test_accuracy_by_hops_and_loops_on_an_oracle(tmp_path):
    programs = [Program(f"{'abc'[i % 3] * h}{i}#>", str(9 - i), h) for h in (1, 2, 3, 4) for i in range(6)]
    programs += [Program("zz#>", "1", 2)]  # a seventh 2-hop program: one more than two ranks can share equally
    assert [len(v) for v in rank_share(programs, 1, 2).values()] == [3, 3, 3, 3]
    by_hops = {h: encode_programs(p, CharTokenizer(), MARK, PAD) for h, p in rank_share(programs, 0, 1).items()}
    rows = {tuple(t[:-1].tolist()): (t.tolist(), h) for h, b in by_hops.items() for t in b.tokens}
    accuracy, delta = answer_accuracy(OracleByLoops(rows), by_hops, [1, 2, 4], torch.device("cpu"))
    expected = {h: {n: float(n >= h) for n in (1, 2, 4)} for h in (1, 2, 3, 4)}
    assert accuracy == expected
    assert delta == [1.0, 0.5, 0.25, 0.125]
    record = {"step": 3, "accuracy": {str(h): {str(n): a for n, a in r.items()} for h, r in accuracy.items()}}
    save_accuracy(record, tmp_path, train_hops=2, mean_depth=2.0)
    assert json.loads((tmp_path / "canary_accuracy.json").read_text()) == record
    assert (tmp_path / "accuracy_heatmap.png").stat().st_size > 1000
    assert (tmp_path / "accuracy_vs_loops.png").stat().st_size > 1000
