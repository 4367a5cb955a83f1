"""Raw text → tokenized ArrayRecord shards + stats.json.

    python data_pipeline/prepare.py --input 'data/web/*.jsonl.zst' --tokenizer qwen3 --out runs/data/web
    python data_pipeline/prepare.py --input builtin:python-stdlib --tokenizer qwen3 --out runs/data/stdlib
    python data_pipeline/prepare.py --input corpus.jsonl --tokenizer qwen3 --out runs/data/web \
        --dedup --decontaminate bench.jsonl --quality rules[,model:PATH --quality_keep_fraction 0.8]

Output folder:
  plan.json                          inputs, record counts, tokenizer, shard count (a re-run must match)
  shard-00003-of-00008.array_record  one record per document: its token ids (+ <|endoftext|>) as
                                     little-endian uint16 (vocab < 65,536) or uint32; group_size:1
  shard-00003-of-00008.lengths.npy   the documents' lengths (for length buckets and mixtures)
  shard-00003-of-00008.json          the shard's stats; written last = the shard is complete
  stats.json                         totals (documents, tokens, skipped by reason, length
                                     histogram, dtype, eos_id, …); written last = dataset complete
  with QA stages also:
  qa/                                which records each stage removes, the model's scores (qa_store.py)
  removed_samples.jsonl              a few removed documents per reason, with why
  report/<stage>.png                 one picture per stage (the `report` extra: matplotlib)

Data QA (each stage optional, named with its settings in plan.json's "stages" / "qa", counted per
reason in stats.json's "qa"; order and files: qa_store.py): --decontaminate FILE ... (benchmark
13-gram overlap), --quality rules (Gopher / C4 rules for text, Codex / StarCoder rules for source
files, qa_rules.py; rules:web / rules:code: one set for every document), --dedup (exact: normalised-text
hash; near: MinHash + LSH, pairs verified at Jaccard >= --near_dup_threshold, union-find, each
cluster keeps its lowest record index), --quality model:PATH (bits per byte under a checkpoint or
HF folder, qa_model.py; cut by --quality_threshold or --quality_keep_fraction; a re-run with another
cut rewrites the shards from the kept scores). They run before tokenizing as their own Beam
pipelines (qa_pipeline.py, qa_model.py), whose results in qa/ a resumed run reuses; a removed
document is tokenized (its tokens counted per stage) but not written.

Records are numbered in input order (files in argument order, lines in file order) and shard s
holds records [s*R/N, (s+1)*R/N): a cheap counting pass (newlines / parquet metadata) fixes the
plan, so output is identical for any --workers, and a re-run after a crash redoes only the shards
without their .json (each shard is written under a temporary name and renamed when complete).

The work runs as an Apache Beam pipeline (data_pipeline/beam_run.py, write_stage.py): one element
per shard still to write, each read, tokenized (batches through Rust code: rank_bpe.py) and
written by one worker, so memory does not depend on corpus size and the bytes do not depend on the
worker count. --runner local (the default) is Beam's own local runner: --workers processes
(default: one per CPU for a corpus big enough to pay their ~5 s start, else this process; 0 or 1:
this process); a periodic line reports docs/s, tokens/s and the ETA. --runner DataflowRunner (or
Flink, Spark, ...) runs the same pipeline there, the arguments prepare.py does not know going to
Beam as pipeline options (--project, --region, --temp_location, ...); inputs and --out then on a
bucket, and the workers need this package (Beam's --extra_package with a built sdist, or
--sdk_container_image). Bad records (malformed JSON, missing text field, invalid UTF-8, empty documents) are
skipped and counted; with --strict the first one stops the run with file:line.
An `--out` on a bucket (`gs://b/data/web`) gets the same files with the same completion rule: each
shard is written to a local temporary folder and uploaded file by file, its .json last, and
stats.json after every shard (an object store has no rename, but each upload is atomic).

A bad *file* (truncated/corrupt .gz/.zst or parquet, a text file that is not UTF-8) stops the run
before anything is written, naming it; with --skip-bad-files it is left out and listed under
"skipped_files" in plan.json, stats.json and the summary. A run that yields no document at all
is an error (naming the inputs, the --text-key and the keys the first record does have) and
leaves nothing behind. Worker processes die with the main process (even on SIGKILL), and a worker
that dies (out of memory) stops the run with one line; a re-run resumes.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import sys
import tempfile
import time
from typing import Sequence

import numpy as np

from data_pipeline import corpus, qa_config, qa_report, qa_store
from data_pipeline.cli import ArgumentParser
from data_pipeline.shard_writer import (  # noqa: F401 - launch/make_responses.py takes the writer from here
    HIST_BUCKETS,
    PrepareError,
    ShardWriter,
    read_json,
    shard_name,
    write_json,
)
from data_pipeline.shards import folder_names
from data_pipeline.text_tokenizer import load_tokenizer, train_sentencepiece
from qwen3_jax import storage

PLAN_VERSION = 1
CRASH_ENV = "DATA_PIPELINE_CRASH_AFTER_SHARDS"  # test hook: die (exit 3) mid-shard after this many shards
AUTO_PARALLEL_BYTES = 16 << 20  # default --workers: worker processes (~5 s to start) for inputs this big


def _plan(inputs: list[str], tok, text_key: str, shards: int, allow_special: bool, limit: int | None,
          skip_bad_files: bool = False) -> dict:
    expanded, counts, bad = [], [], {}
    for spec in corpus.expand_inputs(inputs):
        try:
            counts.append(corpus.count(spec))
            expanded.append(spec)
        except corpus.CorpusError as e:
            if not skip_bad_files:
                raise
            bad[spec] = e.reason
    total = sum(counts) if limit is None else min(limit, sum(counts))
    if total == 0:
        raise PrepareError(f"no records in {_names(expanded)}" + (f" ({len(bad)} bad file(s) skipped: "
                           f"{_names(list(bad))})" if bad else "") + "; check the --input paths")
    if total < shards:
        raise PrepareError(f"{total} records cannot fill {shards} shards; use fewer --shards")
    plan = {"version": PLAN_VERSION, "inputs": expanded, "counts": counts, "records": total,
            "text_key": text_key, "tokenizer": tok.name, "vocab_size": tok.vocab_size, "eos_id": tok.eos_id,
            "dtype": "uint16" if tok.vocab_size <= 1 << 16 else "uint32", "shards": shards,
            "allow_special": allow_special}
    if bad:  # only when there are any, so plans written before this key existed still match
        plan["skipped_files"] = bad
    return plan


def _names(files: list[str], k: int = 3) -> str:
    return ", ".join(files[:k]) + (f" and {len(files) - k} more" if len(files) > k else "") if files else "(none)"


def _no_documents(plan: dict, skipped: dict) -> PrepareError:
    """The error for a run that produced no document: why, and which --text-key would have worked."""
    why = ", ".join(f"{v:,} {r}" for r, v in skipped.items() if v) or "nothing"
    keyed = next(((spec, keys) for spec in plan["inputs"] if (keys := corpus.first_keys(spec)) is not None), None)
    msg = (f"no documents in {_names(plan['inputs'])}" + (f" with --text-key {plan['text_key']!r}" if keyed else "")
           + f" ({plan['records']:,} records skipped: {why}"
           + (f"; bad files left out: {_names(list(plan['skipped_files']))}" if plan.get("skipped_files") else "")
           + ")")
    if keyed:
        return PrepareError(f"{msg}; the first record of {keyed[0]} has keys {keyed[1]}: pass one of them as "
                            f"--text-key")
    return PrepareError(msg + "; every document was empty or unreadable")


def aggregate_stats(out: str, plan: dict, seconds: float, reasons: Sequence[str] = corpus.SKIP_REASONS) -> dict:
    """stats.json from the shards' .json files; `reasons`: the skip reasons always listed (0 or more)."""
    parts = [json.loads(storage.path(os.path.join(out, shard_name(s, plan["shards"]) + ".json")).read_text())
             for s in range(plan["shards"])]
    skipped, counts = collections.Counter(), collections.Counter()
    for p in parts:
        skipped.update(p["skipped"])
        counts.update(p.get("counts", {}))
    hd = np.sum([p["hist_documents"] for p in parts], axis=0)
    ht = np.sum([p["hist_tokens"] for p in parts], axis=0)
    docs, toks = sum(p["documents"] for p in parts), sum(p["tokens"] for p in parts)
    stats = {
        "documents": docs, "tokens": toks, "bytes": sum(p["bytes"] for p in parts),
        "skipped": {r: skipped.get(r, 0) for r in (*reasons, *sorted(set(skipped) - set(reasons)))},
        "mean_length": toks / max(docs, 1),
        "length_histogram": {"bucket_lower": [1 << k for k in range(HIST_BUCKETS)],
                             "documents": hd.tolist(), "tokens": ht.tolist()},
        "shards": [shard_name(s, plan["shards"]) + ".array_record" for s in range(plan["shards"])],
        "shard_documents": [p["documents"] for p in parts],
        "dtype": plan["dtype"], "eos_id": plan["eos_id"], "vocab_size": plan["vocab_size"],
        "tokenizer": plan["tokenizer"], "inputs": plan["inputs"], "skipped_files": plan.get("skipped_files", {}),
        "last_run_seconds": round(seconds, 2),
    }
    if plan.get("qa"):
        stats["qa"] = qa_report.summary(parts, plan)
    if plan.get("loss_on") == "response":
        prompt = sum(p["prompt_tokens"] for p in parts)
        stats.update(loss_on="response", prompt_tokens=prompt, response_tokens=toks - prompt,
                     counts=dict(sorted(counts.items())))
    return stats


def shard_bounds(plan: dict) -> list[int]:
    """Shard s holds records [bounds[s], bounds[s + 1])."""
    return [s * plan["records"] // plan["shards"] for s in range(plan["shards"] + 1)]


def pending_shards(out: str, plan: dict) -> list[int]:
    """The shards without their .json (the completion marker)."""
    n, present = plan["shards"], folder_names(out)
    return [s for s in range(n) if shard_name(s, n) + ".json" not in present]


def open_output(out: str, plan: dict, redo=None) -> dict | None:
    """Starts or resumes writing `plan`'s dataset in `out`: writes plan.json, or checks the one
    there (PrepareError naming the keys that differ). Returns the stats of a dataset already
    complete (nothing to do); otherwise removes a killed run's temporary files and returns None.
    `redo(old plan, plan)`: True when a plan that differs may replace the old one, the shards being
    rewritten (prepare.py: another quality_model cut; the scores in qa/ stay)."""
    if not storage.is_remote(out):  # a bucket has no folders to make
        os.makedirs(out, exist_ok=True)
    plan_path, stats_path = os.path.join(out, "plan.json"), os.path.join(out, "stats.json")
    if storage.path(plan_path).exists():
        old = read_json(plan_path)
        if old is None:
            raise PrepareError(f"{plan_path}: not valid JSON; delete {out} (or use another --out) and re-run")
        if "stages" in plan:  # plans written before the QA stages existed: tokenize only
            old.setdefault("stages", ["tokenize"])
        if diff := sorted(k for k in set(plan) | set(old) if old.get(k) != plan.get(k)):
            if redo is None or not redo(old, plan):
                raise PrepareError(f"{out} holds a different dataset (plan differs in {diff}); use another --out")
            _clear_outputs(out, old)
            write_json(plan_path, plan)
        if storage.path(stats_path).exists() and not pending_shards(out, old) and (st := read_json(stats_path)):
            return st  # complete; a shard whose .json was deleted is redone, an unreadable stats.json rewritten
    else:
        write_json(plan_path, plan)
    for f in folder_names(out):  # leftovers of a killed run
        if ".tmp" in f:
            storage.path(os.path.join(out, f)).unlink(missing_ok=True)
    return None


def _clear_outputs(out: str, plan: dict) -> None:
    """Removes a dataset's shards, stats, report and quality cut (not its plan or its qa/ analysis)."""
    n = plan["shards"]
    for s in range(n):
        for ext in (".json", ".array_record", ".lengths.npy"):  # the .json (completion marker) first
            storage.path(os.path.join(out, shard_name(s, n) + ext)).unlink(missing_ok=True)
    for f in ("stats.json", "removed_samples.jsonl", "qa/selection.json",
              *(f"report/{st}.png" for st in qa_store.STAGES)):
        storage.path(os.path.join(out, f)).unlink(missing_ok=True)


def _workers(workers: int | None, plan: dict, todo: list[int]) -> int:
    """Worker processes for the local runner: --workers, else one per CPU (at most one per shard)
    when the inputs are big enough to pay the workers' start-up, else none (this process)."""
    if workers is not None:
        return max(min(workers, len(todo)), 1)
    size = 0
    for spec in plan["inputs"]:
        try:
            size += corpus.builtin_bytes(spec) if spec.startswith("builtin:") else storage.path(spec).stat().length
        except OSError:
            pass
    size = size * plan["records"] // max(sum(plan["counts"]), 1)  # --limit
    return max(min(os.cpu_count() or 1, len(todo)), 1) if size >= AUTO_PARALLEL_BYTES else 1


def prepare(inputs: Sequence[str], tokenizer: str, out: str, *, text_key: str = "text", shards: int = 8,
            workers: int | None = None, strict: bool = False, allow_special: bool = False,
            limit: int | None = None, progress: bool = True, batch_docs: int = 64,
            skip_bad_files: bool = False, runner: str = "local", beam_args: Sequence[str] | None = None,
            progress_every: float = 10.0, dedup: bool = False, decontaminate: Sequence[str] = (),
            quality: str | None = None, quality_threshold: float | None = None,
            quality_keep_fraction: float | None = None, quality_tokenizer: str | None = None,
            quality_max_chars: int = 4096, near_dup_threshold: float = 0.8, samples: int = 8) -> dict:
    """Tokenizes `inputs` into `out` (see module doc). Returns the stats; a no-op when `out` is complete.

    skip_bad_files: leave out input files that cannot be read whole (listed in stats["skipped_files"])
    instead of raising corpus.CorpusError naming the first one. runner / beam_args: the Beam runner
    ("local", or a runner name Beam knows) and its pipeline options; progress_every: seconds between
    progress lines (progress=False: none). dedup, decontaminate, quality (+ quality_*),
    near_dup_threshold: the QA stages (module doc); samples: removed documents kept per reason."""
    stats_path = os.path.join(out, "stats.json")
    tok = load_tokenizer(tokenizer)
    qa = qa_config.settings(dedup=dedup, decontaminate=list(decontaminate), quality=quality,
                            quality_threshold=quality_threshold, quality_keep_fraction=quality_keep_fraction,
                            quality_tokenizer=quality_tokenizer, quality_max_chars=quality_max_chars,
                            near_dup_threshold=near_dup_threshold)
    plan = _plan(list(inputs), tok, text_key, shards, allow_special, limit, skip_bad_files)
    plan["stages"] = [*qa, "tokenize"]
    if qa:
        plan["qa"] = qa
    created = not storage.path(out).is_dir()
    plan_path = os.path.join(out, "plan.json")
    old_plan = read_json(plan_path) if storage.path(plan_path).exists() else None
    if (st := open_output(out, plan, redo=qa_config.only_selection_differs)) is not None:
        return st
    if old_plan and qa_config.only_selection_differs({"stages": ["tokenize"], **old_plan}, plan):
        print(f"prepare.py: note: the quality cut changed ({_cut(old_plan)} -> {_cut(plan)}): rewriting the shards "
              f"of {out} from the scores in its qa/", file=sys.stderr)

    from data_pipeline import beam_run, write_stage  # heavy (apache_beam, ~2 s): only a run with work to do

    n = plan["shards"]
    bounds, todo = shard_bounds(plan), pending_shards(out, plan)
    nproc = _workers(workers, plan, todo) if runner == beam_run.LOCAL else 0
    beam_run.register_tokenizer(tokenizer, tok)  # the in-process runner uses the one loaded for the plan
    t0 = time.time()
    ctl = tempfile.mkdtemp(prefix="prepare-ctl-") if runner == beam_run.LOCAL else None
    job = {"plan": plan, "out": out, "ctl": ctl, "tokenizer": tokenizer, "bounds": bounds, "strict": strict,
           "batch_docs": batch_docs, "crash_after": int(os.environ.get(CRASH_ENV, "0")), "qa": None,
           "samples": samples}
    died = (f"a worker process died (out of memory? try fewer --workers); finished work in {out} is kept, "
            f"re-run the same command to resume")

    def run(build, stages: dict[str, int], procs: int = nproc) -> None:
        beam_run.run(build, runner=runner, workers=procs, beam_args=list(beam_args or []), ctl=ctl, stages=stages,
                     progress_every=progress_every if progress else None, died=died)

    to_write = {"write": sum(bounds[s + 1] - bounds[s] for s in todo)}
    try:
        if not qa or not _run_qa(out, plan, job, run, todo, to_write):
            run(lambda p: write_stage.build(p, job, todo), to_write)
    finally:
        if ctl:
            shutil.rmtree(ctl, ignore_errors=True)
    written = [s for s in todo if shard_name(s, n) + ".json" in folder_names(out)]
    stats = aggregate_stats(out, plan, time.time() - t0)
    if stats["documents"] == 0:  # nothing worth keeping: leave no plan a corrected re-run would clash with
        _clear_outputs(out, plan)
        storage.path(plan_path).unlink(missing_ok=True)
        for folder in ("qa", "report"):
            if storage.path(os.path.join(out, folder)).exists():
                storage.remove_tree(os.path.join(out, folder))
        if created and not storage.is_remote(out) and not os.listdir(out):
            os.rmdir(out)
        if qa and stats.get("qa", {}).get("documents_in"):
            raise PrepareError(f"the QA stages removed every document ({stats['qa']['removed']}); "
                               f"see --dedup / --decontaminate / --quality")
        raise _no_documents(plan, stats["skipped"])
    if qa:
        _report(out, plan, stats, job, samples)
    stats["last_run_shards_written"] = written
    write_json(stats_path, stats)
    return stats


def _cut(plan: dict) -> str:
    m = plan.get("qa", {}).get("quality_model", {})
    return (f"--quality_threshold {m['threshold']}" if "threshold" in m
            else f"--quality_keep_fraction {m.get('keep_fraction')}")


def _run_qa(out: str, plan: dict, job: dict, run, todo: list[int], to_write: dict) -> bool:
    """The QA stages before tokenizing: the analysis (qa_pipeline.py) unless qa/ holds it for these
    settings, the model's scores (qa_model.py) likewise, then the quality cut; sets job["qa"].
    Without a model the analysis pipeline also writes the shards: True when it did."""
    qa, n = plan["qa"], plan["shards"]
    job["qa"] = {**qa, "benchmarks": qa.get("decontaminate", {}).get("files", [])}
    model = "quality_model" in qa
    if (analysis := qa_config.analysis(qa)) and qa_store.marker(out, "analysis") != analysis:
        from data_pipeline import qa_pipeline  # heavy (apache_beam): only with analysis stages to run
        run(lambda p: qa_pipeline.build(p, job, analysis, None if model else todo),
            {"qa": plan["records"], **({} if model else to_write)})
        if not model:
            return True
    if model:
        from data_pipeline import qa_model  # heavy (jax and the model): only with --quality model:PATH
        if qa_store.marker(out, "scores") != qa_config.scoring(qa):
            run(lambda p: qa_model.build(p, job), {"score": plan["records"]}, procs=1)
            write_json(os.path.join(out, "qa", "scores.json"), qa_config.scoring(qa))
        job["qa"]["selection"] = qa_model.select(out, n, qa["quality_model"])
        write_json(os.path.join(out, "qa", "selection.json"), job["qa"]["selection"])
    return False


def _report(out: str, plan: dict, stats: dict, job: dict, samples: int) -> None:
    """stats["qa"], removed_samples.jsonl and the report PNGs (qa_report.py)."""
    parts = [read_json(os.path.join(out, shard_name(s, plan["shards"]) + ".json")) for s in range(plan["shards"])]
    selection = (job.get("qa") or {}).get("selection")
    qa_stats = {**stats["qa"], **qa_report.details(out, plan, selection)}
    qa_report.write_samples(out, parts, samples)
    scores = qa_report.all_scores(out, plan["shards"]) if "quality_model" in plan["qa"] else None
    pngs = qa_report.write_pngs(out, qa_stats, scores)
    if isinstance(pngs, str):
        print(f"prepare.py: note: {pngs}", file=sys.stderr)
    qa_stats["report"] = pngs
    stats["qa"] = qa_stats


def parse_named_datasets(values: Sequence[str], flag: str = "--data") -> dict[str, str]:
    """Command-line `NAME=DIR` pairs -> {name: prepared dataset folder}; errors name the value."""
    out: dict[str, str] = {}
    for v in values:
        name, sep, path = v.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"{flag} {v!r}: expected NAME=DIR")
        if name in out:
            raise ValueError(f"{flag} {v!r}: dataset name {name!r} given twice")
        if not storage.path(path).is_dir():
            raise ValueError(f"{flag} {v!r}: folder {path} does not exist")
        if not storage.path(os.path.join(path, "stats.json")).is_file():
            raise ValueError(f"{flag} {v!r}: {path} is not a prepared dataset folder (no stats.json)")
        out[name] = path
    return out


def prepare_builtin(out_dir: str, tokenizer: str = "qwen3", *, parts: Sequence[str] = ("code", "docs"),
                    shards: int = 4, workers: int | None = None, spm_vocab_size: int = 4096,
                    progress: bool = False) -> dict[str, str]:
    """Prepares the built-in Python-stdlib corpus end to end; idempotent (skips finished work).

    tokenizer: "qwen3" (the real Qwen3 BPE), "spm" (trains `out_dir/spm{vocab}/spm.model` on the
    built-in corpus first, if missing), or any path `load_tokenizer` accepts.
    Returns {part: dataset folder}, e.g. {"code": ".../code", "docs": ".../docs"}: one prepared
    dataset per part (builtin:python-stdlib-code, builtin:python-stdlib-docs), ready for DatasetSpec.
    """
    if tokenizer == "spm":
        tokenizer = train_sentencepiece(os.path.join(out_dir, f"spm{spm_vocab_size}"), spm_vocab_size)
    paths = {}
    for part in parts:
        paths[part] = os.path.join(out_dir, part)
        prepare([f"builtin:python-stdlib-{part}"], tokenizer, paths[part], shards=shards, workers=workers,
                progress=progress)
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    p = ArgumentParser(description=__doc__.split("\n\n")[0],
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--input", nargs="+", required=True, help="files/globs (jsonl[.gz|.zst], parquet, txt) "
                   "or builtin:python-stdlib[-code|-docs]")
    p.add_argument("--tokenizer", required=True, help="'qwen3', a tokenizer.json / HF folder, or a .model")
    p.add_argument("--out", required=True)
    p.add_argument("--text-key", default="text")
    p.add_argument("--shards", type=int, default=8)
    p.add_argument("--workers", type=int, default=None,
                   help="local runner's worker processes (default: one per CPU for inputs of 16 MB or more, else "
                        "this process; 0 or 1: this process)")
    p.add_argument("--runner", default="local",
                   help="Beam runner: 'local' (default), or DataflowRunner, FlinkRunner, SparkRunner, ... (the "
                        "arguments prepare.py does not know are then Beam pipeline options)")
    p.add_argument("--strict", action="store_true", help="stop at the first bad record (file:line)")
    p.add_argument("--skip-bad-files", action="store_true",
                   help="leave out unreadable input files (truncated .gz/.zst, not UTF-8, …) and list them "
                        "in stats.json instead of stopping")
    p.add_argument("--allow-special-tokens", action="store_true",
                   help="map special tokens spelled in the text (<|im_start|>, <think>, …) to their ids")
    p.add_argument("--limit", type=int, default=None, help="only the first N records")
    # the data QA stages (run before tokenizing; the order and the files: data_pipeline/qa_store.py)
    p.add_argument("--decontaminate", nargs="+", default=[], metavar="FILE",
                    help="remove documents sharing 13-grams with these benchmark files (jsonl: every string "
                         "field; else one item per line)")
    p.add_argument("--quality", default=None, metavar="rules[:web|:code][,model:PATH]",
                    help="'rules': Gopher / C4 rule filters for text, Codex / StarCoder rules for source files (by "
                         "extension; rules:web or rules:code: one set for all); 'model:PATH': bits per byte under a "
                         "checkpoint or Hugging Face folder, cut by --quality_threshold or --quality_keep_fraction")
    p.add_argument("--dedup", action="store_true", help="remove exact and near duplicates (MinHash + LSH), "
                    "keeping the lowest record of each cluster")
    p.add_argument("--near-dup-threshold", type=float, default=0.8, help="Jaccard similarity of word 5-gram "
                    "sets at which two documents are near duplicates")
    p.add_argument("--quality-threshold", type=float, default=None, help="remove documents above this many bits "
                    "per byte")
    p.add_argument("--quality-keep-fraction", type=float, default=None,
                    help="keep this share of the scored documents (the lowest bits per byte)")
    p.add_argument("--quality-tokenizer", default=None, help="the reference model's tokenizer (default: its HF "
                    "folder's, else --tokenizer)")
    p.add_argument("--quality-max-chars", type=int, default=4096, help="characters of each document scored")
    p.add_argument("--samples", type=int, default=8, help="removed documents per reason in removed_samples.jsonl")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--progress-every", type=float, default=10.0, help="seconds between progress lines")
    a, beam_args = p.parse_known_args(argv)
    if beam_args and a.runner == "local":
        p.error(f"unrecognized arguments: {' '.join(beam_args)}")
    try:
        st = prepare(a.input, a.tokenizer, a.out, text_key=a.text_key, shards=a.shards, workers=a.workers,
                     strict=a.strict, allow_special=a.allow_special_tokens, limit=a.limit,
                     progress=not a.no_progress, skip_bad_files=a.skip_bad_files, runner=a.runner,
                     beam_args=beam_args, progress_every=a.progress_every, dedup=a.dedup,
                     decontaminate=a.decontaminate, quality=a.quality, quality_threshold=a.quality_threshold,
                     quality_keep_fraction=a.quality_keep_fraction, quality_tokenizer=a.quality_tokenizer,
                     quality_max_chars=a.quality_max_chars, near_dup_threshold=a.near_dup_threshold,
                     samples=a.samples)
    except (PrepareError, OSError, ValueError) as e:  # corpus.CorpusError is a ValueError
        print(f"prepare.py: error: {e}", file=sys.stderr)
        return 2
    for f, why in st.get("skipped_files", {}).items():
        print(f"prepare.py: warning: skipped bad file {f}: {why}", file=sys.stderr)
    print(json.dumps({k: st[k] for k in ("documents", "tokens", "bytes", "skipped", "mean_length")}
                     | {"skipped_files": len(st.get("skipped_files", {}))}
                     | ({"removed": st["qa"]["removed"]} if "qa" in st else {})))
    return 0


if __name__ == "__main__":
    from data_pipeline.prepare import main as _main  # the module, not __main__: what Beam's workers unpickle
    sys.exit(_main())
