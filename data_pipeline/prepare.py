"""prepare: text -> SentencePiece tokenizer -> pre-tokenized Arrow shards (eos after every document) + manifest.

Crash safety: the old manifest is deleted first and the new one written last (tmp + os.replace), each shard is
renamed into place only when complete, so an interrupted prepare leaves a directory that loaders refuse
("manifest.json does not exist") rather than one they would read half of.
"""

import glob
import os
import platform
import shutil
import time

import numpy as np
from tqdm import tqdm

from data_pipeline.config import DataConfig, DataError
from data_pipeline.shards import FORMAT, MANIFEST, VERSION, ShardWriter, token_dtype, write_manifest
from data_pipeline.sources import default_corpus, in_val_split, list_units, read_documents, resolve_sources
from data_pipeline.tokenizer import TOKENIZER_FILE, file_sha256, load_tokenizer, train_tokenizer

_ENCODE_CHARS = 8_000_000  # text encoded per SentencePiece call (bounds memory for big row groups)


def _invalidate(directory: str) -> None:
    """Make the directory unreadable as a dataset first (no manifest), then drop old shards and tmp leftovers."""
    manifest = os.path.join(directory, MANIFEST)
    if os.path.exists(manifest):
        os.remove(manifest)
    for pattern in ("train-*.arrow", "val-*.arrow", "*.tmp"):
        for path in glob.glob(os.path.join(directory, pattern)):
            os.remove(path)


def _check_vocab(sp, cfg: DataConfig, path: str) -> int:
    """The tokenizer's eos id, after checking its vocabulary size against data.vocab_size."""
    if sp.vocab_size() != cfg.vocab_size:
        raise DataError(f"tokenizer {path} has vocab size {sp.vocab_size()} but data.vocab_size = {cfg.vocab_size}")
    if sp.eos_id() < 0:
        raise DataError(f"tokenizer {path} has no eos piece (needed between documents)")
    return sp.eos_id()


def prepare(cfg: DataConfig, *, progress: bool = True) -> dict:
    """Tokenize cfg.sources (or the stdlib corpus) into cfg.prepared_dir; returns a summary dict
    (documents, tokens, bytes, seconds, shards, ...). Trains a tokenizer unless data.tokenizer_path is set."""
    cfg.validate()
    start = time.perf_counter()
    if cfg.tokenizer_path:  # fail fast, before reading any source
        _check_vocab(load_tokenizer(cfg.tokenizer_path), cfg, cfg.tokenizer_path)
    out = cfg.prepared_dir
    os.makedirs(out, exist_ok=True)
    _invalidate(out)

    files = resolve_sources(cfg.sources) if cfg.sources else default_corpus()
    counts: dict[str, int] = {}
    units = list_units(files, cfg, counts)
    if not units:
        raise DataError(f"prepare: no readable documents in {len(files)} source file(s) (all skipped)")

    tok_path = os.path.join(out, TOKENIZER_FILE)
    if not cfg.tokenizer_path:
        if progress:
            print(
                f"prepare: training a {cfg.tokenizer_type} SentencePiece tokenizer (vocab {cfg.vocab_size}) "
                f"on <= {cfg.tokenizer_train_bytes / 1e6:.0f} MB of text",
                flush=True,
            )
        train_tokenizer((text for unit in units for _, text in read_documents(unit, cfg, {})), cfg, tok_path)
    elif os.path.abspath(cfg.tokenizer_path) != os.path.abspath(tok_path):
        shutil.copyfile(cfg.tokenizer_path, tok_path + ".tmp")
        os.replace(tok_path + ".tmp", tok_path)
    sp = load_tokenizer(tok_path)
    eos = _check_vocab(sp, cfg, cfg.tokenizer_path or tok_path)

    dtype = token_dtype(cfg.vocab_size)
    writers = {split: ShardWriter(out, split, dtype, cfg.shard_tokens) for split in ("train", "val")}
    documents = {"train": 0, "val": 0}
    tokens = {"train": 0, "val": 0}
    n_bytes = empty = 0
    pending: list[tuple[str, str]] = []  # (split, text) waiting to be encoded

    def encode_pending() -> None:
        ids = sp.encode([text for _, text in pending], num_threads=os.cpu_count() or 1)
        for split in ("train", "val"):
            flat = [t for (s, _), doc in zip(pending, ids) if s == split for t in (*doc, eos)]
            writers[split].write(np.array(flat, dtype=dtype))
            tokens[split] += len(flat)
        pending.clear()

    bar = tqdm(total=len(units), unit="unit", desc="prepare", disable=not progress)
    pending_chars = 0
    for unit in units:
        for _, text in read_documents(unit, cfg, counts):
            if not text:
                empty += 1
                continue
            split = "val" if in_val_split(documents["train"] + documents["val"], cfg.val_fraction) else "train"
            documents[split] += 1
            n_bytes += len(text.encode("utf-8"))
            pending.append((split, text))
            pending_chars += len(text)
            if pending_chars >= _ENCODE_CHARS:
                encode_pending()
                pending_chars = 0
        bar.update(1)
        bar.set_postfix(MB=f"{n_bytes / 1e6:.1f}", refresh=False)
    encode_pending()
    bar.close()
    shards = {split: w.close() for split, w in writers.items()}

    seconds = time.perf_counter() - start
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "tokenizer": TOKENIZER_FILE,
        "tokenizer_sha256": file_sha256(tok_path),
        "tokenizer_type": cfg.tokenizer_type,
        "vocab_size": cfg.vocab_size,
        "eos_id": eos,
        "dtype": dtype.name,
        "sources": list(cfg.sources) or [f"default corpus: stdlib .py files of Python {platform.python_version()}"],
        "source_files": len(files),
        "documents": documents,
        "tokens": tokens,
        "bytes": n_bytes,
        "empty_documents": empty,
        "skipped_records": counts.get("skipped_records", 0),
        "skipped_files": counts.get("skipped_files", 0),
        "val_fraction": cfg.val_fraction,
        "seconds": round(seconds, 3),
        "train": shards["train"],
        "val": shards["val"],
    }
    write_manifest(out, manifest)  # last: from here on the directory is a valid dataset
    total_tokens = tokens["train"] + tokens["val"]
    summary = {
        "prepared_dir": out,
        "documents": documents["train"] + documents["val"],
        "tokens": total_tokens,
        "bytes": n_bytes,
        "seconds": seconds,
        "shards": [os.path.join(out, s["file"]) for split in ("train", "val") for s in shards[split]],
        "train_tokens": tokens["train"],
        "val_tokens": tokens["val"],
        "vocab_size": cfg.vocab_size,
        "tokenizer": tok_path,
        "skipped_records": manifest["skipped_records"],
        "skipped_files": manifest["skipped_files"],
    }
    if progress:
        print(
            f"prepare: {summary['documents']} documents, {n_bytes / 1e6:.1f} MB -> {total_tokens:,} tokens "
            f"(train {tokens['train']:,}, val {tokens['val']:,}; {n_bytes / max(total_tokens, 1):.2f} bytes/token) "
            f"in {len(summary['shards'])} shard(s), {seconds:.1f} s; skipped {summary['skipped_records']} records, "
            f"{summary['skipped_files']} files -> {out}",
            flush=True,
        )
    return summary
