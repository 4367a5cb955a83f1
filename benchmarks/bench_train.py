"""Train-step speed and memory on this machine: step time, tokens/s, model TFLOP/s, peak memory.

  python benchmarks/bench_train.py [--steps 5] [--only smoke|slice]
  python benchmarks/bench_train.py --tiles     # attention on a CPU: reference vs chunked tile sizes

Rows: the cpu_smoke model (small MoE, 8 x 256 tokens) and a 4-layer slice of qwen3-0.6b at
4,096 tokens (batch 1), each with fp32 and bf16 compute (fp32 master parameters, AdamW).
Peak memory is XLA's compiled estimate (arguments + outputs + temporaries) and the process
peak RSS. On a GPU/TPU the MFU column uses the device's bf16 peak.
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np


def peak_rss_gib() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def program(cfg, batch, seq_len, loss_chunk=None):
    """The train step launch/train.py would build for `cfg` at this shape, on one device."""
    from qwen3_jax.train.build import build
    from qwen3_jax.train.config import TrainConfig

    tc = TrainConfig(steps=100, seq_len=seq_len, batch_size=batch, checkpoint_every=100, loss_chunk=loss_chunk)
    return build(cfg, tc, jax.devices()[:1])


def xla_gib(compiled) -> float:
    mem = compiled.memory_analysis()
    if mem is None:
        return float("nan")
    return (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
            - mem.alias_size_in_bytes) / 2**30


def random_batch(vocab, batch, seq_len):
    rng = np.random.RandomState(0)
    tok = rng.randint(0, vocab, (batch, seq_len)).astype(np.int32)
    return dict(tokens=tok, targets=np.roll(tok, -1, 1), loss_mask=np.ones((batch, seq_len), np.float32),
                segment_ids=np.ones((batch, seq_len), np.int32),
                positions=np.tile(np.arange(seq_len, dtype=np.int32), (batch, 1)))


def bench(name, cfg, batch, seq_len, steps, loss_chunk=None):
    from qwen3_jax.train.metrics import flops_per_token, peak_flops

    prog = program(cfg, batch, seq_len, loss_chunk)
    state = prog.init_state()
    b = random_batch(cfg.vocab_size, batch, seq_len)
    t0 = time.time()
    compiled = prog.compiled or prog.lower().compile()
    compile_s = time.time() - t0
    gib = xla_gib(compiled)
    state, _ = timed(compiled, state, b, 1)
    state, dt = timed(compiled, state, b, steps)
    tokens = batch * seq_len
    tflops = flops_per_token(cfg, seq_len) * tokens / dt / 1e12
    peak = peak_flops(jax.devices()[0].device_kind)
    mfu = f"{100 * tflops * 1e12 / peak:.1f}%" if peak else "-"
    name += f", loss chunk {loss_chunk}" if loss_chunk else ""
    print(f"| {name} | {cfg.compute_dtype} | {batch}x{seq_len} | {compile_s:.1f} | {dt:.3f} | {tokens / dt:,.0f} | "
          f"{tflops:.3f} | {mfu} | {gib:.2f} | {peak_rss_gib():.2f} |", flush=True)


def sweep(steps: int, max_run_t: int):
    """Stage-3 memory: the small-MoE train step at growing T, reference vs chunked attention."""
    from qwen3_jax.config import get_config

    print("\n| T | attention | XLA peak GiB | step s | tokens/s |")
    print("|---|---|---|---|---|")
    for T in (4096, 8192, 16384, 32768):
        for impl in ("reference", "chunked"):
            cfg = get_config("small-moe", moe_impl="dense", compute_dtype="float32", remat="full",
                             attention_impl=impl, attention_block=256)
            gib, dt = measure(cfg, 1, T, steps if (impl == "chunked" and T <= max_run_t) or T <= 4096 else 0)
            run = f"{dt:.2f} | {T / dt:,.0f}" if dt else "not run | -"
            print(f"| {T} | {impl} | {gib:.2f} | {run} |", flush=True)


def tiles(steps: int):
    """The attention `auto` picks on a CPU (attention_ops.AUTO_REFERENCE_MAX_T, DEFAULT_BLOCK):
    the demo's model (small-moe, fp32, remat none, blocked experts) at its stage shapes, reference
    vs chunked with 128/256/512-token tiles."""
    from qwen3_jax.config import get_config
    from qwen3_jax.model.attention_ops import DEFAULT_BLOCK, resolve_impl

    print("\n| batch x T | attention | step s | tokens/s | vs reference |")
    print("|---|---|---|---|---|")
    for batch, T in ((8, 256), (2, 1024), (2, 2048)):
        auto = resolve_impl("auto", T, "float32", jax.default_backend())
        ref = None
        for impl, block in (("reference", None), ("chunked", 128), ("chunked", 256), ("chunked", 512)):
            cfg = get_config("small-moe", compute_dtype="float32", remat="none", rope_theta=1e6,
                             attention_impl=impl, attention_block=block)
            dt = measure(cfg, batch, T, steps)[1]
            ref = ref or dt
            name = impl + (f" {block}" if block else "")
            mark = " (auto)" if (impl, block) == (auto, DEFAULT_BLOCK.get(auto)) else ""
            print(f"| {batch}x{T} | {name}{mark} | {dt:.3f} | {batch * T / dt:,.0f} | {ref / dt:.2f}x |", flush=True)


def measure(cfg, batch, seq_len, steps):
    prog = program(cfg, batch, seq_len)
    compiled = prog.compiled or prog.lower().compile()
    if not steps:
        return xla_gib(compiled), 0.0
    return xla_gib(compiled), timed(compiled, prog.init_state(), random_batch(cfg.vocab_size, batch, seq_len), steps)[1]


def timed(compiled, state, batch, steps):
    """(state, median seconds per step) over `steps` calls."""
    times = []
    for _ in range(steps):
        t = time.time()
        state, m = compiled(state, batch)
        jax.block_until_ready(m)
        times.append(time.time() - t)
    return state, float(np.median(times))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--only", choices=["smoke", "slice"], default=None)
    p.add_argument("--slice-layers", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--loss-chunk", type=int, default=2048, help="0: full logits at once")
    p.add_argument("--sweep", action="store_true", help="stage-3 memory sweep T=4K..32K instead")
    p.add_argument("--max-run-t", type=int, default=32768, help="sweep: run steps only up to this T")
    p.add_argument("--tiles", action="store_true", help="the CPU attention choice: reference vs chunked tiles")
    args = p.parse_args()
    if args.sweep:
        sweep(args.steps, args.max_run_t)
        return
    if args.tiles:
        tiles(args.steps)
        return
    from qwen3_jax.config import get_config

    print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()} ({jax.default_backend()})")
    print("| model | compute | batch | compile s | step s | tokens/s | model TFLOP/s | MFU | XLA peak GiB | RSS GiB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for dtype in ("float32", "bfloat16"):
        if args.only in (None, "smoke"):
            cfg = get_config("small-moe", moe_impl="dense", compute_dtype=dtype, remat="none", rope_theta=1e4)
            bench("cpu_smoke (small-moe)", cfg, 8, 256, args.steps)
        if args.only in (None, "slice"):
            impl = "chunked" if jax.default_backend() == "cpu" else "reference"
            cfg = get_config("qwen3-0.6b", num_layers=args.slice_layers, compute_dtype=dtype, remat="full",
                             attention_impl=impl)
            bench(f"qwen3-0.6b, {args.slice_layers} layers, {impl} attn", cfg, 1, args.seq_len, args.steps,
                  args.loss_chunk or None)


if __name__ == "__main__":
    main()
