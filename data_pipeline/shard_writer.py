"""Writing one prepared shard: its ArrayRecord file, document lengths and stats, completed by its
`.json` (prepare.py and launch/make_responses.py). Locally the files are written under temporary
names and renamed; for a bucket they are written in a local temporary folder and uploaded, each
upload atomic, the `.json` last either way."""

from __future__ import annotations

import collections
import json
import os
import shutil
import tempfile

import numpy as np
from array_record.python.array_record_module import ArrayRecordWriter

from qwen3_jax import storage

HIST_BUCKETS = 32  # document-length histogram: bucket k holds lengths in [2**k, 2**(k+1))


class PrepareError(RuntimeError):
    """A dataset that cannot be prepared as asked; the message is the one line the tools print."""


def shard_name(s: int, n: int) -> str:
    return f"shard-{s:05d}-of-{n:05d}"


def read_json(path: str):
    """The contents of a JSON file this module wrote (local or on a bucket), None when it is not
    valid JSON."""
    try:
        return json.loads(storage.path(path).read_text())
    except ValueError:
        return None


def write_json(path: str, obj) -> None:
    """Writes `obj` to `path` atomically (local: a temporary file renamed; bucket: one upload)."""
    storage.write_text(path, json.dumps(obj, indent=1))


def _upload(local: str, dst: str) -> None:
    """Copies local file `local` to `dst` on a bucket in one streamed upload (atomic), then removes it."""
    with open(local, "rb") as f, storage.path(dst).open("wb") as g:
        shutil.copyfileobj(f, g, 1 << 24)
    os.remove(local)


class ShardWriter:
    """Shard `s` of `plan` in `out` under temporary names, renamed by close(), which writes the .json
    last (`out` on a bucket: written in a local temporary folder, uploaded by close()). `discard()`
    drops an unfinished shard. A response dataset (plan "loss_on": "response", launch/make_responses.py) also keeps each
    record's prompt length (add(..., prompt_length=P)) in .prompt_lengths.npy (int32), and its
    `counts` in the shard's stats."""

    def __init__(self, out: str, s: int, plan: dict):
        self.shard = s
        self.final = os.path.join(out, shard_name(s, plan["shards"]))
        self._stage = tempfile.mkdtemp(prefix="prepare-shard-") if storage.is_remote(out) else None
        local = os.path.join(self._stage, shard_name(s, plan["shards"])) if self._stage else self.final
        self.tmp = f"{local}.tmp{os.getpid()}"
        self.writer = ArrayRecordWriter(f"{self.tmp}.array_record", "group_size:1")
        self.lengths: list[int] = []
        self.prompt_lengths: list[int] | None = [] if plan.get("loss_on") == "response" else None
        self.skipped = collections.Counter()
        self.counts = collections.Counter()
        self.bytes = 0

    def add(self, tokens: np.ndarray, nbytes: int, prompt_length: int | None = None) -> None:
        if self.prompt_lengths is not None:
            if not 0 <= prompt_length <= len(tokens):
                raise ValueError(f"{self.final}: prompt length {prompt_length} of a {len(tokens)}-token record")
            self.prompt_lengths.append(int(prompt_length))
        self.writer.write(tokens.tobytes())
        self.lengths.append(len(tokens))
        self.bytes += nbytes

    def close(self, extra: dict | None = None) -> dict:
        """Finishes the shard; `extra`: more keys for its .json (prepare.py's QA counts)."""
        self.writer.close()
        lengths = np.asarray(self.lengths, dtype=np.int64)
        np.save(f"{self.tmp}.lengths.npy", lengths.astype(np.int32))
        k = np.floor(np.log2(np.maximum(lengths, 1))).astype(int)
        stats = {"documents": len(lengths), "tokens": int(lengths.sum()), "bytes": self.bytes,
                 "skipped": dict(sorted(self.skipped.items())),
                 "hist_documents": np.bincount(k, minlength=HIST_BUCKETS).tolist(),
                 "hist_tokens": np.bincount(k, weights=lengths, minlength=HIST_BUCKETS).astype(int).tolist()}
        renames = [".array_record", ".lengths.npy"]
        if self.prompt_lengths is not None:
            np.save(f"{self.tmp}.prompt_lengths.npy", np.asarray(self.prompt_lengths, np.int32))
            renames.append(".prompt_lengths.npy")
            stats.update(prompt_tokens=sum(self.prompt_lengths), counts=dict(sorted(self.counts.items())))
        stats.update(extra or {})
        for ext in renames:
            (_upload if self._stage else os.replace)(f"{self.tmp}{ext}", f"{self.final}{ext}")
        write_json(f"{self.final}.json", stats)  # the completion marker
        self.discard()
        return stats

    def discard(self) -> None:
        """Closes the writer and removes this shard's temporary files (the finished ones stay)."""
        self.writer.close()
        if self._stage:
            shutil.rmtree(self._stage, ignore_errors=True)
            return
        folder, prefix = os.path.split(self.tmp)
        for f in os.listdir(folder):
            if f.startswith(prefix):
                os.remove(os.path.join(folder, f))
