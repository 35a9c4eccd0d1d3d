"""prepare at scale: peak memory (RSS) and time for 1x and 8x the same corpus, side by side (prints, asserts
nothing). Memory should be flat in corpus size: each process holds one encode batch, never a file or the corpus.

    python benchmarks/bench_prepare.py [--mb 4] [--workers 2] [--files 4]

The corpus: stdlib .py files as JSON Lines, gzip-compressed, `--files` files per 1x, ~`--mb` MB of text per 1x
(8x = 8 times as many files). Each prepare runs in a fresh child process with a tokenizer trained once before;
its process tree (main, forkserver, workers) is sampled from /proc every 50 ms: the peak of the tree's summed
RSS, and the peak of its largest process.
"""

import argparse
import gzip
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data_pipeline import DataConfig, prepare
from data_pipeline.sources import default_corpus
from data_pipeline.tokenizer import train_tokenizer

VOCAB = 4096


def _texts(mb: float) -> list[str]:
    texts, size = [], 0
    for path in default_corpus():
        with open(path, encoding="utf-8") as f:
            texts.append(f.read())
        size += len(texts[-1])
        if size >= mb * 1e6:
            return texts
    return texts


def _write_corpus(folder: str, texts: list[str], files: int, copies: int) -> None:
    """`copies` x `files` .jsonl.gz files; copy k of a document ends with a comment naming k (other tokens)."""
    os.makedirs(folder)
    for k in range(copies):
        for i in range(files):
            lines = (json.dumps({"text": t + f"\n# copy {k}\n"}) + "\n" for t in texts[i::files])
            with gzip.open(os.path.join(folder, f"part-{k:03d}-{i:03d}.jsonl.gz"), "wt", compresslevel=1) as f:
                f.writelines(lines)


def _child(args: argparse.Namespace) -> None:
    cfg = DataConfig(**json.loads(args.child))
    start = time.perf_counter()
    summary = prepare(cfg, progress=False)
    print(json.dumps({"seconds": time.perf_counter() - start, "tokens": summary["tokens"], "bytes": summary["bytes"]}))


def _tree_rss_mib(root: int) -> list[float]:
    """RSS (MiB) of `root` and all its descendants, read from /proc."""
    parents = {}
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as f:
                parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
        except (ValueError, OSError):
            continue
    tree, grew = {root}, True
    while grew:
        new = {pid for pid, parent in parents.items() if parent in tree} - tree
        tree |= new
        grew = bool(new)
    rss = []
    for pid in tree:
        try:
            with open(f"/proc/{pid}/statm") as f:
                rss.append(int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20)
        except OSError:
            continue
    return rss


def _run_sampled(cmd: list[str]) -> tuple[subprocess.CompletedProcess, float, float]:
    """Run cmd; peak summed RSS of its process tree and peak RSS of its largest process (MiB)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peaks = [0.0, 0.0]

    def sample() -> None:
        while proc.poll() is None:
            rss = _tree_rss_mib(proc.pid)
            peaks[0], peaks[1] = max(peaks[0], sum(rss)), max([peaks[1], *rss])
            time.sleep(0.05)

    sampler = threading.Thread(target=sample)
    sampler.start()
    out, err = proc.communicate()
    sampler.join()
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err), peaks[0], peaks[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=float, default=4.0, help="MB of text in 1x")
    parser.add_argument("--files", type=int, default=4, help=".jsonl.gz files in 1x")
    parser.add_argument("--workers", type=int, default=0, help="data.prepare_workers (0 = one per core)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return _child(args)
    texts = _texts(args.mb)
    with tempfile.TemporaryDirectory() as tmp:
        tok = os.path.join(tmp, "tok.model")
        train_tokenizer(texts, DataConfig(vocab_size=VOCAB, tokenizer_train_bytes=2_000_000), tok)
        rows = {}
        for scale in (1, 8):
            src = os.path.join(tmp, f"src{scale}")
            _write_corpus(src, texts, args.files, scale)
            cfg = {
                "sources": [src],
                "prepared_dir": os.path.join(tmp, f"out{scale}"),
                "tokenizer_path": tok,
                "vocab_size": VOCAB,
                "prepare_workers": args.workers,
                "shard_tokens": 1 << 20,
            }
            run, total, largest = _run_sampled([sys.executable, __file__, "--child", json.dumps(cfg)])
            if run.returncode:
                sys.exit(run.stderr)
            rows[scale] = {**json.loads(run.stdout.strip().splitlines()[-1]), "total": total, "largest": largest}
    print(f"prepare, {args.workers or len(os.sched_getaffinity(0))} worker process(es), .jsonl.gz, vocab {VOCAB}")
    print(
        f"{'corpus':<8} {'text MB':>8} {'tokens':>12} {'seconds':>8} {'peak RSS, all processes MiB':>28} {'largest process MiB':>20}"
    )
    for scale, r in rows.items():
        print(
            f"{scale}x{'':<6} {r['bytes'] / 1e6:>8.1f} {r['tokens']:>12,} {r['seconds']:>8.1f} "
            f"{r['total']:>28.0f} {r['largest']:>20.0f}"
        )


if __name__ == "__main__":
    main()
