"""source_kind=text: on-the-fly tokenization in workers; windows are real token runs of the documents, ranks read
disjoint units and together cover the split, exact resume per rank (with and without workers)."""

import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from data_pipeline import DataConfig, DataError, build_loader, load_tokenizer
from data_pipeline.sources import default_corpus
from data_pipeline.tokenizer import train_tokenizer

VOCAB = 400
SEQ = 32


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tok") / "tok.model")
    train_tokenizer(
        [open(f, encoding="utf-8").read() for f in default_corpus()[:5]], DataConfig(vocab_size=VOCAB), path
    )
    return path


def _marker_docs(tmp_path, n=24):
    docs = [f"doc{i:03d} " * 30 for i in range(n)]
    pq.write_table(pa.table({"text": docs[: n // 2]}), tmp_path / "a.parquet", row_group_size=2)
    with pa.ipc.new_file(str(tmp_path / "b.arrow"), pa.schema([("text", pa.string())])) as w:
        for i in range(n // 2, n, 3):
            w.write_batch(pa.record_batch([pa.array(docs[i : i + 3])], names=["text"]))
    return docs  # units: 6 row groups + 4 record batches


def _cfg(tmp_path, tok, **kw):
    kw = {"val_fraction": 0.0, "num_workers": 0, "shuffle_buffer": 8, **kw}
    return DataConfig(
        source_kind="text",
        sources=[str(tmp_path / "a.parquet"), str(tmp_path / "b.arrow")],
        tokenizer_path=tok,
        vocab_size=VOCAB,
        **kw,
    )


def _loader(cfg, rank=0, world=1, b=2, split="train"):
    return build_loader(
        cfg, split=split, seq_len=SEQ, micro_batch_size=b, grad_accum_steps=1, dp_rank=rank, dp_world_size=world
    )


def _markers(batch, sp):
    found = set()
    for inputs, labels in zip(batch["input_ids"], batch["labels"]):
        found |= set(re.findall(r"doc\d{3}", sp.decode(inputs.tolist() + labels[-1:].tolist())))
    return found


def test_windows_are_token_runs_of_the_documents(tmp_path, tok):
    texts = [open(f, encoding="utf-8").read() for f in default_corpus()[10:30]]
    pq.write_table(pa.table({"text": texts}), tmp_path / "a.parquet", row_group_size=3)
    cfg = DataConfig(
        source_kind="text",
        sources=[str(tmp_path / "a.parquet")],
        tokenizer_path=tok,
        vocab_size=VOCAB,
        num_workers=2,
        val_fraction=0.0,
    )
    sp = load_tokenizer(tok)
    encoded = ["," + ",".join(map(str, sp.encode(t))) + "," for t in texts]
    loader = _loader(cfg, b=4)
    for _ in range(10):
        batch = next(loader)
        assert batch["input_ids"].shape == (4, SEQ) and batch["labels"].shape == (4, SEQ)
        assert torch.equal(batch["input_ids"][:, 1:], batch["labels"][:, :-1])
        for inputs, labels in zip(batch["input_ids"], batch["labels"]):
            runs = [[]]  # the window cut at eos: each run must be consecutive tokens of one document
            for t in inputs.tolist() + labels[-1:].tolist():
                runs.append([]) if t == sp.eos_id() else runs[-1].append(t)
            for run in filter(None, runs):
                assert any("," + ",".join(map(str, run)) + "," in e for e in encoded)


@pytest.mark.parametrize("world", [1, 2])
def test_ranks_read_disjoint_units_covering_the_split(tmp_path, tok, world):
    docs = _marker_docs(tmp_path)
    sp = load_tokenizer(tok)
    seen = []
    for rank in range(world):
        loader, mine = _loader(_cfg(tmp_path, tok), rank=rank, world=world, b=1), set()
        for _ in range(5000):
            batch = next(loader)
            if loader.epoch > 0:  # b=1, no workers: the epoch of this very window
                break
            mine |= _markers(batch, sp)
        seen.append(mine)
    assert set.union(*seen) == {d.split()[0] for d in docs}
    if world == 2:
        assert not seen[0] & seen[1]


def test_val_units_never_reach_train(tmp_path, tok):
    _marker_docs(tmp_path)
    sp = load_tokenizer(tok)
    cfg = _cfg(tmp_path, tok, val_fraction=0.3)
    train, loader = set(), _loader(cfg, b=4)
    for _ in range(60):
        train |= _markers(next(loader), sp)
    val_loader = _loader(cfg, b=4, split="val")
    val = set().union(*(_markers(next(val_loader), sp) for _ in range(20)))
    assert train and val and not train & val
    firsts = [_markers(next(iter(val_loader)), sp) for _ in range(3)]  # every iter() restarts val
    assert firsts[0] == firsts[1] == firsts[2]


@pytest.mark.parametrize("workers", [0, 2])
def test_exact_resume_per_rank(tmp_path, tok, workers):
    _marker_docs(tmp_path)
    cfg = _cfg(tmp_path, tok, num_workers=workers, return_doc_boundaries=True)
    world, k, more = 2, 9, 25  # crosses group and epoch boundaries
    for rank in range(world):
        full = [next(loader) for loader in [_loader(cfg, rank, world)] for _ in range(k + more)]
        first = _loader(cfg, rank, world)
        for _ in range(k):
            next(first)
        state = first.state_dict()
        resumed = _loader(cfg, rank, world)
        resumed.load_state_dict(state)
        for want in full[k:]:
            got = next(resumed)
            assert got.keys() == want.keys() == {"input_ids", "labels", "doc_starts"}
            assert all(torch.equal(got[key], want[key]) for key in got)
        assert resumed.stats()["batches"] == k + more
        first.close()  # stops the workers; the stream continues where it was
        assert torch.equal(next(first)["input_ids"], full[k]["input_ids"])
        with pytest.raises(DataError, match="dp_rank=.*resumes only on the same rank layout"):
            _loader(cfg, 1 - rank, world).load_state_dict(state)


def test_too_few_units_for_ranks_x_workers_is_an_error(tmp_path, tok):
    _marker_docs(tmp_path)  # 10 units
    with pytest.raises(DataError, match=r"train split has 10 unit\(s\) .* fewer than ranks x workers = 12"):
        _loader(_cfg(tmp_path, tok, num_workers=3), rank=0, world=4)
