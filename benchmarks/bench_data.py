"""Data preparation throughput: prepare.py on Apache Beam against the previous prepare.py (a
multiprocessing pool; data_pipeline/ as of git a297184, unpacked into a temporary folder, never
imported by the package), tokenize-only and with the data QA chain, 1 and 2 workers, on the same
input in the same run; what each QA stage removes from that corpus; our numpy MinHash against
datasketch's; the README walk-through's prepare.py commands before -> after; packed batches per host.

    python benchmarks/bench_data.py [--corpus builtin:python-stdlib] [--rounds 1] [--json FILE]
    python benchmarks/bench_data.py --from_json benchmarks/reports/data.json   # print a report

Every prepare.py run is the command line in a fresh process (interpreter start and imports
included: what a user waits for), old and new interleaved round by round. "1 worker" is one
process (the previous code's --workers 0, the new local runner in-process); "2 workers" is
--workers 2 (the previous code: 2 tokenizer processes beside its main process, which reads and
writes; the new: 2 Beam worker processes). The QA chain is --decontaminate (the bundled tiny
multiple-choice set) --quality rules --dedup. Tokens per second count every token of the input
(a document the QA chain removes is tokenized too, to count its tokens).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import bench_report  # noqa: E402

BEFORE = "a297184"  # the last commit with the multiprocessing prepare.py
PREV = "465182c"  # prepare.py on Beam before the faster tokenizer, code rules and per-worker split (issue 26)
IMPLS = ("old", "prev", "new")  # BEFORE, PREV, this checkout
TINY_MC = os.path.join(ROOT, "data_pipeline", "evalsets", "tiny_mc.jsonl")
QA_FLAGS = ["--decontaminate", TINY_MC, "--quality", "rules", "--dedup"]


def old_tree(work: str, rev: str = BEFORE, name: str = "old") -> str:
    """data_pipeline/ as of `rev`, unpacked under work/<name> (run with PYTHONPATH=work/<name>)."""
    dst = os.path.join(work, name)
    os.makedirs(dst, exist_ok=True)
    archive = subprocess.run(["git", "archive", rev, "data_pipeline"], cwd=ROOT, capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", dst], input=archive.stdout, check=True)
    return dst


def prepare_cmd(impl: str, trees: dict, args: list[str]) -> tuple[list[str], dict]:
    env = {**os.environ, "PYTHONPATH": trees[impl] + (os.pathsep + ROOT if impl != "new" else ""),
           "TOKENIZERS_PARALLELISM": "false", "JAX_PLATFORMS": "cpu"}
    return [sys.executable, os.path.join(trees[impl], "data_pipeline", "prepare.py"), *args], env


def _cpu() -> float:
    """CPU seconds (user + system) of the child processes waited for so far (their children too)."""
    u = resource.getrusage(resource.RUSAGE_CHILDREN)
    return u.ru_utime + u.ru_stime


_SPLIT = re.compile(r"prepare: (\w+) .* · per worker: (.*)$")
_WORKER = re.compile(r"([\d,]+) docs/(?:([\d.]+)M tokens/)?([\d.]+) CPU s")


def per_worker(stderr: str) -> dict:
    """{stage: [{docs, tokens, cpu_seconds}, ...]}: the new prepare.py's last progress line per
    stage says how its worker processes shared the work (documents, tokens, CPU seconds each)."""
    out = {}
    for line in stderr.splitlines():
        if m := _SPLIT.search(line):
            out[m.group(1)] = [{"docs": int(d.replace(",", "")), "tokens": round(float(t or 0) * 1e6),
                                "cpu_seconds": float(c)} for d, t, c in _WORKER.findall(m.group(2))]
    return out


def run_prepare(impl: str, trees: dict, args: list[str]) -> dict:
    # the new prepare.py: only its final progress lines (they hold the per-worker split)
    cmd, env = prepare_cmd(impl, trees, [*args, *(["--no_progress"] if impl == "old" else ["--progress_every", "1e9"])])
    load, cpu, t = os.getloadavg()[0], _cpu(), time.perf_counter()
    r = subprocess.run(cmd, cwd=trees[impl], env=env, capture_output=True, text=True)
    dt, cpu = time.perf_counter() - t, _cpu() - cpu
    if r.returncode:
        raise RuntimeError(f"{impl} prepare.py failed: {r.stderr[-2000:]}")
    split = per_worker(r.stderr) if impl == "new" else {}
    return {"seconds": round(dt, 2), "cpu_seconds": round(cpu, 2), "load_before": round(load, 2),
            **json.loads(r.stdout.strip().splitlines()[-1]), **({"per_worker": split} if split else {})}


def bench_prepare(a, trees: dict, work: str) -> list[dict]:
    runs = []
    plan = [("old", "tokenize", 0, 1), ("prev", "tokenize", 1, 1), ("new", "tokenize", 1, 1),
            ("old", "tokenize", 2, 2), ("prev", "tokenize", 2, 2), ("new", "tokenize", 2, 2),
            ("prev", "qa", 1, 1), ("new", "qa", 1, 1), ("prev", "qa", 2, 2), ("new", "qa", 2, 2)]
    for rnd in range(a.rounds):
        for impl, chain, flag, workers in plan:
            out = os.path.join(work, f"prep-{impl}-{chain}-{workers}")
            shutil.rmtree(out, ignore_errors=True)
            args = ["--input", a.corpus, "--tokenizer", "qwen3", "--out", out, "--shards", "8",
                    "--workers", str(flag), *(QA_FLAGS if chain == "qa" else [])]
            r = run_prepare(impl, trees, args)
            row = {"impl": impl, "chain": chain, "workers": workers, "round": rnd, **r}
            if chain == "qa":
                st = json.load(open(os.path.join(out, "stats.json")))
                row["qa"] = {k: st["qa"][k] for k in ("documents_in", "per_stage")}
                row["tokens_in"] = r["tokens"] + sum(st["qa"]["removed_tokens"].values())
            runs.append(row)
            print(f"  {impl} {chain} {workers} worker(s): {r['seconds']:.1f} s, "
                  f"{row.get('tokens_in', r['tokens']) / r['seconds'] / 1e6:.3f} M tokens/s", file=sys.stderr,
                  flush=True)
    return runs


def bench_minhash(corpus: str, docs: int = 300) -> dict:
    """M shingles/s of datasketch's MinHash (update_batch, 128 permutations) and ours, same documents."""
    import numpy as np

    from data_pipeline import corpus as corpus_lib
    from data_pipeline import qa_text
    texts = [d.text for d in corpus_lib.iter_records([corpus]) if d.text][:docs]
    ours = qa_text.MinHasher(128, 1)
    t = time.perf_counter()
    n = 0
    for x in texts:
        sh = qa_text.shingles(qa_text.word_hashes(qa_text.words(x)))
        ours.signature(sh)
        n += len(sh)
    t_ours = time.perf_counter() - t
    out = {"documents": len(texts), "shingles": n, "ours_seconds": round(t_ours, 3)}
    try:
        from datasketch import MinHash  # optional: only this comparison uses it
    except ImportError:
        return {**out, "datasketch": "not installed"}
    t = time.perf_counter()
    for x in texts:
        ws = qa_text.words(x)
        grams = [" ".join(ws[i:i + 5]).encode() for i in range(max(1, len(ws) - 4))]
        m = MinHash(num_perm=128)
        m.update_batch(grams)
    out["datasketch_seconds"] = round(time.perf_counter() - t, 3)
    del np
    return out


WALK_DOCS = ("web", "math", "multilingual")
WALK_CODE = ("code", "reasoning")


def bench_walkthrough(trees: dict, work: str, rounds: int) -> list[dict]:
    """The README walk-through's five prepare.py commands (its spm4k tokenizer trained once)."""
    from data_pipeline.text_tokenizer import train_sentencepiece
    spm = train_sentencepiece(os.path.join(work, "spm4k"), 4096)
    rows = []
    for rnd in range(rounds):
        for impl in IMPLS:
            total = cpu = 0.0
            for name in (*WALK_DOCS, *WALK_CODE):
                part = "docs" if name in WALK_DOCS else "code"
                out = os.path.join(work, f"walk-{impl}", name)
                shutil.rmtree(out, ignore_errors=True)
                cmd, env = prepare_cmd(impl, trees, ["--input", f"builtin:python-stdlib-{part}", "--tokenizer", spm,
                                                     "--out", out, "--limit", "300", "--no_progress"])
                cpu0 = _cpu()
                t = time.perf_counter()
                subprocess.run(cmd, cwd=trees[impl], env=env, capture_output=True, check=True)
                total += time.perf_counter() - t
                cpu += _cpu() - cpu0
            rows.append({"impl": impl, "round": rnd, "seconds": round(total, 2), "cpu_seconds": round(cpu, 2),
                         "load_before": round(os.getloadavg()[0], 2)})
            print(f"  walk-through {impl}: {total:.1f} s, {cpu:.1f} CPU s", file=sys.stderr, flush=True)
    return rows


def bench_pipeline(path: str, seq_len: int, batch: int, packing: str, batches: int, data_shards: int = 1):
    from data_pipeline.pipeline import make_dataset
    it = make_dataset(path, seq_len=seq_len, global_batch_size=batch, packing=packing, process_index=0,
                      process_count=1, data_shards=data_shards)
    for _ in range(3):  # warm up (threads, first reads)
        next(it)
    real = total = 0
    t = time.perf_counter()
    for _ in range(batches):
        b = next(it)
        real += int((b["segment_ids"] > 0).sum())
        total += b["segment_ids"].size
    dt = time.perf_counter() - t
    it.close()
    return {"packing": packing, "seq_len": seq_len, "rows": batch, "data_shards": data_shards,
            "tokens_per_s": round(total / dt), "efficiency": round(real / total, 4)}


def as_jsonl(corpus: str, work: str) -> str:
    """`corpus` written out as work/corpus.jsonl ({"text": ...} per document): reading is then
    json.loads, as for a real corpus, not the built-in corpus's parsing of Python modules."""
    from data_pipeline import corpus as corpus_lib
    path = os.path.join(work, "corpus.jsonl")
    with open(path, "w", encoding="utf-8") as f:
        for d in corpus_lib.iter_records([corpus]):
            if d.text:
                f.write(json.dumps({"text": d.text}) + "\n")
    return path


def measure(a) -> dict:
    work = a.work or tempfile.mkdtemp(prefix="bench_data_")
    os.makedirs(work, exist_ok=True)
    trees = {"old": old_tree(work), "prev": old_tree(work, PREV, "prev"), "new": ROOT}
    name = a.corpus
    if a.as_jsonl:
        name, a.corpus = f"{a.corpus} as jsonl", as_jsonl(a.corpus, work)
    report = {**bench_report.header("bench_data"), "corpus": name, "before": BEFORE, "prev": PREV,
              "rounds": a.rounds}
    report["prepare"] = bench_prepare(a, trees, work)
    report["minhash"] = bench_minhash(a.corpus) if not a.as_jsonl else None
    if not a.skip_walkthrough:
        report["walkthrough"] = bench_walkthrough(trees, work, a.rounds)
    if not a.skip_pipeline:
        path = os.path.join(work, "prep-new-tokenize-1")
        rows = []
        for seq_len, batch in ((4096, 8), (32768, 2)):
            for packing in ("concat_split", "first_fit", "best_fit"):
                rows.append(bench_pipeline(path, seq_len, batch, packing,
                                           a.batches if seq_len == 4096 else max(a.batches // 4, 10)))
        for shards in (1, 4, 16):
            for packing in ("concat_split", "first_fit"):
                rows.append(bench_pipeline(path, 4096, 32, packing, max(a.batches // 4, 10), data_shards=shards))
        report["pipeline"] = rows
    report["load_average_at_end"] = list(os.getloadavg())
    if a.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return report


def _median(rows, key):
    return statistics.median(r[key] for r in rows)


NAMES = {"old": "before (multiprocessing)", "prev": "Beam, tokenizers", "new": "Beam, now"}


def _spread(rows, key) -> str:
    xs = [r[key] for r in rows]
    return f"{statistics.median(xs):.1f} ({min(xs):.1f}–{max(xs):.1f})"


def markdown(report: dict) -> str:
    runs = report["prepare"]
    impls = [i for i in IMPLS if any(r["impl"] == i for r in runs)]
    revs = {"old": report["before"], "prev": report.get("prev", "?"), "new": report["machine"].get("commit", "HEAD")}
    out = [bench_report.provenance(report), "",
           f"prepare.py on `{report['corpus']}` (Qwen3 tokenizer, 8 shards): "
           + ", ".join(f"{NAMES[i]} (`{revs[i]}`)" for i in impls)
           + f"; median (min–max) of {report['rounds']} interleaved round(s), each run a fresh process. Wall time "
           f"depends on what else the machine runs (load average {_median(runs, 'load_before'):.1f} median, "
           f"{min(r['load_before'] for r in runs):.1f}–{max(r['load_before'] for r in runs):.1f}, on "
           f"{report['machine'].get('cores', '?')} cores); CPU seconds (every process of the run) much less:", "",
           "| chain | workers | prepare.py | wall s | CPU s | M tokens/s per worker (wall) | M tokens per CPU-second |"
           " load |", "|---|---|---|---|---|---|---|---|"]
    for chain in ("tokenize", "qa"):
        for w in (1, 2):
            for impl in impls:
                rs = [r for r in runs if r["impl"] == impl and r["chain"] == chain and r["workers"] == w]
                if not rs:
                    continue
                tok = _median(rs, "tokens_in" if chain == "qa" else "tokens")
                name = "tokenize only" if chain == "tokenize" else "QA chain + tokenize"
                wall, cpu = _median(rs, "seconds"), _median(rs, "cpu_seconds")
                out.append(f"| {name} | {w} | {NAMES[impl]} | {_spread(rs, 'seconds')} | {_spread(rs, 'cpu_seconds')} | "
                           f"{tok / wall / w / 1e6:.3f} | {tok / cpu / 1e6:.3f} | {_median(rs, 'load_before'):.1f} |")
    speedups = []
    for chain in ("tokenize", "qa"):
        for impl in impls:
            rs = [r for r in runs if r["impl"] == impl and r["chain"] == chain]
            one, two = [r for r in rs if r["workers"] == 1], [r for r in rs if r["workers"] == 2]
            if one and two:
                speedups.append(f"{NAMES[impl]} {chain} {_median(one, 'seconds') / _median(two, 'seconds'):.2f}x wall, "
                                f"{_median(one, 'cpu_seconds') / _median(two, 'cpu_seconds'):.2f} CPU ratio")
    out += ["", "1 -> 2 workers (wall speed-up; CPU seconds at 1 / at 2, 1.00 = no overhead): " + "; ".join(speedups)]
    split = [r for r in runs if r["impl"] == "new" and r["workers"] == 2 and r.get("per_worker")]
    if split:
        out += ["", "How the 2 worker processes shared the work (now; documents / M tokens / CPU seconds of each "
                "process, its start-up included; tokens per worker CPU-second):"]
        for r in split:
            for stage, ws in r["per_worker"].items():
                out.append(f"- {r['chain']} round {r['round']}, stage {stage}: " + "; ".join(
                    f"{x['docs']:,} docs" + (f" / {x['tokens'] / 1e6:.2f}M" if x["tokens"] else "")
                    + f" / {x['cpu_seconds']:.1f} s"
                    + (f" = {x['tokens'] / max(x['cpu_seconds'], 1e-9) / 1e6:.2f}M tokens per CPU-s"
                       if x["tokens"] else "")
                    for x in ws))
    qa = next((r["qa"] for r in runs if r["chain"] == "qa" and r["impl"] == "new"), None)
    if qa:
        out += ["", f"What the QA chain removes from `{report['corpus']}` ({qa['documents_in']:,} documents in):", "",
                "| stage | documents in | removed | tokens removed | kept | top reasons |", "|---|---|---|---|---|---|"]
        for stage, s in qa["per_stage"].items():
            worst = sorted(s["removed"].items(), key=lambda kv: -kv[1])
            worst = worst[:3] + [kv for kv in worst[3:] if kv[0].startswith("rules:code_")]  # the code rule set's too
            top = ", ".join(f"{k.split(':')[-1]} {v}" for k, v in worst)
            out.append(f"| {stage} | {s['in']:,} | {s['removed_documents']:,} | {s['removed_tokens']:,} | "
                       f"{s['kept']:,} | {top or '–'} |")
    m = report.get("minhash")
    if m:
        ds = m.get("datasketch_seconds")
        out += ["", f"MinHash, 128 permutations, {m['documents']} documents ({m['shingles']:,} word 5-gram shingles): "
                f"ours {m['shingles'] / m['ours_seconds'] / 1e6:.2f} M shingles/s"
                + (f", datasketch {m['shingles'] / ds / 1e6:.2f} M shingles/s (both including word splitting)"
                   if isinstance(ds, (int, float)) else f", datasketch {m.get('datasketch')}")]
    w = report.get("walkthrough")
    if w:
        out += ["", "README walk-through, its five prepare.py commands (--limit 300 each, spm4k, default --workers), "
                "wall s median (min–max), CPU s: " + "; ".join(
                    f"{NAMES[i]} {_spread(rs, 'seconds')}, {_median(rs, 'cpu_seconds'):.1f} CPU s"
                    for i in IMPLS if (rs := [r for r in w if r["impl"] == i]))]
    p = report.get("pipeline")
    if p:
        out += ["", "| pipeline (1 host, from ArrayRecord) | seq_len | rows/batch | data shards | packed M tokens/s | "
                "efficiency (non-pad) |", "|---|---|---|---|---|---|"]
        for r in p:
            out.append(f"| {r['packing']} | {r['seq_len']:,} | {r['rows']} | {r['data_shards']} | "
                       f"{r['tokens_per_s'] / 1e6:.1f} | {r['efficiency']:.1%} |")
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--corpus", default="builtin:python-stdlib", help="prepare.py --input for the throughput runs")
    p.add_argument("--as_jsonl", action="store_true", help="run on --corpus written out as one jsonl file")
    p.add_argument("--rounds", type=int, default=1, help="old/new runs interleaved this many times")
    p.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    p.add_argument("--batches", type=int, default=200, help="batches timed per pipeline row")
    p.add_argument("--skip_walkthrough", action="store_true")
    p.add_argument("--skip_pipeline", action="store_true")
    p.add_argument("--json", default=os.path.join(ROOT, "benchmarks", "reports", "data.json"))
    p.add_argument("--from_json", default=None, help="print this report; run nothing")
    return bench_report.measure_or_print(p.parse_args(argv), measure, markdown)


if __name__ == "__main__":
    sys.exit(main())
