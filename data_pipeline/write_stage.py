"""prepare.py's last stage on Beam: tokenize each shard's documents and write the shard.

One element per shard: a worker reads the shard's records (its range of the global record
numbering), decodes them, tokenizes them in batches (`Tokenizer.encode_batch`: Rust code, for the
Qwen3 BPE tiktoken's core where it gives the same ids, rank_bpe.py) and writes the shard through ShardWriter (temporary names, .json last). A document the
QA stages removed (qa_store.decisions) is tokenized too, to count its tokens, and not written; the
shard's .json counts removals per reason and keeps the first few removed documents as samples.
Everything about a shard is decided by its own records and the QA files, never by which worker
writes it or when: the output is byte-identical for any number of workers.

`job` (a plain dict, pickled to the workers): plan, out, ctl (control folder), tokenizer (spec),
bounds (shard s = records [bounds[s], bounds[s+1])), strict, batch_docs, crash_after (test hook),
qa (None, or {"selection": ...}), samples (removed documents kept per reason and shard).
"""
from __future__ import annotations

import collections
import os

import numpy as np

from data_pipeline import corpus, qa_store
from data_pipeline.beam_run import Progress, beam, crash_now, relay, tokenizer
from data_pipeline.shard_writer import PrepareError, ShardWriter

SAMPLE_CHARS = 2000  # text kept per removed-document sample


def batches(items, size: int):
    batch = []
    for x in items:
        batch.append(x)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def sample(raw: corpus.Raw, i: int, reason: str, detail: str, text: str) -> dict:
    return {"index": i, "source": raw.source, "line": raw.line, "stage": qa_store.stage_of_reason(reason),
            "reason": reason, "detail": detail, "chars": len(text),
            "text": text[:SAMPLE_CHARS] + ("…" if len(text) > SAMPLE_CHARS else "")}


def detail(code: int, ref: int, value: float, benchmarks: list[str]) -> str:
    """Why a document was removed, in words (removed_samples.jsonl)."""
    if code == qa_store.CONTAMINATED:
        names = [os.path.basename(b) for k, b in enumerate(benchmarks) if ref >> min(k, 62) & 1]
        return f"shares benchmark text with {', '.join(names) or 'a benchmark'}"
    if code == qa_store.EXACT_DUP:
        return f"same normalised text as record {ref}"
    if code == qa_store.NEAR_DUP:
        return f"near-duplicate cluster of record {ref} (Jaccard {value:.3f} with its closest member)"
    if code == qa_store.LOW_QUALITY:
        return f"{value:.4f} bits per byte"
    return f"measured {value:g}"


class WriteShardFn(beam.DoFn):
    def __init__(self, job: dict):
        self.job = job

    def setup(self):
        self.tok = tokenizer(self.job["tokenizer"])
        self.progress = Progress(self.job["ctl"], "write")

    @relay(lambda self: self.job["ctl"])
    def process(self, s: int):
        job, plan, tok = self.job, self.job["plan"], self.tok
        n, lo, hi = plan["shards"], job["bounds"][s], job["bounds"][s + 1]
        qa = job.get("qa")
        removed = qa_store.decisions(job["out"], s, n, qa.get("selection")) if qa else {}
        benchmarks = (qa or {}).get("benchmarks", [])
        dtype, eos = np.dtype(plan["dtype"]), tok.eos_id
        gone, gone_tokens, gone_bytes = collections.Counter(), collections.Counter(), collections.Counter()
        samples: dict[str, list] = {}
        writer = ShardWriter(job["out"], s, plan)
        try:
            for batch in batches(corpus.iter_range(plan["inputs"], plan["counts"], lo, hi, plan["text_key"]),
                                 job["batch_docs"]):
                decoded = [corpus.decode(raw, plan["text_key"]) for _, raw in batch]
                texts = [d.text for d in decoded if d.text is not None]
                ids = iter(tok.encode_batch(texts, plan["allow_special"]) if texts else ())
                ntok = nbytes = 0
                for (i, raw), d in zip(batch, decoded):
                    if d.text is None:
                        if job["strict"]:
                            raise PrepareError(f"{raw.source}:{raw.line}: {d.reason}: {d.detail}")
                        writer.skipped[d.reason] += 1
                        continue
                    tokens = np.asarray(next(ids) + [eos], dtype=dtype)
                    size = len(d.text.encode("utf-8"))
                    ntok, nbytes = ntok + len(tokens), nbytes + size
                    why = removed.get(i)
                    if why is None:
                        writer.add(tokens, size)
                        continue
                    reason = qa_store.REASONS[why[0]]
                    gone[reason] += 1
                    gone_tokens[reason] += len(tokens)
                    gone_bytes[reason] += size
                    if len(samples.setdefault(reason, [])) < job["samples"]:
                        samples[reason].append(sample(raw, i, reason, detail(*why, benchmarks), d.text))
                self.progress.add(len(batch), ntok, nbytes)
                if job["crash_after"] and _done(job["ctl"]) >= job["crash_after"]:
                    crash_now(job["ctl"])  # test hook: a killed job, mid-shard
            if job["crash_after"] and not _claim(job["ctl"], job["crash_after"]):
                crash_now(job["ctl"])  # the shards allowed before the crash are all claimed
            extra = {}
            if qa is not None:
                extra = {"removed": dict(sorted(gone.items())), "removed_tokens": dict(sorted(gone_tokens.items())),
                         "removed_bytes": dict(sorted(gone_bytes.items())),
                         "removed_samples": [x for r in sorted(samples) for x in samples[r]]}
            writer.close(extra)
        except BaseException:
            writer.discard()
            raise
        self.progress.flush()
        if job["ctl"]:
            open(os.path.join(job["ctl"], f"done-{s}"), "w").close()
        yield s


def _done(ctl: str) -> int:
    return sum(f.startswith("done-") for f in os.listdir(ctl))


def _claim(ctl: str, slots: int) -> bool:
    """Test hook: takes one of `slots` shard completions (exclusively, across processes)."""
    for k in range(slots):
        try:
            os.close(os.open(os.path.join(ctl, f"slot-{k}"), os.O_CREAT | os.O_EXCL))
            return True
        except FileExistsError:
            continue
    return False


def build(p, job: dict, shards: list[int]) -> None:
    """The write pipeline: one element per shard still to write."""
    (p | "shards" >> beam.Create(shards) | "spread" >> beam.Reshuffle()
     | "write" >> beam.ParDo(WriteShardFn(job)))
