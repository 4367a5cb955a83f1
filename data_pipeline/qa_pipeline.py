"""The data QA analysis on Beam: which records the decontaminate, quality_rules, exact_dedup and
near_dedup stages remove (qa_store.py has the order and the files it writes).

  shards ──features──▶ removed by decontaminate / quality_rules (per document)
           └────▶ survivors keyed by exact key ──group──▶ lowest index kept, the rest exact_dup
                    winners ──LSH bands──group──▶ candidate pairs ──join shingles twice──▶ pairs
                    with Jaccard >= threshold ──all edges──▶ union-find: each connected cluster
                    keeps its lowest index, the rest near_dup
  all removals + one empty entry per shard ──group by shard──▶ qa/removed-SSSSS-of-NNNNN.npz

Every decision depends only on the documents, never on the order elements meet in a worker: a
cluster keeps its lowest record index, groups are sorted before use. Near-duplicate pairs are
verified with the exact Jaccard similarity of the two shingle sets (not the MinHash estimate, whose
spread at 128 permutations, about ±0.035 at 0.8, would make pairs near the threshold a coin flip);
the candidates come from LSH with 25 bands of 5 rows (a pair at Jaccard 0.8 is missed with
probability 5e-5). A bucket of more than MAX_BUCKET_PAIRS members pairs each with its lowest and
its next member only (a boilerplate template shared by thousands of pages would otherwise cost
millions of checks). The union-find runs in one worker over the verified edges: its memory grows
with the number of near-duplicate pairs, not with the corpus.

The stages' settings and the benchmark files' reading are in qa_config.py.
"""
from __future__ import annotations

import bisect
import os

import numpy as np

from data_pipeline import corpus, qa_config, qa_rules, qa_store, qa_text
from data_pipeline.beam_run import Progress, beam, relay
from data_pipeline.shard_writer import write_json
from data_pipeline.write_stage import WriteShardFn

MAX_BUCKET_PAIRS = 64  # members of an LSH bucket beyond which it is chained instead of fully paired


# --- per document ---------------------------------------------------------------------------------
class FeaturesFn(beam.DoFn):
    """Shard s -> its documents' removals by the per-document stages (tag "removed": (shard, row))
    and, with dedup, the survivors' (exact key, (index, signature, shingles))."""

    def __init__(self, job: dict):
        self.job = job

    def setup(self):
        qa = self.job["qa"]
        dec = qa.get("decontaminate")
        self.index = (qa_config.benchmark_index(dec["files"], dec["ngram"], dec["min_words"], dec["short_factor"])
                      if dec else None)
        near = qa.get("near_dedup")
        self.hasher = qa_text.MinHasher(near["num_perm"], near["seed"]) if near else None
        self.progress = Progress(self.job["ctl"], "qa")

    @relay(lambda self: self.job["ctl"])
    def process(self, s: int):
        job, plan, qa = self.job, self.job["plan"], self.job["qa"]
        lo, hi = job["bounds"][s], job["bounds"][s + 1]
        rules, dedup = qa.get("quality_rules", {}).get("select"), "exact_dedup" in qa
        shingle_words = qa["near_dedup"]["shingle_words"] if self.hasher else 0
        for i, raw in corpus.iter_range(plan["inputs"], plan["counts"], lo, hi, plan["text_key"]):
            d = corpus.decode(raw, plan["text_key"])
            self.progress.add(1, 0, len(d.text.encode("utf-8")) if d.text else 0)
            if d.text is None:
                continue  # a bad record: the write stage counts (or, with --strict, reports) it
            wh = qa_text.word_hashes(qa_text.words(d.text)) if self.index or dedup else None
            if self.index is not None and (tags := self.index.matches(wh)):
                yield beam.pvalue.TaggedOutput("removed", (s, (i, qa_store.CONTAMINATED, tags, 0.0)))
                continue
            if rules and (failed := qa_rules.check(d.text, qa_rules.kind_of(_path(raw), rules))) is not None:
                code = qa_store.CODES[f"rules:{failed[0]}"]
                yield beam.pvalue.TaggedOutput("removed", (s, (i, code, code - qa_store.RULE0, failed[1])))
                continue
            if dedup:
                sh = qa_text.shingles(wh, shingle_words) if self.hasher else np.zeros(0, np.uint32)
                sig = self.hasher.signature(sh) if self.hasher and len(sh) else None
                yield qa_text.exact_key(d.text), (i, sig, sh)
        self.progress.flush()


def _path(raw: corpus.Raw) -> str:
    """The file a record comes from: its own (a text file, the built-in corpus's sources), else its input."""
    return raw.payload if raw.kind == "file" else raw.source


# --- duplicates -----------------------------------------------------------------------------------
class _ByShard(beam.DoFn):
    """A DoFn that knows which shard a record index is in."""

    def __init__(self, bounds: list[int]):
        super().__init__()
        self.bounds = bounds

    def shard(self, i: int) -> int:
        return bisect.bisect_right(self.bounds, i) - 1


class PickExact(_ByShard):
    """(exact key, [(i, sig, sh), ...]) -> the lowest index's (i, sig, sh); the rest exact_dup."""

    def process(self, kv):
        members = sorted(kv[1], key=lambda m: m[0])
        keep = members[0]
        for m in members[1:]:
            yield beam.pvalue.TaggedOutput("removed", (self.shard(m[0]), (m[0], qa_store.EXACT_DUP, keep[0], 1.0)))
        yield keep


def band_entries(member, bands: int, rows: int):
    i, sig, _ = member
    if sig is None:  # no words: nothing to compare
        return
    for key in qa_text.band_keys(sig, bands, rows):
        yield key, i


def bucket_pairs(kv):
    """All pairs (i < j) of one LSH bucket; a big bucket: each member with the lowest and the next."""
    ids = sorted(set(kv[1]))
    if len(ids) <= MAX_BUCKET_PAIRS:
        for a in range(len(ids)):
            for b in range(a + 1, len(ids)):
                yield ids[a], ids[b]
    else:
        for a in range(1, len(ids)):
            yield ids[0], ids[a]
            if a + 1 < len(ids):
                yield ids[a], ids[a + 1]


def pass_left(kv):
    """(i, {"sh": [sh_i], "pairs": [j, ...]}) -> (j, (i, sh_i)) for each pair."""
    i, g = kv
    sh = list(g["sh"])
    if sh:
        for j in g["pairs"]:
            yield j, (i, sh[0])


def verified(kv, threshold: float):
    """(j, {"sh": [sh_j], "left": [(i, sh_i), ...]}) -> (i, j, Jaccard) for pairs at the threshold or above."""
    j, g = kv
    sh = list(g["sh"])
    if not sh:
        return
    for i, sh_i in g["left"]:
        jac = qa_text.jaccard(sh_i, sh[0])
        if jac >= threshold:
            yield i, j, jac


class Clusters(_ByShard):
    """All verified edges -> near_dup removals: union-find, each cluster keeps its lowest index;
    a removed member's value is its highest Jaccard similarity to another member."""

    def process(self, edges):
        parent: dict[int, int] = {}

        def find(x: int) -> int:
            root = x
            while parent.get(root, root) != root:
                root = parent[root]
            while parent.get(x, x) != root:
                parent[x], x = root, parent[x]
            return root

        best: dict[int, float] = {}
        for i, j, jac in sorted(edges):
            a, b = find(i), find(j)
            if a != b:
                parent[max(a, b)] = min(a, b)
            best[i] = max(best.get(i, 0.0), jac)
            best[j] = max(best.get(j, 0.0), jac)
        for x in sorted(best):
            root = find(x)
            if root != x:
                yield self.shard(x), (x, qa_store.NEAR_DUP, root, best[x])


class WriteRemovedFn(beam.DoFn):
    """(shard, [row | None, ...]) -> qa/removed-SSSSS-of-NNNNN.npz."""

    def __init__(self, job: dict):
        self.job = job

    def process(self, kv):
        s, rows = kv
        qa_store.write(self.job["out"], "removed", s, self.job["plan"]["shards"], [r for r in rows if r is not None])
        yield s


def build(p, job: dict, analysis: dict, then_write: list[int] | None = None) -> None:
    """The analysis pipeline over every shard (dedup is corpus-wide, so a run that stopped before
    its end redoes it); with `then_write`, those shards are then tokenized and written in the same
    pipeline (write_stage.py), after qa/analysis.json (`analysis`) marks the analysis complete."""
    n, qa = job["plan"]["shards"], job["qa"]
    shards = p | "shards" >> beam.Create(list(range(n))) | "spread" >> beam.Reshuffle()
    feats = shards | "features" >> beam.ParDo(FeaturesFn(job)).with_outputs("removed", main="survivors")
    removed = [feats.removed, p | "every shard" >> beam.Create([(s, None) for s in range(n)])]
    if "exact_dedup" in qa:
        exact = (feats.survivors | "by exact key" >> beam.GroupByKey()
                 | "exact" >> beam.ParDo(PickExact(job["bounds"])).with_outputs("removed", main="winners"))
        removed.append(exact.removed)
        if "near_dedup" in qa:
            nd = qa["near_dedup"]
            winners = exact.winners
            sh = winners | "shingles" >> beam.Map(lambda m: (m[0], m[2]))
            pairs = (winners | "bands" >> beam.FlatMap(band_entries, nd["bands"], nd["rows"])
                     | "by band" >> beam.GroupByKey() | "pairs" >> beam.FlatMap(bucket_pairs)
                     | "distinct" >> beam.Distinct())
            left = ({"sh": sh, "pairs": pairs} | "join i" >> beam.CoGroupByKey()
                    | "to j" >> beam.FlatMap(pass_left))
            edges = ({"sh": sh, "left": left} | "join j" >> beam.CoGroupByKey()
                     | "verify" >> beam.FlatMap(verified, nd["threshold"]))
            removed.append(edges | "all edges" >> beam.combiners.ToList()
                           | "clusters" >> beam.ParDo(Clusters(job["bounds"])))
    written = (removed | "removals" >> beam.Flatten() | "by shard" >> beam.GroupByKey()
               | "write removals" >> beam.ParDo(WriteRemovedFn(job)))
    if then_write is not None:  # the analysis complete (every shard's file, then its marker), tokenize
        (written | "all written" >> beam.combiners.ToList()
         | "mark" >> beam.FlatMap(_mark_done, job["out"], analysis, sorted(then_write))
         | "spread shards" >> beam.Reshuffle() | "write shards" >> beam.ParDo(WriteShardFn(job)))


def _mark_done(_, out: str, analysis: dict, shards: list[int]):
    """Writes qa/analysis.json (the analysis is complete), then hands out the shards to write."""
    write_json(os.path.join(out, "qa", "analysis.json"), analysis)
    yield from shards
