"""Token shards: Arrow IPC files with one flat integer column of token ids, written atomically, read by memory map.

Several shards read as one token stream (their concatenation), so window ids do not depend on how the stream
was cut into files. manifest.json (written last, atomically) is the only thing that makes a prepared
directory valid: shards it does not list, and *.tmp leftovers of an interrupted prepare, are never read.

Checksums: the manifest lists each shard's sha256 (checked by `prepare --verify`, which reads everything) and a
crc32 of each record batch's token ids, checked the first time a process reads from that batch: a shard damaged
or replaced after prepare (even by valid token ids) is an error naming the file, at the cost of one extra pass
over the bytes a process reads anyway.
"""

import bisect
import json
import os
import zlib

import numpy as np
import pyarrow as pa

from data_pipeline.config import DataError
from data_pipeline.tokenizer import file_sha256, write_atomic

MANIFEST = "manifest.json"
FORMAT = "mythos-token-shards"
VERSION = 2
COLUMN = "tokens"


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ShardWriter:
    """Appends token ids to `{prefix}-00000.arrow`, `-00001`, ... of `shard_tokens` tokens each; every file is
    written as *.tmp and renamed once complete."""

    def __init__(self, directory: str, prefix: str, dtype: np.dtype, shard_tokens: int, batch_tokens: int = 1 << 20):
        self.directory, self.prefix, self.dtype = directory, prefix, dtype
        self.shard_tokens, self.batch_tokens = shard_tokens, min(batch_tokens, shard_tokens)
        self.schema = pa.schema([(COLUMN, pa.from_numpy_dtype(dtype))])
        self.shards: list[dict] = []
        self._pending: list[np.ndarray] = []
        self._pending_tokens = 0
        self._in_shard = 0  # tokens already written to the open file
        self._crc32: list[int] = []  # of each record batch in the open file
        self._writer = None

    def _name(self) -> str:
        return f"{self.prefix}-{len(self.shards):05d}.arrow"

    def write(self, ids: np.ndarray) -> None:
        ids = np.asarray(ids).astype(self.dtype, copy=False)
        while len(ids):
            room = self.shard_tokens - self._in_shard - self._pending_tokens
            self._pending.append(ids[:room])
            self._pending_tokens += len(ids[:room])
            ids = ids[room:]
            if self._pending_tokens >= self.batch_tokens or self._in_shard + self._pending_tokens == self.shard_tokens:
                self._flush()
            if self._in_shard == self.shard_tokens:
                self._finish()

    def _flush(self) -> None:
        if not self._pending_tokens:
            return
        if self._writer is None:
            self._writer = pa.ipc.new_file(os.path.join(self.directory, self._name() + ".tmp"), self.schema)
        tokens = np.concatenate(self._pending)
        self._writer.write_batch(pa.record_batch([pa.array(tokens)], schema=self.schema))
        self._crc32.append(zlib.crc32(tokens))
        self._in_shard += len(tokens)
        self._pending, self._pending_tokens = [], 0

    def _finish(self) -> None:
        self._flush()
        if self._writer is None:
            return
        self._writer.close()
        name = self._name()
        tmp, path = os.path.join(self.directory, name + ".tmp"), os.path.join(self.directory, name)
        _fsync(tmp)
        os.replace(tmp, path)
        self.shards.append(
            {
                "file": name,
                "tokens": self._in_shard,
                "bytes": os.path.getsize(path),
                "sha256": file_sha256(path),
                "batch_crc32": self._crc32,
            }
        )
        self._writer, self._in_shard, self._crc32 = None, 0, []

    def close(self) -> list[dict]:
        """Finish the last shard; the list of {file, tokens, bytes, sha256, batch_crc32} written."""
        self._finish()
        return self.shards


def write_manifest(directory: str, manifest: dict) -> None:
    write_atomic(os.path.join(directory, MANIFEST), json.dumps(manifest, indent=1).encode())


def read_manifest(directory: str) -> dict:
    path = os.path.join(directory, MANIFEST)
    if not os.path.isfile(path):
        raise DataError(f"{path} does not exist: {directory} is not a (completely) prepared dataset; run prepare")
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise DataError(f"{path}: unreadable manifest: {err}") from None
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise DataError(
            f"{path}: not a {FORMAT} v{VERSION} manifest (format={manifest.get('format')!r}, version={manifest.get('version')!r}); "
            f"run prepare again (v{VERSION} adds shard checksums)"
        )
    return manifest


def verify_shards(directory: str, manifest: dict) -> int:
    """sha256 of every shard the manifest lists; DataError naming each one that differs. Returns the count."""
    bad = []
    shards = [s for split in ("train", "val") for s in manifest[split]]
    for shard in shards:
        path = os.path.join(directory, shard["file"])
        digest = file_sha256(path) if os.path.isfile(path) else "missing"
        if digest != shard["sha256"]:
            bad.append(f"{path}: sha256 {digest[:12]}... does not match the manifest's {shard['sha256'][:12]}...")
    if bad:
        raise DataError(f"{len(bad)} of {len(shards)} shard(s) damaged or replaced since prepare:\n" + "\n".join(bad))
    return len(shards)


def _open_shard(path: str, column: str) -> list[np.ndarray]:
    """Zero-copy numpy views (one per record batch) of a memory-mapped shard's token column."""
    try:
        return _shard_arrays(path, column)
    except (pa.ArrowInvalid, OSError) as err:
        raise DataError(f"{path}: cannot read token shard (corrupt or truncated?): {err}") from None


def _shard_arrays(path: str, column: str) -> list[np.ndarray]:
    reader = pa.ipc.open_file(pa.memory_map(path))
    if column not in reader.schema.names:
        raise DataError(
            f"{path}: no token column '{column}' (columns: {', '.join(reader.schema.names)}); set data.token_column"
        )
    tp = reader.schema.field(column).type
    if not pa.types.is_integer(tp):
        raise DataError(f"{path}: token column '{column}' has type {tp}, expected integers")
    arrays = []
    for i in range(reader.num_record_batches):
        col = reader.get_batch(i).column(column)
        if col.null_count:
            raise DataError(f"{path}: record batch {i} has {col.null_count} null token ids")
        if len(col):
            arrays.append(col.to_numpy(zero_copy_only=True))
    return arrays


class TokenStream:
    """Random access to the concatenation of token shards. Shards are opened lazily in each process (so DataLoader
    workers map their own views) and every read checks ids against the vocabulary: a corrupt shard is an error
    naming the file and offset, never a silent wrong batch."""

    def __init__(
        self, files: list[str], vocab_size: int, column: str = COLUMN, manifest_shards: list[dict] | None = None
    ):
        self.files, self.vocab_size, self.column = files, vocab_size, column
        self.batch_crc32 = [s["batch_crc32"] for s in manifest_shards] if manifest_shards else None
        "Per shard, the crc32 of each record batch's token ids (prepared data), checked on first read."
        lengths = []
        for i, path in enumerate(files):
            arrays = _open_shard(path, column)
            n = sum(len(a) for a in arrays)
            if manifest_shards is not None and n != manifest_shards[i]["tokens"]:
                raise DataError(
                    f"{path}: holds {n} tokens but the manifest lists {manifest_shards[i]['tokens']} (truncated or replaced?)"
                )
            if self.batch_crc32 is not None and len(arrays) != len(self.batch_crc32[i]):
                raise DataError(
                    f"{path}: has {len(arrays)} record batches but the manifest lists {len(self.batch_crc32[i])} (replaced?)"
                )
            lengths.append(n)
        self.offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).tolist()
        self._shards: dict[int, tuple[list[int], list[np.ndarray], set[int]]] = {}

    def __len__(self) -> int:
        return self.offsets[-1]

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_shards": {}}

    def _shard(self, i: int) -> tuple[list[int], list[np.ndarray], set[int]]:
        """(batch offsets, batch arrays, indices of the batches whose checksum was checked) of shard i."""
        if i not in self._shards:
            arrays = _open_shard(self.files[i], self.column)
            self._shards[i] = (np.cumsum([0] + [len(a) for a in arrays]).tolist(), arrays, set())
        return self._shards[i]

    def _check_batch(self, f: int, b: int, array: np.ndarray, checked: set[int]) -> None:
        if self.batch_crc32 is not None and b not in checked:
            crc = zlib.crc32(array)
            if crc != self.batch_crc32[f][b]:
                raise DataError(
                    f"{self.files[f]}: record batch {b} has crc32 {crc:08x}, the manifest {self.batch_crc32[f][b]:08x}: "
                    f"the shard was damaged or replaced since prepare (prepare --verify checks every shard)"
                )
            checked.add(b)

    def read(self, start: int, stop: int) -> np.ndarray:
        """tokens[start:stop] as int64 (a copy), across shard and record-batch boundaries."""
        if not 0 <= start <= stop <= len(self):
            raise IndexError(f"read({start}, {stop}) outside a stream of {len(self)} tokens")
        out = np.empty(stop - start, dtype=np.int64)
        pos = start
        while pos < stop:
            f = bisect.bisect_right(self.offsets, pos) - 1
            batch_offsets, arrays, checked = self._shard(f)
            local = pos - self.offsets[f]
            b = bisect.bisect_right(batch_offsets, local) - 1
            self._check_batch(f, b, arrays[b], checked)
            lo = local - batch_offsets[b]
            piece = arrays[b][lo : lo + stop - pos]
            if len(piece) and (int(piece.min()) < 0 or int(piece.max()) >= self.vocab_size):
                k = int(np.argmax((piece < 0) | (piece >= self.vocab_size)))
                raise DataError(
                    f"{self.files[f]}: token id {int(piece[k])} at offset {local + k} is outside the vocabulary [0, {self.vocab_size})"
                )
            out[pos - start : pos - start + len(piece)] = piece
            pos += len(piece)
        return out
