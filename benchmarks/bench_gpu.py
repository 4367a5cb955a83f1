"""On one NVIDIA GPU: cuDNN attention against the reference, the train step's MFU through the
same builder as launch/train.py, and generation against transformers on the same GPU.

  python benchmarks/bench_gpu.py [--only attention,train,generate] [--tiny] [--out DIR]

- attention: `attention_ops.cudnn_attention` (packed documents: cuDNN's segment offsets) against
  the reference computed in fp32 from the same bf16 inputs (output and q/k/v gradients, relative
  L2 error, next to the bf16 reference's own error), and fwd+bwd time of reference / chunked /
  cudnn (median of 20 after warm-up).
- train: `qwen3_jax.train.build.build()` on one device — the program train.py compiles — for
  Qwen3 presets in bf16 compute with fp32 master weights and AdamW, attention `auto` (cuDNN),
  several remat policies. Model TFLOP/s from `metrics.flops_per_token` (the number train.py
  logs); MFU against the vendor's dense bf16 peak (989 TFLOP/s, metrics.PEAK_FLOPS) and against
  the bf16 matmul rate measured here first (a large jnp.dot).
- generate: our KV-cache Generator against transformers' generate on the same GPU. Parity in fp32
  (TF32 off on both sides): prefill logits and greedy tokens of a random 4-layer qwen3-0.6b.
  Speed in bf16: decode tokens/s of the full qwen3-0.6b shape (random weights), ours vs HF.

`--tiny` shrinks every shape so the script runs on a CPU in a minute (checks the code, not the GPU).
Results are printed as tables and written to DIR/gpu_results.json.

Measured on one NVIDIA H200 (2026-11-29; jax 0.11.2 + jax-cuda13, flax 0.12.12; one run each;
bf16 matmul measured at 647 / 661 TFLOP/s in the two runs; benchmarks/gpu_reports/*.json):

| model (train step, bf16, AdamW) | remat | tokens | step s | tokens/s | MFU (989) | MFU (647 measured) | XLA GiB |
|---|---|---|---|---|---|---|---|
| qwen3-0.6b | full | 8x4096 | 0.535 | 61,236 | 30.9% | 47.1% | 46.0 |
| qwen3-0.6b | save_attn_mlp | 8x4096 | 0.508 | 64,556 | 32.5% | 49.7% | 68.7 |
| qwen3-0.6b | none | 8x4096 | out of memory (116 GiB asked) | | | | |
| qwen3-1.7b | save_attn_mlp | 8x4096 | 0.929 | 35,286 | 41.9% | 63.9% | 96.7 |
| qwen3-30b-a3b, 4 layers, blocked experts | full | 8x4096 | 0.863 | 37,981 | 14.0% | 20.9% | 101.0 |
| qwen3-30b-a3b, 4 layers, blocked experts | full | 1x4096 | 0.175 | 23,407 | 8.6% | 12.9% | 52.8 |
| qwen3-30b-a3b, 4 layers, ragged_dot experts | full | 1x4096 | 1.127 | 3,633 | 1.3% | 2.0% | 96.3 |

ragged_dot at 8x4096 did not compile: XLA:GPU expands it into one masked copy of the rows per
expert ([128, 262144, 2048] bf16 = 128 GiB), hence `moe_impl='auto'` = blocked on GPU.

| attention, bf16, 4x4096, 16/8 heads x 128, packed rows | out err | dq | dk | dv | fwd+bwd ms | TFLOP/s |
|---|---|---|---|---|---|---|
| reference | 2.27e-03 | 2.64e-03 | 2.59e-03 | 2.49e-03 | 24.69 | 39 |
| chunked | 2.02e-03 | 2.76e-03 | 2.72e-03 | 2.49e-03 | 20.52 | 47 |
| cudnn | 2.02e-03 | 2.76e-03 | 3.43e-03 | 3.29e-03 | 2.53 | 380 |

Generation: fp32 parity with transformers on the GPU (4-layer qwen3-0.6b, 4x64 prompts, 32 greedy
tokens): last-position logits rel err 1.9e-6, 100% of tokens equal. bf16 decode of the full
qwen3-0.6b shape, 128 prompt + 256 new tokens: batch 1 369 tok/s vs transformers 29 (12.6x);
batch 32 3,969 vs 683 (5.8x).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_train import program, random_batch, timed, xla_gib  # noqa: E402  the same builders

RESULTS: dict = {}


def median_time(fn, *args, reps=20, warm=3):
    for _ in range(warm):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def matmul_rate(n: int) -> float:
    """Measured bf16 matmul FLOP/s (a [n,n] x [n,n] product on random data)."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.bfloat16)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.bfloat16)
    f = jax.jit(lambda a, b: a @ b)
    return 2 * n ** 3 / median_time(f, a, b, reps=10)


def rel(x, ref) -> float:
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(x - ref) / np.linalg.norm(ref))


# -- attention ------------------------------------------------------------------------------------

def attention_check(tiny: bool):
    from qwen3_jax.model import attention_ops as ops

    B, T, N, K, H = (1, 256, 4, 2, 64) if tiny else (4, 4096, 16, 8, 128)
    keys = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(keys[0], (B, T, N, H), jnp.bfloat16)
    k = jax.random.normal(keys[1], (B, T, K, H), jnp.bfloat16)
    v = jax.random.normal(keys[2], (B, T, K, H), jnp.bfloat16)
    do = jax.random.normal(keys[3], (B, T, N, H), jnp.bfloat16)
    # Packed rows: 1, 2, 3, ... documents of random lengths per row.
    rng = np.random.default_rng(0)
    seg = np.zeros((B, T), np.int32)
    for b in range(B):
        cuts = np.sort(rng.choice(np.arange(1, T), size=b, replace=False))
        seg[b] = np.searchsorted(cuts, np.arange(T), side="right") + 1
    seg = jnp.asarray(seg)

    def fwd_bwd(impl, dtype):
        def f(q, k, v):
            o = ops.attention(q.astype(dtype), k.astype(dtype), v.astype(dtype), seg, impl=impl, block=512)
            return o
        def g(q, k, v):
            o, vjp = jax.vjp(f, q, k, v)
            return (o,) + vjp(do.astype(o.dtype))
        return jax.jit(g)

    ref = [np.asarray(x, np.float32) for x in fwd_bwd("reference", jnp.float32)(q, k, v)]
    impls = ["reference", "chunked"] + ([] if jax.default_backend() == "cpu" else ["cudnn"])
    rows = []
    for impl in impls:
        fn = fwd_bwd(impl, jnp.bfloat16)
        out = fn(q, k, v)
        errs = [rel(o, r) for o, r in zip(out, ref)]
        dt = median_time(fn, q, k, v)
        # Causal fwd+bwd: 4 matmuls of 2*T*T*H (halved by the mask) forward, 2.5x that backward.
        flops = 3.5 * 4 * B * N * T * T * H / 2
        rows.append(dict(impl=impl, out_err=errs[0], dq_err=errs[1], dk_err=errs[2], dv_err=errs[3],
                         ms=1e3 * dt, tflops=flops / dt / 1e12))
    print(f"\nattention, bf16, B={B} T={T} N={N} K={K} H={H}, packed rows; errors vs the fp32 reference")
    print("| impl | out | dq | dk | dv | fwd+bwd ms | TFLOP/s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['impl']} | {r['out_err']:.2e} | {r['dq_err']:.2e} | {r['dk_err']:.2e} | {r['dv_err']:.2e} | "
              f"{r['ms']:.2f} | {r['tflops']:.0f} |", flush=True)
    RESULTS["attention"] = dict(shape=[B, T, N, K, H], rows=rows)


# -- train step -----------------------------------------------------------------------------------

def train_check(tiny: bool, steps: int, moe: bool = False):
    from qwen3_jax.train.metrics import PEAK_FLOPS, peak_flops

    measured = matmul_rate(512 if tiny else 8192)
    vendor = peak_flops(jax.devices()[0].device_kind) or PEAK_FLOPS["h100"]
    print(f"\nbf16 matmul measured: {measured / 1e12:.0f} TFLOP/s (vendor peak {vendor / 1e12:.0f})", flush=True)
    if tiny:
        cases = [("tiny-dense", dict(), 2, 128, "full"), ("tiny-moe", dict(), 2, 128, "full")]
    elif moe:  # expert forms on the GPU: blocked (auto) at the full batch, blocked vs ragged at a small one
        layers = dict(num_layers=4)
        cases = [("qwen3-30b-a3b", dict(layers, moe_impl="blocked"), 8, 4096, "full"),
                 ("qwen3-30b-a3b", dict(layers, moe_impl="blocked"), 1, 4096, "full"),
                 ("qwen3-30b-a3b", dict(layers, moe_impl="ragged_dot"), 1, 4096, "full")]
    else:
        cases = [("qwen3-0.6b", dict(), 8, 4096, "full"),
                 ("qwen3-0.6b", dict(), 8, 4096, "save_attn_mlp"),
                 ("qwen3-0.6b", dict(), 8, 4096, "none"),
                 ("qwen3-1.7b", dict(), 8, 4096, "save_attn_mlp"),
                 ("qwen3-30b-a3b", dict(num_layers=4), 8, 4096, "full")]
    rows = []
    print("| model | remat | batch | attention | compile s | step s | tokens/s | model TFLOP/s | MFU vendor | "
          "MFU measured | XLA GiB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for preset, over, B, T, remat in cases:
        try:
            row = train_row(preset, over, B, T, remat, steps, vendor, measured)
        except Exception as e:  # e.g. the cuDNN call refused: the same case with chunked attention
            print(f"| {preset} | {remat} | {B}x{T} | auto attention failed: {type(e).__name__}: {str(e)[:300]} |")
            try:
                row = train_row(preset, dict(over, attention_impl="chunked"), B, T, remat, steps, vendor, measured)
            except Exception as e2:  # a policy that does not fit is a row, not the end of the run
                row = dict(model=preset, remat=remat, batch=f"{B}x{T}", error=f"{type(e2).__name__}: {str(e2)[:300]}")
                print(f"| {preset} | {remat} | {B}x{T} | error: {row['error']} |", flush=True)
                rows.append(row)
                continue
        rows.append(row)
        print(f"| {row['model']} | {remat} | {row['batch']} | {row['attention']} | {row['compile_s']:.0f} | "
              f"{row['step_s']:.3f} | {row['tokens_s']:,.0f} | {row['tflops']:.0f} | {100 * row['mfu_vendor']:.1f}% | "
              f"{100 * row['mfu_measured']:.1f}% | {row['xla_gib']:.1f} |", flush=True)
    RESULTS["train"] = dict(matmul_tflops=measured / 1e12, vendor_tflops=vendor / 1e12, rows=rows)


def train_row(preset, over, B, T, remat, steps, vendor, measured) -> dict:
    """One case: the program train.py would build, compiled, 2 warm-up steps, median of `steps`."""
    from qwen3_jax.config import get_config
    from qwen3_jax.train.metrics import flops_per_token

    cfg = get_config(preset, compute_dtype="bfloat16", remat=remat, **over)
    prog = program(cfg, B, T)
    t0 = time.time()
    compiled = prog.compiled or prog.lower().compile()
    compile_s = time.time() - t0
    state = prog.init_state()
    batch = random_batch(cfg.vocab_size, B, T)
    state, _ = timed(compiled, state, batch, 2)
    state, dt = timed(compiled, state, batch, steps)
    del state
    tf = flops_per_token(cfg, T) * B * T / dt
    name = preset + (f" ({over['num_layers']} layers)" if "num_layers" in over else "")
    name += f", {cfg.moe_impl} experts" if cfg.num_experts else ""
    return dict(model=name, remat=remat, batch=f"{B}x{T}", attention=prog.attention, compile_s=compile_s,
                step_s=dt, tokens_s=B * T / dt, tflops=tf / 1e12, mfu_vendor=tf / vendor,
                mfu_measured=tf / measured, xla_gib=xla_gib(compiled))


# -- generation -----------------------------------------------------------------------------------

def random_params(cfg, seed=0):
    from qwen3_jax.params import param_specs

    rng = np.random.default_rng(seed)
    return {k: (1 + 0.1 * rng.standard_normal(s.shape) if "norm" in k else 0.02 * rng.standard_normal(s.shape))
            .astype(np.float32) for k, s in param_specs(cfg).items()}


def hf_model(params, cfg, d, dtype):
    import torch
    from transformers import AutoModelForCausalLM

    from qwen3_jax.hf import write_hf_folder

    write_hf_folder(params, cfg, f"{d}/hf", dtype="float32")
    m = AutoModelForCausalLM.from_pretrained(f"{d}/hf", dtype=dtype).eval()
    m.generation_config.eos_token_id = None
    return m.to("cuda" if torch.cuda.is_available() else "cpu")


def generate_check(tiny: bool):
    import torch

    from qwen3_jax.config import get_config
    from qwen3_jax.inference import Generator

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    out = {}
    # Parity, fp32, matmuls at full fp32 precision on both sides.
    cfg = get_config("tiny-dense" if tiny else "qwen3-0.6b", **({} if tiny else dict(num_layers=4)),
                     param_dtype="float32", compute_dtype="float32")
    params = random_params(cfg)
    B, P, N = 4, 64, 32
    prompts = np.random.default_rng(1).integers(0, cfg.vocab_size, (B, P))
    with jax.default_matmul_precision("highest"), tempfile.TemporaryDirectory() as d:
        ref = hf_model(params, cfg, d, torch.float32)
        ids = torch.tensor(prompts, device=dev)
        with torch.no_grad():
            hf_logits = ref(ids).logits[:, -1].float().cpu().numpy()
            hf_tokens = ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=N, min_new_tokens=N,
                                     do_sample=False, pad_token_id=0)[:, P:].cpu().numpy()
        from qwen3_jax.params import model_from_flat

        our_logits = np.asarray(model_from_flat(cfg, params)(jnp.asarray(prompts, jnp.int32)))[:, -1]
        gen = Generator(cfg, params, steps_per_call=N)
        ours = np.array([g.tokens for g in gen.generate(prompts.tolist(), max_new_tokens=N)])
    agree = float((ours == hf_tokens).mean())
    first_diff = [int(np.argmax(o != h)) if (o != h).any() else N for o, h in zip(ours, hf_tokens)]
    out["parity"] = dict(model=f"{cfg.num_layers}-layer {'tiny-dense' if tiny else 'qwen3-0.6b'}",
                         logits_rel_err=rel(our_logits, hf_logits), token_agreement=agree,
                         first_divergence=first_diff)
    print(f"\ngeneration parity (fp32, {out['parity']['model']}, {B}x{P} prompts, {N} greedy tokens): "
          f"last-position logits rel err {out['parity']['logits_rel_err']:.2e}, tokens equal {100 * agree:.1f}%, "
          f"first divergence per row {first_diff}", flush=True)

    # Speed, bf16.
    cfg = get_config("tiny-dense" if tiny else "qwen3-0.6b", param_dtype="bfloat16", compute_dtype="bfloat16")
    params = {k: v.astype(jnp.bfloat16) for k, v in random_params(cfg).items()}
    rows = []
    with tempfile.TemporaryDirectory() as d:
        ref = hf_model({k: np.asarray(v, np.float32) for k, v in params.items()}, cfg, d, torch.bfloat16)
        gen = Generator(cfg, params, steps_per_call=64)
        for B in ((1, 4) if tiny else (1, 32)):
            P, N = (32, 16) if tiny else (128, 256)
            prompts = np.random.default_rng(2).integers(0, cfg.vocab_size, (B, P))
            gen.generate(prompts.tolist(), max_new_tokens=N)  # compile
            stats = []
            for _ in range(2):
                gen.generate(prompts.tolist(), max_new_tokens=N)
                stats.append(dict(gen.last_stats))
            ours_decode = B * N / min(s["decode_s"] for s in stats)
            ids = torch.tensor(prompts, device=dev)

            def hf_gen(n):
                if dev == "cuda":
                    torch.cuda.synchronize()
                t = time.perf_counter()
                with torch.no_grad():
                    ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                                 do_sample=False, pad_token_id=0)
                if dev == "cuda":
                    torch.cuda.synchronize()
                return time.perf_counter() - t
            hf_gen(4)
            hf_decode = B * (N - 1) / max(min(hf_gen(N) for _ in range(2)) - min(hf_gen(1) for _ in range(2)), 1e-9)
            rows.append(dict(batch=B, prompt=P, new=N, ours_tok_s=ours_decode, hf_tok_s=hf_decode,
                             ratio=ours_decode / hf_decode))
    print("| model | batch | prompt+new | ours decode tok/s | transformers tok/s | ours/HF |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {'tiny-dense' if tiny else 'qwen3-0.6b'} bf16 | {r['batch']} | {r['prompt']}+{r['new']} | "
              f"{r['ours_tok_s']:,.0f} | {r['hf_tok_s']:,.0f} | {r['ratio']:.2f} |", flush=True)
    out["speed"] = rows
    RESULTS["generate"] = out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--only", default="attention,train,generate")
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--moe", action="store_true", help="train: the MoE expert forms (qwen3-30b-a3b, 4 layers)")
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    args = p.parse_args()
    d = jax.devices()[0]
    import flax
    RESULTS["env"] = dict(device=d.device_kind, backend=jax.default_backend(), jax=jax.__version__,
                          flax=flax.__version__)
    print(f"device: {d.device_kind} ({jax.default_backend()}), jax {jax.__version__}, flax {flax.__version__}",
          flush=True)
    failed = []
    for name, fn in (("train", lambda: train_check(args.tiny, args.steps, args.moe)),
                     ("attention", lambda: attention_check(args.tiny)),
                     ("generate", lambda: generate_check(args.tiny))):
        if name in args.only.split(","):
            try:
                fn()
            except Exception:
                traceback.print_exc()
                failed.append(name)
                RESULTS[name] = dict(error=traceback.format_exc()[-2000:])
            finally:
                with open(os.path.join(args.out, "gpu_results.json"), "w") as f:
                    json.dump(RESULTS, f, indent=1, default=str)
    if failed:
        sys.exit(f"error: bench_gpu: {', '.join(failed)} failed (tracebacks above)")


if __name__ == "__main__":
    main()
