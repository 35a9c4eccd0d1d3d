"""prepare: text -> SentencePiece tokenizer -> pre-tokenized Arrow shards (eos after every document) + manifest.

Nothing already prepared is lost: the inputs are checked first, the new dataset is built in a sibling folder
`<prepared_dir>.partial/dataset` and only a complete one replaces `prepared_dir` (two renames; a crash between
them is repaired by the next prepare). A failed or interrupted prepare leaves the previous dataset as it was.

Scale: units are tokenized by data.prepare_workers processes into parts (prepare_parts.py) and merged in order,
so the output does not depend on the process count and memory does not grow with the corpus. A re-run keeps
the parts an interrupted run completed, and does nothing at all when the manifest's inputs_sha256 (source
files' size and mtime, output-changing settings, tokenizer) matches and every shard is there.
"""

import fnmatch
import hashlib
import json
import math
import multiprocessing
import os
import platform
import shutil
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path

from tqdm import tqdm

from data_pipeline.config import DataConfig, DataError
from data_pipeline.prepare_parts import file_identity, merge_part, part_done, part_key, tokenize_unit
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
from data_pipeline.sources import default_corpus, list_units, read_documents, resolve_sources
from data_pipeline.tokenizer import (
    TOKENIZER_FILE,
    check_vocab_size,
    file_sha256,
    load_tokenizer,
    train_tokenizer,
    write_atomic,
)

_PART_FILES = (".tokens", ".lengths", ".json", ".tokens.tmp", ".lengths.tmp", ".json.tmp")


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
    check_vocab_size(sp, cfg, path)
    if sp.eos_id() < 0:
        raise DataError(f"tokenizer {path} has no eos piece (needed between documents)")
    return sp.eos_id()


_OUTPUT_FIELDS = (
    "sources",
    "text_column",
    "vocab_size",
    "tokenizer_type",
    "tokenizer_train_bytes",
    "tokenizer_sentences",
    "val_fraction",
    "shard_tokens",
    "seed",
    "on_bad_record",
    "max_document_chars",
    "answer_marker",  # a trained tokenizer registers it as one piece
    "user_symbols",  # and these
)


def _inputs_sha256(cfg: DataConfig, files: list[str]) -> str:
    """Hash of everything the prepared dataset depends on: each source file's (uri, size, mtime), the data
    fields that change the output, and the given tokenizer; equal hashes let a re-run skip the work."""
    given = file_sha256(cfg.tokenizer_path) if cfg.tokenizer_path else None
    blob = [FORMAT, VERSION, [file_identity(f) for f in files], {k: getattr(cfg, k) for k in _OUTPUT_FIELDS}, given]
    return hashlib.sha256(json.dumps(blob).encode()).hexdigest()


def _already_prepared(out: str, inputs: str) -> dict | None:
    """The manifest of `out` when it was prepared from exactly these inputs and all its shards are there."""
    try:
        manifest = read_manifest(out)
    except DataError:
        return None
    shards = [s for split in ("train", "val") for s in manifest[split]]
    complete = all(
        os.path.isfile(p := os.path.join(out, s["file"])) and os.path.getsize(p) == s["bytes"] for s in shards
    )
    return manifest if complete and manifest.get("inputs_sha256") == inputs else None


def _tokenizer(cfg: DataConfig, units: list, staging: str, inputs: str, progress: bool) -> str:
    """staging/tokenizer.model: a copy of data.tokenizer_path, or one trained on the sources (kept across an
    interrupted prepare of the same inputs, so its parts stay valid)."""
    path, marker = os.path.join(staging, TOKENIZER_FILE), os.path.join(staging, "tokenizer.inputs")
    if cfg.tokenizer_path:
        shutil.copyfile(cfg.tokenizer_path, path)
    elif not (os.path.isfile(path) and os.path.isfile(marker) and Path(marker).read_text() == inputs):
        if progress:
            print(
                f"prepare: training a {cfg.tokenizer_type} SentencePiece tokenizer (vocab {cfg.vocab_size}) "
                f"on <= {cfg.tokenizer_train_bytes / 1e6:.0f} MB of text",
                flush=True,
            )
        train_tokenizer((text for unit in units for _, text in read_documents(unit, cfg, {})), cfg, path)
        write_atomic(marker, inputs.encode())
    return path


def _workers(cfg: DataConfig) -> int:
    return cfg.prepare_workers or len(os.sched_getaffinity(0))


def _tokenize(units: list, keys: list[str], cfg: DataConfig, tok_path: str, parts: str, progress: bool) -> list[dict]:
    """Counts of every unit's part, in unit order; parts not already complete are written by a process pool
    (at most 2 units per process in flight) under one progress bar."""
    results = {k: part_done(parts, k) for k in keys}
    todo = [(u, k) for u, k in zip(units, keys) if results[k] is None]
    workers = min(_workers(cfg), len(todo))
    bar = tqdm(total=len(units), initial=len(units) - len(todo), unit="unit", desc="prepare", disable=not progress)
    if workers <= 1:
        for unit, key in todo:
            results[key] = tokenize_unit(unit, key, cfg, tok_path, parts)
            bar.update(1)
    else:
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("forkserver")) as pool:
            queue, running = iter(todo), {}
            try:
                while True:
                    while len(running) < 2 * workers and (item := next(queue, None)):
                        running[pool.submit(tokenize_unit, *item, cfg, tok_path, parts)] = item[1]
                    if not running:
                        break
                    finished, _ = wait(running, return_when=FIRST_COMPLETED)
                    for future in finished:
                        results[running.pop(future)] = future.result()
                        bar.update(1)
            except BaseException:
                pool.shutdown(cancel_futures=True)
                raise
    bar.close()
    return [results[k] for k in keys]


def _summary(out: str, manifest: dict, seconds: float) -> dict:
    return {
        "prepared_dir": out,
        "documents": manifest["documents"]["train"] + manifest["documents"]["val"],
        "tokens": manifest["tokens"]["train"] + manifest["tokens"]["val"],
        "bytes": manifest["bytes"],
        "seconds": seconds,
        "shards": [os.path.join(out, s["file"]) for split in ("train", "val") for s in manifest[split]],
        "train_tokens": manifest["tokens"]["train"],
        "val_tokens": manifest["tokens"]["val"],
        "vocab_size": manifest["vocab_size"],
        "tokenizer": os.path.join(out, TOKENIZER_FILE),
        "skipped_records": manifest["skipped_records"],
        "skipped_files": manifest["skipped_files"],
    }


def prepare(cfg: DataConfig, *, progress: bool = True) -> dict:
    """Tokenize cfg.sources (or the stdlib corpus) into cfg.prepared_dir; returns a summary dict
    (documents, tokens, bytes, seconds, shards, ...). Trains a tokenizer unless data.tokenizer_path is set.
    Does nothing when prepared_dir already holds the dataset of exactly these inputs."""
    cfg.validate()
    start = time.perf_counter()
    if cfg.tokenizer_path:  # fail fast, before reading any source
        _check_vocab(load_tokenizer(cfg.tokenizer_path), cfg, cfg.tokenizer_path)
    out = os.path.normpath(cfg.prepared_dir)
    staging = out + ".partial"
    _check_replaceable(out, staging)
    files = resolve_sources(cfg.sources) if cfg.sources else default_corpus()
    inputs = _inputs_sha256(cfg, files)
    if (manifest := _already_prepared(out, inputs)) is not None:
        if progress:
            print(f"prepare: {out} already holds these inputs prepared and complete; nothing to do", flush=True)
        return _summary(out, manifest, time.perf_counter() - start)
    counts: dict[str, int] = {}
    units = list_units(files, cfg, counts)
    if not units:
        raise DataError(f"prepare: no readable documents in {len(files)} source file(s) (all skipped)")

    os.makedirs(staging, exist_ok=True)
    tok_path = _tokenizer(cfg, units, staging, inputs, progress)
    eos = _check_vocab(load_tokenizer(tok_path), cfg, cfg.tokenizer_path or tok_path)
    tok_sha = file_sha256(tok_path)
    keys = [part_key(unit, tok_sha, cfg) for unit in units]
    parts = os.path.join(staging, "parts")
    os.makedirs(parts, exist_ok=True)
    for name in set(os.listdir(parts)) - {k + s for k in keys for s in _PART_FILES}:  # parts of other inputs
        os.remove(os.path.join(parts, name))
    results = _tokenize(units, keys, cfg, tok_path, parts, progress)

    dataset = os.path.join(staging, "dataset")
    shutil.rmtree(dataset, ignore_errors=True)
    os.makedirs(dataset)
    shutil.copyfile(tok_path, os.path.join(dataset, TOKENIZER_FILE))
    dtype = token_dtype(cfg.vocab_size)
    writers = {split: ShardWriter(dataset, split, dtype, cfg.shard_tokens) for split in ("train", "val")}
    tokens = {"train": 0, "val": 0}
    n_documents = 0
    for key, result in zip(keys, results):
        for split, n in merge_part(parts, key, n_documents, cfg.val_fraction, writers, dtype).items():
            tokens[split] += n
        n_documents += result["documents"]
    shards = {split: w.close() for split, w in writers.items()}
    n_val = math.floor(n_documents * cfg.val_fraction)  # sum of in_val_split over the documents (telescoping)
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "inputs_sha256": inputs,
        "tokenizer": TOKENIZER_FILE,
        "tokenizer_sha256": tok_sha,
        "tokenizer_type": cfg.tokenizer_type,
        "vocab_size": cfg.vocab_size,
        "eos_id": eos,
        "dtype": dtype.name,
        "sources": list(cfg.sources) or [f"default corpus: stdlib .py files of Python {platform.python_version()}"],
        "source_files": len(files),
        "documents": {"train": n_documents - n_val, "val": n_val},
        "tokens": tokens,
        "bytes": sum(r["bytes"] for r in results),
        "empty_documents": sum(r["empty"] for r in results),
        "skipped_records": counts.get("skipped_records", 0) + sum(r["skipped_records"] for r in results),
        "skipped_files": counts.get("skipped_files", 0) + sum(r["skipped_files"] for r in results),
        "val_fraction": cfg.val_fraction,
        "seconds": round(time.perf_counter() - start, 3),
        "train": shards["train"],
        "val": shards["val"],
    }
    write_manifest(dataset, manifest)
    _replace(dataset, out, staging)
    summary = _summary(out, manifest, time.perf_counter() - start)
    if progress:
        total = summary["tokens"]
        print(
            f"prepare: {summary['documents']} documents, {summary['bytes'] / 1e6:.1f} MB -> {total:,} tokens "
            f"(train {tokens['train']:,}, val {tokens['val']:,}; {summary['bytes'] / max(total, 1):.2f} bytes/token) "
            f"in {len(summary['shards'])} shard(s), {summary['seconds']:.1f} s; skipped {summary['skipped_records']} "
            f"records, {summary['skipped_files']} files -> {out}",
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
