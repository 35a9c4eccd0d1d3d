"""Object stores through pyarrow.fs, against a real S3 API served on this machine (moto's server): prepare reads
Parquet and JSON Lines from a bucket into the very shards it writes from the same files on local disk, and a
run on remote text (source_kind=text) resumes exactly."""

import gzip
import json
import logging
import os

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from data_pipeline import DataConfig, build_loader, prepare
from data_pipeline.sources import default_corpus
from data_pipeline.tokenizer import train_tokenizer

moto_server = pytest.importorskip("moto.server")
VOCAB = 512


def _corpus(local):
    """A Parquet file (2 row groups), a .jsonl.gz and a .jsonl.zst of stdlib files, written to `local`."""
    texts = [open(f, encoding="utf-8").read() for f in default_corpus() if 1_000 < os.path.getsize(f) < 8_000][:24]
    local.mkdir()
    pq.write_table(pa.table({"text": texts[:8]}), local / "a.parquet", row_group_size=4)
    lines = "".join(json.dumps({"text": t}) + "\n" for t in texts[8:16]).encode()
    (local / "b.jsonl.gz").write_bytes(gzip.compress(lines))
    with pa.CompressedOutputStream(str(local / "c.jsonl.zst"), "zstd") as f:
        f.write("".join(json.dumps({"text": t}) + "\n" for t in texts[16:]).encode())
    return texts


@pytest.fixture(scope="module")
def bucket(tmp_path_factory):
    """(s3 URI of the corpus folder, local copy, tokenizer): the URI carries credentials and endpoint, so
    prepare's worker processes need no environment."""
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    options = f"endpoint_override={host}:{port}&scheme=http&region=us-east-1"
    root = tmp_path_factory.mktemp("s3")
    texts = _corpus(root / "local")
    fs, _ = pafs.FileSystem.from_uri(f"s3://testing:testing@corpus?{options}&allow_bucket_creation=true")
    fs.create_dir("corpus")
    for path in sorted((root / "local").iterdir()):
        with fs.open_output_stream(f"corpus/data/{path.name}", compression=None) as f:  # bytes as they are
            f.write(path.read_bytes())
    tok = str(root / "tok.model")
    train_tokenizer(texts, DataConfig(vocab_size=VOCAB), tok)
    yield f"s3://testing:testing@corpus/data?{options}", root / "local", tok
    server.stop()


def _files(out):
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.name != "manifest.json"}


@pytest.mark.slow  # worker processes
def test_prepare_from_s3_equals_prepare_from_local_files(bucket, tmp_path):
    uri, local, tok = bucket
    outs = {"s3": tmp_path / "s3", "local": tmp_path / "local"}
    for name, source in (("s3", uri), ("local", str(local))):
        cfg = DataConfig(sources=[source], prepared_dir=str(outs[name]), tokenizer_path=tok, vocab_size=VOCAB)
        summary = prepare(DataConfig(**{**cfg.__dict__, "val_fraction": 0.1, "prepare_workers": 2}), progress=False)
        assert summary["documents"] == 24
    assert _files(outs["s3"]) == _files(outs["local"])


@pytest.mark.slow  # a DataLoader worker process
def test_run_on_remote_text_resumes_exactly(bucket):
    uri, _, tok = bucket
    cfg = DataConfig(
        source_kind="text", sources=[uri], tokenizer_path=tok, vocab_size=VOCAB, val_fraction=0.0, num_workers=1
    )
    shape = dict(split="train", seq_len=32, micro_batch_size=2, grad_accum_steps=1, dp_rank=0, dp_world_size=1)
    first = build_loader(cfg, **shape)
    head = [next(first)["input_ids"] for _ in range(5)]
    state = first.state_dict()
    reference = [next(first)["input_ids"] for _ in range(8)]
    first.close()
    resumed = build_loader(cfg, **shape)
    resumed.load_state_dict(json.loads(json.dumps(state)))
    assert all((next(resumed)["input_ids"] == r).all() for r in reference)
    assert len({tuple(t.flatten().tolist()) for t in head + reference}) == 13  # 13 different batches
    resumed.close()
