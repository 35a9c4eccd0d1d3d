"""Data settings (the `[data]` section of a job config) and the one error type the pipeline raises."""

import math
from dataclasses import dataclass, field
from typing import Literal


class DataError(ValueError):
    """Bad input data or a mismatch between data, tokenizer and config; the message names the file/field."""


@dataclass
class DataConfig:
    sources: list[str] = field(default_factory=list)
    "Text inputs for prepare / source_kind=text (Parquet, Arrow, JSON Lines .jsonl/.jsonl.gz/.json.gz/.jsonl.zst, plain text), or token shards for source_kind=tokens: files, dirs, globs, URIs; empty = the stdlib corpus."
    source_kind: Literal["prepared", "tokens", "text"] = "prepared"
    "What build_loader reads: 'prepared' (manifest.json in prepared_dir), 'tokens' (token shards in sources), 'text' (tokenize sources on the fly)."
    text_column: str = "text"
    "Column holding the documents in Parquet/Arrow text sources (string or UTF-8 binary), and the string field holding them in each JSON Lines object."
    token_column: str = "tokens"
    "Integer column holding the flat token stream in token shards (source_kind=tokens)."
    mixture: list[str] = field(default_factory=list)
    "Weighted mixture of prepared datasets sharing one tokenizer, as name=weight:prepared_dir entries (e.g. web=0.7:data/web); empty = prepared_dir alone. Changed weights on resume apply from the resume position on (logged)."
    mixture_block: int = 1000
    "Windows per mixture block: every block holds each source's share (weight x block, largest remainder) in a seeded order."
    prepared_dir: str = "data/stdlib"
    "Directory that prepare writes (tokenizer.model, Arrow shards, manifest.json) and source_kind=prepared reads."
    tokenizer_path: str = ""
    "SentencePiece .model to use; empty = prepared_dir/tokenizer.model (trained by prepare when absent)."
    vocab_size: int = 8192
    "Tokenizer vocabulary size; must equal model.vocab_size."
    tokenizer_type: Literal["bpe", "unigram"] = "bpe"
    "SentencePiece model type trained by prepare."
    tokenizer_train_bytes: int = 64_000_000
    "At most this many bytes of text (the first documents in source order) are offered to tokenizer training."
    tokenizer_sentences: int = 300_000
    "SentencePiece input_sentence_size: paragraphs sampled from the offered text for training."
    val_fraction: float = 0.02
    "Fraction held out for validation: every 1/f-th document (prepare) or Parquet row group / Arrow batch (text)."
    prepare_workers: int = 0
    "Processes that tokenize in prepare (output identical for any count); 0 = one per CPU core this process may use."
    shard_tokens: int = 1 << 26
    "Tokens per Arrow shard file written by prepare."
    shuffle_buffer: int = 1024
    "source_kind=text: windows collected (from whole row groups/batches) and shuffled together before yielding."
    num_workers: int = 0
    "DataLoader worker processes per rank; 0 = in the training process, fastest for prepared (memory-mapped) data. Use workers for source_kind=text (on-the-fly tokenization)."
    prefetch_factor: int = 4
    "Micro-batches each worker prepares ahead."
    pin_memory: bool = True
    "Pin batches in page-locked memory when CUDA is available (faster non_blocking host-to-device copies)."
    seed: int = 0
    "Seed of the data order (shuffle of windows per epoch, tokenizer sampling)."
    on_bad_record: Literal["error", "skip"] = "error"
    "Unreadable file, bad row or over-long document: raise DataError naming it, or skip it and count it in stats()."
    max_document_chars: int = 16_000_000
    "Documents longer than this are bad records (protects workers from a single huge row)."
    return_doc_boundaries: bool = False
    "Add doc_starts (BoolTensor[B, S]: True where a document starts, and at position 0) to every batch."
    loss_mask: Literal["all", "answers"] = "all"
    "Which next-token labels count in the loss: 'all', or 'answers': only the tokens after data.answer_marker up to and including the document's eos, in documents that start inside the window (a prompt whose start was cut off has no answer to learn). Batches then carry loss_mask (BoolTensor[B, S])."
    answer_marker: str = ""
    "Text that ends a prompt (loss_mask = 'answers'); prepare registers it with the tokenizer it trains as one piece."
    user_symbols: list[str] = field(default_factory=list)
    "Texts the trained tokenizer keeps as one piece wherever they occur (registered like answer_marker; the canary command sets its statements here)."
    answer_end: str = ""
    "Text that ends an answer besides the eos (loss_mask = 'answers'; one tokenizer piece, e.g. ';'), so one document can hold several prompts and answers; '' = answers end at the eos."
    return_window_ids: bool = False
    "Add window_ids (LongTensor[B]) to every batch (source_kind prepared/tokens; for tests and debugging)."

    def validate(self) -> None:
        """Raise DataError (a ValueError) naming the first bad field."""
        checks = [
            (
                self.source_kind in ("prepared", "tokens", "text"),
                f"data.source_kind must be prepared, tokens or text, got {self.source_kind!r}",
            ),
            (
                self.tokenizer_type in ("bpe", "unigram"),
                f"data.tokenizer_type must be bpe or unigram, got {self.tokenizer_type!r}",
            ),
            (
                self.on_bad_record in ("error", "skip"),
                f"data.on_bad_record must be error or skip, got {self.on_bad_record!r}",
            ),
            (self.seed >= 0, f"data.seed must be >= 0, got {self.seed}"),
            (0 < self.vocab_size < 2**31, f"data.vocab_size must be in [1, 2^31), got {self.vocab_size}"),
            (0.0 <= self.val_fraction < 1.0, f"data.val_fraction must be in [0,1), got {self.val_fraction}"),
            (bool(self.text_column), "data.text_column must not be empty"),
            (bool(self.token_column), "data.token_column must not be empty"),
            (bool(self.prepared_dir), "data.prepared_dir must not be empty"),
            (self.shard_tokens >= 1, f"data.shard_tokens must be >= 1, got {self.shard_tokens}"),
            (self.shuffle_buffer >= 1, f"data.shuffle_buffer must be >= 1, got {self.shuffle_buffer}"),
            (self.num_workers >= 0, f"data.num_workers must be >= 0, got {self.num_workers}"),
            (self.prepare_workers >= 0, f"data.prepare_workers must be >= 0, got {self.prepare_workers}"),
            (self.prefetch_factor >= 1, f"data.prefetch_factor must be >= 1, got {self.prefetch_factor}"),
            (
                self.tokenizer_train_bytes >= 1,
                f"data.tokenizer_train_bytes must be >= 1, got {self.tokenizer_train_bytes}",
            ),
            (self.tokenizer_sentences >= 1, f"data.tokenizer_sentences must be >= 1, got {self.tokenizer_sentences}"),
            (self.max_document_chars >= 1, f"data.max_document_chars must be >= 1, got {self.max_document_chars}"),
            (
                self.loss_mask in ("all", "answers"),
                f"data.loss_mask must be all or answers, got {self.loss_mask!r}",
            ),
            (
                self.loss_mask == "all" or bool(self.answer_marker),
                "data.loss_mask = 'answers' needs data.answer_marker (the text that ends a prompt)",
            ),
            (
                self.loss_mask == "all" or self.source_kind != "text",
                "data.loss_mask = 'answers' needs pre-tokenized data (data.source_kind prepared or tokens)",
            ),
            (
                self.source_kind != "tokens" or bool(self.sources),
                "data.sources must list token shards when data.source_kind = 'tokens'",
            ),
            (self.mixture_block >= 1, f"data.mixture_block must be >= 1, got {self.mixture_block}"),
            (
                not self.mixture or self.source_kind == "prepared",
                f"data.mixture needs data.source_kind = 'prepared', got {self.source_kind!r}",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise DataError(message)
        self.mixture_sources()

    def mixture_sources(self) -> list[tuple[str, float, str]]:
        """(name, weight, prepared_dir) of each data.mixture entry; DataError naming a bad one."""
        sources = []
        for entry in self.mixture:
            name, _, rest = entry.partition("=")
            weight, _, directory = rest.partition(":")
            try:
                value = float(weight)
            except ValueError:
                value = math.nan
            if not name or not directory or not math.isfinite(value) or value < 0:
                raise DataError(f"data.mixture: {entry!r} is not name=weight:prepared_dir with a finite weight >= 0")
            sources.append((name, value, directory))
        names = [n for n, _, _ in sources]
        if len(set(names)) != len(names):
            raise DataError(f"data.mixture: source names must be unique, got {names}")
        if sources and not sum(w for _, w, _ in sources) > 0:
            raise DataError("data.mixture: the weights sum to 0")
        return sources
