"""The data QA report a person reads: stats.json's "qa", removed_samples.jsonl, one PNG per stage.

stats.json "qa" (from the shards' .json files and qa/):
  stages            the QA stages run, in order (plan.json names them too, with their settings)
  documents_in      documents that reached the first stage (every decodable record)
  per_stage         per stage: in, kept, removed {reason: documents}, removed_tokens, removed_bytes
  removed / removed_tokens / removed_bytes   per reason, all stages
  contamination_hits   documents removed per benchmark file (one document may count for several)
  exact_dup_clusters / near_dup_clusters   clusters, documents removed, largest, sizes histogram
  quality_model     documents scored, the cut (threshold in bits per byte or kept fraction), removed
  report            the PNG files written, or why none were (matplotlib is the optional `report` extra)
removed_samples.jsonl: up to `samples` removed documents per reason (the lowest record indices), each
with its source file and line, stage, reason, the reason in words, and its text's first 2,000 characters.
report/<stage>.png: decontaminate (hits per benchmark), quality_rules (documents per rule),
exact_dedup and near_dedup (cluster sizes), quality_model (bits per byte with the cut).
"""
from __future__ import annotations

import collections
import io
import json
import os

import numpy as np

from data_pipeline import qa_store
from qwen3_jax import storage


def summary(parts: list[dict], plan: dict) -> dict:
    """stats.json's "qa" counts from the shards' .json files."""
    stages = [s for s in plan.get("stages", []) if s in qa_store.STAGES]
    removed, tokens, nbytes = collections.Counter(), collections.Counter(), collections.Counter()
    for p in parts:
        removed.update(p.get("removed", {}))
        tokens.update(p.get("removed_tokens", {}))
        nbytes.update(p.get("removed_bytes", {}))
    docs_in = sum(p["documents"] for p in parts) + sum(removed.values())
    per_stage, left = {}, docs_in
    for st in stages:
        reasons = sorted(r for r in removed if qa_store.stage_of_reason(r) == st)
        gone = sum(removed[r] for r in reasons)
        per_stage[st] = {"in": left, "kept": left - gone, "removed": {r: removed[r] for r in reasons},
                         "removed_documents": gone, "removed_tokens": sum(tokens[r] for r in reasons),
                         "removed_bytes": sum(nbytes[r] for r in reasons)}
        left -= gone
    return {"stages": stages, "documents_in": docs_in, "per_stage": per_stage,
            "removed": dict(sorted(removed.items())), "removed_tokens": dict(sorted(tokens.items())),
            "removed_bytes": dict(sorted(nbytes.items()))}


def _clusters(sizes: list[int]) -> dict:
    hist = collections.Counter(sizes)
    return {"clusters": len(sizes), "documents_removed": sum(s - 1 for s in sizes), "largest": max(sizes, default=0),
            "sizes": {str(k): hist[k] for k in sorted(hist)}}


def details(out: str, plan: dict, selection: dict | None) -> dict:
    """The stage-specific figures (from qa/): hits per benchmark, cluster sizes, the model's cut."""
    qa, n = plan.get("qa", {}), plan["shards"]
    d: dict = {}
    if "decontaminate" in qa:
        d["contamination_hits"] = qa_store.contamination_hits(out, n, qa["decontaminate"]["files"])
    if "exact_dedup" in qa:
        d["exact_dup_clusters"] = _clusters(qa_store.cluster_sizes(out, n, qa_store.EXACT_DUP))
    if "near_dedup" in qa:
        d["near_dup_clusters"] = _clusters(qa_store.cluster_sizes(out, n, qa_store.NEAR_DUP))
    if "quality_model" in qa:
        scores = all_scores(out, n)
        d["quality_model"] = {"model": qa["quality_model"]["model"], "scored": int(len(scores)),
                              "selection": selection,
                              "bpb_quantiles": ({q: round(float(np.quantile(scores, float(q))), 4)
                                                 for q in ("0.1", "0.5", "0.9")} if len(scores) else {})}
    return d


def all_scores(out: str, n: int) -> np.ndarray:
    parts = [qa_store.read(out, "scores", s, n) for s in range(n)]
    return np.concatenate([p["bpb"] for p in parts if p is not None] or [np.zeros(0, np.float32)])


def write_samples(out: str, parts: list[dict], per_reason: int) -> int:
    """removed_samples.jsonl: the first `per_reason` removed documents of each reason."""
    by_reason: dict[str, list] = {}
    for p in parts:
        for x in p.get("removed_samples", []):
            by_reason.setdefault(x["reason"], []).append(x)
    rows = [x for r in sorted(by_reason) for x in sorted(by_reason[r], key=lambda x: x["index"])[:per_reason]]
    storage.write_text(os.path.join(out, "removed_samples.jsonl"),
                       "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in rows))
    return len(rows)


def write_pngs(out: str, qa_stats: dict, scores: np.ndarray | None) -> list[str] | str:
    """report/<stage>.png for each stage run; a sentence instead when matplotlib is missing."""
    try:
        import matplotlib  # optional: matplotlib (the `report` extra) draws the report's PNGs
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # optional: matplotlib
    except ImportError:
        return "matplotlib is not installed (pip install 'qwen3-jax[report]'): no report PNGs"
    written = []
    for stage in qa_stats["stages"]:
        fig, ax = plt.subplots(figsize=(7, 4))
        ps = qa_stats["per_stage"][stage]
        title = f"{stage}: {ps['removed_documents']:,} of {ps['in']:,} documents removed"
        if stage == "decontaminate":
            hits = qa_stats.get("contamination_hits", {})
            ax.barh(list(hits), list(hits.values()), color="tab:red")
            ax.set_xlabel("documents removed (sharing benchmark text)")
        elif stage == "quality_rules":
            reasons = ps["removed"]
            ax.barh([r.split(":", 1)[1] for r in reasons], list(reasons.values()), color="tab:orange")
            ax.set_xlabel("documents removed (first rule failed)")
        elif stage in ("exact_dedup", "near_dedup"):
            sizes = qa_stats.get(f"{stage[:-6]}_dup_clusters", {}).get("sizes", {})
            ax.bar([int(k) for k in sizes], list(sizes.values()), color="tab:blue")
            ax.set_xlabel("cluster size (documents; one kept per cluster)")
            ax.set_ylabel("clusters")
        elif stage == "quality_model" and scores is not None and len(scores):
            ax.hist(scores, bins=50, color="tab:green")
            sel = (qa_stats.get("quality_model") or {}).get("selection") or {}
            cut = sel.get("threshold", (sel.get("cut") or [None])[0])
            if cut is not None:
                ax.axvline(cut, color="black", linestyle="--", label=f"cut {cut:.3f} bits/byte")
                ax.legend()
            ax.set_xlabel("bits per byte under the reference model")
            ax.set_ylabel("documents")
        ax.set_title(title)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=100, metadata={"Software": None})
        plt.close(fig)
        name = f"report/{stage}.png"
        storage.write_bytes(os.path.join(out, name), buf.getvalue())
        written.append(name)
    return written
