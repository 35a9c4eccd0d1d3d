"""Pre-tokenized loader: windows match the shards, one global order for any world size / worker count, exact and
elastic resume (2->1, 1->2, 2->4) with no repeated and no missing windows. Ranks are simulated in one process."""

from collections import Counter

import numpy as np
import pyarrow as pa
import pytest
import torch

from data_pipeline import DataConfig, DataError, build_loader
from data_pipeline.shuffle import permute, shuffle_key

VOCAB = 1000
EOS = 2
SEQ = 16


def _write_shards(tmp_path, lengths, seed=0):
    """Token shards written with plain pyarrow (several record batches each); returns (paths, reference stream)."""
    rng = np.random.default_rng(seed)
    paths, parts = [], []
    for i, n in enumerate(lengths):
        tokens = rng.integers(3, VOCAB, n).astype(np.uint16)
        tokens[rng.random(n) < 0.05] = EOS
        path = tmp_path / f"shard{i}.arrow"
        schema = pa.schema([("tokens", pa.uint16())])
        with pa.ipc.new_file(str(path), schema) as w:
            for chunk in np.array_split(tokens, 3):
                w.write_batch(pa.record_batch([pa.array(chunk)], schema=schema))
        paths.append(str(path))
        parts.append(tokens.astype(np.int64))
    return paths, np.concatenate(parts)


@pytest.fixture
def shards(tmp_path):
    return _write_shards(tmp_path, [300, 157, 411])  # 867 tokens -> 54 windows of 17 with stride 16


def _cfg(paths, **kw):
    kw = {"val_fraction": 0.0, "num_workers": 0, "return_window_ids": True, **kw}
    return DataConfig(source_kind="tokens", sources=paths, vocab_size=VOCAB, **kw)


def _loader(cfg, rank=0, world=1, b=3, split="train", seq=SEQ):
    return build_loader(
        cfg, split=split, seq_len=seq, micro_batch_size=b, grad_accum_steps=2, dp_rank=rank, dp_world_size=world
    )


def _take(loader, k):
    return [next(loader) for _ in range(k)]


def _ids(batches):
    return [int(w) for b in batches for w in b["window_ids"]]


def _check_contents(batches, ref, first=0):
    for batch in batches:
        for row, w in enumerate(batch["window_ids"].tolist()):
            window = ref[(first + w) * SEQ : (first + w) * SEQ + SEQ + 1]
            assert batch["input_ids"][row].tolist() == window[:-1].tolist()
            assert batch["labels"][row].tolist() == window[1:].tolist()


@pytest.mark.parametrize("n", [1, 2, 3, 54, 1000, 4097, 100_003])
def test_permute_is_a_seeded_bijection(n):
    orders = [permute(np.arange(n), n, shuffle_key(seed, 0, epoch)) for seed, epoch in ((0, 0), (0, 1), (1, 0))]
    for order in orders:
        assert np.array_equal(np.sort(order), np.arange(n))
    if n >= 1000:
        assert len({tuple(o[:50]) for o in orders}) == 3  # keys give different orders
        assert abs(np.corrcoef(np.arange(n), orders[0])[0, 1]) < 0.1 and np.mean(orders[0] == np.arange(n)) < 0.01
        i = np.random.default_rng(0).integers(0, n, 64)
        assert np.array_equal(permute(i, n, shuffle_key(0, 0, 0)), orders[0][i])  # index by index = whole order


def test_batches_are_the_shard_windows(shards):
    paths, ref = shards
    loader = _loader(_cfg(paths))
    batches = _take(loader, 6)
    assert batches[0]["input_ids"].shape == (3, SEQ) and batches[0]["input_ids"].dtype == torch.int64
    assert batches[0]["labels"].shape == (3, SEQ) and batches[0]["labels"].dtype == torch.int64
    assert loader.num_windows == (len(ref) - 1) // SEQ
    _check_contents(batches, ref)  # includes windows that span shard files and record batches


def test_epochs_visit_every_window_once_in_new_orders(shards):
    paths, ref = shards
    loader = _loader(_cfg(paths), b=4)
    n = loader.num_windows  # 54: micro-batches of 4 straddle the epoch boundary
    ids = _ids(_take(loader, 27))  # 108 windows = 2 epochs
    assert sorted(ids[:n]) == list(range(n)) and sorted(ids[n:]) == list(range(n))
    assert ids[:n] != ids[n:] and ids[:n] != list(range(n))
    assert loader.epoch == 2 and loader.stats()["epoch"] == 2


@pytest.mark.parametrize("world,workers", [(1, 2), (2, 0), (2, 2), (4, 1)])
def test_global_order_independent_of_world_size_and_workers(shards, world, workers):
    paths, ref = shards
    b, steps = 3, 10
    reference = _ids(_take(_loader(_cfg(paths)), steps * world))  # one rank, no workers
    per_rank = [_take(_loader(_cfg(paths, num_workers=workers), rank=r, world=world, b=b), steps) for r in range(world)]
    for r in range(world):
        _check_contents(per_rank[r], ref)
    # micro-batch m of all ranks together = the next b*world windows of the single-rank stream
    merged = [w for m in range(steps) for r in range(world) for w in _ids([per_rank[r][m]])]
    assert merged == reference
    # ranks x workers: disjoint and covering within the first epoch
    first_epoch = merged[: _loader(_cfg(paths)).num_windows]
    assert len(set(first_epoch)) == len(first_epoch)


@pytest.mark.parametrize("workers", [0, 2])
def test_exact_resume_on_every_rank(shards, workers):
    paths, _ = shards
    cfg = _cfg(paths, num_workers=workers, return_doc_boundaries=False)
    world, k, more = 2, 7, 9
    full = [_take(_loader(cfg, rank=r, world=world), k + more) for r in range(world)]
    first = [_loader(cfg, rank=r, world=world) for r in range(world)]
    for loader in first:
        _take(loader, k)
    states = [loader.state_dict() for loader in first]
    assert states[0] == states[1]  # identical on all ranks: save once
    for r in range(world):
        resumed = _loader(cfg, rank=r, world=world)
        resumed.load_state_dict(states[0])
        for got, want in zip(_take(resumed, more), full[r][k:]):
            assert got.keys() == want.keys()
            assert all(torch.equal(got[key], want[key]) for key in got)


@pytest.mark.parametrize("w1,w2", [(2, 1), (1, 2), (2, 4)])
def test_elastic_resume_no_repeats_no_gaps(shards, w1, w2):
    paths, ref = shards
    cfg = _cfg(paths)
    b, k1, k2 = 3, 5, 7  # crosses the epoch boundary (54 windows) for 2->4
    before = [_loader(cfg, rank=r, world=w1, b=b) for r in range(w1)]
    consumed = [w for loader in before for w in _ids(_take(loader, k1))]
    state = before[0].state_dict()
    after = [_loader(cfg, rank=r, world=w2, b=b) for r in range(w2)]
    for loader in after:
        loader.load_state_dict(state)
        batches = _take(loader, k2)
        _check_contents(batches, ref)
        consumed += _ids(batches)
    total = b * (k1 * w1 + k2 * w2)
    assert Counter(consumed) == Counter(_ids(_take(_loader(cfg, b=1), total)))


def test_next_iter_per_step_continues_and_val_restarts(shards):
    paths, ref = shards
    cfg = _cfg(paths, val_fraction=0.2)
    loader = _loader(cfg)
    stepwise = [next(iter(loader)) for _ in range(5)]
    assert _ids(stepwise) == _ids(_take(_loader(cfg), 5))
    val = _loader(cfg, split="val")
    a, b = _take(iter(val), 4), _take(iter(val), 4)
    assert _ids(a) == _ids(b)
    assert val.first_window + val.num_windows == (len(ref) - 1) // SEQ  # val = the last windows
    assert val.first_window > loader.num_windows  # one window left out: no token in both splits
    _check_contents(a, ref, first=val.first_window)


def test_state_from_another_setup_is_refused(shards):
    paths, _ = shards
    state = _loader(_cfg(paths)).state_dict()
    with pytest.raises(DataError, match="seq_len=16 but this loader has seq_len=8"):
        _loader(_cfg(paths), seq=8).load_state_dict(state)
    with pytest.raises(DataError, match="seed"):
        _loader(_cfg(paths, seed=1)).load_state_dict(state)
    with pytest.raises(DataError, match="pre-tokenized loader state"):
        _loader(_cfg(paths)).load_state_dict({"kind": "text", "version": 1})


def test_doc_starts_need_an_eos_id(shards):
    paths, _ = shards
    with pytest.raises(DataError, match="return_doc_boundaries needs the eos id"):
        _loader(_cfg(paths, return_doc_boundaries=True))


def test_bad_token_ids_name_the_shard(tmp_path):
    path = tmp_path / "bad.arrow"
    with pa.ipc.new_file(str(path), pa.schema([("tokens", pa.int32())])) as w:
        w.write_batch(
            pa.record_batch([pa.array(np.r_[np.arange(40), 5000, np.arange(40)].astype(np.int32))], names=["tokens"])
        )
    loader = _loader(_cfg([str(path)]), b=8)
    with pytest.raises(DataError, match=r"bad.arrow: token id 5000 at offset 40 is outside the vocabulary \[0, 1000\)"):
        _take(loader, 5)
    floats = tmp_path / "floats.arrow"
    with pa.ipc.new_file(str(floats), pa.schema([("tokens", pa.float32())])) as w:
        w.write_batch(pa.record_batch([pa.array(np.zeros(100, np.float32))], names=["tokens"]))
    with pytest.raises(DataError, match="floats.arrow: token column 'tokens' has type float, expected integers"):
        _loader(_cfg([str(floats)]))
    with pytest.raises(DataError, match="no window of seq_len"):
        _loader(_cfg([str(floats).replace("floats", "bad")]), seq=100)
