"""A prepared dataset's ArrayRecord shards as one random-access source, checked when opened.

`ShardSource(path, stats)` opens the shards listed in stats.json and, before anything
is read, checks each one against what prepare.py recorded: the file exists, its index can be
read, it holds `shard_documents[s]` records, and its `.lengths.npy` has that many entries. (A
truncated ArrayRecord file opens as 0 records without an error, so the count is what catches
it.) A response dataset (stats.json "loss_on": "response", launch/make_responses.py) also has a
`.prompt_lengths.npy` per shard: one entry per record, each between 0 and the record's length.
A record that fails to read later (a corrupt chunk: checksum mismatch) or whose size does not
match its length raises `ShardError` naming the shard file and the record index in it.
The fix is the same for all: delete that shard's .json and re-run prepare.py (make_responses.py
for a response dataset) with the same arguments, which rewrites just that shard.

A dataset folder may be a bucket (`gs://b/data/web`): ArrayRecord reads `gs://` objects itself
(its Google Cloud C++ client: credentials from GOOGLE_APPLICATION_CREDENTIALS, gcloud's
application-default file or the VM's metadata server; an emulator through
CLOUD_STORAGE_EMULATOR_ENDPOINT, which qwen3_jax.storage sets from STORAGE_EMULATOR_HOST), and
the small files (.lengths.npy, stats.json) go through `qwen3_jax.storage` (which does not import
jax, so prepare.py keeps forking its worker processes). A FUSE mount of the bucket is a local
folder like any other.
"""
from __future__ import annotations

import io
import os
import socket
from typing import Sequence

import numpy as np
from array_record.python.array_record_module import ArrayRecordReader

from qwen3_jax import storage


class ShardError(ValueError):
    """A prepared shard that does not match its stats (truncated, corrupt, missing)."""


def _fix(shard_file: str, tool: str) -> str:
    marker = shard_file.replace(".array_record", ".json")
    return f"delete {marker} and re-run {tool} with the same arguments to rewrite this shard"


def _tool(stats: dict) -> str:
    return "make_responses.py" if stats.get("loss_on") == "response" else "prepare.py"


# --- where the files live ----------------------------------------------------------------------
def check_gcs_reader(path: str) -> None:
    """Before ArrayRecord opens `gs://` shards: fails (ShardError) when its C++ client would find no
    credentials. Without any it asks the metadata server of a Google Cloud VM, and off Cloud it
    retries that for many minutes instead of failing."""
    env = os.environ  # qwen3_jax.storage has set CLOUD_STORAGE_EMULATOR_ENDPOINT for an emulator
    if env.get("CLOUD_STORAGE_EMULATOR_ENDPOINT") or env.get("GOOGLE_APPLICATION_CREDENTIALS"):
        return
    gcloud = env.get("CLOUDSDK_CONFIG") or os.path.join(os.path.expanduser("~"), ".config", "gcloud")
    if os.path.exists(os.path.join(gcloud, "application_default_credentials.json")):
        return
    try:
        socket.getaddrinfo("metadata.google.internal", 80)
    except OSError:
        raise ShardError(f"{path}: no Google Cloud credentials to read its ArrayRecord shards with (not on a "
                         f"Cloud VM, no GOOGLE_APPLICATION_CREDENTIALS, no `gcloud auth application-default "
                         f"login`); set one, or mount the bucket with gcsfuse and read the local path") from None


def folder_names(path: str) -> set[str]:
    """The file names in folder `path` (local or a bucket prefix); empty when it does not exist."""
    p = storage.path(path)
    return {c.name for c in p.iterdir()} if p.is_dir() else set()


def load_npy(f: str) -> np.ndarray:
    """A .npy file, local or on a bucket."""
    if not storage.is_remote(f):
        return np.load(f)
    return np.load(io.BytesIO(storage.path(f).read_bytes()))


def shard_lengths(path: str, stats: dict) -> list[np.ndarray]:
    """The document lengths of each shard of the dataset at `path`, checked against the shard
    files and the stats (ShardError naming the file otherwise)."""
    expected = stats.get("shard_documents") or [None] * len(stats["shards"])
    tool = _tool(stats)
    if storage.is_remote(path):
        check_gcs_reader(path)
    present, out = folder_names(path), []
    for name, want in zip(stats["shards"], expected):
        f = os.path.join(path, name)
        if name not in present:
            raise ShardError(f"{f}: missing (listed in {os.path.join(path, 'stats.json')}); {_fix(f, tool)}")
        try:
            reader = ArrayRecordReader(f)
            ok, n = reader.ok(), reader.num_records()
            reader.close()
        except Exception as e:  # the reader raises RuntimeError/ValueError with riegeli's message
            why = f"{type(e).__name__}: {str(e) or 'truncated?'}"
            raise ShardError(f"{f}: cannot be opened ({why}); {_fix(f, tool)}") from None
        if not ok or (want is not None and n != want):
            raise ShardError(f"{f}: {n} readable records, stats.json says {want} (truncated or corrupt file); "
                             f"{_fix(f, tool)}")
        lengths_file = f.replace(".array_record", ".lengths.npy")
        try:
            lengths = load_npy(lengths_file)
        except (OSError, ValueError) as e:
            raise ShardError(f"{lengths_file}: unreadable ({e}); {_fix(f, tool)}") from None
        if lengths.shape != (n,):
            raise ShardError(f"{lengths_file}: {len(lengths)} lengths for {n} records; {_fix(f, tool)}")
        out.append(lengths)
    return out


def shard_prompt_lengths(path: str, stats: dict, lengths: Sequence[np.ndarray]) -> list[np.ndarray] | None:
    """Per shard, the prompt tokens leading each record of a response dataset (None for a plain
    dataset), checked against the records' `lengths` (ShardError naming the file otherwise)."""
    if stats.get("loss_on") != "response":
        return None
    tool, out, present = _tool(stats), [], folder_names(path)
    for name, n in zip(stats["shards"], lengths):
        f = os.path.join(path, name)
        pl_file = f.replace(".array_record", ".prompt_lengths.npy")
        if os.path.basename(pl_file) not in present:
            raise ShardError(f"{pl_file}: missing (stats.json says loss_on='response'); {_fix(f, tool)}")
        try:
            pl = load_npy(pl_file)
        except (OSError, ValueError) as e:
            raise ShardError(f"{pl_file}: unreadable ({e}); {_fix(f, tool)}") from None
        if pl.shape != n.shape:
            raise ShardError(f"{pl_file}: {len(pl)} prompt lengths for {len(n)} records; {_fix(f, tool)}")
        bad = np.flatnonzero((pl < 0) | (pl > n))
        if len(bad):
            k = int(bad[0])
            raise ShardError(f"{pl_file}: record {k} has prompt length {int(pl[k])}, its length is {int(n[k])} "
                             f"tokens; {_fix(f, tool)}")
        out.append(pl.astype(np.int64))
    return out


class ShardSource:
    """grain random-access source over the shards; errors name the shard file and record."""

    def __init__(self, path: str, stats: dict):
        import grain  # late: grain loads jax; prepare.py's forked workers read shards without it
        per_shard = shard_lengths(path, stats)
        self._files = [os.path.join(path, s) for s in stats["shards"]]
        self._starts = np.concatenate([[0], np.cumsum([len(n) for n in per_shard])]).astype(np.int64)
        self._bytes_per_token = np.dtype(stats["dtype"]).itemsize
        self._tool = _tool(stats)
        self.lengths = np.concatenate(per_shard).astype(np.int64)  # tokens per document, in record order
        prompts = shard_prompt_lengths(path, stats, per_shard)
        # leading prompt tokens per document (a response dataset), else None
        self.prompt_lengths = None if prompts is None else np.concatenate(prompts)
        self._source = grain.sources.ArrayRecordDataSource(self._files)

    def __len__(self) -> int:
        return int(self._starts[-1])

    def where(self, i: int) -> tuple[str, int]:
        """Global record index → (shard file, record index in that file)."""
        s = int(np.searchsorted(self._starts, i, side="right")) - 1
        return self._files[s], int(i - self._starts[s])

    def _error(self, i: int, what: str) -> ShardError:
        f, k = self.where(i)
        return ShardError(f"{f}: record {k} (document {i} of the dataset) {what}; {_fix(f, self._tool)}")

    def _checked(self, i: int, record: bytes) -> bytes:
        if len(record) != self.lengths[i] * self._bytes_per_token:
            raise self._error(i, f"has {len(record)} bytes, its length says "
                                 f"{self.lengths[i]} tokens × {self._bytes_per_token} bytes")
        return record

    def __getitem__(self, i) -> bytes:
        i = int(i)
        try:
            record = self._source[i]
        except Exception as e:  # riegeli: RuntimeError "Corrupted Riegeli/records file: … hash mismatch"
            raise self._error(i, f"cannot be read ({e})") from None
        return self._checked(i, record)

    def __getitems__(self, ii: Sequence[int]) -> list[bytes]:
        ii = [int(i) for i in ii]
        try:
            records = self._source.__getitems__(ii)
        except Exception:
            return [self[i] for i in ii]  # reads one by one to name the bad record
        return [self._checked(i, r) for i, r in zip(ii, records)]
