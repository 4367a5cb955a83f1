"""Attention implementations: step time and memory at long sequence lengths.

    python benchmarks/bench_attention.py                      # T = 4K..32K, all impls this backend runs
    python benchmarks/bench_attention.py --lengths 4096 8192 --impls chunked --blocks 256 512

Two workloads per (impl, T):
  op     forward + backward of the attention op alone: jax.grad of sum(o * w) wrt q, k, v.
  model  a train-like step of a small Qwen3 (qwen3_jax.create_model): jax.grad of the mean
         logit wrt all parameters, with the impl selected through ModelConfig.attention_impl.
Each row runs in its own subprocess so `peak RSS` is that configuration's own. `temp` and `args`
are XLA's compiled memory_analysis(); a configuration whose compiled temp + argument bytes exceed
--max-gib is compiled (to report its size) but not run.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

BACKEND_IMPLS = {"cpu": ("reference", "chunked"), "gpu": ("reference", "chunked", "cudnn"),
                 "tpu": ("reference", "chunked", "splash")}


def _packed_segments(B, T, doc_len):
    import jax.numpy as jnp
    ids = jnp.arange(T, dtype=jnp.int32) // doc_len + 1
    return jnp.broadcast_to(ids, (B, T))


def _op_step(args, impl, T, block):
    import jax
    import jax.numpy as jnp

    from qwen3_jax.model.attention_ops import attention

    B, N, K, H = args.batch, args.heads, args.kv_heads, args.head_dim
    dtype = jnp.dtype(args.dtype)
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    q = jax.random.normal(keys[0], (B, T, N, H), dtype)
    k = jax.random.normal(keys[1], (B, T, K, H), dtype)
    v = jax.random.normal(keys[2], (B, T, K, H), dtype)
    seg = _packed_segments(B, T, args.doc_len) if args.doc_len else None

    def loss(q, k, v):
        o = attention(q, k, v, seg, impl=impl, block=block)
        return jnp.sum(o.astype(jnp.float32) * 1e-3)

    return jax.jit(jax.grad(loss, argnums=(0, 1, 2))), (q, k, v)


def _model_step(args, impl, T, block):
    import jax
    import jax.numpy as jnp
    from flax import nnx

    import qwen3_jax

    cfg = qwen3_jax.get_config("tiny-dense", num_heads=args.heads, num_kv_heads=args.kv_heads,
                               head_dim=args.head_dim, compute_dtype=args.dtype, attention_impl=impl,
                               attention_block=block, max_position_embeddings=max(T, 4096), remat="full")
    graphdef, params = nnx.split(qwen3_jax.create_model(cfg))
    tokens = jax.random.randint(jax.random.PRNGKey(0), (args.batch, T), 0, cfg.vocab_size)
    seg = _packed_segments(args.batch, T, args.doc_len) if args.doc_len else None
    positions = (jnp.arange(T, dtype=jnp.int32) % args.doc_len if args.doc_len
                 else jnp.arange(T, dtype=jnp.int32))
    positions = jnp.broadcast_to(positions, (args.batch, T))

    def loss(params, tokens, positions):
        logits = nnx.merge(graphdef, params)(tokens, positions, seg)
        return logits.mean()

    return jax.jit(jax.grad(loss)), (params, tokens, positions)


def run_one(args, workload, impl, T, block):
    """Compile, maybe run, and return one result row (called in a fresh subprocess)."""
    import jax

    make = _op_step if workload == "op" else _model_step
    step, inputs = make(args, impl, T, block)
    compiled = step.lower(*inputs).compile()
    mem = compiled.memory_analysis()
    row = dict(workload=workload, impl=impl, T=T, block=block if impl == "chunked" else None,
               temp_mib=mem.temp_size_in_bytes / 2**20, args_mib=mem.argument_size_in_bytes / 2**20)
    if (mem.temp_size_in_bytes + mem.argument_size_in_bytes) / 2**30 > args.max_gib:
        row["note"] = f"not run: needs > {args.max_gib:g} GiB"
        return row
    jax.block_until_ready(compiled(*inputs))  # warm-up
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*inputs))
        times.append(time.perf_counter() - t0)
    row["step_s"] = min(times)
    row["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return row


def _fmt(row):
    step = f"{row['step_s']:.3f}" if "step_s" in row else "-"
    rss = f"{row['peak_rss_mib']:.0f}" if "peak_rss_mib" in row else "-"
    block = row.get("block") or "-"
    return (f"| {row['workload']:5} | {row['impl']:9} | {block!s:>5} | {row['T']:>6} | {step:>9} | "
            f"{row['temp_mib']:>10.1f} | {row['args_mib']:>8.1f} | {rss:>9} | {row.get('note', '')} |")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192, 16384, 32768])
    p.add_argument("--impls", nargs="+", default=None, help="default: those the backend runs")
    p.add_argument("--blocks", type=int, nargs="+", default=[512], help="chunked tile sizes")
    p.add_argument("--workloads", nargs="+", default=["op", "model"], choices=["op", "model"])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--doc-len", type=int, default=0, help="pack documents of this length (0: one document)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--max-gib", type=float, default=12.0, help="skip running configs needing more")
    p.add_argument("--one", nargs=4, metavar=("WORKLOAD", "IMPL", "T", "BLOCK"), help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.one:
        workload, impl, T, block = args.one
        print("RESULT " + json.dumps(run_one(args, workload, impl, int(T), int(block))), flush=True)
        return

    import jax
    backend = jax.default_backend()
    impls = args.impls or BACKEND_IMPLS.get(backend, ("reference", "chunked"))
    print(f"backend {backend} ({jax.devices()[0].device_kind}), B={args.batch} N={args.heads} "
          f"K={args.kv_heads} H={args.head_dim} {args.dtype}, "
          f"{'documents of ' + str(args.doc_len) if args.doc_len else 'one document per row'}; "
          f"step = fastest of {args.repeats} after a warm-up\n")
    print("| work  | impl      | block |      T | step (s)  |  temp MiB  | args MiB | peak RSS MiB | note |")
    print("|-------|-----------|-------|--------|-----------|------------|----------|--------------|------|")
    passthrough = [a for a in sys.argv[1:]]
    for workload in args.workloads:
        for T in args.lengths:
            for impl in impls:
                for block in (args.blocks if impl == "chunked" else [args.blocks[0]]):
                    cmd = [sys.executable, __file__, *passthrough, "--one", workload, impl, str(T), str(block)]
                    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
                        [os.path.dirname(os.path.dirname(os.path.abspath(__file__))), os.environ.get("PYTHONPATH", "")]))
                    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
                    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
                    if proc.returncode or not lines:
                        err = (proc.stderr.strip().splitlines() or ["?"])[-1][:80]
                        print(f"| {workload:5} | {impl:9} | {block:>5} | {T:>6} | failed: {err} |", flush=True)
                        continue
                    print(_fmt(json.loads(lines[-1][len("RESULT "):])), flush=True)


if __name__ == "__main__":
    main()
