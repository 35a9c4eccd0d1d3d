"""Weighted mixtures of prepared datasets, with the global window order still a pure function of (seed, position).

The stream is cut into blocks of data.mixture_block windows. Each block holds exactly per_block[s] windows of
source s (weight x block, largest remainder) in an order permuted by (seed, split, segment, block); a source's
windows are taken in its own epoch order (a permutation per (seed, split, epoch, source)), so position p ->
(source, k-th window of that source) is computed in O(1) from p, on any rank, at any world size: exact and
elastic resume work as for one dataset (windows.py), and every block has the weights' shares to 1/block.

A weight change on resume starts a new *segment* at the resume position: the state keeps each segment's start,
per_block and the windows each source had given before it, so the order before the change never moves.
"""

import functools
import logging
from dataclasses import replace

import numpy as np

from data_pipeline.config import DataConfig, DataError
from data_pipeline.loader import WindowLoader, answer_ids, prepared_stream
from data_pipeline.shards import TokenStream
from data_pipeline.shuffle import permute, shuffle_key
from data_pipeline.tokenizer import tokenizer_path
from data_pipeline.windows import SPLIT_CODES, WindowBatches

log = logging.getLogger(__name__)


def per_block(weights: list[float], block: int) -> list[int]:
    """Windows of each source in a block of `block`: weight shares, largest remainder (sums to block)."""
    exact = np.array(weights, dtype=np.float64) / sum(weights) * block
    counts = np.floor(exact).astype(np.int64)
    for s in np.argsort(-(exact - counts), kind="stable")[: block - counts.sum()]:
        counts[s] += 1
    return counts.tolist()


class MixtureOrder:
    """position -> (source, index in that source's stream). segments: [start, per_block, counts before start]."""

    def __init__(self, seed: int, split: str, block: int, segments: list[list]):
        self.seed, self.split, self.block = seed, split, block
        self.segments = [[int(a), list(b), list(c)] for a, b, c in segments]

    def _where(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        starts = np.array([g[0] for g in self.segments])
        g = np.searchsorted(starts, positions, side="right") - 1
        b, k = np.divmod(positions - starts[g], self.block)
        return g, b, k

    @functools.lru_cache(maxsize=16)  # noqa: B019 (one order per loader, a handful of blocks in use)
    def _block(self, g: int, b: int) -> tuple[np.ndarray, np.ndarray]:
        """Source of each slot of block b of segment g, and each slot's rank among its source's slots."""
        slots = np.repeat(np.arange(len(self.segments[g][1])), self.segments[g][1])
        key = shuffle_key(self.seed, SPLIT_CODES[self.split], 101, g + 1, b + 1)
        slots = slots[permute(np.arange(self.block), self.block, key)]
        ranks = np.empty(self.block, dtype=np.int64)
        for s in range(len(self.segments[g][1])):
            here = np.flatnonzero(slots == s)
            ranks[here] = np.arange(len(here))
        return slots, ranks

    def locate(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(source, index in the source's window stream) of each position."""
        g, b, k = self._where(positions)
        sources, index = np.empty_like(positions), np.empty_like(positions)
        for gi, bi in set(zip(g.tolist(), b.tolist())):
            here = (g == gi) & (b == bi)
            slots, ranks = self._block(gi, bi)
            src = slots[k[here]]
            sources[here] = src
            counts, blocks = np.array(self.segments[gi][2]), np.array(self.segments[gi][1])
            index[here] = counts[src] + bi * blocks[src] + ranks[k[here]]
        return sources, index

    def counts(self, position: int) -> np.ndarray:
        """Windows each source has given to positions [0, position)."""
        g, b, k = (int(x[0]) for x in self._where(np.array([position])))
        slots, _ = self._block(g, b)
        blocks = np.array(self.segments[g][1])
        return np.array(self.segments[g][2]) + b * blocks + np.bincount(slots[:k], minlength=len(blocks))

    def reweight(self, position: int, blocks: list[int]) -> None:
        """New per_block from `position` on; the order before it is unchanged."""
        counts = self.counts(position).tolist()
        if self.segments[-1][0] == position:
            self.segments.pop()
        self.segments.append([position, list(blocks), counts])
        self._block.cache_clear()


class MixtureBatches(WindowBatches):
    """WindowBatches over several sources: window ids are global (source s holds ids [first[s], first[s] + N_s))."""

    def __init__(self, batches: WindowBatches, streams: list[TokenStream], windows: list[int], order: MixtureOrder):
        vars(self).update(vars(batches))  # the loader's settings (shape, rank, position, seed, ...)
        self.streams, self.windows, self.order = streams, windows, order
        self.first = np.cumsum([0, *windows])

    def windows_at(self, positions: np.ndarray) -> np.ndarray:
        sources, index = self.order.locate(positions)
        ids = np.empty_like(index)
        for s in np.unique(sources):
            here, n = sources == s, self.windows[s]
            epochs, offset = np.divmod(index[here], n)
            local = np.empty_like(offset)
            for epoch in np.unique(epochs):
                key = shuffle_key(self.seed, SPLIT_CODES[self.split], int(epoch), int(s) + 1)
                local[epochs == epoch] = permute(offset[epochs == epoch], n, key)
            ids[here] = self.first[s] + local
        return ids

    def window_tokens(self, w: int) -> np.ndarray:
        s = int(np.searchsorted(self.first, w, side="right")) - 1
        start = int(w - self.first[s]) * self.seq_len
        return self.streams[s].read(start, start + self.seq_len + 1)


class MixtureLoader(WindowLoader):
    """Micro-batches of a mixture. State: the position and the mixture's segments (identical on every rank);
    stats() adds each source's realised share (the trainer logs it to TensorBoard as data/share/<name>)."""

    def __init__(self, cfg: DataConfig, streams: list[TokenStream], windows: list[int], *, split: str, **kw):
        super().__init__(cfg, streams[0], split=split, first_window=0, num_windows=sum(windows), **kw)
        sources = cfg.mixture_sources()
        self.names, self.streams, self.windows = [n for n, _, _ in sources], streams, windows
        self.blocks = per_block([w for _, w, _ in sources], cfg.mixture_block)
        self.order = MixtureOrder(cfg.seed, split, cfg.mixture_block, [[0, self.blocks, [0] * len(windows)]])

    def _dataset(self) -> MixtureBatches:
        return MixtureBatches(super()._dataset(), self.streams, self.windows, self.order)

    def stats(self) -> dict:
        shares = self.order.counts(self.position) / max(self.position, 1)
        return {**super().stats(), **{f"share/{n}": float(v) for n, v in zip(self.names, shares)}}

    def state_dict(self) -> dict:
        mixture = {"names": self.names, "windows": self.windows, "block": self.cfg.mixture_block}
        return {**super().state_dict(), "mixture": {**mixture, "segments": self.order.segments}}

    def load_state_dict(self, state: dict) -> None:
        """Resume the saved order; weights that differ from the saved ones apply from this position on."""
        saved = state.get("mixture") or {}
        for key, mine in (("names", self.names), ("windows", self.windows), ("block", self.cfg.mixture_block)):
            if saved.get(key) != mine:
                raise DataError(
                    f"loader state was saved with mixture {key}={saved.get(key)!r} but data.mixture gives {mine!r} "
                    f"(sources can be re-weighted on resume, not added, removed, re-prepared or re-blocked)"
                )
        super().load_state_dict(state)
        self.order = MixtureOrder(self.cfg.seed, self.split, self.cfg.mixture_block, saved["segments"])
        old = self.order.segments[-1][1]
        if old != self.blocks:
            self.order.reweight(self.position, self.blocks)
            block = self.cfg.mixture_block
            change = ", ".join(
                f"{n} {o / block:.3f} -> {b / block:.3f}" for n, o, b in zip(self.names, old, self.blocks)
            )
            log.warning(
                "data mixture (%s) re-weighted from window position %d (step %d) on: %s",
                self.split,
                self.position,
                self.position // self.global_batch_windows,
                change,
            )


def source_config(cfg: DataConfig, name: str) -> DataConfig:
    """The config of data.mixture source `name` alone (e.g. for its validation loss), with the shared tokenizer."""
    directory = {n: d for n, _, d in cfg.mixture_sources()}[name]
    return replace(cfg, mixture=[], prepared_dir=directory, tokenizer_path=tokenizer_path(cfg))


def mixture_loader(cfg: DataConfig, *, split: str, **shape) -> MixtureLoader:
    """build_loader for data.mixture: every source a prepared dataset read with the same tokenizer."""
    streams, windows, eos = [], [], -1
    for name, _, directory in cfg.mixture_sources():
        stream, eos = prepared_stream(source_config(cfg, name), split)
        n = max(len(stream) - 1, 0) // shape["seq_len"]
        if n < 1:
            raise DataError(f"data.mixture source {name} ({directory}, {split}): {len(stream)} tokens hold no window")
        streams.append(stream)
        windows.append(n)
    ids = answer_ids(cfg, tokenizer_path(cfg))
    return MixtureLoader(cfg, streams, windows, split=split, eos_id=eos, answer_ids=ids, **shape)
