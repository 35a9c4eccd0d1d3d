"""SentencePiece: training a lossless tokenizer for prepare, loading one, and resolving which file a config means."""

import hashlib
import io
import os
from collections.abc import Iterable, Iterator

import sentencepiece as spm

from data_pipeline.config import DataConfig, DataError

TOKENIZER_FILE = "tokenizer.model"
_MAX_SENTENCE_BYTES = 16384


def tokenizer_path(cfg: DataConfig) -> str:
    """The .model a config means: data.tokenizer_path, else the one prepare wrote into data.prepared_dir (with a
    mixture: into the first source's; the loader checks that every source was prepared with it)."""
    directory = cfg.mixture_sources()[0][2] if cfg.mixture else cfg.prepared_dir
    return cfg.tokenizer_path or os.path.join(directory, TOKENIZER_FILE)


def load_tokenizer(path: str) -> spm.SentencePieceProcessor:
    """Load a SentencePiece model; DataError naming the file when it is missing or not a model."""
    if not os.path.isfile(path):
        raise DataError(f"tokenizer {path} does not exist (run prepare, or set data.tokenizer_path)")
    try:
        return spm.SentencePieceProcessor(model_file=path)
    except (OSError, RuntimeError) as err:
        raise DataError(f"tokenizer {path} is not a SentencePiece model: {err}") from None


def check_vocab_size(sp: spm.SentencePieceProcessor, cfg: DataConfig, path: str) -> None:
    """The tokenizer's vocabulary must be data.vocab_size: shards are typed and checked by it (the trainer then
    checks it against model.vocab_size)."""
    if sp.vocab_size() != cfg.vocab_size:
        raise DataError(f"tokenizer {path} has vocab size {sp.vocab_size()} but data.vocab_size = {cfg.vocab_size}")


def tokenizer_vocab_size(cfg: DataConfig) -> int:
    """Vocabulary size of the tokenizer the config uses (the trainer checks it against model.vocab_size)."""
    return load_tokenizer(tokenizer_path(cfg)).vocab_size()


def file_sha256(path: str) -> str:
    """Hex sha256 of a file, read in 8 MiB blocks (shards can be large)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 23):
            digest.update(block)
    return digest.hexdigest()


def write_atomic(path: str, data: bytes) -> None:
    """Write `path` via path.tmp + os.replace, so readers see the old file or the whole new one."""
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _paragraphs(texts: Iterable[str], max_bytes: int) -> Iterator[str]:
    """Training sentences: paragraphs (split at blank lines, so pieces can learn newlines and indentation),
    cut to SentencePiece's sentence limit, until `max_bytes` of text has been offered."""
    seen = 0
    for text in texts:
        for para in text.split("\n\n"):
            for i in range(0, len(para), _MAX_SENTENCE_BYTES // 4):
                chunk = para[i : i + _MAX_SENTENCE_BYTES // 4]
                if chunk.strip():
                    yield chunk
        seen += len(text.encode("utf-8"))
        if seen >= max_bytes:
            return


def train_tokenizer(texts: Iterable[str], cfg: DataConfig, path: str) -> None:
    """Train a byte-fallback SentencePiece model on `texts` and write it atomically to `path`.

    Identity normalisation, no dummy prefix and kept whitespace make decode(encode(x)) == x for any UTF-8 text
    (except the U+2581 character, which SentencePiece uses for spaces); byte fallback means no <unk> for unseen
    characters. ids: unk=0, bos=1, eos=2 (documents are separated by eos)."""
    if cfg.vocab_size < 260:
        raise DataError(
            f"data.vocab_size={cfg.vocab_size} is too small: byte fallback needs 256 byte pieces + unk/bos/eos"
        )
    model = io.BytesIO()
    spm.set_random_generator_seed(cfg.seed + 1)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_paragraphs(texts, cfg.tokenizer_train_bytes),
            model_writer=model,
            model_type=cfg.tokenizer_type,
            vocab_size=cfg.vocab_size,
            byte_fallback=True,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            allow_whitespace_only_pieces=True,
            split_digits=True,
            character_coverage=0.9995,
            input_sentence_size=cfg.tokenizer_sentences,
            shuffle_input_sentence=True,
            max_sentence_length=_MAX_SENTENCE_BYTES,
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=-1,
            user_defined_symbols=([cfg.answer_marker] if cfg.answer_marker else []) + list(cfg.user_symbols),
            num_threads=os.cpu_count() or 1,
            minloglevel=2,
        )
    except RuntimeError as err:
        raise DataError(
            f"SentencePiece could not train data.vocab_size={cfg.vocab_size} ({cfg.tokenizer_type}) on this text: {err}"
        ) from None
    write_atomic(path, model.getvalue())
