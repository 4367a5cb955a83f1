"""CPU train-step time under context parallelism: CP=2 against CP=1 on the same shape, 8 fake CPU
devices (one process; XLA's CPU devices share this machine's cores).

  python benchmarks/bench_cp.py [--model tiny-moe] [--seq_len 1024] [--batch 8] [--rounds 5]
      [--json benchmarks/reports/cp.json]
  python benchmarks/bench_cp.py --from_json benchmarks/reports/cp.json   # print, run nothing

Each side is the train step `qwen3_jax.train.build` makes (the one launch/train.py runs) for the
same model, global batch and sequence length of packed multi-document rows, on 8 devices: CP=1 is
FSDP 8; CP=2 is FSDP 4 x context 2 (the sequence in zig-zag order, K/V all-gathered per layer:
qwen3_jax/model/context_parallel.py). Both are compiled and run once (warm-up), then they run
interleaved, `--rounds` rounds, so a busy machine slows both alike; the table shows each side's
median, min and max, and the ratio of medians with the range of per-round ratios. On fake CPU
devices CP only moves work between threads of the same cores: this measures the overhead of the
permutation, the gathers and the blocked CP kernel, not the memory it saves on a TPU slice.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import bench_report  # noqa: E402

REPORT = bench_report.REPORTS / "cp.json"
SIDES = {"cp1_fsdp8": dict(ici_fsdp=8, ici_context=1), "cp2_fsdp4": dict(ici_fsdp=4, ici_context=2)}


def markdown(report: dict) -> str:
    s = report["settings"]
    load = report["machine"].get("load_average_at_start")
    lines = [bench_report.provenance(report) + ".",
             f"{s['model']}, {s['batch']} rows x {s['seq_len']} tokens (packed documents), {s['devices']} fake CPU "
             f"devices, remat {s['remat']}; {s['rounds']} interleaved rounds after one warm-up step each"
             + (f"; load average at start {load[0]:.1f}" if load else "") + ".",
             "", "| mesh | step median s | min s | max s | vs CP=1 (median) | per-round ratio range |",
             "|---|---|---|---|---|---|"]
    base = report["sides"]["cp1_fsdp8"]["times_s"]
    for name, side in report["sides"].items():
        t = side["times_s"]
        ratios = [a / b for a, b in zip(t, base)]
        lines.append(f"| {name} | {statistics.median(t):.3f} | {min(t):.3f} | {max(t):.3f} | "
                     f"{statistics.median(t) / statistics.median(base):.2f}x | {min(ratios):.2f}-{max(ratios):.2f} |")
    return "\n".join(lines) + "\n"


def _batch(vocab, B, T, seed=0):
    import numpy as np
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, vocab, (B, T)).astype(np.int32)
    seg, pos = np.zeros((B, T), np.int32), np.zeros((B, T), np.int32)
    for b in range(B):
        t, doc = 0, 1
        while t < T:
            n = min(int(rng.integers(T // 8, T // 2)), T - t)
            seg[b, t:t + n], pos[b, t:t + n] = doc, np.arange(n)
            t, doc = t + n, doc + 1
    mask = (np.roll(seg, -1, 1) == seg).astype(np.float32)
    return dict(tokens=tokens, targets=np.roll(tokens, -1, 1), segment_ids=seg, positions=pos, loss_mask=mask)


def measure(args) -> dict:
    import jax

    from qwen3_jax import configurables
    from qwen3_jax.sharding import MeshConfig
    from qwen3_jax.train.build import build

    model, tc = configurables.read_run(["cpu_smoke.gin", f"model/{args.model}.gin"],
                                       [f"SEQ_LEN={args.seq_len}", f"BATCH_SIZE={args.batch}"])
    model = model.replace(remat=args.remat, max_position_embeddings=max(model.max_position_embeddings, args.seq_len))
    batch = _batch(model.vocab_size, args.batch, args.seq_len)
    runs = {}
    for name, mesh_kw in SIDES.items():
        program = build(model, dataclasses.replace(tc, mesh=MeshConfig(**mesh_kw)), jax.devices()[:8])
        t0 = time.perf_counter()
        compiled = program.lower().compile()
        compile_s = time.perf_counter() - t0
        state = program.init_state()
        b = jax.device_put(batch, program.batch_sharding)
        state, m = compiled(state, b)  # warm-up
        jax.block_until_ready(m)
        runs[name] = {"compiled": compiled, "state": state, "batch": b, "times_s": [], "compile_s": compile_s,
                      "attention": program.attention, "first_loss": float(m["loss"])}
    for _ in range(args.rounds):
        for name, r in runs.items():
            t0 = time.perf_counter()
            r["state"], m = r["compiled"](r["state"], r["batch"])
            jax.block_until_ready(m)
            r["times_s"].append(time.perf_counter() - t0)
    return {**bench_report.header("bench_cp"),
            "settings": {"model": args.model, "seq_len": args.seq_len, "batch": args.batch, "rounds": args.rounds,
                         "devices": 8, "remat": args.remat},
            "sides": {n: {k: v for k, v in r.items() if k not in ("compiled", "state", "batch")}
                      for n, r in runs.items()}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny-moe")
    p.add_argument("--seq_len", type=int, default=1024)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--remat", default="none")
    p.add_argument("--json", default=str(REPORT))
    p.add_argument("--from_json", default=None)
    return bench_report.measure_or_print(p.parse_args(argv), measure, markdown)


if __name__ == "__main__":
    sys.exit(main())
