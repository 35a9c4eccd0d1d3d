"""Streaming Arrow data pipeline, independent of the model.

    prepare(cfg, progress=True) -> dict          text (or the stdlib corpus) -> SentencePiece -> token shards + manifest
    verify_prepared(cfg) -> int                  sha256 of every prepared shard against the manifest (prepare --verify)
    build_loader(cfg, split=, seq_len=, micro_batch_size=, grad_accum_steps=, dp_rank=, dp_world_size=)
        -> iterator of {"input_ids": LongTensor[B, S], "labels": LongTensor[B, S]}
           (+ "doc_starts": BoolTensor[B, S] with data.return_doc_boundaries, + "window_ids": LongTensor[B])
           with .state_dict() / .load_state_dict() / .stats() / .epoch / .skipped_records / .close()
    source_config(cfg, name) -> DataConfig       one data.mixture source alone (its validation loss)
    load_tokenizer(path) -> SentencePieceProcessor; tokenizer_vocab_size(cfg) -> int; tokenizer_path(cfg) -> str

Pre-tokenized data (source_kind prepared | tokens): one global window order, independent of world size and
workers; the loader state is {"position": windows consumed over all ranks, ...}, identical on every rank (save
it once, load it on every rank, at any world size). Text sources (source_kind text): state per rank.
"""

from data_pipeline.config import DataConfig, DataError
from data_pipeline.loader import TextLoader, WindowLoader, build_loader
from data_pipeline.mixture import source_config
from data_pipeline.prepare import prepare, verify_prepared
from data_pipeline.tokenizer import load_tokenizer, tokenizer_path, tokenizer_vocab_size

__all__ = [
    "DataConfig",
    "DataError",
    "TextLoader",
    "WindowLoader",
    "build_loader",
    "load_tokenizer",
    "prepare",
    "source_config",
    "tokenizer_path",
    "tokenizer_vocab_size",
    "verify_prepared",
]
