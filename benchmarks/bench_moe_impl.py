"""Forward + backward time of each MoE expert-computation form (qwen3_jax.model.moe_compute) on
this machine, one MoE layer's experts at the side-by-side shapes (bench_vs_maxtext.py): 4,096
tokens (batch 4 x 1,024), d_model 512, 16 experts top-4, expert FFN 256, fp32.

  python benchmarks/bench_moe_impl.py [--reps 5] [--forms dense,ragged,blocked] [--blocks 64,128,256]

Each form is one jitted value_and_grad (loss = Σ y·probe, gradients to x, the router weights
and the three expert matrices); routing is a softmax top-4 of random logits, passed as an input
(not a constant XLA could fold). The forms run interleaved, `--reps` rounds, and the table shows
each form's median and min; `auto` is the form moe_impl='auto' picks on this backend.

Measured 2026-11-29 on the shared 2-core box (six other jobs running: absolute times several
times an idle machine's, ratios hold across runs), 3 reps, fwd+bwd median: dense 11.3 s,
ragged 27.8 s (0.41x dense), blocked C=256 2.75 s (4.1x), blocked C=128 2.21 s (5.1x); an
earlier 5-rep run: dense 18.4, ragged 44.2, blocked C=128 5.2, C=256 5.7, C=512 6.1 s. Hence
BLOCK_ROWS = 128.
"""

from __future__ import annotations

import argparse
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--d_model", type=int, default=512)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--top_k", type=int, default=4)
    p.add_argument("--ffn", type=int, default=256)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--forms", default="dense,ragged,blocked")
    p.add_argument("--blocks", default="", help="extra blocked-form block sizes C to time, e.g. 64,128,512")
    p.add_argument("--skew", type=float, default=0.0, help="added to expert 0's router logit (0: balanced)")
    args = p.parse_args()

    from qwen3_jax.model import moe_compute

    N, D, E, k, F = args.tokens, args.d_model, args.experts, args.top_k, args.ffn
    r = np.random.default_rng(0)
    logits = r.normal(size=(N, E)) + np.eye(E)[0] * args.skew
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    ids = np.argsort(-probs, 1)[:, :k]
    w = np.take_along_axis(probs, ids, 1)
    w /= w.sum(1, keepdims=True)
    arrays = dict(x=r.normal(size=(N, D)), w=w, gate=r.normal(size=(E, D, F)) / D ** 0.5,
                  up=r.normal(size=(E, D, F)) / D ** 0.5, down=r.normal(size=(E, F, D)) / F ** 0.5,
                  probe=r.normal(size=(N, D)))
    arrays = {kk: jnp.asarray(v, jnp.float32) for kk, v in arrays.items()}
    ids = jnp.asarray(ids, jnp.int32)

    fns = {"dense": moe_compute.experts_dense, "ragged": moe_compute.experts_sorted,
           "blocked": moe_compute.experts_blocked}
    forms = {f: fns[f] for f in args.forms.split(",") if f}
    for c in filter(None, args.blocks.split(",")):
        forms[f"blocked C={int(c)}"] = functools.partial(moe_compute.experts_blocked, block=int(c))
    auto = moe_compute.resolve_impl("auto", jax.default_backend(), D, F)

    def program(fn):
        def loss(x, w, gate, up, down, probe, ids):
            return jnp.sum(fn(x, w, ids, gate, up, down) * probe)
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4)))

    a = arrays
    call_args = (a["x"], a["w"], a["gate"], a["up"], a["down"], a["probe"], ids)
    compiled, compile_s = {}, {}
    for name, fn in forms.items():
        t = time.perf_counter()
        compiled[name] = program(fn).lower(*call_args).compile()
        compile_s[name] = time.perf_counter() - t
        jax.block_until_ready(compiled[name](*call_args))  # warm-up
    times = {name: [] for name in forms}
    for _ in range(args.reps):  # interleaved: a busy machine slows every form alike
        for name, c in compiled.items():
            t = time.perf_counter()
            jax.block_until_ready(c(*call_args))
            times[name].append(time.perf_counter() - t)

    C = moe_compute.BLOCK_ROWS
    flops = 2 * N * k * D * F * 3 * 3  # 3 matmuls, forward + 2x backward, routed rows only
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}); {N} tokens, d_model {D}, "
          f"{E} experts top-{k}, expert FFN {F}, fp32; auto = {auto}; blocked default C = {C}; "
          f"{args.reps} interleaved reps")
    print("| form | fwd+bwd median ms | min ms | routed GFLOP/s (median) | vs dense | compile s |")
    print("|---|---|---|---|---|---|")
    ref = np.median(times["dense"]) if "dense" in times else None
    for name in forms:
        med = float(np.median(times[name]))
        rel = f"{ref / med:.2f}x" if ref else "-"
        tag = " (auto)" if name == auto else ""
        print(f"| {name}{tag} | {med * 1e3:.0f} | {min(times[name]) * 1e3:.0f} | {flops / med / 1e9:.1f} | {rel} | "
              f"{compile_s[name]:.1f} |", flush=True)


if __name__ == "__main__":
    main()
