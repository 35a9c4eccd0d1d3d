"""prepare's parallel half: each unit (row group, record batch, file) is tokenized on its own, in a pool of
processes, into a *part* in `<prepared_dir>.partial/parts`; the parts are then merged in unit order into the
shards, so the output is bit for bit the one a single process writes (the train/val split is decided in the
merge, by the document's global index).

A part is `<key>.tokens` (token ids, each document followed by eos, in the shard dtype), `<key>.lengths` (int64
tokens per document, eos included) and `<key>.json` (counts), the json written last: a part with its json is
complete, and a prepare re-run after an interruption tokenizes only the units without one. The key hashes
everything the part depends on (unit, file size and mtime, tokenizer, reading settings), so a changed input is
never mixed with an old part. Memory per process: one encode batch (_ENCODE_CHARS of text), flat in corpus size.
"""

import hashlib
import itertools
import json
import os
from dataclasses import astuple

import numpy as np

from data_pipeline.config import DataConfig
from data_pipeline.shards import token_dtype
from data_pipeline.sources import Unit, filesystem, read_documents
from data_pipeline.tokenizer import load_tokenizer, write_atomic

_ENCODE_CHARS = 2_000_000  # text encoded per SentencePiece call
_MERGE_DOCS = 1 << 20  # documents split into train/val per step of the merge
_worker_tokenizers: dict = {}


def file_identity(uri: str) -> list:
    """(uri, size, mtime): what says a source file is unchanged, for part keys and prepare's skip check."""
    fs, path = filesystem(uri)
    info = fs.get_file_info(path)
    return [uri, info.size, info.mtime_ns]


def part_key(unit: Unit, tokenizer_sha256: str, cfg: DataConfig) -> str:
    reading = [cfg.text_column, cfg.max_document_chars, cfg.on_bad_record, cfg.vocab_size]
    blob = json.dumps([list(astuple(unit)), file_identity(unit.uri), tokenizer_sha256, reading])
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def part_done(parts: str, key: str) -> dict | None:
    path = os.path.join(parts, key + ".json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def tokenize_unit(unit: Unit, key: str, cfg: DataConfig, tokenizer_file: str, parts: str) -> dict:
    """Write the part of one unit; returns its counts {documents, empty, bytes, skipped_records, skipped_files}."""
    if tokenizer_file not in _worker_tokenizers:  # once per process: loading a model takes ~10 ms
        _worker_tokenizers[tokenizer_file] = load_tokenizer(tokenizer_file)
    sp = _worker_tokenizers[tokenizer_file]
    eos, dtype = sp.eos_id(), token_dtype(cfg.vocab_size)
    base = os.path.join(parts, key)
    counts: dict[str, int] = {}
    done = {"documents": 0, "empty": 0, "bytes": 0}
    pending: list[str] = []
    with open(base + ".tokens.tmp", "wb") as tokens_file, open(base + ".lengths.tmp", "wb") as lengths_file:

        def encode() -> None:
            ids = sp.encode(pending, num_threads=1)  # the processes are the parallelism
            np.array([len(doc) + 1 for doc in ids], np.int64).tofile(lengths_file)
            np.array(list(itertools.chain.from_iterable(doc + [eos] for doc in ids)), dtype).tofile(tokens_file)
            pending.clear()

        chars = 0
        for _, text in read_documents(unit, cfg, counts):
            if not text:
                done["empty"] += 1
                continue
            done["documents"] += 1
            done["bytes"] += len(text.encode("utf-8"))
            pending.append(text)
            chars += len(text)
            if chars >= _ENCODE_CHARS:
                encode()
                chars = 0
        encode()
    for suffix in (".tokens", ".lengths"):
        os.replace(base + suffix + ".tmp", base + suffix)
    done.update(skipped_records=counts.get("skipped_records", 0), skipped_files=counts.get("skipped_files", 0))
    write_atomic(base + ".json", json.dumps(done).encode())
    return done


def _read(path: str, dtype: np.dtype) -> np.ndarray:
    return np.memmap(path, dtype=dtype, mode="r") if os.path.getsize(path) else np.zeros(0, dtype)


def merge_part(parts: str, key: str, first_document: int, val_fraction: float, writers: dict, dtype) -> dict:
    """Append one part's documents to writers["train"] / writers["val"] (every 1/f-th document of the corpus is
    validation, as sources.in_val_split); returns the tokens written per split."""
    tokens, lengths = (
        _read(os.path.join(parts, key + ".tokens"), dtype),
        _read(os.path.join(parts, key + ".lengths"), np.int64),
    )
    written = {"train": 0, "val": 0}
    position = 0
    for lo in range(0, len(lengths), _MERGE_DOCS):
        block = np.asarray(lengths[lo : lo + _MERGE_DOCS])
        index = np.arange(first_document + lo, first_document + lo + len(block), dtype=np.float64)
        is_val = np.floor((index + 1) * val_fraction) > np.floor(index * val_fraction)
        # runs of consecutive documents of one split are written with one call each
        cuts = np.flatnonzero(np.diff(is_val.astype(np.int8))) + 1
        ends = np.cumsum(block) + position
        for doc_lo, doc_hi in zip(np.r_[0, cuts], np.r_[cuts, len(block)]):
            start = int(ends[doc_lo - 1]) if doc_lo else position
            stop = int(ends[doc_hi - 1])
            split = "val" if is_val[doc_lo] else "train"
            writers[split].write(tokens[start:stop])
            written[split] += stop - start
        position = int(ends[-1]) if len(block) else position
    return written
