"""build_loader: the per-rank iterator of micro-batches, with state_dict()/load_state_dict() and stats().

Workers run in torchdata's StatefulDataLoader. For pre-tokenized data we keep our own state instead of its
state_dict: that one records per-rank sampler and per-worker progress, so it is tied to world size and worker
count, while the stream position (windows.py) is one integer that is the same on every rank and survives any
change of world size, micro-batch size or num_workers. The worker pipeline is simply rebuilt from the position
(the order is a pure function of it). For text sources the workers' progress *is* the state, so there we do use
StatefulDataLoader's state_dict (per rank; see text_stream.py).

The train loader is an infinite stream (epochs wrap with a new shuffle); `iter()` continues where it stopped,
so `next(iter(loader))` per step is fine. The val loader restarts from its beginning on every `iter()` and also
cycles forever: take a fixed number of batches (itertools.islice), the same on every rank.
"""

import math
import os
import warnings

import torch
from torchdata.stateful_dataloader import StatefulDataLoader

from data_pipeline.config import DataConfig, DataError
from data_pipeline.shards import COLUMN, TokenStream, read_manifest
from data_pipeline.sources import in_val_split, list_units, resolve_sources
from data_pipeline.text_stream import TextWindows
from data_pipeline.tokenizer import check_vocab_size, file_sha256, load_tokenizer, tokenizer_path
from data_pipeline.windows import WindowBatches

STATE_VERSION = 1


class _Forever(torch.utils.data.Sampler):
    """Micro-batch indices 0, 1, 2, ... (the stream is infinite; epochs are handled by the dataset)."""

    def __iter__(self):
        m = 0
        while True:
            yield m
            m += 1


def _dataloader(cfg: DataConfig, dataset, **kwargs) -> StatefulDataLoader:
    workers = cfg.num_workers
    with warnings.catch_warnings():  # torchdata 0.11 calls the deprecated torch.set_vital in __init__
        warnings.filterwarnings("ignore", message=".*set_vital.*")
        return StatefulDataLoader(
            dataset,
            batch_size=None,
            num_workers=workers,
            prefetch_factor=cfg.prefetch_factor if workers else None,
            pin_memory=cfg.pin_memory and torch.cuda.is_available(),
            # Forked workers inherit a copy of a threaded parent (gloo/NCCL, OpenMP): they can segfault, and their
            # exit can abort on inherited std::thread objects. forkserver workers start from a clean process.
            multiprocessing_context="forkserver" if workers else None,
            # Its own generator for the workers' base seed: drawn from the default one, it would shift training's
            # random stream (model.initial_state = 'noise') depending on when this process made its iterator.
            generator=torch.Generator(),
            **kwargs,
        )


class WindowLoader:
    """Micro-batches of pre-tokenized windows (source_kind prepared / tokens). State: the global stream position."""

    def __init__(
        self,
        cfg: DataConfig,
        stream: TokenStream,
        *,
        split: str,
        seq_len: int,
        first_window: int,
        num_windows: int,
        micro_batch_size: int,
        grad_accum_steps: int,
        dp_rank: int,
        dp_world_size: int,
        eos_id: int,
        answer_ids: tuple[int, int | None] | None = None,
    ):
        self.cfg, self.stream, self.split, self.seq_len = cfg, stream, split, seq_len
        self.answer_ids = answer_ids
        self.first_window, self.num_windows, self.eos_id = first_window, num_windows, eos_id
        self.micro_batch_size, self.dp_rank, self.dp_world_size = micro_batch_size, dp_rank, dp_world_size
        self.global_batch_windows = micro_batch_size * grad_accum_steps * dp_world_size
        "Windows one optimizer step consumes over all ranks."
        self.position = 0
        "Windows consumed so far over all ranks (the stream position; identical on every rank)."
        self._it = None

    @property
    def epoch(self) -> int:
        """Completed passes over the split."""
        return self.position // self.num_windows

    @property
    def skipped_records(self) -> int:
        return 0  # records are skipped by prepare (see its manifest); windows are never skipped, bad ones raise

    def __iter__(self):
        if self.split == "val":
            self.position, self._it = 0, None
        return self

    def __next__(self) -> dict:
        if self._it is None:
            self._it = iter(_dataloader(self.cfg, self._dataset(), sampler=_Forever()))
        batch = next(self._it)
        self.position += self.micro_batch_size * self.dp_world_size
        return batch

    def _dataset(self) -> WindowBatches:
        """This rank's micro-batches from the current position on."""
        return WindowBatches(
            self.stream,
            seq_len=self.seq_len,
            first_window=self.first_window,
            num_windows=self.num_windows,
            split=self.split,
            seed=self.cfg.seed,
            start=self.position,
            micro_batch_size=self.micro_batch_size,
            dp_rank=self.dp_rank,
            dp_world_size=self.dp_world_size,
            eos_id=self.eos_id,
            doc_starts=self.cfg.return_doc_boundaries,
            window_ids=self.cfg.return_window_ids,
            answer_ids=self.answer_ids,
        )

    def close(self) -> None:
        """Stop the worker processes (they also stop when the loader is garbage-collected)."""
        self._it = None

    def stats(self) -> dict:
        """Counters to log; tokens_consumed counts label tokens over all ranks."""
        return {
            "epoch": self.epoch,
            "position": self.position,
            "tokens_consumed": self.position * self.seq_len,
            "skipped_records": 0,
            "skipped_files": 0,
        }

    def state_dict(self) -> dict:
        """Identical on every rank: save it once (e.g. from rank 0) and load it on all ranks, any world size."""
        return {
            "version": STATE_VERSION,
            "kind": "windows",
            "split": self.split,
            "position": self.position,
            "epoch": self.epoch,
            "num_windows": self.num_windows,
            "seq_len": self.seq_len,
            "seed": self.cfg.seed,
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != STATE_VERSION or state.get("kind") != "windows":
            raise DataError(
                f"loader state is not a v{STATE_VERSION} pre-tokenized loader state (kind={state.get('kind')!r}, version={state.get('version')!r})"
            )
        for key, mine in (
            ("split", self.split),
            ("seq_len", self.seq_len),
            ("num_windows", self.num_windows),
            ("seed", self.cfg.seed),
        ):
            if state[key] != mine:
                raise DataError(
                    f"loader state was saved with {key}={state[key]!r} but this loader has {key}={mine!r} "
                    f"(the data, train.seq_len or data.seed changed since the checkpoint)"
                )
        self.position, self._it = int(state["position"]), None


class TextLoader:
    """Micro-batches tokenized on the fly (source_kind text). State: StatefulDataLoader's, per rank."""

    def __init__(
        self,
        cfg: DataConfig,
        dataset: TextWindows,
        *,
        split: str,
        seq_len: int,
        micro_batch_size: int,
        grad_accum_steps: int,
        dp_rank: int,
        dp_world_size: int,
        listing_counts: dict,
    ):
        self.cfg, self.dataset, self.split, self.seq_len = cfg, dataset, split, seq_len
        self.micro_batch_size, self.dp_rank, self.dp_world_size = micro_batch_size, dp_rank, dp_world_size
        self.global_batch_windows = micro_batch_size * grad_accum_steps * dp_world_size
        self._listing = {k: listing_counts.get(k, 0) for k in ("skipped_records", "skipped_files")}
        self._reset()

    def _reset(self, loader_state: dict | None = None, workers: dict | None = None, batches: int = 0) -> None:
        self._sdl = _dataloader(self.cfg, self.dataset)
        if loader_state is not None:
            self._sdl.load_state_dict(loader_state)
        self._it, self._workers, self.batches = None, dict(workers or {}), batches

    @property
    def epoch(self) -> int:
        return max((w[0] for w in self._workers.values()), default=0)

    def _count(self, key: str) -> int:
        i = 1 if key == "skipped_records" else 2
        return self._listing[key] + sum(w[i] for w in self._workers.values())

    @property
    def skipped_records(self) -> int:
        return self._count("skipped_records")

    def __iter__(self):
        if self.split == "val":
            self._reset()
        return self

    def __next__(self) -> dict:
        if self._it is None:
            self._it = iter(self._sdl)
        batch = next(self._it)
        worker = batch.pop("_worker")
        self._workers[worker] = (batch.pop("_epoch"), batch.pop("_skipped_records"), batch.pop("_skipped_files"))
        self.batches += 1
        return batch

    def close(self) -> None:
        """Stop the worker processes; the next batch resumes from the current state."""
        self.load_state_dict(self.state_dict())

    def stats(self) -> dict:
        return {
            "epoch": self.epoch,
            "batches": self.batches,
            "tokens_consumed": self.batches
            * self.micro_batch_size
            * self.dp_world_size
            * self.seq_len,  # ranks in lockstep
            "skipped_records": self._count("skipped_records"),
            "skipped_files": self._count("skipped_files"),
        }

    def state_dict(self) -> dict:
        """Per rank (save every rank's); loading checks it comes from the same rank, world size and num_workers."""
        return {
            "version": STATE_VERSION,
            "kind": "text",
            "split": self.split,
            "dp_rank": self.dp_rank,
            "dp_world_size": self.dp_world_size,
            "num_workers": self.cfg.num_workers,
            "seq_len": self.seq_len,
            "micro_batch_size": self.micro_batch_size,
            "seed": self.cfg.seed,
            "batches": self.batches,
            "workers": {str(k): list(v) for k, v in self._workers.items()},
            "loader": self._sdl.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != STATE_VERSION or state.get("kind") != "text":
            raise DataError(
                f"loader state is not a v{STATE_VERSION} text loader state (kind={state.get('kind')!r}, version={state.get('version')!r})"
            )
        mine = {
            "split": self.split,
            "dp_rank": self.dp_rank,
            "dp_world_size": self.dp_world_size,
            "num_workers": self.cfg.num_workers,
            "seq_len": self.seq_len,
            "micro_batch_size": self.micro_batch_size,
            "seed": self.cfg.seed,
        }
        for key, value in mine.items():
            if state[key] != value:
                raise DataError(
                    f"text loader state was saved with {key}={state[key]!r}, this loader has {key}={value!r}: "
                    f"source_kind=text resumes only on the same rank layout (prepare the data for elastic resume)"
                )
        self._reset(state["loader"], {int(k): tuple(v) for k, v in state["workers"].items()}, state["batches"])


def _check_tokenizer(cfg: DataConfig, path: str) -> int:
    sp = load_tokenizer(path)
    check_vocab_size(sp, cfg, path)
    return sp.eos_id()


def answer_ids(cfg: DataConfig, path: str) -> tuple[int, int | None] | None:
    """The pieces data.answer_marker (prepare registers it) and data.answer_end (None when unset) are, in the
    tokenizer at `path`; None without data.loss_mask = 'answers'."""
    if cfg.loss_mask != "answers":
        return None
    sp = load_tokenizer(path)
    if sp.encode(cfg.answer_marker) != [piece := sp.piece_to_id(cfg.answer_marker)] or sp.is_unknown(piece):
        raise DataError(
            f"tokenizer {path} has no single piece for data.answer_marker {cfg.answer_marker!r} "
            f"(prepare again with it set, so the tokenizer registers it)"
        )
    if not cfg.answer_end:
        return piece, None
    if len(end := sp.encode(cfg.answer_end)) != 1 or sp.is_unknown(end[0]):
        raise DataError(f"tokenizer {path} has no single piece for data.answer_end {cfg.answer_end!r}")
    return piece, end[0]


def prepared_stream(cfg: DataConfig, split: str) -> tuple[TokenStream, int]:
    """The token stream of a prepared split and its eos id, after checking manifest, vocabulary and tokenizer."""
    manifest = read_manifest(cfg.prepared_dir)
    where = os.path.join(cfg.prepared_dir, "manifest.json")
    if manifest["vocab_size"] != cfg.vocab_size:
        raise DataError(
            f"{where}: data was tokenized with vocab size {manifest['vocab_size']} but data.vocab_size = {cfg.vocab_size}"
        )
    tok = tokenizer_path(cfg)
    if not os.path.isfile(tok) or file_sha256(tok) != manifest["tokenizer_sha256"]:
        raise DataError(
            f"tokenizer {tok} is not the one {where} was prepared with (sha256 {manifest['tokenizer_sha256'][:12]}...); "
            f"re-run prepare or point data.tokenizer_path at that tokenizer"
        )
    files = [os.path.join(cfg.prepared_dir, s["file"]) for s in manifest[split]]
    stream = TokenStream(files, cfg.vocab_size, COLUMN, manifest[split])
    return stream, manifest["eos_id"]


def build_loader(
    cfg: DataConfig,
    *,
    split: str,
    seq_len: int,
    micro_batch_size: int,
    grad_accum_steps: int,
    dp_rank: int,
    dp_world_size: int,
) -> "WindowLoader | TextLoader":
    """This rank's loader of `split` ("train" | "val"): micro-batches dict(input_ids=LongTensor[B, seq_len],
    labels=LongTensor[B, seq_len]) (+ doc_starts BoolTensor[B, seq_len], + window_ids LongTensor[B],
    + loss_mask BoolTensor[B, seq_len] with data.loss_mask = 'answers')."""
    cfg.validate()
    if split not in ("train", "val"):
        raise DataError(f"split must be 'train' or 'val', got {split!r}")
    if min(seq_len, micro_batch_size, grad_accum_steps, dp_world_size) < 1 or not 0 <= dp_rank < dp_world_size:
        raise DataError(
            f"bad loader shape: seq_len={seq_len}, micro_batch_size={micro_batch_size}, grad_accum_steps={grad_accum_steps}, "
            f"dp_rank={dp_rank}, dp_world_size={dp_world_size}"
        )
    shape = dict(
        seq_len=seq_len,
        micro_batch_size=micro_batch_size,
        grad_accum_steps=grad_accum_steps,
        dp_rank=dp_rank,
        dp_world_size=dp_world_size,
    )

    if cfg.mixture:
        from data_pipeline.mixture import mixture_loader  # imported here: mixture.py builds on this module

        return mixture_loader(cfg, split=split, **shape)
    if cfg.source_kind == "text":
        counts: dict[str, int] = {}
        units = list_units(resolve_sources(cfg.sources), cfg, counts) if cfg.sources else []
        if not units:
            raise DataError(
                "data.sources: source_kind=text needs readable text sources (the default corpus is used through prepare)"
            )
        units = [u for i, u in enumerate(units) if in_val_split(i, cfg.val_fraction) == (split == "val")]
        if not units:
            raise DataError(
                f"text {split} split is empty: data.val_fraction={cfg.val_fraction} of the units (row groups / record batches / files)"
            )
        if len(units) < dp_world_size * max(cfg.num_workers, 1):
            raise DataError(
                f"text {split} split has {len(units)} unit(s) (row groups / record batches / files), fewer than "
                f"ranks x workers = {dp_world_size * max(cfg.num_workers, 1)}; lower data.num_workers or prepare the data"
            )
        tok = tokenizer_path(cfg)
        eos = _check_tokenizer(cfg, tok)
        dataset = TextWindows(
            units,
            cfg,
            tokenizer_path=tok,
            split=split,
            seq_len=seq_len,
            micro_batch_size=micro_batch_size,
            dp_rank=dp_rank,
            dp_world_size=dp_world_size,
            eos_id=eos,
        )
        return TextLoader(cfg, dataset, split=split, listing_counts=counts, **shape)

    if cfg.source_kind == "prepared":
        stream, eos = prepared_stream(cfg, split)
        where = f"{cfg.prepared_dir} ({split})"
        first, count = 0, max(len(stream) - 1, 0) // seq_len
    else:
        eos = _check_tokenizer(cfg, cfg.tokenizer_path) if cfg.tokenizer_path else -1
        files = resolve_sources(cfg.sources)
        for f in files:
            if "://" in f:
                raise DataError(f"data.sources: token shards are memory-mapped and must be local files, got {f}")
        stream = TokenStream(files, cfg.vocab_size, cfg.token_column)
        where = f"token shards ({split})"
        total = max(len(stream) - 1, 0) // seq_len
        n_val = math.floor(total * cfg.val_fraction)  # the last windows; one window left out keeps splits disjoint
        first, count = (total - n_val, n_val) if split == "val" else (0, total - n_val - (1 if n_val else 0))
    if count < 1:
        hint = f" (data.val_fraction={cfg.val_fraction})" if split == "val" else ""
        raise DataError(f"{where}: {len(stream)} tokens hold no window of seq_len+1={seq_len + 1} tokens{hint}")
    if cfg.return_doc_boundaries and eos < 0:
        raise DataError("data.return_doc_boundaries needs the eos id: set data.tokenizer_path for source_kind=tokens")
    if cfg.loss_mask == "answers" and eos < 0:
        raise DataError("data.loss_mask = 'answers' needs the eos id: set data.tokenizer_path for source_kind=tokens")
    ids = answer_ids(cfg, tokenizer_path(cfg))
    return WindowLoader(
        cfg, stream, split=split, first_window=first, num_windows=count, eos_id=eos, answer_ids=ids, **shape
    )
