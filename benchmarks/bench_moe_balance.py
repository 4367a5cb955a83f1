"""MoE load balancing: global-batch vs micro-batch balancing and expert specialization, on a CPU.

  python benchmarks/bench_moe_balance.py [--steps 150] [--seeds 0] [--aux_coef 0.01]
      [--variants micro_batch,global_exact,...] [--out runs/bench_moe_balance]

arXiv 2501.11873's headline (the recipe Qwen3 follows): computing the load-balancing loss's
expert frequencies f over the global batch instead of each micro-batch lets experts specialise
by domain, at no cost in balance and a small gain in loss. Here the small MoE (configs/cpu_smoke.gin:
4 layers, 8 experts top-2) trains on the built-in corpus's two domains, Python sources (`code`)
and their documentation (`docs`), half each, with train.micro_batches=4 (micro-batches of 2 rows)
in every variant:

  micro_batch      aux_scope='micro_batch': f per micro-batch
  global_exact     aux_scope='global', aux_global_counts='exact' (extra routing pass per step)
  global_running   global, 'running' (micro-batches 1..m, Megatron-LM)
  global_prev      global, 'previous_step' (the last step's counts)
  bias_only        aux-loss-free bias (router_bias_rate, DeepSeek-V3), no load-balancing loss
  bias_global      the bias and the global_exact loss
  none             (not run by default) neither: how unbalanced the router gets on its own

Each run goes through the library exactly as launch/train.py does (configurables.parse_gin +
run_config + loop.train). Columns: train LM loss (mean of the last 10 steps, without aux terms),
held-out loss per domain (qwen3_jax.evaluate.heldout_metrics on the documents training never saw),
worst-layer expert load (largest expert share × E of the worst layer, mean of the last 10 steps;
1 = uniform, 8 = one expert), mean step time (steps 3+, with its ratio to micro_batch: the cost
of each global-counts option) and the specialization score (qwen3_jax.expert_report: the
mean over layers of the Jensen-Shannon divergence, bits, between the code and docs routing
distributions on held-out tokens; 0 = same experts, 1 = disjoint). Results also go to
OUT/results.json; each run's workdir (metrics.jsonl, checkpoint) stays under OUT for
launch/expert_report.py.

Default (150 steps x 8 x 256 tokens, 6 variants, one seed) takes ~20-25 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VARIANTS = {
    "micro_batch": ["train.aux_scope='micro_batch'"],
    "global_exact": ["train.aux_scope='global'", "train.aux_global_counts='exact'"],
    "global_running": ["train.aux_scope='global'", "train.aux_global_counts='running'"],
    "global_prev": ["train.aux_scope='global'", "train.aux_global_counts='previous_step'"],
    "bias_only": ["train.aux_loss_coef=0.0", "train.router_bias_rate={rate}"],
    "bias_global": ["train.aux_scope='global'", "train.aux_global_counts='exact'", "train.router_bias_rate={rate}"],
    "none": ["train.aux_loss_coef=0.0"],
}
DEFAULT_VARIANTS = "micro_batch,global_exact,global_running,global_prev,bias_only,bias_global"
DOMAINS = ("code", "docs")


def bindings(args, variant: str, seed: int, data_dir: str) -> list[str]:
    common = [f"STEPS={args.steps}", f"SEQ_LEN={args.seq_len}", f"BATCH_SIZE={args.batch_size}",
              f"CHECKPOINT_EVERY={args.steps}", f"SEED={seed}", f"train.micro_batches={args.micro_batches}",
              f"train.aux_loss_coef={args.aux_coef}", "train.eval_every=0", "train.sample_every=0", "train.async_checkpoint=False",
              f"train.log_every={max(args.steps // 3, 1)}", "train.keep_last=1",
              "stage_mixture.weights={'code': 0.5, 'docs': 0.5}", f"stage_mixture.builtin_dir='{data_dir}'",
              f"lr_schedule.peak_lr={args.lr}"]
    return common + [b.format(rate=args.bias_rate) for b in VARIANTS[variant]]


def read_metrics(workdir: Path) -> list[dict]:
    rows = {}
    for line in (workdir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec.get("split") == "train":
            rows[rec["step"]] = rec
    return [rows[s] for s in sorted(rows)]


def run_one(args, variant: str, seed: int, data: dict[str, str], tokenizer, data_dir: str) -> dict:
    import gin
    import numpy as np

    from qwen3_jax import configurables
    from qwen3_jax.evaluate import heldout_metrics
    from qwen3_jax import expert_report as er
    from qwen3_jax.checkpoint import restore_params_numpy
    from qwen3_jax.train.loop import train

    workdir = Path(args.out) / f"{variant}-seed{seed}"
    if any((workdir / f).exists() for f in ("metrics.jsonl", "checkpoints", "config.gin")):
        shutil.rmtree(workdir)  # a previous run of this benchmark: start fresh, never resume
    configurables.parse_gin(["cpu_smoke.gin"], bindings(args, variant, seed, data_dir))
    model, tc = configurables.run_config()
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.gin").write_text(gin.config_str())  # as launch/train.py: expert_report reads it
    t0 = time.time()
    train(workdir, model, tc)
    train_s = time.time() - t0
    rows = read_metrics(workdir)
    last = rows[-10:]
    times = [r["step_time_s"] for r in rows[2:]] or [r["step_time_s"] for r in rows]
    cfg, flat, step, meta = restore_params_numpy(workdir)
    held = heldout_metrics(cfg, flat, data, args.seq_len, args.batch_size, args.eval_batches, tokenizer)
    bias = er.read_router_bias(workdir, step) if meta.get("router_bias") else None
    per_domain = {name: er.routing_counts(cfg, flat, path, max_tokens=args.route_tokens, seq_len=args.seq_len,
                                          batch_size=args.batch_size, router_bias=bias)[0]
                  for name, path in data.items()}
    spec = er.specialization(per_domain, er.moe_layer_ids(cfg))
    result = {"variant": variant, "seed": seed, "steps": step, "train_seconds": train_s,
              "train_loss": float(np.mean([r["lm_loss"] for r in last])),
              "final_step_loss": float(rows[-1]["lm_loss"]),
              "heldout_loss": {k: v["loss"] for k, v in held.items()},
              "heldout_tokens": {k: v["tokens"] for k, v in held.items()},
              "worst_layer_load": float(np.mean([r["expert_load_max"] for r in last])),
              "dead_experts": float(np.mean([r.get("expert_dead", 0.0) for r in last])),
              "step_time_s": float(np.mean(times)), "specialization": spec["score"],
              "js_per_layer": [r["js_mean"] for r in spec["layers"]],
              "final_load_per_layer": er.layer_loads(er.shares(np.asarray(rows[-1]["expert_counts"]))).tolist(),
              "bindings": bindings(args, variant, seed, data_dir)}
    print(f"[{variant} seed {seed}] train loss {result['train_loss']:.4f}, held-out "
          + ", ".join(f"{k} {v:.4f}" for k, v in result["heldout_loss"].items())
          + f", worst-layer load {result['worst_layer_load']:.2f}, {result['step_time_s']:.2f} s/step, "
          f"specialization {result['specialization']:.4f} ({time.time() - t0:.0f}s)", flush=True)
    return result


def table(results: list[dict]) -> str:
    base = [r["step_time_s"] for r in results if r["variant"] == "micro_batch"]
    ref = sum(base) / len(base) if base else None
    head = (f"{'variant':<15} {'seed':>4} {'train loss':>10} " + " ".join(f"{'held ' + d:>10}" for d in DOMAINS)
            + f" {'worst load':>10} {'dead':>5} {'s/step':>7} {'vs micro':>8} {'special. JS':>11}")
    lines = [head, "-" * len(head)]
    for r in results:
        rel = f"{r['step_time_s'] / ref:>7.2f}x" if ref else f"{'-':>8}"
        lines.append(f"{r['variant']:<15} {r['seed']:>4} {r['train_loss']:>10.4f} "
                     + " ".join(f"{r['heldout_loss'][d]:>10.4f}" for d in DOMAINS)
                     + f" {r['worst_layer_load']:>10.2f} {r['dead_experts']:>5.1f} {r['step_time_s']:>7.2f} {rel}"
                     f" {r['specialization']:>11.4f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--variants", default=DEFAULT_VARIANTS, help=f"comma-separated, from {', '.join(VARIANTS)}")
    p.add_argument("--aux_coef", type=float, default=0.01, help="train.aux_loss_coef of the loss variants")
    p.add_argument("--bias_rate", type=float, default=1e-3, help="train.router_bias_rate of the bias variants")
    p.add_argument("--micro_batches", type=int, default=4)
    p.add_argument("--seq_len", type=int, default=256)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-3, help="lr_schedule.peak_lr (cpu_smoke's)")
    p.add_argument("--eval_batches", type=int, default=8, help="held-out batches per domain for the loss")
    p.add_argument("--route_tokens", type=int, default=16384, help="held-out tokens per domain for the routing")
    p.add_argument("--data_dir", default=str(ROOT / "runs" / "cache" / "stdlib-corpus"),  # corpus.BUILTIN_CACHE_DIR
                   help="stage_mixture.builtin_dir: where the built-in corpus is (prepared once)")
    p.add_argument("--out", default=str(ROOT / "runs" / "bench_moe_balance"))
    args = p.parse_args(argv)
    variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants:
        print(f"error: --variants {args.variants!r}: unknown {unknown}; known: {', '.join(VARIANTS)}", file=sys.stderr)
        return 2
    for flag in ("steps", "micro_batches", "seq_len", "batch_size", "eval_batches", "route_tokens"):
        if getattr(args, flag) <= 0:
            print(f"error: --{flag} {getattr(args, flag)}: must be > 0", file=sys.stderr)
            return 2
    if args.batch_size % args.micro_batches:
        print(f"error: --batch_size {args.batch_size} is not divisible by --micro_batches {args.micro_batches}",
              file=sys.stderr)
        return 2
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

    from data_pipeline.prepare import prepare_builtin
    from data_pipeline.text_tokenizer import load_tokenizer

    parts = prepare_builtin(os.path.join(args.data_dir, "spm4096"), "spm", spm_vocab_size=4096)  # no-op once done
    data = {d: parts[d] for d in DOMAINS}
    with open(os.path.join(data["code"], "stats.json")) as f:
        tokenizer = load_tokenizer(json.load(f)["tokenizer"].partition(":")[2])
    Path(args.out).mkdir(parents=True, exist_ok=True)
    print(f"small MoE, {len(variants)} variant(s) x seeds {args.seeds}: {args.steps} steps of {args.batch_size} x "
          f"{args.seq_len} tokens, micro_batches {args.micro_batches}, aux coef {args.aux_coef}, bias rate "
          f"{args.bias_rate}; code/docs 50/50", flush=True)
    t0 = time.time()
    results = [run_one(args, v, s, data, tokenizer, args.data_dir) for s in args.seeds for v in variants]
    settings = {k: getattr(args, k) for k in ("steps", "seeds", "aux_coef", "bias_rate", "micro_batches", "seq_len",
                                                "batch_size", "lr", "eval_batches", "route_tokens")}
    out = Path(args.out) / "results.json"
    out.write_text(json.dumps({"settings": settings, "results": results, "seconds": time.time() - t0}, indent=1))
    print(f"\nsettings: {settings}")
    print(table(results))
    print(f"({time.time() - t0:.0f}s; results in {out}; per-run workdirs for launch/expert_report.py under {args.out})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
