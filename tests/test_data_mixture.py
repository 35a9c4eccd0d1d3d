"""Weighted mixtures of prepared datasets: realised shares within 1% of the weights over 10k windows, counted
from the window ids (each source's id range read off its manifest); the same global order on 1 and 2 ranks and
across an exact resume; a re-weighting on resume applies from the resume position on, logged."""

import json

import numpy as np
import pytest

from data_pipeline import DataConfig, DataError, build_loader, prepare
from data_pipeline.sources import default_corpus
from data_pipeline.tokenizer import train_tokenizer

VOCAB = 512
SEQ = 16
WEIGHTS = {"web": 0.6, "code": 0.3, "math": 0.1}


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Three prepared datasets of different sizes, one shared tokenizer; name -> prepared_dir."""
    root = tmp_path_factory.mktemp("mixture")
    texts = [open(f, encoding="utf-8").read() for f in default_corpus()[:40]]
    tok = str(root / "tok.model")
    train_tokenizer(texts[:10], DataConfig(vocab_size=VOCAB), tok)
    dirs = {}
    for i, name in enumerate(WEIGHTS):
        src = root / f"{name}.jsonl"
        src.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[i * 10 : i * 10 + 5 + 3 * i]))
        dirs[name] = str(root / name)
        cfg = DataConfig(sources=[str(src)], prepared_dir=dirs[name], tokenizer_path=tok, vocab_size=VOCAB)
        prepare(DataConfig(**{**cfg.__dict__, "prepare_workers": 1, "val_fraction": 0.2}), progress=False)
    return dirs


def _cfg(dirs, weights=WEIGHTS, **kw):
    mixture = [f"{n}={w}:{dirs[n]}" for n, w in weights.items()]
    return DataConfig(mixture=mixture, vocab_size=VOCAB, return_window_ids=True, num_workers=0, **kw)


def _loader(cfg, rank=0, world=1, b=10, split="train"):
    return build_loader(
        cfg, split=split, seq_len=SEQ, micro_batch_size=b, grad_accum_steps=1, dp_rank=rank, dp_world_size=world
    )


def _ids(loader, k):
    return [int(w) for _ in range(k) for w in next(loader)["window_ids"]]


def _source_ranges(dirs):
    """First window id of each source: windows per source from its manifest's train token count."""
    sizes = []
    for name in WEIGHTS:
        manifest = json.loads(open(f"{dirs[name]}/manifest.json").read())
        sizes.append((manifest["tokens"]["train"] - 1) // SEQ)
    return np.cumsum([0, *sizes])


def _shares(ids, first):
    return np.bincount(np.searchsorted(first, ids, side="right") - 1, minlength=len(WEIGHTS)) / len(ids)


def test_shares_follow_the_weights(sources):
    loader = _loader(_cfg(sources))
    ids = _ids(loader, 1000)  # 10k windows
    first = _source_ranges(sources)
    assert np.abs(_shares(ids, first) - list(WEIGHTS.values())).max() < 0.01
    stats = loader.stats()
    assert [round(stats[f"share/{n}"], 6) for n in WEIGHTS] == [round(v, 6) for v in _shares(ids, first)]
    math_ids = [w for w in ids if w >= first[2]]  # the small source cycles: every window once per epoch
    n_math = first[3] - first[2]
    for epoch in range(len(math_ids) // n_math):
        assert sorted(math_ids[epoch * n_math : (epoch + 1) * n_math]) == list(range(first[2], first[3]))
    batch = next(loader)
    for row, w in enumerate(batch["window_ids"].tolist()):  # tokens are those of the window's own source
        s = int(np.searchsorted(first, w, side="right") - 1)
        local = build_loader(
            DataConfig(prepared_dir=sources[list(WEIGHTS)[s]], vocab_size=VOCAB, num_workers=0),
            split="train", seq_len=SEQ, micro_batch_size=1, grad_accum_steps=1, dp_rank=0, dp_world_size=1,
        )  # fmt: skip
        window = local.stream.read((w - first[s]) * SEQ, (w - first[s]) * SEQ + SEQ + 1)
        assert batch["input_ids"][row].tolist() == window[:-1].tolist()


def test_same_order_on_1_and_2_ranks_and_across_a_resume(sources):
    cfg = _cfg(sources)
    one = _ids(_loader(cfg, b=4), 100)
    ranks = [_loader(cfg, rank=r, world=2, b=2) for r in range(2)]
    two = [w for _ in range(100) for r in ranks for w in _ids(r, 1)]
    assert two == one
    first = _loader(cfg, b=4)
    head = _ids(first, 37)
    state = first.state_dict()
    resumed = [_loader(cfg, rank=r, world=2, b=2) for r in range(2)]
    for r in resumed:
        r.load_state_dict(json.loads(json.dumps(state)))  # as a checkpoint stores it
    tail = [w for _ in range(63) for r in resumed for w in _ids(r, 1)]
    assert head + tail == one


def test_reweighting_on_resume_applies_from_there_and_is_logged(sources, caplog):
    first = _loader(_cfg(sources), b=10)
    head = _ids(first, 300)
    state = first.state_dict()
    new = {"web": 0.2, "code": 0.3, "math": 0.5}
    resumed = _loader(_cfg(sources, new), b=10)
    resumed.load_state_dict(state)
    assert (
        "re-weighted from window position 3000 (step 300) on: web 0.600 -> 0.200, code 0.300 -> 0.300, math 0.100 -> 0.500"
        in caplog.text
    )
    tail = _ids(resumed, 1000)
    ranges = _source_ranges(sources)
    assert np.abs(_shares(tail, ranges) - list(new.values())).max() < 0.01
    assert np.abs(_shares(head, ranges) - list(WEIGHTS.values())).max() < 0.01
    again = _loader(_cfg(sources, new), b=10)  # a second resume keeps both segments: exact continuation
    again.load_state_dict(resumed.state_dict())
    reference = _loader(_cfg(sources, new), b=10)
    reference.load_state_dict(state)
    _ids(reference, 1000)
    assert _ids(again, 50) == _ids(reference, 50)


def test_mixture_errors_name_the_entry(sources):
    with pytest.raises(DataError, match=r"data.mixture: 'web=x:/d' is not name=weight:prepared_dir"):
        DataConfig(mixture=["web=x:/d"]).validate()
    state = _loader(_cfg(sources)).state_dict()
    fewer = _loader(_cfg(sources, {"web": 0.5, "code": 0.5}))
    with pytest.raises(
        DataError, match=r"mixture names=\['web', 'code', 'math'\] but data.mixture gives \['web', 'code'\]"
    ):
        fewer.load_state_dict(state)
    assert len(_ids(_loader(_cfg(sources), split="val", b=2), 5)) == 10
