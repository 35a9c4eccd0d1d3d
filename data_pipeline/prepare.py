"""prepare: text -> SentencePiece tokenizer -> pre-tokenized Arrow shards (eos after every document) + manifest.

Nothing already prepared is lost: the inputs are checked first, the new dataset is built in a sibling folder
`<prepared_dir>.partial/dataset` and only a complete one replaces `prepared_dir` (two renames; a crash between
them is repaired by the next prepare). A failed or interrupted prepare leaves the previous dataset as it was.
"""

import fnmatch
import os
import platform
import shutil
import time

import numpy as np
from tqdm import tqdm

from data_pipeline.config import DataConfig, DataError
from data_pipeline.shards import (
    FORMAT,
    MANIFEST,
    VERSION,
    ShardWriter,
    read_manifest,
    token_dtype,
    verify_shards,
    write_manifest,
)
from data_pipeline.sources import default_corpus, in_val_split, list_units, read_documents, resolve_sources
from data_pipeline.tokenizer import TOKENIZER_FILE, file_sha256, load_tokenizer, train_tokenizer

_ENCODE_CHARS = 8_000_000  # text encoded per SentencePiece call (bounds memory for big row groups)


_OWN_FILES = (MANIFEST, TOKENIZER_FILE, "train-*.arrow", "val-*.arrow", "*.tmp")


def _check_replaceable(out: str, staging: str) -> None:
    """Refuse to replace a folder prepare did not write; put back a dataset a crash left moved aside."""
    old = os.path.join(staging, "old")
    if not os.path.exists(out) and os.path.isfile(os.path.join(old, MANIFEST)):
        os.rename(old, out)  # a previous prepare stopped between its two renames
    if os.path.exists(out) and not os.path.isdir(out):
        raise DataError(f"data.prepared_dir: {out} is a file, not a folder")
    for name in sorted(os.listdir(out)) if os.path.isdir(out) else []:
        if not any(fnmatch.fnmatch(name, pattern) for pattern in _OWN_FILES):
            raise DataError(
                f"data.prepared_dir: {out} holds {name}, which prepare did not write; prepare replaces the whole "
                f"folder, so point data.prepared_dir at a new or prepared folder"
            )


def _replace(dataset: str, out: str, staging: str) -> None:
    """Move the complete `dataset` to `out`, the old dataset aside, then delete the build folder."""
    old = os.path.join(staging, "old")
    if os.path.exists(out):
        shutil.rmtree(old, ignore_errors=True)  # left by a crash after a previous replacement
        os.rename(out, old)
    os.rename(dataset, out)
    shutil.rmtree(staging)


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
    out = os.path.normpath(cfg.prepared_dir)
    staging = out + ".partial"
    _check_replaceable(out, staging)
    files = resolve_sources(cfg.sources) if cfg.sources else default_corpus()
    counts: dict[str, int] = {}
    units = list_units(files, cfg, counts)
    if not units:
        raise DataError(f"prepare: no readable documents in {len(files)} source file(s) (all skipped)")

    dataset = os.path.join(staging, "dataset")
    shutil.rmtree(dataset, ignore_errors=True)
    os.makedirs(dataset)
    tok_path = os.path.join(dataset, TOKENIZER_FILE)
    if not cfg.tokenizer_path:
        if progress:
            print(
                f"prepare: training a {cfg.tokenizer_type} SentencePiece tokenizer (vocab {cfg.vocab_size}) "
                f"on <= {cfg.tokenizer_train_bytes / 1e6:.0f} MB of text",
                flush=True,
            )
        train_tokenizer((text for unit in units for _, text in read_documents(unit, cfg, {})), cfg, tok_path)
    else:
        shutil.copyfile(cfg.tokenizer_path, tok_path)
    sp = load_tokenizer(tok_path)
    eos = _check_vocab(sp, cfg, cfg.tokenizer_path or tok_path)

    dtype = token_dtype(cfg.vocab_size)
    writers = {split: ShardWriter(dataset, split, dtype, cfg.shard_tokens) for split in ("train", "val")}
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
    write_manifest(dataset, manifest)
    _replace(dataset, out, staging)
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
        "tokenizer": os.path.join(out, TOKENIZER_FILE),
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


def verify_prepared(cfg: DataConfig) -> int:
    """`prepare --verify`: read every shard of cfg.prepared_dir and compare its sha256 with the manifest (and the
    tokenizer's); DataError naming each file that differs. Returns the number of shards checked."""
    manifest = read_manifest(cfg.prepared_dir)
    tok = os.path.join(cfg.prepared_dir, manifest["tokenizer"])
    if not os.path.isfile(tok) or file_sha256(tok) != manifest["tokenizer_sha256"]:
        raise DataError(
            f"{tok}: missing or not the tokenizer the manifest lists (sha256 {manifest['tokenizer_sha256'][:12]}...)"
        )
    return verify_shards(cfg.prepared_dir, manifest)
