"""Text sources: resolving files, the stdlib default corpus, and reading documents one *unit* at a time.

A unit is the smallest piece of a file that can be read on its own: a Parquet row group, an Arrow IPC file
record batch, a whole Arrow IPC stream, a whole JSON Lines file (streamed line by line, jsonl.py), or a whole
plain-text file (one document). Units are listed from
metadata, so prepare and the text loader stream them one by one (never a whole dataset in memory) and can hand
them out to splits, ranks and workers.
"""

import glob
import itertools
import logging
import math
import os
import sysconfig
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs

from data_pipeline.config import DataConfig, DataError
from data_pipeline.jsonl import JSONL_SUFFIXES, is_jsonl, jsonl_documents

log = logging.getLogger(__name__)

TABLE_SUFFIXES = {".parquet": "parquet", ".arrow": "ipc", ".feather": "ipc", ".ipc": "ipc"}
TEXT_SUFFIXES = (".txt", ".md", ".rst", ".py")
SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
_TEXT_TYPES = {pa.string(): pa.binary(), pa.large_string(): pa.large_binary(), pa.string_view(): pa.binary_view()}
_BINARY_TYPES = {pa.binary(), pa.large_binary(), pa.binary_view()}


@dataclass(frozen=True)
class Unit:
    uri: str
    "File as the user named it (error messages quote it)."
    kind: str
    "parquet | ipc | ipc_stream | jsonl | plain"
    index: int
    "Row group / record batch within the file (0 for whole-file units)."
    first_row: int
    "Row number of the unit's first row within its file."


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path) for a local path or a URI such as s3://bucket/x.parquet or file:///data/x.arrow."""
    if "://" in uri:
        try:
            return pafs.FileSystem.from_uri(uri)
        except (pa.ArrowInvalid, OSError) as err:
            raise DataError(f"data.sources: cannot open {uri}: {err}") from None
    return pafs.LocalFileSystem(), os.path.abspath(uri)


def _wanted(name: str) -> bool:
    return name.endswith(tuple(TABLE_SUFFIXES) + TEXT_SUFFIXES + tuple(JSONL_SUFFIXES)) and not os.path.basename(
        name
    ).startswith(".")


def _child_uri(src: str, path: str) -> str:
    """URI of `path` (as a filesystem lists it) under the URI `src`, keeping src's credentials and options
    (s3://key:secret@bucket/dir?endpoint_override=host:port -> s3://key:secret@bucket/dir/x.parquet?endpoint...)."""
    parts = urllib.parse.urlsplit(src)
    if path.startswith("/"):  # hdfs and the like: the host stays, the path is absolute
        return urllib.parse.urlunsplit((parts.scheme, parts.netloc, path, parts.query, ""))
    user = parts.netloc.rpartition("@")[0]
    bucket, _, key = path.partition("/")
    return urllib.parse.urlunsplit((parts.scheme, f"{user}@{bucket}" if user else bucket, "/" + key, parts.query, ""))


def _expand(src: str) -> list[str]:
    if "://" in src:
        fs, path = filesystem(src)
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.NotFound:
            raise DataError(f"data.sources: {src} does not exist")
        if info.type == pafs.FileType.File:
            return [src]
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
        return sorted(_child_uri(src, i.path) for i in infos if i.type == pafs.FileType.File and _wanted(i.path))
    if any(c in src for c in "*?["):
        matched = sorted(glob.glob(src, recursive=True))
        if not matched:
            raise DataError(f"data.sources: {src!r} matches no files")
        return [f for m in matched for f in (_expand(m) if os.path.isdir(m) else [m])]
    if os.path.isdir(src):
        found = []
        for dirpath, dirnames, filenames in os.walk(src):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            found += [os.path.join(dirpath, f) for f in filenames if _wanted(f)]
        return sorted(found)
    if os.path.isfile(src):
        return [src]
    raise DataError(f"data.sources: {src!r} does not exist")


def resolve_sources(sources: list[str]) -> list[str]:
    """Files named by `sources` (files, directories, globs, URIs) in a fixed order: per source, sorted."""
    files: list[str] = []
    for src in sources:
        found = _expand(src)
        if not found:
            raise DataError(
                f"data.sources: {src!r} holds no {', '.join(sorted(TABLE_SUFFIXES) + list(TEXT_SUFFIXES) + list(JSONL_SUFFIXES))} files"
            )
        files += found
    return list(dict.fromkeys(files))


def default_corpus() -> list[str]:
    """The running interpreter's standard-library .py files (~12-20 MB), without tests and site-packages."""
    root = sysconfig.get_paths()["stdlib"]
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS)
        files += [os.path.join(dirpath, f) for f in filenames if f.endswith(".py")]
    if not files:
        raise DataError(f"default corpus: no .py files under the stdlib directory {root}; set data.sources")
    return sorted(files)


def in_val_split(index: int, val_fraction: float) -> bool:
    """Every 1/f-th document (prepare) or unit (text loader) is validation: an exact fraction, spread over the
    corpus, decided while streaming."""
    return math.floor((index + 1) * val_fraction) > math.floor(index * val_fraction)


def bad_record(cfg: DataConfig, counts: dict, key: str, message: str) -> None:
    """Raise DataError(message), or with on_bad_record=skip count it under counts[key] and log it."""
    if cfg.on_bad_record == "error":
        raise DataError(message)
    counts[key] = counts.get(key, 0) + 1
    log.warning("skipped: %s", message)


def _kind(uri: str) -> str:
    name = uri.split("?", 1)[0]  # a URI's query holds filesystem options
    if is_jsonl(name):
        return "jsonl"
    return next((k for s, k in TABLE_SUFFIXES.items() if name.lower().endswith(s)), "plain")


def _open_ipc(fs: pafs.FileSystem, path: str):
    """Memory-map local files (zero-copy batches); other filesystems are read through a random-access handle."""
    return pa.memory_map(path) if isinstance(fs, pafs.LocalFileSystem) else fs.open_input_file(path)


def _check_text_column(uri: str, schema: pa.Schema, column: str) -> None:
    if column not in schema.names:
        raise DataError(
            f"{uri}: no column '{column}' (columns: {', '.join(schema.names) or 'none'}); set data.text_column"
        )
    tp = schema.field(column).type
    if tp not in _TEXT_TYPES and tp not in _BINARY_TYPES:
        raise DataError(f"{uri}: column '{column}' has type {tp}, expected string or binary (UTF-8 text)")


def _file_units(uri: str, cfg: DataConfig) -> list[Unit]:
    fs, path = filesystem(uri)
    info = fs.get_file_info(path)
    if info.type != pafs.FileType.File:
        raise DataError(f"{uri}: not a file")
    kind = _kind(uri)
    if kind in ("plain", "jsonl"):
        return [Unit(uri, kind, 0, 0)]
    if info.size == 0:
        raise DataError(f"{uri}: empty file (0 bytes), not a valid {kind} file")
    try:
        if kind == "parquet":
            fragment = ds.ParquetFileFormat().make_fragment(path, filesystem=fs)
            schema, sizes = fragment.physical_schema, [rg.num_rows for rg in fragment.row_groups]
        else:
            try:
                reader = pa.ipc.open_file(_open_ipc(fs, path))
                schema, sizes = reader.schema, [reader.get_batch(i).num_rows for i in range(reader.num_record_batches)]
            except pa.ArrowInvalid:  # not the file format: try the streaming format (e.g. Hugging Face caches)
                stream = pa.ipc.open_stream(_open_ipc(fs, path))
                schema, sizes, kind = stream.schema, [sum(b.num_rows for b in stream)], "ipc_stream"
    except (pa.ArrowInvalid, OSError) as err:
        raise DataError(f"{uri}: cannot read as {kind} (corrupt or truncated?): {err}") from None
    _check_text_column(uri, schema, cfg.text_column)
    if sum(sizes) == 0:
        raise DataError(f"{uri}: has no rows")
    starts = [0, *itertools.accumulate(sizes)]
    return [Unit(uri, kind, i, start) for i, (start, n) in enumerate(zip(starts, sizes)) if n > 0]


def list_units(files: list[str], cfg: DataConfig, counts: dict) -> list[Unit]:
    """All units of `files` in order; a file that cannot be used is an error or a counted skip (skipped_files)."""
    units = []
    for uri in files:
        try:
            units += _file_units(uri, cfg)
        except DataError as err:
            bad_record(cfg, counts, "skipped_files", str(err))
    return units


def _unit_arrays(unit: Unit, column: str) -> Iterator[pa.Array]:
    fs, path = filesystem(unit.uri)
    if unit.kind == "parquet":
        fragment = ds.ParquetFileFormat().make_fragment(path, filesystem=fs, row_groups=[unit.index])
        for batch in fragment.to_batches(columns=[column], batch_size=4096, use_threads=False):
            yield batch.column(0)
    elif unit.kind == "ipc":
        yield pa.ipc.open_file(_open_ipc(fs, path)).get_batch(unit.index).column(column)
    else:
        for batch in pa.ipc.open_stream(_open_ipc(fs, path)):
            yield batch.column(column)


def _decode(array: pa.Array) -> list:
    """Python str per row (None for nulls); bytes for rows that are not valid UTF-8."""
    if array.type in _TEXT_TYPES:
        try:
            return array.to_pylist()
        except UnicodeDecodeError:  # Arrow does not validate UTF-8 when reading Parquet or IPC
            array = array.view(_TEXT_TYPES[array.type])
    out = []
    for value in array.to_pylist():
        try:
            out.append(value.decode("utf-8") if value is not None else None)
        except UnicodeDecodeError:
            out.append(value)
    return out


def _usable(value: str | bytes | None, where: str, cfg: DataConfig, counts: dict) -> bool:
    """Whether a row is a document; a null, non-UTF-8 or over-long one is an error or a counted skip."""
    if value is None:
        bad_record(cfg, counts, "skipped_records", f"{where}: null text")
    elif isinstance(value, bytes):
        bad_record(cfg, counts, "skipped_records", f"{where}: not UTF-8 text")
    elif len(value) > cfg.max_document_chars:
        bad_record(
            cfg,
            counts,
            "skipped_records",
            f"{where}: document of {len(value)} chars exceeds data.max_document_chars={cfg.max_document_chars}",
        )
    else:
        return True
    return False


def _jsonl(unit: Unit, cfg: DataConfig, counts: dict) -> Iterator[tuple[int, str]]:
    fs, path = filesystem(unit.uri)
    number = 0
    try:
        for number, text, why in jsonl_documents(fs, path, cfg.text_column, cfg.max_document_chars):
            if why is not None:
                bad_record(cfg, counts, "skipped_records", f"{unit.uri}: line {number}: {why}")
            elif _usable(text, f"{unit.uri}: line {number}", cfg, counts):
                yield number, text
    except (pa.ArrowInvalid, OSError) as err:
        bad_record(
            cfg, counts, "skipped_files", f"{unit.uri}: unreadable after line {number} (truncated or corrupt?): {err}"
        )


def read_documents(unit: Unit, cfg: DataConfig, counts: dict) -> Iterator[tuple[int, str]]:
    """(row in file, text) for each usable document of `unit` (row = line number for JSON Lines); bad rows are
    errors or counted skips."""
    if unit.kind == "jsonl":
        yield from _jsonl(unit, cfg, counts)
        return
    if unit.kind == "plain":
        fs, path = filesystem(unit.uri)
        with fs.open_input_stream(path) as f:
            data = f.read()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as err:
            bad_record(cfg, counts, "skipped_records", f"{unit.uri}: not UTF-8 text (bad byte at offset {err.start})")
            return
        if _usable(text, unit.uri, cfg, counts):
            yield 0, text
        return
    row = unit.first_row
    try:
        for array in _unit_arrays(unit, cfg.text_column):
            for value in _decode(array):
                if _usable(value, f"{unit.uri}: row {row}", cfg, counts):
                    yield row, value
                row += 1
    except (pa.ArrowInvalid, OSError) as err:
        part = (
            "stream"
            if unit.kind == "ipc_stream"
            else f"{'row group' if unit.kind == 'parquet' else 'record batch'} {unit.index}"
        )
        bad_record(cfg, counts, "skipped_files", f"{unit.uri}: {part} unreadable near row {row}: {err}")
