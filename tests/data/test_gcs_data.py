"""The data side on a bucket, against a real GCS API server (tests/gcs_server.py): prepare.py writing
to `gs://` (complete shards, a re-run that skips, a resume that redoes only a shard without its
.json), training reading those shards directly (the same batches as from a local copy), the data
position saved into and restored from a `gs://` checkpoint, inspect_data.py on a bucket, and the
one-line errors (no dataset there, no credentials for ArrayRecord's own GCS client)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from train_utils import ROOT, load_script

from data_pipeline import prepare as prepare_mod
from qwen3_jax import storage

ARGS = ["--input", "builtin:python-stdlib-docs", "--limit", "50", "--shards", "2", "--workers", "0",
        "--no-progress"]


def _prepare(out: str, tokenizer: str) -> int:
    """prepare.py's command line, in this process (as `python data_pipeline/prepare.py ...`)."""
    return prepare_mod.main([*ARGS, "--tokenizer", tokenizer, "--out", out])


def _names(url: str) -> list[str]:
    return sorted(p.name for p in storage.path(url).iterdir())


def _download(url: str, local) -> None:
    """The files under `url` into folder `local` (same relative names)."""
    os.makedirs(local, exist_ok=True)
    for p in storage.path(url).iterdir():
        if p.is_dir():
            _download(os.fspath(p), os.path.join(local, p.name))
        else:
            storage.path(os.path.join(local, p.name)).write_bytes(p.read_bytes())


@pytest.fixture
def bucket_data(gcs_bucket, spm512):
    """A small dataset prepared into `<bucket>/data/web` with a tokenizer read from the bucket."""
    tok = f"{gcs_bucket}/tok/spm.model"
    storage.write_bytes(tok, storage.path(spm512["tokenizer"]).read_bytes())
    assert _prepare(f"{gcs_bucket}/data/web", tok) == 0
    return {"root": f"{gcs_bucket}/data", "web": f"{gcs_bucket}/data/web", "tokenizer": tok}


def _batches(data, n: int = 3, **kw) -> list[dict]:
    from data_pipeline.pipeline import make_dataset
    it = make_dataset(data, seq_len=128, global_batch_size=4, process_index=0, process_count=1, **kw)
    out = [next(it) for _ in range(n)]
    it.close()
    return out


def test_prepare_writes_complete_shards_and_resumes(bucket_data, capsys):
    web = bucket_data["web"]
    shards = [f"shard-0000{s}-of-00002{ext}" for s in range(2) for ext in (".array_record", ".json", ".lengths.npy")]
    assert _names(web) == sorted(["plan.json", "stats.json", *shards])
    stats = json.loads(storage.path(f"{web}/stats.json").read_text())
    assert stats["documents"] == 50 and stats["last_run_shards_written"] == [0, 1]
    assert stats["tokenizer"] == f"spm:{bucket_data['tokenizer']}"  # the URL, not the temporary copy
    # a re-run is a no-op: stats.json is not rewritten
    generation = storage.path(f"{web}/stats.json").stat().mtime
    assert _prepare(web, bucket_data["tokenizer"]) == 0
    assert storage.path(f"{web}/stats.json").stat().mtime == generation
    # a shard without its .json (the completion marker) is redone, and only that one
    storage.path(f"{web}/shard-00001-of-00002.json").unlink()
    assert _prepare(web, bucket_data["tokenizer"]) == 0
    again = json.loads(storage.path(f"{web}/stats.json").read_text())
    assert again["last_run_shards_written"] == [1]
    assert {k: again[k] for k in ("documents", "tokens", "shard_documents")} == \
        {k: stats[k] for k in ("documents", "tokens", "shard_documents")}
    # another dataset in the same folder is refused, naming it
    capsys.readouterr()
    assert prepare_mod.main([*ARGS[:3], "40", *ARGS[4:], "--tokenizer", bucket_data["tokenizer"], "--out", web]) == 2
    assert f"{web} holds a different dataset" in capsys.readouterr().err


def test_training_reads_the_bucket_like_a_local_copy(bucket_data, tmp_path):
    """make_dataset (through stage_mixture, as training builds it) reads the gs:// shards directly
    and gives the batches a local copy of the same folder gives. Reads from the bucket are kept
    few: against fake-gcs-server, ArrayRecord's C++ client sees one read stall for 120 s (its
    download stall timeout) after ~390 reads in a process (measured; grain reads ahead 64
    documents per dataset and data shard)."""
    from qwen3_jax.train.data import stage_mixture
    _download(bucket_data["root"], tmp_path)
    for root in (bucket_data["root"], str(tmp_path)):
        mix = stage_mixture({"web": 1.0}, root=root)
        got = _batches(mix, n=2, with_ids=True)
        if root == str(tmp_path):
            assert all(np.array_equal(a[k], b[k]) for a, b in zip(want, got) for k in a)
        want = got


def test_data_position_round_trip_in_a_bucket_checkpoint(spm512, gcs_bucket):
    """The data position goes into a gs:// orbax checkpoint (one JSON file per data shard) and
    comes back: the restored iterator continues with the batch the saved one would have given.
    (The data is local here: the emulator stalls ArrayRecord's reads after a few hundred, see
    test_training_reads_the_bucket_like_a_local_copy.)"""
    import orbax.checkpoint as ocp

    from data_pipeline.data_state import DataRestore, DataSave
    from data_pipeline.pipeline import make_dataset

    def make(seq_len=128):
        return make_dataset(spm512["docs"], seq_len=seq_len, global_batch_size=4, process_index=0,
                            process_count=1, data_shards=2)

    it = make()
    for _ in range(2):
        next(it)
    ckpt = f"{gcs_bucket}/run/checkpoints"
    with ocp.CheckpointManager(ckpt) as mgr:
        mgr.save(2, args=ocp.args.Composite(data=DataSave(it)))
        mgr.wait_until_finished()
    saved = [n for n in _names(f"{ckpt}/2/data") if n != "commit_success.txt"]  # orbax's marker on a bucket
    assert saved == ["shard_00000-of-00002.json", "shard_00001-of-00002.json"]
    want = next(it)
    with ocp.CheckpointManager(ckpt) as mgr:
        it2 = mgr.restore(2, args=ocp.args.Composite(data=DataRestore(make())))["data"]
        assert all(np.array_equal(want[k], v) for k, v in next(it2).items())
        with pytest.raises(ValueError, match=r"seq_len: 128 -> 64"):
            mgr.restore(2, args=ocp.args.Composite(data=DataRestore(make(64))))


def test_inspect_reads_the_bucket(bucket_data, capsys):
    main = load_script(ROOT / "launch" / "inspect_data.py", "inspect_data_launch").main
    assert main([bucket_data["web"], "--tokenizer", bucket_data["tokenizer"], "--seq-len", "64"]) == 0
    out = capsys.readouterr().out
    assert f"{bucket_data['web']}: 50 documents" in out and "=== batch 0: (2, 64)" in out


def test_errors_name_the_bucket_path(gcs_bucket, monkeypatch):
    from data_pipeline import shards
    from data_pipeline.pipeline import make_dataset
    missing = f"{gcs_bucket}/data/none"
    with pytest.raises(FileNotFoundError, match=f"^{missing} is not a complete prepared dataset"):
        make_dataset(missing, seq_len=64, global_batch_size=2, process_index=0, process_count=1)
    # off Google Cloud without credentials ArrayRecord's client would retry the metadata server for
    # minutes: refused at once instead
    for k in ("STORAGE_EMULATOR_HOST", "CLOUD_STORAGE_EMULATOR_ENDPOINT", "GOOGLE_APPLICATION_CREDENTIALS"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("CLOUDSDK_CONFIG", os.devnull)

    def no_metadata_server(*a, **k):
        raise OSError("Name or service not known")
    monkeypatch.setattr(shards.socket, "getaddrinfo", no_metadata_server)
    with pytest.raises(shards.ShardError, match=f"^{missing}: no Google Cloud credentials"):
        shards.check_gcs_reader(missing)


def test_inputs_on_a_bucket(gcs_bucket, spm512, tmp_path):
    """--input globs of jsonl / .jsonl.gz / parquet on a bucket give the dataset local copies give."""
    import gzip

    import pyarrow as pa
    import pyarrow.parquet as pq

    from data_pipeline.prepare import prepare
    texts = [f"document {i}: " + "word " * i for i in range(12)]
    lines = [json.dumps({"text": t}).encode() + b"\n" for t in texts]
    storage.write_bytes(f"{gcs_bucket}/raw/a.jsonl", b"".join(lines[:4]))
    storage.write_bytes(f"{gcs_bucket}/raw/b.jsonl.gz", gzip.compress(b"".join(lines[4:8])))
    pq.write_table(pa.table({"text": texts[8:]}), tmp_path / "c.parquet")
    storage.write_bytes(f"{gcs_bucket}/raw/c.parquet", (tmp_path / "c.parquet").read_bytes())
    st = prepare([f"{gcs_bucket}/raw/*.jsonl*", f"{gcs_bucket}/raw/c.parquet"], spm512["tokenizer"],
                 str(tmp_path / "out"), shards=1, workers=0, progress=False)
    assert st["documents"] == 12 and st["inputs"] == [f"{gcs_bucket}/raw/{n}" for n in
                                                       ("a.jsonl", "b.jsonl.gz", "c.parquet")]
    from data_pipeline.text_tokenizer import load_tokenizer
    tok = load_tokenizer(spm512["tokenizer"])
    assert st["tokens"] == sum(len(tok.encode(t)) + 1 for t in texts)
    with pytest.raises(FileNotFoundError, match=f"no input file matches '{gcs_bucket}/raw/\\*.txt'"):
        prepare([f"{gcs_bucket}/raw/*.txt"], spm512["tokenizer"], str(tmp_path / "none"), progress=False)


def test_qa_stages_with_everything_on_a_bucket(gcs_bucket, spm512, tmp_path):
    """The QA stages with the corpus, the benchmark file and --out on a bucket: the same files, the
    same bytes as a local --out."""
    from planted_corpus import build

    from data_pipeline.prepare import prepare
    build(str(tmp_path / "planted"), clean=30, seed=3)
    for f in ("corpus.jsonl", "bench.jsonl"):
        storage.write_bytes(f"{gcs_bucket}/raw/{f}", (tmp_path / "planted" / f).read_bytes())
    kw = dict(shards=2, workers=0, progress=False, dedup=True, quality="rules")
    remote = f"{gcs_bucket}/data/qa"
    st = prepare([f"{gcs_bucket}/raw/corpus.jsonl"], spm512["tokenizer"], remote,
                 decontaminate=[f"{gcs_bucket}/raw/bench.jsonl"], **kw)
    local = prepare([str(tmp_path / "planted" / "corpus.jsonl")], spm512["tokenizer"], str(tmp_path / "local"),
                    decontaminate=[str(tmp_path / "planted" / "bench.jsonl")], **kw)
    assert st["qa"]["removed"] == local["qa"]["removed"] and sum(st["qa"]["removed"].values()) > 0
    _download(remote, tmp_path / "copy")
    names_local = {str(tmp_path / "planted" / f): f"{gcs_bucket}/raw/{f}" for f in ("corpus.jsonl", "bench.jsonl")}
    for root, _, names in os.walk(tmp_path / "local"):
        for name in names:
            rel = os.path.relpath(os.path.join(root, name), tmp_path / "local")
            mine = (tmp_path / "local" / rel).read_bytes()
            if rel.endswith((".json", ".jsonl")):  # they name the input files
                for a, b in names_local.items():
                    mine = mine.replace(a.encode(), b.encode())
            if rel not in ("stats.json",):  # its run time
                assert (tmp_path / "copy" / rel).read_bytes() == mine, rel
