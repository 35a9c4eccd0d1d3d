"""Reading a checkpoint without trusting it: what it may execute, and whether its files are the ones written.

DCP's .metadata is a pickle: it goes through an unpickler that allows exact (module, name) pairs of DCP's plain
data classes only. DCP's non-tensor items (optimizer hyper-parameters) are read with `torch.load(weights_only=
True)`. The COMPLETE marker lists every file of the checkpoint with its size and CRC-32, so a truncated,
overwritten or missing file is found before anything is loaded.
"""

from __future__ import annotations

import enum
import io
import json
import pickle
import re
import zlib
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import ReadItem

MARKER = "COMPLETE"

# --------------------------------------------------------------------------- safe loading


def _layout(name: str) -> torch.layout:
    """torch.layout from its string ("torch.strided"): a private stand-in for torch.serialization._get_layout,
    so a pickle never holds (and BUILD never reaches) that function's process-wide cache."""
    layout = getattr(torch, name.removeprefix("torch."), None) if name.startswith("torch.") else None
    if not isinstance(layout, torch.layout):
        raise pickle.UnpicklingError(f"checkpoint metadata names layout {name!r}, which is not a torch layout")
    return layout


class _MetadataUnpickler(pickle._Unpickler):  # the pure-Python unpickler lets BUILD be guarded
    """Unpickles DCP's .metadata, refusing every global that is not one of DCP's plain-data classes.

    Only exact (module, name) pairs pass: pickle protocol 4 resolves dotted names, so allowing a module (or any
    name with a dot) would reach through attributes to the function and code types and let a crafted file build
    and call a function (issue 14). BUILD (set an object's state) runs only on a fresh instance of an allowed
    class: on the class itself, a function or a shared enum member it would patch them for the whole process
    (e.g. PosixPath.__fspath__, so a later rmtree of a checkpoint path deletes another folder).
    """

    allowed = {
        *(
            ("torch.distributed.checkpoint.metadata", name)
            for name in (
                "Metadata",
                "StorageMeta",
                "MetadataIndex",
                "ChunkStorageMetadata",
                "TensorStorageMetadata",
                "BytesStorageMetadata",
                "TensorProperties",
                "_MEM_FORMAT_ENCODING",
            )
        ),
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
        ("pathlib", "PosixPath"),
        ("pathlib", "PurePosixPath"),
        ("pathlib", "WindowsPath"),
        ("pathlib", "PureWindowsPath"),
        ("torch", "Size"),
        ("torch.serialization", "_get_layout"),
        ("collections", "OrderedDict"),
    }

    def find_class(self, module: str, name: str) -> Any:
        dtype = module == "torch" and "." not in name and isinstance(getattr(torch, name, None), torch.dtype)
        if not (dtype or (module, name) in self.allowed):
            raise pickle.UnpicklingError(f"checkpoint metadata refers to {module}.{name}, which is not allowed")
        if (module, name) == ("torch.serialization", "_get_layout"):
            return _layout
        return super().find_class(module, name)

    def _load_build(self) -> None:
        instance, state = self.stack[-2], self.stack[-1]
        cls = type(instance)
        buildable = (cls.__module__, cls.__qualname__) in self.allowed and not issubclass(cls, enum.Enum)
        if not buildable:
            raise pickle.UnpicklingError(f"checkpoint metadata sets the state of {cls.__qualname__} {instance!r}")
        # an allowed class's own __setstate__ checks its state; attributes set directly must not be special ones
        for part in () if hasattr(cls, "__setstate__") else state if isinstance(state, tuple) else (state,):
            if part is not None and (not isinstance(part, dict) or any(str(key).startswith("__") for key in part)):
                raise pickle.UnpicklingError(f"checkpoint metadata sets special attributes of {cls.__qualname__}")
        pickle._Unpickler.load_build(self)

    dispatch = {**pickle._Unpickler.dispatch, pickle.BUILD[0]: _load_build}


class SafeFileSystemReader(FileSystemReader):
    """FileSystemReader whose metadata load cannot run arbitrary code."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as stream:
            metadata = _MetadataUnpickler(io.BytesIO(stream.read())).load()
        if not isinstance(metadata, Metadata):
            raise pickle.UnpicklingError(f"{path}: not a DCP Metadata object")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """DefaultLoadPlanner that reads DCP's non-tensor items with weights_only semantics."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        obj = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            from torch.distributed.checkpoint._nested_dict import set_element

            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


def dcp_load(
    state: dict, path: Path, process_group: dist.ProcessGroup | None = None, allow_partial_load: bool = False
) -> None:
    """dcp.load `state` in place from `path` through the safe reader and planner (allow_partial_load: entries of
    `state` the checkpoint lacks keep their values)."""
    planner = SafeLoadPlanner(allow_partial_load=allow_partial_load)
    dcp.load(state, storage_reader=SafeFileSystemReader(path), planner=planner, process_group=process_group)


def checkpoint_keys(path: Path) -> set[str]:
    """The flattened state-dict keys stored in checkpoint `path` (e.g. 'model.norm.weight')."""
    return set(SafeFileSystemReader(path).read_metadata().state_dict_metadata)


# --------------------------------------------------------------------------- file checksums


def _crc32(file: Path) -> int:
    crc = 0
    with open(file, "rb") as stream:
        while chunk := stream.read(1 << 24):
            crc = zlib.crc32(chunk, crc)
    return crc


def checksum_file(rank: int) -> str:
    """Where rank `rank` leaves the checksums of the files it wrote, for rank 0's COMPLETE marker."""
    return f"rank/checksums{rank}.json"


def _written_by(name: str) -> int | None:
    """The rank that wrote checkpoint file `name` (DCP's __<rank>_<n>.distcp, rank/rank<r>.pt); None: rank 0's own
    files (.metadata, train_state.json) and anything else."""
    match = re.fullmatch(r"__(\d+)_\d+\.distcp|rank/rank(\d+)\.pt", name)
    return int(match.group(1) or match.group(2)) if match else None


def file_checksums(path: Path, rank: int = 0) -> dict[str, list[int]]:
    """The files of checkpoint `path` that `rank` wrote (rank 0: also those of no rank), but the marker and the
    checksum files: relative path -> [size in bytes, CRC-32]. Each rank reads only its own share of a checkpoint."""
    names = (str(file.relative_to(path)) for file in sorted(Path(path).rglob("*")) if file.is_file())
    return {
        name: [(Path(path) / name).stat().st_size, _crc32(Path(path) / name)]
        for name in names
        if name != MARKER
        and not re.fullmatch(r"rank/checksums\d+\.json(\.tmp)?", name)
        and (_written_by(name) == rank or (rank == 0 and _written_by(name) is None))
    }


def verify(path: Path, rank: int = 0, world_size: int = 1) -> str | None:
    """None when every file the COMPLETE marker lists is there with its size and checksum, else what is wrong.
    With `world_size` > 1 only this rank's share (every world_size-th listed file) is checked.

    A marker from before checksums ("ok") has nothing to verify and passes."""
    text = (Path(path) / MARKER).read_text()
    if text.strip() == "ok":
        return None
    try:
        expected = json.loads(text)["files"]
    except (ValueError, KeyError, TypeError):
        return f"unreadable {MARKER} marker"
    for name, (size, crc) in list(expected.items())[rank::world_size]:
        file = Path(path) / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != size:
            return f"{name} has {file.stat().st_size} bytes, {size} were written"
        if _crc32(file) != crc:
            return f"{name} does not match its checksum"
    return None
