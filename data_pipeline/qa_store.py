"""The data QA stages' names, removal reasons and files in a prepared folder's `qa/`.

Stages run in this order, each on the documents the ones before it kept (prepare.py enables them):
  decontaminate  benchmark n-gram overlap (--decontaminate FILE ...)    reason contaminated
  quality_rules  Gopher / C4 rules (--quality rules; qa_rules.py)       reason rules:<rule name>
  exact_dedup    normalised-text hash (--dedup)                         reason exact_dup
  near_dedup     MinHash + LSH, verified Jaccard (--dedup)              reason near_dup
  quality_model  bits per byte under a model (--quality model:PATH)     reason low_quality
Decontamination comes first so a leaked benchmark item is reported as such even when it would
also fail a rule (a short item); duplicates are resolved among documents that passed the filters,
so the copy kept of a cluster (its lowest record index) is one that is kept for good.

Files (written by the QA pipelines, read by the shard writers):
  qa/removed-SSSSS-of-NNNNN.npz  per shard: idx (int64, ascending), code (uint8: REASONS), ref
                                 (int64: the record kept for a duplicate, the benchmark bitmask for
                                 a contaminated document, the rule's number), value (float32: the
                                 Jaccard similarity, the rule's measured value)
  qa/scores-SSSSS-of-NNNNN.npz   per shard: idx, text_hash (int64), bpb (float32): the model's
                                 bits per byte for each document that reached quality_model
  qa/analysis.json, qa/scores.json   written last = that part is complete (holds its settings)
  qa/selection.json              the quality_model cut in effect (threshold or kept fraction)
"""
from __future__ import annotations

import io
import os

import numpy as np

from data_pipeline.qa_rules import RULE_NAMES
from data_pipeline.shard_writer import read_json, shard_name
from qwen3_jax import storage

STAGES = ("decontaminate", "quality_rules", "exact_dedup", "near_dedup", "quality_model")
CONTAMINATED, EXACT_DUP, NEAR_DUP, LOW_QUALITY, RULE0 = 1, 2, 3, 4, 16
REASONS = {CONTAMINATED: "contaminated", EXACT_DUP: "exact_dup", NEAR_DUP: "near_dup", LOW_QUALITY: "low_quality",
           **{RULE0 + k: f"rules:{name}" for k, name in enumerate(RULE_NAMES)}}
CODES = {v: k for k, v in REASONS.items()}
STAGE_OF = {CONTAMINATED: "decontaminate", EXACT_DUP: "exact_dedup", NEAR_DUP: "near_dedup",
            LOW_QUALITY: "quality_model", **{RULE0 + k: "quality_rules" for k in range(len(RULE_NAMES))}}
_FIELDS = {"removed": ("idx", "code", "ref", "value"), "scores": ("idx", "text_hash", "bpb")}
_DTYPES = {"idx": np.int64, "code": np.uint8, "ref": np.int64, "value": np.float32, "text_hash": np.int64,
           "bpb": np.float32}


def stage_of_reason(reason: str) -> str:
    return STAGE_OF[CODES[reason]]


def path(out: str, kind: str, s: int, n: int) -> str:
    return os.path.join(out, "qa", f"{kind}-{shard_name(s, n)[len('shard-'):]}.npz")


def write(out: str, kind: str, s: int, n: int, rows: list[tuple]) -> None:
    """Writes shard s's `kind` file ("removed" / "scores") from rows of its fields, sorted by index."""
    rows = sorted(rows)
    cols = list(zip(*rows)) if rows else [()] * len(_FIELDS[kind])
    arrays = {f: np.asarray(c, dtype=_DTYPES[f]) for f, c in zip(_FIELDS[kind], cols)}
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    storage.write_bytes(path(out, kind, s, n), buf.getvalue())


def read(out: str, kind: str, s: int, n: int) -> dict[str, np.ndarray] | None:
    """Shard s's `kind` file as {field: array}, None when it does not exist."""
    p = storage.path(path(out, kind, s, n))
    if not p.exists():
        return None
    with np.load(io.BytesIO(p.read_bytes())) as z:
        return {f: z[f] for f in _FIELDS[kind]}


def marker(out: str, name: str) -> dict | None:
    p = os.path.join(out, "qa", f"{name}.json")
    return read_json(p) if storage.path(p).exists() else None


def decisions(out: str, s: int, n: int, selection: dict | None) -> dict[int, tuple[int, int, float]]:
    """{record index: (code, ref, value)} of shard s's removed documents: the analysis's removals
    plus, with a quality_model `selection`, the scored documents past its cut."""
    out_d: dict[int, tuple[int, int, float]] = {}
    rem = read(out, "removed", s, n)
    if rem is not None:
        for i, c, r, v in zip(rem["idx"].tolist(), rem["code"].tolist(), rem["ref"].tolist(), rem["value"].tolist()):
            out_d[i] = (c, r, v)
    if selection:
        sc = read(out, "scores", s, n)
        for i, b in zip(sc["idx"].tolist(), sc["bpb"].tolist()):
            if i not in out_d and not passes(selection, b, i):
                out_d[i] = (LOW_QUALITY, -1, b)
    return out_d


def passes(selection: dict, bpb: float, idx: int) -> bool:
    """Whether a document with this score (and record index, for ties) is kept by `selection`:
    {"threshold": T} keeps bpb <= T; {"cut": [b, i]} keeps (bpb, idx) <= (b, i)."""
    if "threshold" in selection:
        return bpb <= selection["threshold"]
    b, i = selection["cut"]
    return (bpb, idx) <= (b, i)


def cluster_sizes(out: str, n: int, code: int) -> list[int]:
    """Sizes of the duplicate clusters with a removal of `code` (exact_dup / near_dup), ascending."""
    counts: dict[int, int] = {}
    for s in range(n):
        rem = read(out, "removed", s, n)
        if rem is None:
            continue
        for c, r in zip(rem["code"].tolist(), rem["ref"].tolist()):
            if c == code:
                counts[r] = counts.get(r, 1) + 1
    return sorted(counts.values())


def contamination_hits(out: str, n: int, files: list[str]) -> dict[str, int]:
    """Documents removed as contaminated, per benchmark file (a document can match several)."""
    hits = dict.fromkeys((os.path.basename(f) for f in files), 0)
    names = list(hits)
    for s in range(n):
        rem = read(out, "removed", s, n)
        if rem is None:
            continue
        for c, r in zip(rem["code"].tolist(), rem["ref"].tolist()):
            if c == CONTAMINATED:
                for k, name in enumerate(names):
                    if r >> min(k, 62) & 1:
                        hits[name] += 1
    return hits
