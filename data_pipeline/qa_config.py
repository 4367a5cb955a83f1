"""The data QA stages' settings (plan.json's "qa") and the benchmark files of --decontaminate.

Benchmarks: .jsonl / .json lines (every string in the object, nested ones too, is a unit of
benchmark text, and the longest top-level string joined with each other string, list items
included, is one more: a question with each of its choices or its answer), or any other file as
plain text, one unit per non-blank line. qa_text.NgramIndex decides which units a document holds:
units of 13 or more normalised words by their 13-grams, 8 to 12 words whole, shorter ones only
when the document is little more than the unit (at most twice its words).
"""
from __future__ import annotations

import hashlib
import json
import os

from data_pipeline import qa_rules, qa_text
from qwen3_jax import storage

SELECTION_KEYS = ("threshold", "keep_fraction")  # quality_model settings a re-run may change in place


def benchmark_units(path: str) -> list[str]:
    """The units of benchmark text in one file (see the module docstring); errors name file:line."""
    p = storage.path(path)
    if not p.is_file():
        raise FileNotFoundError(f"--decontaminate {path}: no such file")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"--decontaminate {path}: not UTF-8 text (byte {e.start})") from None
    if not path.endswith((".jsonl", ".json", ".ndjson")):
        return [line for line in text.splitlines() if line.strip()]
    units = []
    for k, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError as e:
            raise ValueError(f"{path}:{k}: not JSON ({e})") from None
        units += _strings(obj)
        if isinstance(obj, dict):
            top = [v for v in obj.values() if isinstance(v, str)]
            if top:
                q = max(top, key=len)
                units += [f"{q} {s}" for v in obj.values() if v is not q for s in _strings(v)]
    return units


def _strings(x) -> list[str]:
    if isinstance(x, str):
        return [x]
    if isinstance(x, dict):
        return [s for v in x.values() for s in _strings(v)]
    if isinstance(x, list):
        return [s for v in x for s in _strings(v)]
    return []


def benchmark_index(files: list[str], ngram: int, min_words: int, short_factor: float) -> qa_text.NgramIndex:
    index = qa_text.NgramIndex(ngram, min_words, short_factor)
    for tag, f in enumerate(files):
        for unit in benchmark_units(f):
            index.add(unit, tag)
    return index


def parse_quality(spec: str | None) -> tuple[str | None, str | None]:
    """--quality 'rules[:web|:code]' | 'model:PATH' | 'rules,model:PATH' -> (which rule sets: "auto"
    (by source file, qa_rules.kind_of), "web", "code" or None, model path or None)."""
    if not spec:
        return None, None
    head, sep, model = spec.partition("model:")
    items = [x.strip() for x in head.split(",") if x.strip()]
    kinds = [x.partition(":")[2] or "auto" for x in items if x.partition(":")[0] == "rules"]
    if (len(kinds) != len(items) or len(items) > 1 or any(k not in qa_rules.KINDS for k in kinds)
            or (sep and not model) or not (items or sep)):
        raise ValueError(f"--quality {spec}: expected rules (or rules:web, rules:code), model:PATH or "
                         f"rules,model:PATH")
    return (kinds[0] if kinds else None), (model if sep else None)


def settings(*, dedup: bool = False, decontaminate: list[str] | None = None, quality: str | None = None,
             quality_threshold: float | None = None, quality_keep_fraction: float | None = None,
             quality_tokenizer: str | None = None, quality_max_chars: int = 4096,
             near_dup_threshold: float = 0.8, ngram: int = 13, min_words: int = 8) -> dict:
    """plan.json's "qa": the stages asked for, in stage order, each with its settings. Bad values
    (a missing benchmark file, a threshold out of range, ...) raise ValueError naming the flag."""
    rules, model = parse_quality(quality)
    qa: dict = {}
    for f in decontaminate or []:
        if not benchmark_units(f):
            raise ValueError(f"--decontaminate {f}: no benchmark text in it")
    if decontaminate:
        qa["decontaminate"] = {"files": list(decontaminate),
                               "sha1": [hashlib.sha1(storage.path(f).read_bytes()).hexdigest() for f in decontaminate],
                               "ngram": ngram, "min_words": min_words, "short_factor": 2.0}
    if rules:
        qa["quality_rules"] = {"select": rules,  # auto: the code rules for source files (by extension), else web
                               **({"code_extensions": list(qa_rules.CODE_EXTENSIONS)} if rules == "auto" else {}),
                               **{f"{k}_rules": list(v) for k, v in qa_rules.RULE_SETS.items()
                                  if rules in ("auto", k)}}
    if dedup:
        if not 0.0 < near_dup_threshold <= 1.0:
            raise ValueError(f"--near_dup_threshold {near_dup_threshold}: must be in (0, 1]")
        qa["exact_dedup"] = {"key": "blake2b of the text in NFKC, lower case, whitespace runs as one space"}
        qa["near_dedup"] = {"threshold": near_dup_threshold, "shingle_words": 5, "num_perm": 128, "bands": 25,
                            "rows": 5, "seed": 1, "verify": "exact Jaccard of the shingle sets"}
    if model:
        if (quality_threshold is None) == (quality_keep_fraction is None):
            raise ValueError(f"--quality model:{model} needs one of --quality_threshold BPB (remove documents "
                             f"above it) or --quality_keep_fraction F (keep that share, lowest bits per byte)")
        if quality_keep_fraction is not None and not 0.0 < quality_keep_fraction <= 1.0:
            raise ValueError(f"--quality_keep_fraction {quality_keep_fraction}: must be in (0, 1]")
        if quality_max_chars < 1:
            raise ValueError(f"--quality_max_chars {quality_max_chars}: must be >= 1")
        path = model if storage.is_remote(model) else os.path.abspath(model)
        if not storage.path(path).exists():
            raise ValueError(f"--quality model:{model}: does not exist (a checkpoint folder or a Hugging Face folder)")
        qa["quality_model"] = {"model": path, "tokenizer": quality_tokenizer, "max_chars": quality_max_chars,
                               **({"threshold": quality_threshold} if quality_threshold is not None
                                  else {"keep_fraction": quality_keep_fraction})}
    elif quality_threshold is not None or quality_keep_fraction is not None:
        raise ValueError("--quality_threshold / --quality_keep_fraction need --quality model:PATH")
    return qa


def analysis(qa: dict) -> dict:
    """The settings the analysis pipeline (qa_pipeline.py) depends on."""
    return {k: v for k, v in qa.items() if k != "quality_model"}


def scoring(qa: dict) -> dict | None:
    """The settings the model's scores depend on (not the selection): a re-run keeps scores that match."""
    m = qa.get("quality_model")
    return None if m is None else {k: v for k, v in m.items() if k not in SELECTION_KEYS}


def only_selection_differs(old: dict, new: dict) -> bool:
    """Whether two plans differ only in the quality_model selection (threshold / kept fraction)."""
    if {k for k in set(old) | set(new) if old.get(k) != new.get(k)} != {"qa"}:
        return False
    o, n = old.get("qa") or {}, new.get("qa") or {}
    return (analysis(o) == analysis(n) and scoring(o) == scoring(n) and scoring(n) is not None)
