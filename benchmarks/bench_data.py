"""Data pipeline throughput: prepare.py tokenization and packed batches per host.

    python benchmarks/bench_data.py [--work DIR] [--batches 200]

Prints a table: tokenization MB/s and tokens/s (Qwen3 tokenizer, built-in corpus) in one process and
with all CPUs; packed tokens/s per host and packing efficiency (non-padding fraction) at 4,096 and
32,768 tokens for each packer; and the cost of running several data shards on one host (what a
host does when a run resumes on fewer hosts than DATA_SHARDS).
"""
import argparse
import os
import shutil
import sys
import tempfile
import time

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # one thread per process: per-process numbers
sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

from data_pipeline.pipeline import make_dataset  # noqa: E402
from data_pipeline.prepare import prepare  # noqa: E402


def bench_prepare(work: str, workers: int, corpus: str = "builtin:python-stdlib"):
    out = os.path.join(work, f"prep-w{workers}")
    shutil.rmtree(out, ignore_errors=True)
    t = time.perf_counter()
    st = prepare([corpus], "qwen3", out, shards=8, workers=workers, progress=False)
    dt = time.perf_counter() - t
    return out, st, dt


def bench_pipeline(path: str, seq_len: int, batch: int, packing: str, batches: int, data_shards: int = 1):
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
    return total / dt, real / total


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    p.add_argument("--batches", type=int, default=200, help="batches timed per pipeline row")
    a = p.parse_args()
    work = a.work or tempfile.mkdtemp(prefix="bench_data_")
    cpus = os.cpu_count() or 1
    print(f"machine: {cpus} CPUs; corpus builtin:python-stdlib; tokenizer qwen3\n")
    print("| prepare.py (Qwen3 tokenizer) | processes | MB/s | M tokens/s | MB/s per process | M tokens/s per process |")
    print("|---|---|---|---|---|---|")
    path = None
    for w in (0, cpus):
        path, st, dt = bench_prepare(work, w)
        n = max(w, 1)
        print(f"| {st['documents']:,} docs, {st['bytes'] / 1e6:.1f} MB, {st['tokens'] / 1e6:.2f} M tokens | "
              f"{n} | {st['bytes'] / 1e6 / dt:.2f} | {st['tokens'] / 1e6 / dt:.2f} | "
              f"{st['bytes'] / 1e6 / dt / n:.2f} | {st['tokens'] / 1e6 / dt / n:.2f} |")
    print("\n| pipeline (1 host, from ArrayRecord) | seq_len | rows/batch | packed M tokens/s per host | "
          "efficiency (non-pad) |")
    print("|---|---|---|---|---|")
    for seq_len, batch in ((4096, 8), (32768, 2)):
        for packing in ("concat_split", "first_fit", "best_fit"):
            n = a.batches if seq_len == 4096 else max(a.batches // 4, 10)
            tps, eff = bench_pipeline(path, seq_len, batch, packing, n)
            print(f"| {packing} | {seq_len:,} | {batch} | {tps / 1e6:.1f} | {eff:.1%} |")
    print("\n| data shards on this host (4,096 x 32 rows) | concat_split M tokens/s | efficiency | "
          "first_fit M tokens/s | efficiency |")
    print("|---|---|---|---|---|")
    for shards in (1, 4, 16):
        cells = []
        for packing in ("concat_split", "first_fit"):
            tps, eff = bench_pipeline(path, 4096, 32, packing, max(a.batches // 4, 10), data_shards=shards)
            cells += [f"{tps / 1e6:.1f}", f"{eff:.1%}"]
        print(f"| {shards} | " + " | ".join(cells) + " |")
    if a.work is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
