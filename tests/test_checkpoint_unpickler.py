"""DCP's .metadata is a pickle: loading one must never run code, whatever the file holds.

Each hostile pickle below would create a marker file when run by a plain unpickler (the first test proves that,
so the set cannot silently go harmless); the checkpoint reader must refuse every one and leave the file absent.
"""

import pickle
from pathlib import Path

import pytest

from mythos_train.checkpoint_safety import SafeFileSystemReader

METADATA_MODULE = "torch.distributed.checkpoint.metadata"


# --------------------------------------------------------------------------- a tiny pickle assembler


def _str(text: str) -> bytes:
    raw = text.encode()
    return b"\x8c" + bytes([len(raw)]) + raw  # SHORT_BINUNICODE


def _global(module: str, name: str) -> bytes:
    return _str(module) + _str(name) + b"\x93"  # STACK_GLOBAL (protocol 4 resolves dotted names)


def _value(value) -> bytes:
    """`value` (plain data) as opcodes to embed: a protocol-3 pickle without its header and STOP."""
    return pickle.dumps(value, protocol=3)[2:-1]


def _pickle(body: bytes) -> bytes:
    return b"\x80\x04" + body + b"."


def _shell(marker: Path) -> str:
    return f"touch {marker}"


def _function_from_code(marker: Path) -> bytes:
    """Build a code object and a function from it through dotted names under an allowed module, then call it."""
    code = compile(f"__import__('os').system({_shell(marker)!r})", "<hostile>", "exec")
    fields = (
        code.co_argcount, code.co_posonlyargcount, code.co_kwonlyargcount, code.co_nlocals, code.co_stacksize,
        code.co_flags, code.co_code, code.co_consts, code.co_names, code.co_varnames, code.co_filename,
        code.co_name, code.co_qualname, code.co_firstlineno, code.co_linetable, code.co_exceptiontable,
        code.co_freevars, code.co_cellvars,
    )  # fmt: skip
    make_code = _global(METADATA_MODULE, "Metadata.__init__.__code__.__class__") + _value(fields) + b"R"
    make_function = _global(METADATA_MODULE, "Metadata.__init__.__class__") + make_code + b"}" + b"\x86R"
    return _pickle(make_function + b")R")  # call it with no arguments


def _hostile_pickles(marker: Path) -> dict[str, bytes]:
    cmd = _value(_shell(marker))
    system = _global("os", "system")
    return {
        "dotted names: function type and code type": _function_from_code(marker),
        "dotted name to os under an allowed module": _pickle(_global(METADATA_MODULE, "os.system") + cmd + b"\x85R"),
        "REDUCE os.system": _pickle(system + cmd + b"\x85R"),
        "REDUCE builtins.eval": _pickle(
            _global("builtins", "eval") + _value(f"__import__('os').system({_shell(marker)!r})") + b"\x85R"
        ),
        "INST": f"(S'{_shell(marker)}'\nios\nsystem\n.".encode(),
        "OBJ": b"(" + system + cmd + b"o.",
        "NEWOBJ on an allowed type with a hostile argument": _pickle(
            _global("collections", "OrderedDict") + b"(" + system + cmd + b"\x85R" + b"t\x81"
        ),
        "REDUCE on an allowed type, nested global in its arguments": _pickle(
            _global(METADATA_MODULE, "StorageMeta") + b"(" + system + cmd + b"\x85Rt" + b"R"
        ),
        "BUILD that plants __setstate__, then a second BUILD": _pickle(
            _global(METADATA_MODULE, "StorageMeta") + b")R" + b"}" + _str("__setstate__") + system + b"sb" + cmd + b"b"
        ),
        "dotted name into torch": _pickle(_global("torch", "serialization.os.system") + cmd + b"\x85R"),
        "subprocess through a type under the filesystem module": _pickle(
            _global("torch.distributed.checkpoint.filesystem", "os.system") + cmd + b"\x85R"
        ),
    }


def _checkpoint_with(tmp_path: Path, name: str, data: bytes) -> Path:
    folder = tmp_path / name.replace(" ", "_").replace(":", "").replace(",", "")
    folder.mkdir()
    (folder / ".metadata").write_bytes(data)
    return folder


def test_the_hostile_pickles_do_run_under_a_plain_unpickler(tmp_path):
    """The set is really hostile: plain pickle.loads creates the marker with each (or fails only after it)."""
    for name, data in _hostile_pickles(tmp_path / "x").items():
        marker = tmp_path / f"ran-{abs(hash(name))}"
        data = _hostile_pickles(marker)[name]
        try:
            pickle.loads(data)
        except Exception:  # some fail after the side effect (e.g. BUILD on a non-dict)
            pass
        assert marker.exists(), name


@pytest.mark.parametrize("name", list(_hostile_pickles(Path("/x"))))
def test_checkpoint_metadata_never_runs_a_hostile_pickle(tmp_path, name):
    marker = tmp_path / "ran"
    folder = _checkpoint_with(tmp_path, name, _hostile_pickles(marker)[name])
    with pytest.raises(pickle.UnpicklingError):
        SafeFileSystemReader(folder).read_metadata()
    assert not marker.exists(), f"{name}: code ran while reading checkpoint metadata"


# --------------------------------------------------------------------------- BUILD on a shared object


def _posix_path_fspath_to_get_layout() -> bytes:
    """BUILD with a slot state on the class PosixPath: its __fspath__ becomes the (allowed) _get_layout."""
    get_layout = _global("torch.serialization", "_get_layout")
    return _pickle(_global("pathlib", "PosixPath") + b"N}" + _str("__fspath__") + get_layout + b"s\x86b0N")


def _get_layout_cache_poisoned(victim: str) -> bytes:
    """BUILD with a dict state on the function _get_layout: its cache maps a checkpoint path to `victim`."""
    victim_path = _global("pathlib", "PosixPath") + _value(victim) + b"\x85R"
    cache = b"}" + _str("runs/demo/checkpoints/step-200") + victim_path + b"s"
    return _pickle(_global("torch.serialization", "_get_layout") + b"}" + _str("cache") + cache + b"sb0N")


def _enum_member_attribute() -> bytes:
    """BUILD on a process-wide enum member fetched through an allowed class."""
    member = _global(METADATA_MODULE, "_MEM_FORMAT_ENCODING") + _value(1) + b"\x85R"
    return _pickle(member + b"}" + _str("planted") + _value(1) + b"sb0N")


def _undo_patches(checkpoint: str) -> list[str]:
    """What the BUILD payloads changed in shared objects, put back at once so nothing leaks into pytest itself."""
    import pathlib

    import torch.distributed.checkpoint.metadata as metadata
    import torch.serialization

    changed = []
    if "__fspath__" in vars(pathlib.PosixPath):
        del pathlib.PosixPath.__fspath__
        changed.append("PosixPath.__fspath__ was replaced")
    if torch.serialization._get_layout.cache.pop(checkpoint, None) is not None:
        changed.append("_get_layout's cache was poisoned")
    for member in metadata._MEM_FORMAT_ENCODING:
        if vars(member).pop("planted", None) is not None:
            changed.append(f"enum member {member} was changed")
    return changed


def test_metadata_cannot_patch_an_allowed_class_function_or_enum_member(tmp_path):
    """BUILD may only fill an instance the pickle made itself: never a class, a function or a shared member."""
    checkpoint = "runs/demo/checkpoints/step-200"
    payloads = {
        "class slot state": _posix_path_fspath_to_get_layout(),
        "function dict state": _get_layout_cache_poisoned(str(tmp_path / "victim")),
        "enum member dict state": _enum_member_attribute(),
    }
    for name, data in payloads.items():
        folder = _checkpoint_with(tmp_path, name, data)
        try:
            SafeFileSystemReader(folder).read_metadata()
        except pickle.UnpicklingError:
            pass
        assert _undo_patches(checkpoint) == [], name
