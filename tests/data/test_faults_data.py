"""Fault injection, data side: each case breaks an input or an output the way a user would meet it
and checks the one-line error (naming the file/key), the exit code, and that earlier outputs stay.

prepare.py cases run its CLI entry point in-process (`main(argv)`: the same code as the command,
minus interpreter start-up), one in a subprocess, and the SIGKILL case kills a real run.
"""
import gzip
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from train_utils import ROOT, load_script
import zstandard

from data_pipeline import corpus
from data_pipeline.prepare import main as prepare_main
from data_pipeline.prepare import prepare

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
LINES = b"".join(json.dumps({"text": f"document {i}: " + "word " * (i % 40)}).encode() + b"\n" for i in range(3000))


def _flip(b: bytes, at: int, n: int = 16) -> bytes:
    return b[:at] + bytes(x ^ 0xFF for x in b[at:at + n]) + b[at + n:]


def _write_inputs(d):
    """Every kind of bad input file, plus one good one."""
    z = zstandard.ZstdCompressor().compress(LINES)
    g = gzip.compress(LINES)
    (d / "good.jsonl").write_bytes(LINES[:LINES.index(b"\n", 20_000) + 1])
    (d / "cut.jsonl.zst").write_bytes(z[:len(z) // 2])
    (d / "cut.jsonl.gz").write_bytes(g[:len(g) // 2])
    (d / "flipped.jsonl.gz").write_bytes(_flip(g, len(g) // 2))
    (d / "latin1.txt").write_bytes("café au lait\n".encode("latin-1"))
    (d / "empty.txt").write_bytes(b"")
    (d / "content.jsonl").write_text("".join(json.dumps({"id": i, "content": f"doc {i}"}) + "\n" for i in range(5)))
    pq.write_table(pa.table({"body": ["a row", "another row"], "url": ["u1", "u2"]}), d / "body.parquet")


# (case, --input files, extra flags, exit code, what stderr must say, documents when it succeeds)
PREPARE_CASES = [
    ("truncated .zst", ["cut.jsonl.zst"], [], 2, ["cut.jsonl.zst: truncated", "--skip-bad-files"], None),
    ("truncated .gz", ["cut.jsonl.gz"], [], 2, ["cut.jsonl.gz: truncated"], None),
    ("corrupt .gz", ["good.jsonl", "flipped.jsonl.gz"], [], 2, ["flipped.jsonl.gz: unreadable"], None),
    ("non-UTF-8 .txt", ["latin1.txt"], [], 2, ["latin1.txt: not UTF-8 text (byte 3", "iconv"], None),
    ("empty .txt", ["empty.txt"], [], 2, ["no documents in", "empty.txt", "1 empty"], None),
    ("wrong --text-key (jsonl)", ["content.jsonl"], [], 2,
     ["content.jsonl with --text-key 'text'", "5 missing_text", "has keys ['id', 'content']"], None),
    ("wrong --text-key (parquet)", ["body.parquet"], ["--text_key", "text"], 2,
     ["body.parquet with --text-key 'text'", "has keys ['body', 'url']"], None),
    ("bad files skipped", ["good.jsonl", "cut.jsonl.zst", "latin1.txt", "cut.jsonl.gz"], ["--skip-bad-files"], 0,
     ["warning: skipped bad file", "cut.jsonl.zst: truncated", "latin1.txt: not UTF-8", "cut.jsonl.gz"], "good"),
    ("only bad files, skipped", ["cut.jsonl.zst", "cut.jsonl.gz"], ["--skip_bad_files"], 2,
     ["no records in (none)", "2 bad file(s) skipped: ", "cut.jsonl.zst"], None),
]


@pytest.mark.parametrize("case,inputs,flags,code,says,docs", PREPARE_CASES, ids=[c[0] for c in PREPARE_CASES])
def test_prepare_faults(tmp_path, capsys, case, inputs, flags, code, says, docs):
    _write_inputs(tmp_path)
    out = tmp_path / "out"
    rc = prepare_main(["--input", *[str(tmp_path / f) for f in inputs], "--tokenizer", "qwen3", "--out", str(out),
                       "--shards", "1", "--workers", "0", "--no-progress", *flags])
    cap = capsys.readouterr()
    assert rc == code, cap.err
    for s in says:
        assert s in cap.err, (s, cap.err)
    if code:
        assert len(cap.err.strip().splitlines()) == 1, cap.err  # one line, no traceback
        assert not out.exists()  # nothing written: a corrected re-run can use the same --out
    else:
        st = json.load(open(out / "stats.json"))
        summary = json.loads(cap.out)
        n_good = (tmp_path / "good.jsonl").read_bytes().count(b"\n")
        assert st["documents"] == summary["documents"] == n_good
        assert summary["skipped_files"] == 3 and sorted(os.path.basename(f) for f in st["skipped_files"]) == [
            "cut.jsonl.gz", "cut.jsonl.zst", "latin1.txt"]
        assert json.load(open(out / "plan.json"))["skipped_files"] == st["skipped_files"]
        # the same command again is a no-op (same plan), and says again what it left out
        assert prepare_main(["--input", *[str(tmp_path / f) for f in inputs], "--tokenizer", "qwen3", "--out",
                             str(out), "--shards", "1", "--no-progress", *flags]) == 0
        assert "skipped bad file" in capsys.readouterr().err


def test_truncated_zst_as_a_command(tmp_path):
    """What the user types: exit 2, one line on stderr naming the file; used to be exit 0, 1,424 of 3,000."""
    _write_inputs(tmp_path)
    r = subprocess.run([sys.executable, "data_pipeline/prepare.py", "--input", str(tmp_path / "cut.jsonl.zst"),
                        "--tokenizer", "qwen3", "--out", str(tmp_path / "out"), "--shards", "1", "--no-progress"],
                       cwd=REPO, capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert f"{tmp_path / 'cut.jsonl.zst'}: truncated" in r.stderr and r.stdout == ""


def test_zst_reader_keeps_multi_frame_files_whole(tmp_path):
    one = zstandard.ZstdCompressor().compress(LINES)
    (tmp_path / "two.jsonl.zst").write_bytes(one + one)
    assert corpus.count(str(tmp_path / "two.jsonl.zst")) == 6000
    raws = list(corpus.iter_raw(str(tmp_path / "two.jsonl.zst")))
    assert len(raws) == 6000 and raws[3000].payload == raws[0].payload


# --- reading prepared shards -----------------------------------------------------------------
@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    d = tmp_path_factory.mktemp("faults")
    rng = np.random.default_rng(0)
    words = [f"w{k}" for k in range(3000)]  # varied text: the shards' chunks hold real bytes
    (d / "in.jsonl").write_text("".join(json.dumps({"text": " ".join(rng.choice(words, 1 + i % 60))}) + "\n"
                                        for i in range(400)))
    prepare([str(d / "in.jsonl")], "qwen3", str(d / "ds"), shards=2, workers=0, progress=False)
    return d, _read_all(str(d / "ds"))


def _data_end(b: bytes) -> int:
    """Where the records of an ArrayRecord file end (the rest is padding and the index)."""
    return b.index(b"\0" * 256, 64)


def _read_all(path):
    from data_pipeline.pipeline import make_dataset
    it = make_dataset(path, seq_len=128, global_batch_size=2, process_index=0, process_count=1, num_epochs=1)
    try:
        return sum(int(b["segment_ids"].astype(bool).sum()) for b in it)
    finally:
        it.close()


# (case, how the second shard is damaged, when the error comes, what it says)
SHARD_CASES = [
    ("truncated shard", lambda f: open(f, "r+b").truncate(os.path.getsize(f) // 3), "open",
     ["shard-00001-of-00002.array_record:", "delete", "shard-00001-of-00002.json"]),
    ("flipped bytes", lambda f: open(f, "r+b").write(_flip(open(f, "rb").read(), _data_end(open(f, "rb").read()) // 2)),
     "read", ["shard-00001-of-00002.array_record: record ", "cannot be read", "hash mismatch"]),
    ("missing shard", os.remove, "open", ["shard-00001-of-00002.array_record: missing"]),
    ("lengths file of another shard", lambda f: shutil.copy(f.replace("00001-", "00000-").replace(
        ".array_record", ".lengths.npy"), f.replace(".array_record", ".lengths.npy")), "open",
     ["shard-00001-of-00002.lengths.npy: 200 lengths for 200 records"]),
]


@pytest.mark.parametrize("case,damage,when,says", SHARD_CASES, ids=[c[0] for c in SHARD_CASES])
def test_damaged_shard_names_file_and_record(prepared, tmp_path, case, damage, when, says):
    from data_pipeline.shards import ShardError
    prepared, tokens = prepared
    ds = tmp_path / "ds"
    shutil.copytree(prepared / "ds", ds)
    bad = str(ds / "shard-00001-of-00002.array_record")
    damage(bad)
    if case == "lengths file of another shard":  # same count, other lengths: only a record's size gives it away
        says, when = ["shard-00001-of-00002.array_record: record ", "bytes, its length says"], "read"
    with pytest.raises(ShardError) as e:
        _read_all(str(ds))
    assert all(s in str(e.value) for s in says), str(e.value)
    if when == "open":  # found by make_dataset itself, before any batch
        from data_pipeline.pipeline import load_stats
        from data_pipeline.shards import ShardSource
        with pytest.raises(ShardError):
            ShardSource(str(ds), load_stats(str(ds)))
    # the fix the message gives: delete the shard's .json, re-run prepare → the same bytes, all tokens back
    good = (prepared / "ds" / "shard-00000-of-00002.array_record").read_bytes()
    os.remove(ds / "shard-00001-of-00002.json")
    st = prepare([str(prepared / "in.jsonl")], "qwen3", str(ds), shards=2, workers=0, progress=False)
    assert st["last_run_shards_written"] == [1]
    assert (ds / "shard-00000-of-00002.array_record").read_bytes() == good  # the intact shard was kept
    assert (ds / "shard-00001-of-00002.array_record").read_bytes() == (
        prepared / "ds" / "shard-00001-of-00002.array_record").read_bytes()
    assert _read_all(str(ds)) == tokens


def test_half_written_stats_and_plan(prepared, tmp_path, capsys):
    from data_pipeline.pipeline import make_dataset
    prepared = prepared[0]
    ds = tmp_path / "ds"
    shutil.copytree(prepared / "ds", ds)
    (ds / "stats.json").write_text('{"documents": 4')
    with pytest.raises(ValueError, match=r"stats\.json: not valid JSON .*delete it"):
        make_dataset(str(ds), seq_len=64, global_batch_size=2, process_index=0, process_count=1)
    st = prepare([str(prepared / "in.jsonl")], "qwen3", str(ds), shards=2, workers=0, progress=False)
    assert st["last_run_shards_written"] == [] and st["documents"] == 400  # rebuilt from the shards' own stats
    (ds / "plan.json").write_text("{")
    argv = ["--input", str(prepared / "in.jsonl"), "--tokenizer", "qwen3", "--out", str(ds), "--shards", "2",
            "--no_progress"]
    assert prepare_main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "plan.json: not valid JSON" in err, err
    assert sorted(os.listdir(ds)) == sorted(os.listdir(prepared / "ds"))  # nothing removed


def test_inspect_data_one_line_error_and_both_flag_spellings(prepared, tmp_path, capsys):
    inspect_main = load_script(ROOT / "launch" / "inspect_data.py", "inspect_data_launch").main
    prepared = prepared[0]
    assert inspect_main([str(prepared / "ds"), "--tokenizer", "qwen3", "--seq_len", "32", "--batch-size", "1"]) == 0
    assert "⟦seg 1" in capsys.readouterr().out
    ds = tmp_path / "ds"
    shutil.copytree(prepared / "ds", ds)
    os.truncate(ds / "shard-00000-of-00002.array_record", 5000)
    assert inspect_main([str(ds), "--tokenizer", "qwen3", "--seq-len", "32"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "shard-00000-of-00002.array_record" in err, err


def test_both_spellings_of_every_multi_word_flag():
    from data_pipeline.cli import ArgumentParser
    p = ArgumentParser()
    p.add_argument("--gin_param", action="append", default=[])
    p.add_argument("--text-key", default="text")
    a = p.parse_args(["--gin-param", "A=1", "--gin_param", "B=2", "--text_key", "body"])
    assert a.gin_param == ["A=1", "B=2"] and a.text_key == "body"
    assert p.parse_args(["--text", "x"]).text_key == "x"  # an abbreviation matching both spellings is fine
    with pytest.raises(SystemExit):
        p.parse_args(["--text-keyy", "x"])


def test_builtin_cache_is_not_a_user_output_folder():
    import inspect

    from qwen3_jax.train.data import stage_mixture
    cache = inspect.signature(stage_mixture).parameters["builtin_dir"].default
    assert cache == corpus.BUILTIN_CACHE_DIR
    # the README's `prepare.py --input builtin:python-stdlib --out runs/data/stdlib` must not land in it
    assert not os.path.abspath(cache).startswith(os.path.abspath("runs/data") + os.sep), cache


# --- SIGKILL of prepare's main process ----------------------------------------------------------
def _children(pid: int) -> list[int]:
    out = []
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                stat = open(f"/proc/{p}/stat").read()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(p))
    return out


def _alive(pid: int) -> bool:
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_sigkill_of_prepare_leaves_no_worker_behind(tmp_path):
    rng = np.random.default_rng(0)
    words = [f"w{k}" for k in range(5000)]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"text": " ".join(rng.choice(words, 100))}) + "\n"
                                               for i in range(4000)))  # shards slow enough to kill mid-run
    out = tmp_path / "out"
    cmd = [sys.executable, "data_pipeline/prepare.py", "--input", str(tmp_path / "in.jsonl"), "--tokenizer", "qwen3",
           "--out", str(out), "--shards", "4", "--workers", "2", "--no-progress"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline, workers, first = time.time() + 120, [], out / "shard-00000-of-00004.json"
    while time.time() < deadline and not (len(workers) == 2 and first.exists()) and proc.poll() is None:
        workers = workers if len(workers) == 2 else _children(proc.pid)
        time.sleep(0.02)
    assert len(workers) == 2 and first.exists(), (workers, proc.poll())
    os.kill(proc.pid, signal.SIGKILL)  # mid-run: one of four shards written, the workers busy
    proc.wait()
    assert not (out / "stats.json").exists(), "the run finished before it was killed: make the input larger"
    deadline = time.time() + 20
    while time.time() < deadline and any(map(_alive, workers)):
        time.sleep(0.1)
    left = [w for w in workers if _alive(w)]
    for w in left:  # do not leave them behind even when the test fails
        os.kill(w, signal.SIGKILL)
    assert not left, f"worker processes {left} outlived their SIGKILLed parent"
    for f in os.listdir(out):  # what was finished is whole (resuming is test_prepare's killed-run test)
        if f.startswith("shard-") and f.endswith(".json"):
            assert json.load(open(out / f))["documents"] > 0
