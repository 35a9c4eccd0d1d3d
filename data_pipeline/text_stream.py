"""source_kind=text: tokenize Parquet/Arrow/plain-text sources on the fly in DataLoader workers.

Work is split by unit (row group / record batch / file): each epoch permutes the split's units with (seed,
epoch); worker slot q = rank * num_workers + worker takes every (world_size * num_workers)-th of them. A worker
reads units until it holds >= shuffle_buffer windows (a *group*: the units' documents tokenized, each followed by
eos, concatenated and cut into windows of S + 1 tokens with stride S; the tail < S + 1 tokens is dropped), yields
the group's windows in a seeded random order, and moves on.

The worker state is (epoch, cursor = index of the group's first unit, windows taken from the group, skip counts
before the group): small, so StatefulDataLoader snapshots it with every batch; resuming re-reads and re-tokenizes
one group. Limit: the order is deterministic per (world size, num_workers), not independent of them (splitting
by window would need every rank to tokenize everything), so exact resume needs the same world size and
num_workers; elastic resume is exact only for pre-tokenized data (source_kind prepared/tokens).
"""

import numpy as np
from torch.utils.data import IterableDataset, get_worker_info

from data_pipeline.config import DataConfig, DataError
from data_pipeline.shuffle import permute, shuffle_key
from data_pipeline.sources import Unit, read_documents
from data_pipeline.tokenizer import load_tokenizer
from data_pipeline.windows import SPLIT_CODES, epoch_order, make_batch

_COUNTS = ("skipped_records", "skipped_files")
_START = {"epoch": 0, "cursor": 0, "taken": 0, "skipped_records": 0, "skipped_files": 0}


class TextWindows(IterableDataset):
    """Yields this rank/worker's micro-batches forever, with meta keys _worker, _epoch, _skipped_records,
    _skipped_files (popped by the loader)."""

    def __init__(
        self,
        units: list[Unit],
        cfg: DataConfig,
        *,
        tokenizer_path: str,
        split: str,
        seq_len: int,
        micro_batch_size: int,
        dp_rank: int,
        dp_world_size: int,
        eos_id: int,
    ):
        self.units, self.cfg, self.tokenizer_path, self.split = units, cfg, tokenizer_path, split
        self.seq_len, self.micro_batch_size, self.dp_rank, self.dp_world_size = (
            seq_len,
            micro_batch_size,
            dp_rank,
            dp_world_size,
        )
        self.eos_id = eos_id
        self._state = self._resume = None

    def state_dict(self) -> dict:
        return dict(self._state or _START)

    def load_state_dict(self, state: dict) -> None:
        self._resume = dict(state)

    def _group(self, units: list[Unit], cursor: int, sp, counts: dict) -> tuple[np.ndarray, int]:
        """Tokens of the group starting at units[cursor] and the index after its last unit."""
        parts, n, end = [], 0, cursor
        while end < len(units) and n < self.cfg.shuffle_buffer * self.seq_len + 1:
            texts = [text for _, text in read_documents(units[end], self.cfg, counts) if text]
            for ids in sp.encode(texts, num_threads=1):
                parts.append(np.array(ids + [self.eos_id], dtype=np.int64))
                n += len(ids) + 1
            end += 1
        return (np.concatenate(parts) if parts else np.zeros(0, np.int64)), end

    def _windows(self, slot: int, stride: int):
        sp = load_tokenizer(self.tokenizer_path)
        state, self._resume = self._resume or _START, None  # a new iterator without a loaded state starts over
        self._state = dict(state)
        epoch, cursor, taken = state["epoch"], state["cursor"], state["taken"]
        before = {k: state[k] for k in _COUNTS}
        s = self.seq_len
        while True:
            unit_order = epoch_order(np.arange(len(self.units)), len(self.units), self.cfg.seed, self.split, epoch)
            mine = [self.units[i] for i in unit_order[slot::stride]]
            produced = cursor > 0 or taken > 0
            while cursor < len(mine):
                counts = dict(before)
                tokens, end = self._group(mine, cursor, sp, counts)
                n = max(len(tokens) - 1, 0) // s
                key = shuffle_key(self.cfg.seed, SPLIT_CODES[self.split], epoch, stride, slot, cursor)
                window_order = permute(np.arange(n), n, key)
                for k in range(taken, n):
                    self._state = {"epoch": epoch, "cursor": cursor, "taken": k + 1, **before}
                    produced = True
                    w = window_order[k]
                    yield tokens[w * s : w * s + s + 1], epoch, counts
                cursor, taken, before = end, 0, counts
            if not produced:
                raise DataError(
                    f"text {self.split} split: worker slot {slot} of {stride} got no window of seq_len+1={s + 1} tokens "
                    f"from its {len(mine)} unit(s) in a whole epoch (documents too short or all skipped)"
                )
            epoch, cursor = epoch + 1, 0

    def __iter__(self):
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        windows = self._windows(self.dp_rank * num_workers + worker, self.dp_world_size * num_workers)
        while True:
            rows = [next(windows) for _ in range(self.micro_batch_size)]
            batch = make_batch(np.stack([r[0] for r in rows]), self.eos_id, self.cfg.return_doc_boundaries)
            counts = rows[-1][2]
            batch.update(
                _worker=worker,
                _epoch=rows[-1][1],
                _skipped_records=counts["skipped_records"],
                _skipped_files=counts["skipped_files"],
            )
            yield batch
