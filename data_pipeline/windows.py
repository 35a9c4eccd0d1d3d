"""The canonical window order of pre-tokenized data, and micro-batches cut from it.

A split's token stream of n tokens holds N = (n - 1) // S windows of S + 1 tokens with stride S (window w =
tokens[w*S : w*S + S + 1]; inputs are its first S tokens, labels its last S). Epoch e visits all N windows in
the order of a permutation keyed by (seed, split, e) (shuffle.py); epochs follow each other into one infinite
stream, and stream position p is window perm_{p // N}(p % N). Nothing here depends on world size or workers:

    micro-batch m of rank r (after the loader starts at position p0) = positions p0 + m*B*W + r*B + [0, B)

so after k micro-batches on every rank exactly the prefix [0, p0 + k*B*W) has been consumed: one integer is the
whole loader state, the same on every rank, and valid for any other (B, W) on resume.
"""

import numpy as np
import torch
from torch.utils.data import Dataset

from data_pipeline.shards import TokenStream
from data_pipeline.shuffle import permute, shuffle_key

SPLIT_CODES = {"train": 0, "val": 1}


def epoch_order(index: np.ndarray, n: int, seed: int, split: str, epoch: int) -> np.ndarray:
    """Items at `index` of the order in which `epoch` of `split` visits range(n)."""
    return permute(index, n, shuffle_key(seed, SPLIT_CODES[split], epoch))


def answer_mask(tokens: torch.Tensor, eos_id: int, answer_id: int, end_id: int | None = None) -> torch.Tensor:
    """tokens [B, S+1] -> loss_mask [B, S] (bool) of data.loss_mask = 'answers': label j (= tokens[:, j+1]) counts
    when the latest answer marker in tokens[:, :j+1] comes after the latest eos and end_id (data.answer_end) there
    (an answer and the eos or end piece closing it) and after the window's first eos (its document started inside
    the window: its prompt is whole)."""
    index = torch.arange(tokens.shape[1]).expand_as(tokens)  # [B, S+1]
    none = torch.full_like(index, -1)
    last_marker = torch.where(tokens == answer_id, index, none).cummax(dim=1).values
    ends = (tokens == eos_id) | (tokens == end_id) if end_id is not None else tokens == eos_id
    last_eos = torch.where(ends, index, none).cummax(dim=1).values
    is_eos = tokens == eos_id
    first_eos = torch.where(is_eos.any(dim=1), is_eos.int().argmax(dim=1), tokens.shape[1])  # [B]
    inside = (last_marker > last_eos) & (last_marker > first_eos[:, None])
    return inside[:, :-1].contiguous()


def make_batch(
    tokens: np.ndarray, eos_id: int, doc_starts: bool, answer_ids: tuple[int, int | None] | None = None
) -> dict:
    """tokens [B, S+1] -> input_ids [B, S], labels [B, S] (int64), optionally doc_starts [B, S] (bool:
    position 0 and every position right after an eos) and, given answer_ids (the marker's and data.answer_end's
    piece, or None), loss_mask [B, S] (answer_mask)."""
    tokens = torch.from_numpy(np.ascontiguousarray(tokens, dtype=np.int64))
    batch = {"input_ids": tokens[:, :-1].contiguous(), "labels": tokens[:, 1:].contiguous()}
    if answer_ids is not None:
        batch["loss_mask"] = answer_mask(tokens, eos_id, *answer_ids)
    if doc_starts:
        starts = torch.zeros_like(batch["input_ids"], dtype=torch.bool)  # [B, S]
        starts[:, 0] = True
        starts[:, 1:] = batch["input_ids"][:, :-1] == eos_id
        batch["doc_starts"] = starts
    return batch


class WindowBatches(Dataset):
    """Map-style dataset: index m -> this rank's m-th micro-batch counted from stream position `start`."""

    def __init__(
        self,
        stream: TokenStream,
        *,
        seq_len: int,
        first_window: int,
        num_windows: int,
        split: str,
        seed: int,
        start: int,
        micro_batch_size: int,
        dp_rank: int,
        dp_world_size: int,
        eos_id: int,
        doc_starts: bool,
        window_ids: bool,
        answer_ids: tuple[int, int | None] | None = None,
    ):
        self.stream, self.seq_len, self.first_window, self.num_windows = stream, seq_len, first_window, num_windows
        self.split, self.seed, self.start = split, seed, start
        self.micro_batch_size, self.dp_rank, self.dp_world_size = micro_batch_size, dp_rank, dp_world_size
        self.eos_id, self.doc_starts, self.window_ids = eos_id, doc_starts, window_ids
        self.answer_ids = answer_ids
        "Pieces of data.answer_marker and data.answer_end (or None) with data.loss_mask = 'answers', else None."

    def windows_at(self, positions: np.ndarray) -> np.ndarray:
        """Window ids at stream positions."""
        epochs, index = np.divmod(positions, self.num_windows)
        ids = np.empty_like(index)
        for epoch in np.unique(epochs):  # a micro-batch spans at most two epochs
            here = epochs == epoch
            ids[here] = epoch_order(index[here], self.num_windows, self.seed, self.split, int(epoch))
        return ids

    def window_tokens(self, w: int) -> np.ndarray:
        """Tokens [S + 1] of window w."""
        start = (self.first_window + w) * self.seq_len
        return self.stream.read(start, start + self.seq_len + 1)

    def __getitem__(self, m: int) -> dict:
        b = self.micro_batch_size
        positions = self.start + m * b * self.dp_world_size + self.dp_rank * b + np.arange(b)
        ids = self.windows_at(positions)
        tokens = np.stack([self.window_tokens(w) for w in ids])
        batch = make_batch(tokens, self.eos_id, self.doc_starts, self.answer_ids)
        if self.window_ids:
            batch["window_ids"] = torch.from_numpy(ids)
        return batch
