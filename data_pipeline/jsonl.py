"""JSON Lines text sources (.jsonl, and gzip or zstd compressed as .jsonl.gz / .json.gz (Dolma) / .jsonl.zst),
read as a stream: pyarrow decompresses while reading, lines are cut from 4 MiB blocks, so memory holds one block
and one line, never a whole file. Each non-blank line is a JSON object holding the document in a string field.
"""

import json
from collections.abc import Iterator

import pyarrow.fs as pafs

JSONL_SUFFIXES = {".jsonl": None, ".jsonl.gz": "gzip", ".json.gz": "gzip", ".jsonl.zst": "zstd", ".json.zst": "zstd"}
_BLOCK = 1 << 22


def is_jsonl(name: str) -> bool:
    return name.lower().endswith(tuple(JSONL_SUFFIXES))


def _lines(stream, max_line_bytes: int) -> Iterator[tuple[int, bytes | None]]:
    """(line number from 1, line without its newline), or None for a line over max_line_bytes (dropped, so a file
    without newlines cannot fill memory)."""
    tail, number, overlong = b"", 0, False
    while block := stream.read(_BLOCK):
        lines = (tail + block).split(b"\n")
        tail = lines.pop()
        for line in lines:
            number += 1
            yield number, None if overlong else line
            overlong = False
        if len(tail) > max_line_bytes:
            tail, overlong = b"", True
    if tail or overlong:
        yield number + 1, None if overlong else tail


def jsonl_documents(
    fs: pafs.FileSystem, path: str, field: str, max_chars: int
) -> Iterator[tuple[int, str | None, str | None]]:
    """(line number, document, None) per good record, (line number, None, why) per malformed one. A damaged
    compressed stream raises OSError from the read that hits it."""
    codec = next(c for s, c in JSONL_SUFFIXES.items() if path.lower().endswith(s))
    with fs.open_input_stream(path, compression=codec) as stream:
        for number, line in _lines(stream, 4 * max_chars + 1024):
            if line is None:
                yield number, None, f"line longer than 4 x data.max_document_chars={max_chars} bytes"
                continue
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                yield number, None, f"not valid JSON ({err})"
                continue
            if not isinstance(record, dict):
                yield number, None, f"not a JSON object but {type(record).__name__}"
            elif field not in record:
                yield number, None, f"no field '{field}' (fields: {', '.join(list(record)[:10])}); set data.text_column"
            elif not isinstance(record[field], str):
                yield number, None, f"field '{field}' is {type(record[field]).__name__}, not a string"
            else:
                yield number, record[field], None
