"""Every kind of bad input is a DataError naming the file (and row where known), or with on_bad_record=skip a
counted skip, never a silent wrong batch."""

import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_pipeline import DataConfig, DataError, build_loader, prepare
from data_pipeline.sources import default_corpus
from data_pipeline.tokenizer import train_tokenizer

VOCAB = 400
GOOD = ["def f(x):\n    return x + 1\n", "class A:\n    pass\n", "print('hello world')\n"]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tok") / "tok.model")
    texts = [open(f, encoding="utf-8").read() for f in default_corpus()[:5]]
    train_tokenizer(texts, DataConfig(vocab_size=VOCAB), path)
    return path


def _valid_parquet_bytes(tmp_path):
    path = tmp_path / "valid.parquet"
    pq.write_table(pa.table({"text": GOOD * 20}), path)
    return path.read_bytes()


def _valid_arrow_bytes(tmp_path):
    path = tmp_path / "valid.arrow"
    with pa.ipc.new_file(str(path), pa.schema([("text", pa.string())])) as w:
        w.write_batch(pa.record_batch([pa.array(GOOD * 20)], names=["text"]))
    return path.read_bytes()


def _invalid_utf8_strings():
    binary = pa.array([b"fine", b"ab\xff\xfe"], pa.binary())
    return pa.Array.from_buffers(pa.string(), 2, binary.buffers())  # Arrow does not validate this on write or read


# name -> (file name, writer, error regex, skip counter, good documents the bad file still contributes)
CASES = {
    "corrupt_parquet": (
        "bad.parquet",
        lambda p, t: p.write_bytes(b"PAR1 this is not parquet at all PAR1" * 10),
        r"bad.parquet: cannot read as parquet \(corrupt or truncated\?\)",
        "skipped_files",
        0,
    ),
    "truncated_parquet": (
        "bad.parquet",
        lambda p, t: p.write_bytes(_valid_parquet_bytes(t)[:-40]),
        r"bad.parquet: cannot read as parquet \(corrupt or truncated\?\)",
        "skipped_files",
        0,
    ),
    "truncated_arrow": (
        "bad.arrow",
        lambda p, t: p.write_bytes(_valid_arrow_bytes(t)[:-60]),
        r"bad.arrow: cannot read as ipc \(corrupt or truncated\?\)",
        "skipped_files",
        0,
    ),
    "missing_column": (
        "bad.parquet",
        lambda p, t: pq.write_table(pa.table({"body": GOOD}), p),
        r"bad.parquet: no column 'text' \(columns: body\); set data.text_column",
        "skipped_files",
        0,
    ),
    "wrong_type": (
        "bad.parquet",
        lambda p, t: pq.write_table(pa.table({"text": [1, 2]}), p),
        r"bad.parquet: column 'text' has type int64, expected string or binary",
        "skipped_files",
        0,
    ),
    "empty_file": (
        "bad.parquet",
        lambda p, t: p.write_bytes(b""),
        r"bad.parquet: empty file \(0 bytes\)",
        "skipped_files",
        0,
    ),
    "zero_rows": (
        "bad.parquet",
        lambda p, t: pq.write_table(pa.table({"text": pa.array([], pa.string())}), p),
        r"bad.parquet: has no rows",
        "skipped_files",
        0,
    ),
    "non_utf8_binary": (
        "bad.parquet",
        lambda p, t: pq.write_table(pa.table({"text": pa.array([b"ok", b"\xff\xfe"], pa.binary())}), p),
        r"bad.parquet: row 1: not UTF-8 text",
        "skipped_records",
        1,
    ),
    "non_utf8_string": (
        "bad.arrow",
        lambda p, t: _write_arrow(p, _invalid_utf8_strings()),
        r"bad.arrow: row 1: not UTF-8 text",
        "skipped_records",
        1,
    ),
    "non_utf8_plain": (
        "bad.txt",
        lambda p, t: p.write_bytes(b"abc\xff\xfedef"),
        r"bad.txt: not UTF-8 text \(bad byte at offset 3\)",
        "skipped_records",
        0,
    ),
    "null_text": (
        "bad.parquet",
        lambda p, t: pq.write_table(pa.table({"text": ["a", None, "b"]}), p),
        r"bad.parquet: row 1: null text",
        "skipped_records",
        2,
    ),
    "huge_document": (
        "bad.parquet",
        lambda p, t: pq.write_table(pa.table({"text": ["a", "b", "x" * 50_000]}), p),
        r"bad.parquet: row 2: document of 50000 chars exceeds data.max_document_chars=10000",
        "skipped_records",
        2,
    ),
}


def _write_arrow(path, array):
    with pa.ipc.new_file(str(path), pa.schema([("text", array.type)])) as w:
        w.write_batch(pa.record_batch([array], names=["text"]))


def _source_dir(tmp_path, case):
    name, write, *_ = CASES[case]
    src = tmp_path / "src"
    src.mkdir()
    pq.write_table(pa.table({"text": GOOD}), src / "a_good.parquet")
    write(src / name, tmp_path)
    return str(src)


@pytest.mark.parametrize("case", sorted(CASES))
def test_prepare_bad_input_errors_or_counted_skip(tmp_path, tok, case):
    _, _, message, counter, extra_docs = CASES[case]
    src = _source_dir(tmp_path, case)
    cfg = dict(
        sources=[src],
        tokenizer_path=tok,
        vocab_size=VOCAB,
        max_document_chars=10_000,
        val_fraction=0.0,
        prepare_workers=1,
    )
    with pytest.raises(DataError, match=message):
        prepare(DataConfig(prepared_dir=str(tmp_path / "err"), **cfg), progress=False)
    assert not os.path.exists(tmp_path / "err" / "manifest.json")
    summary = prepare(DataConfig(prepared_dir=str(tmp_path / "skip"), on_bad_record="skip", **cfg), progress=False)
    assert summary[counter] == 1 and summary["skipped_records" if counter == "skipped_files" else "skipped_files"] == 0
    assert summary["documents"] == len(GOOD) + extra_docs


def test_text_loader_reports_bad_rows_from_workers(tmp_path, tok):
    src = tmp_path / "src"
    src.mkdir()
    rows = [GOOD[i % 3] * 30 for i in range(40)]
    pq.write_table(pa.table({"text": rows[:20] + [None] + rows[20:]}), src / "a.parquet", row_group_size=7)
    shape = dict(split="train", seq_len=32, micro_batch_size=2, grad_accum_steps=1, dp_rank=0, dp_world_size=1)
    base = dict(
        source_kind="text", sources=[str(src)], tokenizer_path=tok, vocab_size=VOCAB, val_fraction=0.0, num_workers=1
    )
    loader = build_loader(DataConfig(**base), **shape)
    with pytest.raises(DataError, match=r"a.parquet: row 20: null text"):
        for _ in range(500):
            next(loader)
    loader = build_loader(DataConfig(on_bad_record="skip", **base), **shape)
    counted = []
    while loader.epoch < 1:
        next(loader)
        counted.append(loader.stats()["skipped_records"])
    assert counted[0] == counted[-2] == 1  # in the first epoch; each pass over the text counts its skips again


def test_prepare_refuses_a_tokenizer_of_another_vocab_size(tmp_path, tok):
    src = _source_dir(tmp_path, "zero_rows")
    with pytest.raises(DataError, match=r"tokenizer .*tok.model has vocab size 400 but data.vocab_size = 1000"):
        prepare(
            DataConfig(
                sources=[src],
                prepared_dir=str(tmp_path / "o"),
                tokenizer_path=tok,
                vocab_size=1000,
                on_bad_record="skip",
            ),
            progress=False,
        )
    with pytest.raises(DataError, match=r"tokenizer .*missing.model does not exist"):
        prepare(
            DataConfig(sources=[src], prepared_dir=str(tmp_path / "o"), tokenizer_path=str(tmp_path / "missing.model")),
            progress=False,
        )


def test_bad_config_and_sources_name_the_field(tmp_path):
    with pytest.raises(DataError, match=r"data.val_fraction must be in \[0,1\)"):
        DataConfig(val_fraction=1.0).validate()
    with pytest.raises(DataError, match="data.on_bad_record must be error or skip"):
        DataConfig(on_bad_record="ignore").validate()
    with pytest.raises(DataError, match="data.sources must list token shards"):
        DataConfig(source_kind="tokens").validate()
    with pytest.raises(DataError, match=r"data.sources: '.*nowhere' does not exist"):
        prepare(DataConfig(sources=[str(tmp_path / "nowhere")], prepared_dir=str(tmp_path / "o")), progress=False)
    with pytest.raises(DataError, match=r"data.sources: '.*\*.parquet' matches no files"):
        prepare(DataConfig(sources=[str(tmp_path / "*.parquet")], prepared_dir=str(tmp_path / "o")), progress=False)
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "manifest.json").write_text("{not json")
    with pytest.raises(DataError, match="manifest.json: unreadable manifest"):
        build_loader(
            DataConfig(prepared_dir=str(tmp_path / "p")),
            split="train",
            seq_len=8,
            micro_batch_size=1,
            grad_accum_steps=1,
            dp_rank=0,
            dp_world_size=1,
        )
    with pytest.raises(DataError, match="SentencePiece could not train data.vocab_size=5000"):
        train_tokenizer(["tiny text"], DataConfig(vocab_size=5000), str(tmp_path / "t.model"))
