"""JSON Lines sources (.jsonl, .jsonl.gz, .json.gz, .jsonl.zst): the documents read equal the same documents read
from Parquet; malformed lines are a DataError naming file and line, or counted skips; a truncated gzip/zstd file
is a DataError naming the file."""

import gzip
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_pipeline import DataConfig, DataError, prepare
from data_pipeline.sources import default_corpus, list_units, read_documents, resolve_sources
from data_pipeline.tokenizer import train_tokenizer

VOCAB = 400
SUFFIXES = [".jsonl", ".jsonl.gz", ".json.gz", ".jsonl.zst"]
TRICKY = ['quote " backslash \\ newline \n tab \t', "naïve café 日本語 🙂", "", "\u2028 line separator"]


def _docs(n=30):
    files = [f for f in default_corpus() if 1_000 < os.path.getsize(f) < 20_000][:n]
    return [open(f, encoding="utf-8").read() for f in files] + TRICKY


def _write_jsonl(path, lines: list[bytes]):
    """Plain, gzip (stdlib gzip) or zstd (pyarrow) by suffix."""
    data = b"".join(line + b"\n" for line in lines)
    if path.name.endswith(".gz"):
        path.write_bytes(gzip.compress(data))
    elif path.name.endswith(".zst"):
        with pa.CompressedOutputStream(str(path), "zstd") as f:
            f.write(data)
    else:
        path.write_bytes(data)


def _records(docs, field="text"):
    return [json.dumps({"id": i, field: d, "meta": {"n": i}}).encode() for i, d in enumerate(docs)]


def _read(path, **kw):
    cfg = DataConfig(sources=[str(path)], **kw)
    counts: dict = {}
    units = list_units(resolve_sources(cfg.sources), cfg, counts)
    return [text for unit in units for _, text in read_documents(unit, cfg, counts)], counts


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tok") / "tok.model")
    train_tokenizer(_docs(8), DataConfig(vocab_size=VOCAB), path)
    return path


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_jsonl_documents_equal_the_parquet_documents(tmp_path, suffix):
    docs = _docs()
    pq.write_table(pa.table({"body": docs}), tmp_path / "ref.parquet", row_group_size=7)
    _write_jsonl(tmp_path / f"docs{suffix}", _records(docs, field="body"))
    from_parquet, _ = _read(tmp_path / "ref.parquet", text_column="body")
    from_jsonl, counts = _read(tmp_path / f"docs{suffix}", text_column="body")
    assert from_jsonl == from_parquet == docs and not counts


def test_prepare_of_jsonl_equals_prepare_of_parquet(tmp_path, tok):
    docs = _docs(12)
    src = tmp_path / "src"
    src.mkdir()
    pq.write_table(pa.table({"text": docs}), src / "a.parquet", row_group_size=5)
    for i, suffix in enumerate(SUFFIXES):  # the same documents, cut into one file per format
        part = docs[i * len(docs) // 4 : (i + 1) * len(docs) // 4]
        _write_jsonl(tmp_path / "src" / f"b{i}{suffix}", _records(part))
    tokens = {}
    for name, sources in {"parquet": [str(src / "a.parquet")], "jsonl": [str(src / "b*")]}.items():
        out = tmp_path / name
        prepare(
            DataConfig(sources=sources, prepared_dir=str(out), tokenizer_path=tok, vocab_size=VOCAB, prepare_workers=1),
            progress=False,
        )
        manifest = json.loads((out / "manifest.json").read_text())
        tokens[name] = np.concatenate(
            [pa.ipc.open_file(str(out / s["file"])).read_all().column(0).to_numpy() for s in manifest["train"]]
        )
    assert np.array_equal(tokens["jsonl"], tokens["parquet"])


BAD_LINES = [
    (b"{not json", "not valid JSON"),
    (b"[1, 2]", "not a JSON object"),
    (b'{"other": "x"}', "no field 'text'"),
    (b'{"text": 5}', "field 'text' is int, not a string"),
    (b'{"text": "\xff\xfe"}', "not valid JSON"),
]


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.zst"])
def test_malformed_lines_are_counted_with_file_and_line(tmp_path, suffix, caplog):
    good = _records(["one", "two", "three"])
    lines = [good[0], *[bad for bad, _ in BAD_LINES], b"", good[1], b"   ", good[2]]  # blank lines are not records
    path = tmp_path / f"x{suffix}"
    _write_jsonl(path, lines)
    with pytest.raises(DataError, match=rf"x{suffix}: line 2: not valid JSON"):
        _read(path)
    docs, counts = _read(path, on_bad_record="skip")
    assert docs == ["one", "two", "three"] and counts == {"skipped_records": len(BAD_LINES)}
    for k, (_, message) in enumerate(BAD_LINES):
        assert f"x{suffix}: line {k + 2}: {message}" in caplog.text


@pytest.mark.parametrize("suffix", [".jsonl.gz", ".jsonl.zst"])
def test_truncated_compressed_file_is_an_error_naming_it(tmp_path, suffix):
    path = tmp_path / f"t{suffix}"
    _write_jsonl(path, _records(_docs(10)))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(DataError, match=rf"t{suffix}: unreadable after line \d+ \(truncated or corrupt"):
        _read(path)
    docs, counts = _read(path, on_bad_record="skip")  # the lines before the damage are kept, the file counted
    assert counts == {"skipped_files": 1} and docs == _docs(10)[: len(docs)]


def test_a_line_without_end_is_bounded(tmp_path, caplog):
    """A damaged file without newlines is not read into memory as one line: the line is dropped and counted."""
    path = tmp_path / "long.jsonl"
    path.write_bytes(b"\n".join(_records(["a", "b"])) + b'\n{"text": "' + b"x" * 10_000)
    docs, counts = _read(path, on_bad_record="skip", max_document_chars=1000)
    assert docs == ["a", "b"] and counts == {"skipped_records": 1}
    assert "long.jsonl: line 3: line longer than 4 x data.max_document_chars=1000 bytes" in caplog.text
