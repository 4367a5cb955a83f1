"""prepare.py: formats, skipped records, --strict, crash + resume, the built-in corpus."""
import gzip
import json
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from array_record.python.array_record_data_source import ArrayRecordDataSource

from data_pipeline import corpus
from data_pipeline.prepare import CRASH_ENV, PrepareError, prepare
from data_pipeline.text_tokenizer import load_tokenizer

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
GOOD = ["first document", "second one\nwith two lines", "ünïcödé 日本 🎉", "x" * 50]


def _read_docs(out):
    st = json.load(open(os.path.join(out, "stats.json")))
    src = ArrayRecordDataSource([os.path.join(out, s) for s in st["shards"]])
    return [np.frombuffer(src[i], st["dtype"]).tolist() for i in range(len(src))]


@pytest.fixture
def messy(tmp_path):
    """Four files, one of each format, with every kind of bad record."""
    lines = [json.dumps({"text": GOOD[0]}).encode(),
             b'{"text": "unterminated',                        # malformed_json (line 2)
             json.dumps({"content": "no text key"}).encode(),  # missing_text
             b'{"text": "bad \xff\xfe bytes"}',                # invalid_utf8
             json.dumps({"text": "   "}).encode(),             # empty
             json.dumps({"text": GOOD[1]}).encode(),
             b'{"text": "lone surrogate \\ud800"}',            # invalid_utf8 (not encodable)
             json.dumps({"text": 42}).encode()]                # missing_text
    (tmp_path / "a.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    with gzip.open(tmp_path / "b.jsonl.gz", "wb") as f:
        f.write(json.dumps({"text": GOOD[2]}).encode() + b"\n\n")  # + a blank line: empty
    (tmp_path / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(
        json.dumps({"text": GOOD[3]}).encode()))  # no trailing newline
    pq.write_table(pa.table({"text": ["parquet row", None, ""]}), tmp_path / "d.parquet")
    (tmp_path / "e.txt").write_text("a plain text file\n")
    return tmp_path


def test_formats_and_skips(messy):
    out = str(messy / "out")
    st = prepare([str(messy / "a.jsonl"), str(messy / "*.jsonl.*"), str(messy / "d.parquet"), str(messy / "e.txt")],
                 "qwen3", out, shards=2, workers=2, progress=False)
    assert st["skipped"] == {"malformed_json": 1, "missing_text": 3, "invalid_utf8": 2, "empty": 3}
    texts = [GOOD[0], GOOD[1], GOOD[2], GOOD[3], "parquet row", "a plain text file\n"]
    tok = load_tokenizer("qwen3")
    assert _read_docs(out) == [tok.encode(t) + [151643] for t in texts]
    assert st["documents"] == 6 and st["tokens"] == sum(len(tok.encode(t)) + 1 for t in texts)
    assert sum(st["length_histogram"]["documents"]) == 6
    assert sum(st["length_histogram"]["tokens"]) == st["tokens"]
    assert st["bytes"] == sum(len(t.encode()) for t in texts)
    # a re-run is a no-op; a different plan in the same folder is refused
    assert prepare([str(messy / "a.jsonl"), str(messy / "*.jsonl.*"), str(messy / "d.parquet"),
                    str(messy / "e.txt")], "qwen3", out, shards=2, progress=False)["last_run_shards_written"] == [0, 1]
    with pytest.raises(PrepareError, match="different dataset"):
        prepare([str(messy / "a.jsonl")], "qwen3", out, shards=2, progress=False)


def test_strict_stops_with_file_and_line(messy):
    with pytest.raises(PrepareError, match=r"a\.jsonl:2: malformed_json"):
        prepare([str(messy / "a.jsonl")], "qwen3", str(messy / "o1"), shards=1, workers=0, strict=True,
                progress=False)
    assert not any(".tmp" in f or f.endswith(".array_record") for f in os.listdir(messy / "o1"))
    r = subprocess.run([sys.executable, "data_pipeline/prepare.py", "--input", str(messy / "b.jsonl.gz"),
                        "--tokenizer", "qwen3", "--out", str(messy / "o2"), "--shards", "1", "--strict",
                        "--no-progress"], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 2 and "b.jsonl.gz:2: empty" in r.stderr


def _shard_bytes(out):
    return {f: open(os.path.join(out, f), "rb").read() for f in sorted(os.listdir(out))
            if f.startswith("shard-")}


def test_killed_run_resumes_to_identical_shards(tmp_path):
    texts = [f"document {i}: " + "word " * (i % 37) for i in range(600)]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    args = [sys.executable, "data_pipeline/prepare.py", "--input", str(tmp_path / "in.jsonl"), "--tokenizer",
            "qwen3", "--shards", "6", "--workers", "0", "--no-progress"]  # this process: no worker start-ups
    crashed = str(tmp_path / "crashed")
    r = subprocess.run(args + ["--out", crashed], cwd=REPO, env={**os.environ, CRASH_ENV: "2"},
                       capture_output=True, text=True)
    assert r.returncode == 3, r.stderr  # died (os._exit) right after its 2nd shard, mid-run
    done = sorted(f for f in os.listdir(crashed) if f.endswith(".json") and f.startswith("shard-"))
    assert len(done) == 2 and not os.path.exists(os.path.join(crashed, "stats.json"))
    assert any(".tmp" in f for f in os.listdir(crashed))  # the half-written third shard
    before = {f: os.path.getmtime(os.path.join(crashed, f)) for f in os.listdir(crashed) if f.startswith("shard-")}
    r = subprocess.run(args + ["--out", crashed], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    st = json.load(open(os.path.join(crashed, "stats.json")))
    finished = sorted(int(f[len("shard-"):][:5]) for f in done)
    assert st["last_run_shards_written"] == sorted(set(range(6)) - set(finished))  # only the unfinished ones
    assert all(os.path.getmtime(os.path.join(crashed, f)) == t for f, t in before.items() if ".tmp" not in f)
    clean = str(tmp_path / "clean")
    prepare([str(tmp_path / "in.jsonl")], "qwen3", clean, shards=6, workers=2, progress=False)  # other worker count
    assert _shard_bytes(crashed) == _shard_bytes(clean)
    assert not any(".tmp" in f for f in os.listdir(crashed))
    assert st["documents"] == 600


def test_builtin_corpus(stdlib_data):
    st = json.load(open(os.path.join(stdlib_data["code"], "stats.json")))
    n_files = len(corpus.stdlib_sources())
    assert n_files > 300 and st["documents"] + sum(st["skipped"].values()) == n_files
    assert st["tokens"] > 1_000_000 and st["eos_id"] == 151643 and st["dtype"] == "uint32"
    docs = json.load(open(os.path.join(stdlib_data["docs"], "stats.json")))
    assert docs["documents"] > 300 and docs["tokens"] > 100_000
    first = _read_docs(stdlib_data["code"])[0]
    path = corpus.stdlib_sources()[0]
    assert first == load_tokenizer("qwen3").encode(open(path, encoding="utf-8").read()) + [151643]
