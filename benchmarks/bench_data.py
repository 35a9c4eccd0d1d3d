"""Data pipeline throughput (medians of a few repeats; prints numbers, asserts nothing).

    python benchmarks/bench_data.py [--repeats 3] [--seq-len 1024] [--batch 8]

1. prepare on the default corpus (stdlib .py files, vocab 8192, tokenizer training included)
2. streaming pre-tokenized shards into micro-batches (source_kind=prepared), 0 and 1 worker
3. on-the-fly SentencePiece tokenization (source_kind=text), 1 worker, and bare sp.encode on one thread
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data_pipeline import DataConfig, build_loader, load_tokenizer, prepare
from data_pipeline.sources import default_corpus


def _loader_tokens_per_s(cfg: DataConfig, seq_len: int, batch: int, batches: int) -> float:
    loader = build_loader(
        cfg, split="train", seq_len=seq_len, micro_batch_size=batch, grad_accum_steps=1, dp_rank=0, dp_world_size=1
    )
    for _ in range(3):  # start the workers, fill the prefetch queue
        next(loader)
    start = time.perf_counter()
    for _ in range(batches):
        next(loader)
    seconds = time.perf_counter() - start
    loader.close()
    return batches * batch * seq_len / seconds


def _median(label: str, values: list[float], unit: str) -> None:
    print(f"{label:<58} {statistics.median(values):>14,.0f} {unit}   (runs: {', '.join(f'{v:,.0f}' for v in values)})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--batches", type=int, default=200)
    args = parser.parse_args()
    print(f"cpus={os.cpu_count()} seq_len={args.seq_len} micro_batch={args.batch} repeats={args.repeats}")

    with tempfile.TemporaryDirectory() as tmp:
        prepared = os.path.join(tmp, "stdlib")
        runs = [prepare(DataConfig(prepared_dir=prepared), progress=False) for _ in range(args.repeats)]
        s = runs[-1]
        print(f"default corpus: {s['documents']} files, {s['bytes'] / 1e6:.1f} MB, {s['tokens']:,} tokens")
        _median("prepare, default corpus (incl. tokenizer training) [s]", [r["seconds"] for r in runs], "s")
        _median("prepare, default corpus", [r["tokens"] / r["seconds"] for r in runs], "tokens/s")

        for workers in (0, 1):
            cfg = DataConfig(prepared_dir=prepared, num_workers=workers)
            values = [_loader_tokens_per_s(cfg, args.seq_len, args.batch, args.batches) for _ in range(args.repeats)]
            _median(f"pre-tokenized shards -> batches, {workers} worker(s)", values, "tokens/s")

        texts = [open(f, encoding="utf-8").read() for f in default_corpus()[:300]]
        source = os.path.join(tmp, "text.parquet")
        pq.write_table(pa.table({"text": texts}), source, row_group_size=10)
        tok = os.path.join(prepared, "tokenizer.model")
        sp = load_tokenizer(tok)
        encode = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            n = sum(len(sp.encode(text)) for text in texts)
            encode.append(n / (time.perf_counter() - start))
        _median("SentencePiece encode alone, 1 thread", encode, "tokens/s")
        # small shuffle groups so the timed batches include the tokenization of many groups, not a filled buffer
        cfg = DataConfig(
            source_kind="text", sources=[source], tokenizer_path=tok, num_workers=1, val_fraction=0.0, shuffle_buffer=16
        )
        values = [_loader_tokens_per_s(cfg, args.seq_len, args.batch, args.batches) for _ in range(args.repeats)]
        _median("on-the-fly tokenization -> batches, 1 worker", values, "tokens/s")


if __name__ == "__main__":
    main()
