"""Generation speed on this CPU: our KV-cache decoding (qwen3_jax.inference) vs transformers' generate.

  python benchmarks/bench_generate.py [--prompt_len 128] [--new_tokens 32] [--batches 1,8]

Models (random weights, fp32, the same weights on both sides through a Hugging Face folder):
`small-moe` (the CPU preset: 4 MoE layers, 8 experts top-2, tied) with its configured expert
kernel (`moe_impl="ragged_dot"`: `lax.ragged_dot`, slow on XLA:CPU) and with `moe_impl="dense"` (every
expert on every token as one einsum: E/k times the FLOPs, faster on CPU), and a 2-layer slice of
`qwen3-0.6b` (its real widths and 151,936-row vocabulary). Greedy, no EOS, every row the same
prompt length. Prefill tokens/s = B * prompt_len / (time to the first token's logits); decode
tokens/s = B * new_tokens / (time of the decode steps). transformers: prefill = one forward with a
fresh cache (logits of the last position only); decode = (generate with N new tokens - generate
with 1) over N - 1 tokens, which cancels generate's fixed per-call overhead. Compile time (first call
of a bucket) is reported apart and excluded. `--threads 1` (the default) runs both on one core
(XLA single-threaded, torch.set_num_threads(1)): on a box shared with other jobs, torch's OpenMP
threads spin against them and a forward on 2 threads can take many times as long as on one. KV
cache: the bytes our cache holds for the bucket (S = cache length) against 2 * layers * B * S * K *
H * bytes.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")


def _threads_from_argv(default: int = 1) -> int:
    """--threads, read before jax is imported (XLA takes its thread settings at start-up)."""
    argv = sys.argv[1:]
    for i, a in enumerate(argv):
        if a == "--threads" and i + 1 < len(argv):
            return int(argv[i + 1])
        if a.startswith("--threads="):
            return int(a.split("=", 1)[1])
    return default


THREADS = _threads_from_argv()
if THREADS == 1:  # one core each: on a shared box, multi-threaded runtimes spin against other jobs
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1").strip()


def our_run(gen, prompts, new_tokens):
    gen.generate(prompts, max_new_tokens=new_tokens)
    return dict(gen.last_stats)


def hf_prefill_time(model, ids, repeats=3):
    """One forward over the prompts that fills transformers' cache and gives the last logits."""
    import torch
    from transformers import DynamicCache

    import inspect

    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        with torch.no_grad():
            model(ids, attention_mask=torch.ones_like(ids), use_cache=True, logits_to_keep=1,
                  **{name: DynamicCache(config=model.config)})
        best = min(best, time.perf_counter() - t0)
    return best


def hf_time(model, ids, new_tokens, repeats=1):
    import torch

    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        with torch.no_grad():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                           min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        best = min(best, time.perf_counter() - t0)
    return best


def bench_model(name, cfg, batches, prompt_len, new_tokens, rows):
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    from qwen3_jax.hf import write_hf_folder
    from qwen3_jax.inference import Generator, cache_bytes, cache_bytes_formula, cache_shapes
    from qwen3_jax.params import param_specs

    cfg = cfg.replace(param_dtype="float32", compute_dtype="float32")
    rng = np.random.default_rng(0)
    params = {k: (1 + 0.1 * rng.standard_normal(s.shape) if "norm" in k else 0.02 * rng.standard_normal(s.shape))
              .astype(np.float32) for k, s in param_specs(cfg).items()}
    with tempfile.TemporaryDirectory() as d:
        write_hf_folder(params, cfg, f"{d}/hf", dtype="float32")
        ref = AutoModelForCausalLM.from_pretrained(f"{d}/hf", dtype=torch.float32).eval()
    ref.generation_config.eos_token_id = None
    gen = Generator(cfg, params, steps_per_call=new_tokens)
    for B in batches:
        prompts = rng.integers(0, cfg.vocab_size, (B, prompt_len)).tolist()
        t0 = time.perf_counter()
        our_run(gen, prompts, new_tokens)  # compiles this bucket
        compile_s = time.perf_counter() - t0
        runs = [our_run(gen, prompts, new_tokens) for _ in range(2)]
        prefill_s = min(r["prefill_s"] for r in runs)
        decode_s = min(r["decode_s"] for r in runs)
        ids = torch.tensor(prompts)
        hf_time(ref, ids, 2)  # warm up
        hf_prefill = hf_prefill_time(ref, ids)
        hf_decode = max(hf_time(ref, ids, new_tokens) - hf_time(ref, ids, 1, repeats=2), 1e-9)
        S = runs[0]["cache_len"]
        ours_p, ours_d = B * prompt_len / prefill_s, B * new_tokens / decode_s
        hf_p, hf_d = B * prompt_len / hf_prefill, B * (new_tokens - 1) / hf_decode
        held = cache_bytes(cache_shapes(cfg, B, S))
        formula = cache_bytes_formula(cfg, B, S)
        rows.append(f"| {name} | {B} | {prompt_len}+{new_tokens} | {ours_p:,.0f} | {hf_p:,.0f} | {ours_p / hf_p:.2f} | "
                    f"{ours_d:,.1f} | {hf_d:,.1f} | {ours_d / hf_d:.2f} | {compile_s:.1f} | {S} | "
                    f"{held / 2**20:.2f} | {formula / 2**20:.2f} |")
        print(rows[-1], flush=True)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--prompt_len", type=int, default=128)
    p.add_argument("--new_tokens", type=int, default=32)
    p.add_argument("--batches", default="1,8")
    p.add_argument("--threads", type=int, default=THREADS,
                   help="CPU threads for both (1: XLA single-threaded, torch.set_num_threads(1)); 0: defaults")
    args = p.parse_args()
    import jax
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)

    from qwen3_jax.config import get_config

    batches = [int(b) for b in args.batches.split(",")]
    header = ("| model | B | prompt+new | prefill tok/s ours | prefill tok/s HF | ratio | decode tok/s ours | "
              "decode tok/s HF | ratio | our compile s | cache len S | KV cache MiB | formula MiB |")
    print(f"jax {jax.__version__} on {jax.devices()[0].platform} (XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}), "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads), fp32, greedy\n")
    print(header)
    print("|---" * (header.count("|") - 1) + "|")
    rows: list[str] = []
    small = get_config("small-moe")
    bench_model("small-moe", small, batches, args.prompt_len, args.new_tokens, rows)
    bench_model("small-moe, dense experts", small.replace(moe_impl="dense"), batches, args.prompt_len,
                args.new_tokens, rows)
    bench_model("qwen3-0.6b (2 layers)", get_config("qwen3-0.6b", num_layers=2), batches, args.prompt_len,
                args.new_tokens, rows)


if __name__ == "__main__":
    main()
