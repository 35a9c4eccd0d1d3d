"""prepare: lossless tokenizer on real stdlib files, shards that decode back to the source documents (read here
with plain pyarrow), split rule, atomicity under interruption, and refusal of tampered/mismatched data."""

import importlib
import json
import os
import re
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_pipeline import (
    DataConfig,
    DataError,
    build_loader,
    load_tokenizer,
    prepare,
    prepare_parts,
    tokenizer_vocab_size,
    verify_prepared,
)
from data_pipeline.shards import ShardWriter
from data_pipeline.sources import default_corpus
from data_pipeline.tokenizer import train_tokenizer
from mythos_train.__main__ import main

VOCAB = 512
TRICKY = [
    "naïve café 日本語 🙂\ttab  two  spaces  \r\nwindows line\n\n\n   indented",
    " leading space",
    "trailing ",
    "\n",
]


def _stdlib_texts(n, skip=0):
    files = [f for f in default_corpus() if 2_000 < os.path.getsize(f) < 10_000][skip : skip + n]
    return [open(f, encoding="utf-8").read() for f in files]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tok") / "tok.model")
    train_tokenizer(_stdlib_texts(8) + TRICKY, DataConfig(vocab_size=VOCAB), path)
    return path


@pytest.fixture
def corpus(tmp_path):
    """12 documents in a Parquet file (2 row groups, plus an empty row), an Arrow IPC file (2 batches) and plain files."""
    docs = _stdlib_texts(10, skip=20) + TRICKY[:2]
    src = tmp_path / "src"
    src.mkdir()
    pq.write_table(pa.table({"text": docs[:5] + [""], "id": list(range(6))}), src / "a.parquet", row_group_size=3)
    schema = pa.schema([("text", pa.large_string())])
    with pa.ipc.new_file(str(src / "b.arrow"), schema) as w:
        for part in (docs[5:7], docs[7:10]):
            w.write_batch(pa.record_batch([pa.array(part, pa.large_string())], schema=schema))
    (src / "c.txt").write_text(docs[10], encoding="utf-8")
    (src / "d.md").write_text(docs[11], encoding="utf-8")
    (src / "e.txt").write_text("")
    return str(src), docs  # sorted file order a, b, c, d = document order


def _cfg(src, out, tok, **kw):
    kw = {"vocab_size": VOCAB, "prepare_workers": 1, **kw}  # one process: the parallel test covers the pool
    return DataConfig(sources=[src], prepared_dir=str(out), tokenizer_path=tok, **kw)


def _read_split(out, split):
    """Token stream of a split, read with plain pyarrow from the files the manifest lists."""
    manifest = json.loads((out / "manifest.json").read_text())
    parts = [pa.ipc.open_file(str(out / s["file"])).read_all().column("tokens").to_numpy() for s in manifest[split]]
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)


def _documents(tokens, sp):
    eos = sp.eos_id()
    ends = np.flatnonzero(tokens == eos)
    assert len(tokens) == 0 or ends[-1] == len(tokens) - 1  # every document is followed by eos
    return [sp.decode(doc.tolist()) for doc in np.split(tokens, ends + 1)[:-1]]


def _dataset_bytes(out):
    """Every file of a prepared folder (the manifest without its timing)."""
    files = {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file()}
    files["manifest.json"] = {k: v for k, v in json.loads(files["manifest.json"]).items() if k != "seconds"}
    return files


@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
def test_tokenizer_round_trips_real_files(tmp_path, model_type):
    path = str(tmp_path / "t.model")
    train_tokenizer(_stdlib_texts(6), DataConfig(vocab_size=VOCAB, tokenizer_type=model_type), path)
    sp = load_tokenizer(path)
    assert sp.vocab_size() == VOCAB and sp.eos_id() == 2
    for text in _stdlib_texts(10, skip=30) + TRICKY:  # files not seen in training, and odd whitespace/unicode
        ids = sp.encode(text)
        assert sp.decode(ids) == text
        assert sp.unk_id() not in ids  # byte fallback instead of <unk>


def test_prepare_shards_decode_to_the_documents(tmp_path, corpus, tok):
    src, docs = corpus
    out = tmp_path / "out"
    summary = prepare(_cfg(src, out, tok, val_fraction=0.25, shard_tokens=3000), progress=False)
    sp = load_tokenizer(tok)
    train, val = _documents(_read_split(out, "train"), sp), _documents(_read_split(out, "val"), sp)
    is_val = [int((i + 1) * 0.25) > int(i * 0.25) for i in range(len(docs))]  # every 4th document
    assert val == [d for d, v in zip(docs, is_val) if v]
    assert train == [d for d, v in zip(docs, is_val) if not v]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["documents"] == {"train": 9, "val": 3} and manifest["vocab_size"] == VOCAB
    assert manifest["empty_documents"] == 2 and manifest["eos_id"] == sp.eos_id()
    assert summary["documents"] == 12 and summary["tokens"] == len(_read_split(out, "train")) + len(
        _read_split(out, "val")
    )
    assert len(manifest["train"]) > 2 and len(summary["shards"]) == len(manifest["train"]) + len(manifest["val"])
    assert summary["bytes"] == sum(len(d.encode()) for d in docs)


def test_sources_as_uri_glob_and_files_give_the_same_data(tmp_path, corpus, tok):
    src, _ = corpus
    names = ["a.parquet", "b.arrow", "c.txt", "d.md", "e.txt"]
    variants = {"dir": [src], "uri": ["file://" + src], "glob": [src + "/*"], "files": [f"{src}/{n}" for n in names]}
    streams = {}
    for name, sources in variants.items():
        out = tmp_path / name
        prepare(
            DataConfig(sources=sources, prepared_dir=str(out), tokenizer_path=tok, vocab_size=VOCAB, prepare_workers=1),
            progress=False,
        )
        streams[name] = _read_split(out, "train").tolist()
    assert streams["uri"] == streams["dir"] == streams["glob"] == streams["files"] and streams["dir"]


def test_arrow_stream_format_is_read(tmp_path, tok):
    docs = _stdlib_texts(5, skip=50)
    src = tmp_path / "cache.arrow"  # Hugging Face datasets write the IPC *stream* format
    with pa.ipc.new_stream(str(src), pa.schema([("text", pa.string())])) as w:
        for part in (docs[:2], docs[2:]):
            w.write_batch(pa.record_batch([pa.array(part)], names=["text"]))
    out = tmp_path / "out"
    prepare(
        DataConfig(
            sources=[str(src)],
            prepared_dir=str(out),
            tokenizer_path=tok,
            vocab_size=VOCAB,
            val_fraction=0.0,
            prepare_workers=1,
        ),
        progress=False,
    )
    assert _documents(_read_split(out, "train"), load_tokenizer(tok)) == docs


def test_loader_reads_prepared_windows_and_doc_starts(tmp_path, corpus, tok):
    src, _ = corpus
    out = tmp_path / "out"
    prepare(_cfg(src, out, tok, val_fraction=0.25, shard_tokens=3000), progress=False)
    cfg = _cfg(src, out, "", num_workers=0, return_doc_boundaries=True, return_window_ids=True)
    stream, seq = _read_split(out, "train"), 64
    loader = build_loader(
        cfg, split="train", seq_len=seq, micro_batch_size=4, grad_accum_steps=1, dp_rank=0, dp_world_size=1
    )
    assert loader.num_windows == (len(stream) - 1) // seq
    eos = load_tokenizer(tok).eos_id()
    for batch in [next(loader) for _ in range(20)]:
        for row, w in enumerate(batch["window_ids"].tolist()):
            window = stream[w * seq : w * seq + seq + 1]
            assert batch["input_ids"][row].tolist() == window[:-1].tolist()
            assert batch["labels"][row].tolist() == window[1:].tolist()
            starts = [i == 0 or window[i - 1] == eos for i in range(seq)]
            assert batch["doc_starts"][row].tolist() == starts


def test_interrupted_prepare_keeps_the_previous_dataset(tmp_path, corpus, tok, monkeypatch):
    src, _ = corpus
    out = tmp_path / "out"
    prepare(_cfg(src, out, tok, shard_tokens=3000), progress=False)
    before = _dataset_bytes(out)
    other = _cfg(src, out, tok, shard_tokens=2500)  # another dataset into the same folder
    finish = ShardWriter._finish

    def crash_on_second_shard(self):
        if len(self.shards) == 1:
            raise KeyboardInterrupt  # the second shard is half written (*.tmp), the first one renamed
        finish(self)

    monkeypatch.setattr(ShardWriter, "_finish", crash_on_second_shard)
    with pytest.raises(KeyboardInterrupt):
        prepare(other, progress=False)
    assert _dataset_bytes(out) == before
    build_loader(
        _cfg(src, out, tok),
        split="train",
        seq_len=32,
        micro_batch_size=2,
        grad_accum_steps=1,
        dp_rank=0,
        dp_world_size=1,
    )
    monkeypatch.undo()
    prepare(other, progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    assert max(s["tokens"] for s in manifest["train"]) == 2500 and not (tmp_path / "out.partial").exists()


def test_tampered_or_mismatched_prepared_data_is_refused(tmp_path, corpus, tok):
    src, _ = corpus
    out = tmp_path / "out"
    cfg = _cfg(src, out, tok, shard_tokens=3000)
    prepare(cfg, progress=False)
    shape = dict(split="train", seq_len=32, micro_batch_size=2, grad_accum_steps=1, dp_rank=0, dp_world_size=1)
    assert tokenizer_vocab_size(cfg) == VOCAB

    with pytest.raises(
        DataError, match=r"manifest.json: data was tokenized with vocab size 512 but data.vocab_size = 600"
    ):
        build_loader(_cfg(src, out, tok, vocab_size=600), **shape)
    other = str(tmp_path / "other.model")
    train_tokenizer(_stdlib_texts(4, skip=40), DataConfig(vocab_size=VOCAB, tokenizer_type="unigram"), other)
    with pytest.raises(DataError, match=r"other.model is not the one .*manifest.json was prepared with"):
        build_loader(_cfg(src, out, other), **shape)
    shard = out / "train-00001.arrow"
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(DataError, match=r"train-00001.arrow: cannot read token shard \(corrupt or truncated"):
        build_loader(cfg, **shape)


def test_default_corpus_is_the_stdlib_without_tests():
    files = default_corpus()
    assert files == sorted(files) and len(files) > 100
    assert all(f.endswith(".py") for f in files)
    parts = {p for f in files for p in f.split(os.sep)}
    assert not parts & {"site-packages", "test", "tests", "idle_test", "__pycache__"}


@pytest.mark.slow
def test_prepare_default_corpus_end_to_end(tmp_path):
    """The trainer's default path: stdlib corpus, vocab 8192; validation documents decode to the source files."""
    out = tmp_path / "stdlib"
    summary = prepare(DataConfig(prepared_dir=str(out)), progress=False)
    texts = [t for t in (open(f, encoding="utf-8").read() for f in default_corpus()) if t]
    assert summary["documents"] == len(texts) and summary["skipped_records"] == 0
    sp = load_tokenizer(str(out / "tokenizer.model"))
    assert sp.vocab_size() == 8192
    val = _documents(_read_split(out, "val"), sp)
    assert val == [t for i, t in enumerate(texts) if int((i + 1) * 0.02) > int(i * 0.02)]
    assert Counter(_documents(_read_split(out, "train"), sp)) + Counter(val) == Counter(texts)


def test_failed_prepare_keeps_the_previous_dataset(tmp_path, corpus, tok):
    """Issue 14.2: a prepare that fails (missing source, bad file half-way) leaves the old dataset as it was."""
    src, _ = corpus
    out = tmp_path / "out"
    prepare(_cfg(src, out, tok, shard_tokens=3000), progress=False)
    before = _dataset_bytes(out)
    with pytest.raises(DataError, match="/no/such/dir"):
        prepare(_cfg("/no/such/dir", out, tok), progress=False)
    assert _dataset_bytes(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]  # input checked before any build folder
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.txt").write_text("fine")
    (bad / "b.txt").write_bytes(b"\xff\xfe not utf-8")
    with pytest.raises(DataError, match="b.txt: not UTF-8"):
        prepare(_cfg(str(bad), out, tok), progress=False)
    assert _dataset_bytes(out) == before


def test_prepare_refuses_to_replace_a_folder_it_did_not_write(tmp_path, corpus, tok):
    src, _ = corpus
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="notes.txt"):
        prepare(_cfg(src, out, tok), progress=False)
    assert (out / "notes.txt").read_text() == "mine"


def _epoch(cfg):
    """Every window of the train split once (one rank), as the trainer would read them."""
    loader = build_loader(
        cfg, split="train", seq_len=32, micro_batch_size=1, grad_accum_steps=1, dp_rank=0, dp_world_size=1
    )
    return [next(loader) for _ in range(loader.num_windows)]


def _overwrite_with_valid_tokens(path, vocab):
    """Rewrite an Arrow shard with other in-vocabulary token ids, keeping its size, batches and token count."""
    table = pa.ipc.open_file(str(path)).read_all()
    schema = table.schema
    with pa.ipc.new_file(str(path), schema) as w:
        for batch in table.to_batches():
            tokens = batch.column(0).to_numpy()
            w.write_batch(
                pa.record_batch([pa.array((tokens.astype(np.int64) + 1) % vocab, schema[0].type)], schema=schema)
            )


@pytest.mark.parametrize("damage", ["zeroed_head", "zeroed_middle", "valid_token_ids"])
def test_corrupt_shard_is_an_error_naming_the_file(tmp_path, corpus, tok, damage):
    """Issue 14.8: 512 zeroed bytes at the start (a raw ArrowInvalid before) or in the middle (zeros are valid
    ids: trained silently before), and other valid token ids (trained silently before)."""
    src, _ = corpus
    out = tmp_path / "out"
    cfg = _cfg(src, out, tok, shard_tokens=3000)
    prepare(cfg, progress=False)
    shard = out / "train-00001.arrow"
    size = shard.stat().st_size
    if damage.startswith("zeroed"):
        data = bytearray(shard.read_bytes())
        at = 0 if damage == "zeroed_head" else size // 2
        data[at : at + 512] = bytes(512)
        shard.write_bytes(bytes(data))
    else:
        _overwrite_with_valid_tokens(shard, VOCAB)
    assert shard.stat().st_size == size
    with pytest.raises(DataError, match=r"train-00001.arrow"):
        _epoch(cfg)
    with pytest.raises(DataError, match=r"train-00001.arrow: sha256 .* does not match the manifest"):
        verify_prepared(cfg)


def test_verify_passes_an_intact_dataset(tmp_path, corpus, tok):
    src, _ = corpus
    out = tmp_path / "out"
    cfg = _cfg(src, out, tok, shard_tokens=3000)
    prepare(cfg, progress=False)
    assert verify_prepared(cfg) == len(list(out.glob("*.arrow")))
    assert len(_epoch(cfg)) > 10


@pytest.mark.slow
def test_parallel_prepare_is_bitwise_the_serial_one(tmp_path, corpus, tok):
    """Issue 17.4: 3 processes write the very bytes 1 process writes (also with a mid-file val split)."""
    src, _ = corpus
    outs = {n: tmp_path / f"w{n}" for n in (1, 3)}
    for n, out in outs.items():
        prepare(_cfg(src, out, tok, shard_tokens=3000, val_fraction=0.3, prepare_workers=n), progress=False)
    assert _dataset_bytes(outs[3]) == _dataset_bytes(outs[1])
    (tmp_path / "src" / "f.jsonl").write_text('{"text": "fine"}\n{"text": broken\n')  # an error in a worker
    with pytest.raises(DataError, match=r"f.jsonl: line 2: not valid JSON"):
        prepare(_cfg(src, outs[3], tok, shard_tokens=3000, val_fraction=0.3, prepare_workers=3), progress=False)
    assert _dataset_bytes(outs[3]) == _dataset_bytes(outs[1])


def test_rerun_skips_what_is_prepared(tmp_path, corpus, tok, monkeypatch):
    """Issue 17.4: a re-run of the same inputs tokenizes nothing; after an interruption only the missing units."""
    src, _ = corpus
    cfg = _cfg(src, tmp_path / "out", tok, shard_tokens=3000)
    reference = tmp_path / "reference"
    prepare(_cfg(src, reference, tok, shard_tokens=3000), progress=False)
    tokenized, interrupt = [], [True]
    tokenize = prepare_parts.tokenize_unit

    def counting(unit, *args):
        if len(tokenized) == 3 and interrupt.pop():
            raise KeyboardInterrupt  # the first prepare stops after 3 units
        tokenized.append(unit)
        return tokenize(unit, *args)

    monkeypatch.setattr(importlib.import_module("data_pipeline.prepare"), "tokenize_unit", counting)
    with pytest.raises(KeyboardInterrupt):
        prepare(cfg, progress=False)
    interrupt.append(False)
    prepare(cfg, progress=False)
    n_units = len(tokenized)
    assert n_units == 7  # 3 units, then the other 4 (a.parquet: 2 row groups, b.arrow: 2 batches, c, d, e)
    assert _dataset_bytes(tmp_path / "out") == _dataset_bytes(reference)
    prepare(cfg, progress=False)
    assert len(tokenized) == n_units  # nothing tokenized again
    (tmp_path / "src" / "c.txt").write_text("changed")  # a changed input is prepared again
    prepare(cfg, progress=False)
    assert len(tokenized) == 2 * n_units and "changed" in _documents(
        _read_split(tmp_path / "out", "train"), load_tokenizer(tok)
    )


def test_prepare_verify_command(tmp_path, corpus, tok, capsys):
    src, _ = corpus
    out = tmp_path / "out"
    prepare(_cfg(src, out, tok, shard_tokens=3000), progress=False)
    command = ["prepare", "--verify", f"--data.prepared_dir={out}", f"--data.vocab_size={VOCAB}"]
    assert main(command) == 0 and "shard(s) match" in capsys.readouterr().out
    _overwrite_with_valid_tokens(out / "train-00000.arrow", VOCAB)
    assert main(command) == 2
    assert re.search(r"1 of \d+ shard\(s\) damaged .*\n.*train-00000.arrow: sha256", capsys.readouterr().err)


def test_rerun_after_an_interruption_keeps_the_trained_tokenizer(tmp_path, corpus, monkeypatch):
    src, _ = corpus
    cfg = _cfg(src, tmp_path / "out", "")
    module = importlib.import_module("data_pipeline.prepare")
    trained, tokenize = [], module.tokenize_unit
    monkeypatch.setattr(module, "train_tokenizer", lambda *a: trained.append(train_tokenizer(*a)))

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(module, "tokenize_unit", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare(cfg, progress=False)
    monkeypatch.setattr(module, "tokenize_unit", tokenize)
    prepare(cfg, progress=False)
    assert len(trained) == 1  # the parts of a re-run need the same tokenizer, so it is not trained again


def test_a_new_answer_marker_prepares_again(tmp_path, corpus):
    """The trained tokenizer registers data.answer_marker as one piece: a re-run with another marker must not skip
    as already prepared, or the loader finds no piece for it. Checked with SentencePiece's own encode."""
    src, _ = corpus
    for marker in ("<ans>", "<answer>"):
        prepare(_cfg(src, tmp_path / "out", "", answer_marker=marker), progress=False)
        sp = load_tokenizer(str(tmp_path / "out" / "tokenizer.model"))
        assert sp.encode(marker) == [sp.piece_to_id(marker)] and not sp.is_unknown(sp.piece_to_id(marker)), marker


def test_user_symbols_are_whole_pieces_and_a_new_list_prepares_again(tmp_path, corpus):
    """data.user_symbols are kept as one piece even where split_digits would cut them ("x=7"), and a re-run with
    another list trains a new tokenizer instead of skipping as already prepared. Checked with SentencePiece's own
    encode."""
    src, _ = corpus
    for symbols in (["x=7"], ["x=7", "y=x"]):
        prepare(_cfg(src, tmp_path / "out", "", user_symbols=symbols), progress=False)
        sp = load_tokenizer(str(tmp_path / "out" / "tokenizer.model"))
        for symbol in symbols:
            assert sp.encode(f";{symbol};", out_type=str)[1] == symbol, symbol
